"""Model files on load: Triton's `file:<relative path>` load parameters (bytes over gRPC, base64
over HTTP) load a model from files the client sends, in a private directory of their own that goes
when the model does; hostile paths are refused and leave nothing behind."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import wait_until
from model_builders import add_constant
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

CONFIG = json.dumps({"name": "sent", "platform": "onnxruntime_onnx", "max_batch_size": 4,
                     "input": [{"name": "INPUT", "data_type": "TYPE_FP32", "dims": [4]}],
                     "output": [{"name": "OUTPUT", "data_type": "TYPE_FP32", "dims": [4]}]})


@pytest.fixture(scope="module")
def onnx_bytes(tmp_path_factory) -> dict[float, bytes]:
    folder = tmp_path_factory.mktemp("sent")
    return {c: add_constant(folder / f"{c}.onnx", c).read_bytes() for c in (1.0, 2.0)}


@pytest.fixture(scope="module")
def tmpdir_of_server(tmp_path_factory):
    return tmp_path_factory.mktemp("server_tmp")


@pytest.fixture(scope="module")
def explicit(start_server, test_repo, tmpdir_of_server):
    """A server in explicit mode whose temporary directories go to a folder the tests can see."""
    return start_server(test_repo, "--model-control-mode", "explicit", env={"TMPDIR": str(tmpdir_of_server)})


def _dirs(folder) -> list[str]:
    """The model directories the server made there (other libraries keep files of their own in TMPDIR)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("fuserve_model_"))


def _plus(client, lib, constant: float) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    inp = lib.InferInput("INPUT", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("sent", [inp]).as_numpy("OUTPUT"), x + constant)


def test_a_model_sent_over_grpc_then_replaced_then_unloaded(explicit, onnx_bytes, tmpdir_of_server):
    client = grpcclient.InferenceServerClient(explicit.grpc_url)
    try:
        client.load_model("sent", config=CONFIG, files={"file:1/model.onnx": onnx_bytes[1.0]})
        assert client.is_model_ready("sent")
        _plus(client, grpcclient, 1.0)
        [first] = _dirs(tmpdir_of_server)
        assert first.startswith("fuserve_model_")
        assert (tmpdir_of_server / first / "1" / "model.onnx").read_bytes() == onnx_bytes[1.0]
        assert (tmpdir_of_server / first).stat().st_mode & 0o077 == 0  # private
        assert "sent" in [m.name for m in client.get_model_repository_index().models]

        client.load_model("sent", config=CONFIG, files={"file:1/model.onnx": onnx_bytes[2.0]})
        _plus(client, grpcclient, 2.0)
        assert len(_dirs(tmpdir_of_server)) == 1 and _dirs(tmpdir_of_server) != [first]  # the old one went

        client.unload_model("sent")
        assert not client.is_model_ready("sent")
        assert _dirs(tmpdir_of_server) == []
    finally:
        client.close()


def test_a_model_sent_over_http_as_base64(explicit, onnx_bytes, tmpdir_of_server):
    client = httpclient.InferenceServerClient(explicit.http_url)
    client.load_model("sent", config=CONFIG, files={"file:1/model.onnx": onnx_bytes[2.0]})
    try:
        _plus(client, httpclient, 2.0)
    finally:
        client.unload_model("sent")
    assert _dirs(tmpdir_of_server) == []
    body = json.dumps({"parameters": {"config": CONFIG, "file:1/model.onnx": "not base64!"}}).encode()
    status, _, reply = explicit.request("POST", "/v2/repository/models/sent/load", body)
    assert status == 400 and "is not valid base64" in json.loads(reply)["error"]
    assert _dirs(tmpdir_of_server) == []


def test_a_failed_load_leaves_nothing_and_keeps_what_served(explicit, onnx_bytes, tmpdir_of_server):
    client = grpcclient.InferenceServerClient(explicit.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="failed to load") as err:
            client.load_model("sent", config=CONFIG, files={"file:1/model.onnx": b"not an onnx model"})
        assert _dirs(tmpdir_of_server) == [] and not client.is_model_ready("sent")
        with pytest.raises(InferenceServerException, match="model file not found") as missing:
            client.load_model("sent", config=CONFIG, files={"file:1/other.bin": b"x"})
        for e in (err, missing):  # the server's private directory is not named
            assert str(tmpdir_of_server) not in str(e.value) and "fuserve_model_" not in str(e.value)
        client.load_model("sent", config=CONFIG, files={"file:1/model.onnx": onnx_bytes[1.0]})
        kept = _dirs(tmpdir_of_server)
        with pytest.raises(InferenceServerException, match="failed to load"):
            client.load_model("sent", config=CONFIG, files={"file:1/model.onnx": b"still not onnx"})
        assert _dirs(tmpdir_of_server) == kept
        _plus(client, grpcclient, 1.0)  # the loaded model goes on serving
        client.unload_model("sent")
        assert _dirs(tmpdir_of_server) == []
    finally:
        client.close()


