"""The committed server/_proto/ must be what protos/generate.py produces from protos/*.proto."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the protos")
    r = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_wire_compatible_with_tritonclient():
    """Same package, messages and field numbers as Triton's own generated code."""
    from tritonclient.grpc import service_pb2 as theirs

    from server._proto import grpc_service_pb2 as ours

    for name in ("ModelInferRequest", "ModelInferResponse", "ModelStreamInferResponse", "ModelConfigResponse",
                 "ModelStatisticsResponse", "RepositoryIndexResponse"):
        a, b = getattr(ours, name).DESCRIPTOR, getattr(theirs, name).DESCRIPTOR
        assert a.full_name == b.full_name
        assert {f.name: f.number for f in b.fields}.items() <= {f.name: f.number for f in a.fields}.items()
    assert ours.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name == "inference.GRPCInferenceService"
