"""A bounded headless Locust run of loadtests/locustfile.py: all three users, zero failures."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import model_builders as mb
import pytest
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[2]
# Only look for locust: importing it here would gevent-monkey-patch the whole test process.
if importlib.util.find_spec("locust") is None:
    pytest.skip("locust is not installed (the test extra has it)", allow_module_level=True)


UNARY_USERS = ("V2JsonUser", "V2BinaryUser", "GrpcUser")
STREAM_USERS = ("GenerateStreamUser", "GrpcStreamUser")


def run_locust(server, seconds: int, users: int = 6, classes: tuple[str, ...] = UNARY_USERS) -> dict[str, dict]:
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), *classes, "--headless",
           "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--host", f"http://{server.http_url}",
           "--only-summary", "--json", "--exit-code-on-error", "0"]
    env = {**os.environ, "FUSERVE_MODEL": "add_sub", "FUSERVE_GRPC": server.grpc_url}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 60, cwd=ROOT)
    stats = json.loads(out.stdout)
    return {s["name"]: s for s in stats}


def test_smoke_run_has_no_failures(server):
    stats = run_locust(server, 15, users=10, classes=UNARY_USERS + STREAM_USERS)
    for name in ("v2-json", "v2-binary", "grpc"):
        assert stats[name]["num_failures"] == 0, stats[name]
        assert stats[name]["num_requests"] > 200, stats[name]
    for name in ("generate_stream", "grpc-stream"):  # the stream users: one response per add_sub request
        assert stats[name]["num_failures"] == 0, stats[name]
        assert stats[name]["num_requests"] > 20, stats[name]
        # every request's first response is timed (one more per user if the run stopped in between)
        assert 0 <= stats[f"{name} first"]["num_requests"] - stats[name]["num_requests"] <= 10, stats


def test_wrong_replies_are_counted_as_failures(start_server, tmp_path):
    """The users check the values: a model named add_sub that multiplies makes every request fail."""
    io = [helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", 16]) for n in
          ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")]
    wrong = mb._model([helper.make_node("Mul", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
                       helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])], "wrong", io[:2], io[2:])
    mb.save(wrong, tmp_path / "add_sub" / "1" / "model.onnx")
    stats = run_locust(start_server(tmp_path), 4, users=3)
    for name in ("v2-json", "v2-binary", "grpc"):
        assert stats[name]["num_requests"] > 0
        assert stats[name]["num_failures"] == stats[name]["num_requests"], stats[name]