@pytest.mark.parametrize(("path", "code", "words"), [
    ("file:" + "A" * 256, grpc.StatusCode.INTERNAL, "failed to poll from model repository"),
    ("file:1/" + "m" * 256, grpc.StatusCode.INTERNAL, "failed to poll from model repository"),
    ("file:../escape.onnx", grpc.StatusCode.INVALID_ARGUMENT, "must be a relative path within the model directory"),
    ("file:1/../../escape.onnx", grpc.StatusCode.INVALID_ARGUMENT, "no empty, '.' or '..' components"),
    ("file:/etc/escape.onnx", grpc.StatusCode.INVALID_ARGUMENT, "must be a relative path within the model directory"),
    ("file:1//model.onnx", grpc.StatusCode.INVALID_ARGUMENT, "no empty, '.' or '..' components"),
    ("file:./1/model.onnx", grpc.StatusCode.INVALID_ARGUMENT, "no empty, '.' or '..' components"),
    ("file:", grpc.StatusCode.INVALID_ARGUMENT, "must be a relative path within the model directory"),
])
def test_hostile_paths_are_refused(explicit, tmpdir_of_server, path, code, words):
    channel = grpc.insecure_channel(explicit.grpc_url)
    try:
        request = service_pb2.RepositoryModelLoadRequest(model_name="sent")
        request.parameters["config"].string_param = "{}"
        request.parameters[path].bytes_param = b"a"
        with pytest.raises(grpc.RpcError) as err:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(request, timeout=30)
        assert err.value.code() == code and words in err.value.details(), err.value.details()
        assert "failed to load 'sent'" in err.value.details()
    finally:
        channel.close()
    assert _dirs(tmpdir_of_server) == []
    assert not (tmpdir_of_server.parent / "escape.onnx").exists()
    assert httpclient.InferenceServerClient(explicit.http_url).is_server_live()


def test_files_that_collide_or_come_without_config(explicit, onnx_bytes, tmpdir_of_server):
    client = grpcclient.InferenceServerClient(explicit.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="cannot be written as given"):
            client.load_model("sent", config=CONFIG, files={"file:1": b"x", "file:1/model.onnx": onnx_bytes[1.0]})
        with pytest.raises(InferenceServerException, match="must also give the model's 'config'") as err:
            client.load_model("sent", files={"file:1/model.onnx": onnx_bytes[1.0]})
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert _dirs(tmpdir_of_server) == []
    finally:
        client.close()


def test_files_need_explicit_mode(server, onnx_bytes):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="explicit model load is not allowed") as err:
            client.load_model("sent", config=CONFIG, files={"file:1/model.onnx": onnx_bytes[1.0]})
        assert err.value.status() == "StatusCode.UNIMPLEMENTED"
    finally:
        client.close()


def test_a_load_given_up_by_its_client_leaves_nothing(explicit, onnx_bytes, tmpdir_of_server):
    """The client's deadline passes while the files are written or the model loads: whatever the
    server was doing then, no directory outlives it (unless the model did load, until its unload)."""
    files = {f"file:1/extra_{i}.bin": b"\0" * (1 << 20) for i in range(40)}
    files["file:1/model.onnx"] = onnx_bytes[1.0]
    client = grpcclient.InferenceServerClient(explicit.grpc_url)
    try:
        given_up = 0
        for timeout in (0.05, 0.2, 0.5):
            try:
                client.load_model("sent", config=CONFIG, files=files, client_timeout=timeout)
            except InferenceServerException as exc:
                assert "deadline" in str(exc).lower()  # the client's deadline, or the server's answer to it
                given_up += 1
            wait_until(lambda: len(_dirs(tmpdir_of_server)) == (1 if client.is_model_ready("sent") else 0),
                       timeout=30, what="the load to settle")
            client.unload_model("sent")
            wait_until(lambda: _dirs(tmpdir_of_server) == [], timeout=30, what="no model directory left")
        assert given_up  # 50 ms is too short for 40 MiB of files: that one, at least, was cut short
    finally:
        client.close()


def test_too_many_files_are_refused_before_anything_is_written(explicit, tmpdir_of_server):
    client = grpcclient.InferenceServerClient(explicit.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="at most 1024 files, this one has 1025") as err:
            client.load_model("sent", config=CONFIG, files={f"file:1/f{i}": b"" for i in range(1025)})
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert _dirs(tmpdir_of_server) == []
    finally:
        client.close()
