"""A model repository root that is one model, as KServe's storage initializer leaves /mnt/models:
a bare model file (no config.pbtxt: auto-complete), or one model's directory with versions."""

from __future__ import annotations

import os

import numpy as np
import tritonclient.http as httpclient
from model_builders import add_constant, write_config


def _plus(server, model: str, constant: float) -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    inp = httpclient.InferInput("INPUT", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer(model, [inp]).as_numpy("OUTPUT"), x + constant)


def _shadows() -> set[str]:
    return {p for p in os.listdir(os.environ.get("TMPDIR", "/tmp")) if p.startswith("fuserve_repo_")}


def test_a_bare_model_file_is_served_under_the_root_s_name(start_server, tmp_path):
    root = tmp_path / "mnt_models"
    add_constant(root / "model.onnx", 2.0)  # what the storage initializer leaves: the file alone
    before = _shadows()
    server = start_server(root)
    _plus(server, "mnt_models", 2.0)
    assert httpclient.InferenceServerClient(server.http_url).get_model_metadata("mnt_models")["versions"] == ["1"]
    assert "serving" in server.log() and "as the model 'mnt_models'" in server.log()
    assert server.stop() == 0
    assert _shadows() == before  # the private directory went with the server
    assert sorted(p.name for p in root.iterdir()) == ["model.onnx"]  # nothing written beside the file


def test_fuserve_model_name_and_a_model_directory_with_versions(start_server, tmp_path):
    root = tmp_path / "models"
    add_constant(root / "1" / "model.onnx", 1.0)
    add_constant(root / "3" / "model.onnx", 3.0)
    write_config(root, 'platform: "onnxruntime_onnx"\nmax_batch_size: 4\nversion_policy: { all: {} }\n')
    server = start_server(root, env={"FUSERVE_MODEL_NAME": "add-constant"})  # KServe's runtime sets it
    _plus(server, "add-constant", 3.0)
    client = httpclient.InferenceServerClient(server.http_url)
    assert client.get_model_metadata("add-constant")["versions"] == ["1", "3"]
    assert client.get_model_config("add-constant")["max_batch_size"] == 4  # its config.pbtxt was read


def test_a_triton_repository_is_still_a_repository(server):
    assert httpclient.InferenceServerClient(server.http_url).is_model_ready("add_sub")
