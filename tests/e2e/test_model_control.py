"""Model control modes and the model repository extension, on real processes and real files."""

from __future__ import annotations

import json
import shutil
import time

import model_builders as mb
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def add_one(client, model: str, version: str = "") -> np.ndarray:
    x = np.zeros((1, 4), dtype=np.float32)
    inp = httpclient.InferInput("INPUT", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], model_version=version).as_numpy("OUTPUT")


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    mb.add_constant(r / "alpha" / "1" / "model.onnx", 1.0)
    mb.add_constant(r / "beta" / "1" / "model.onnx", 5.0)
    return r


def test_broken_models_beside_good_ones(server):
    c = httpclient.InferenceServerClient(server.http_url)
    index = {m["name"]: m for m in c.get_model_repository_index()}
    assert index["broken_config"]["state"] == "UNAVAILABLE"
    assert "config.pbtxt" in index["broken_config"]["reason"]
    assert index["broken_onnx"]["state"] == "UNAVAILABLE" and "model.onnx" in index["broken_onnx"]["reason"]
    assert index["add_sub"]["state"] == "READY"
    assert not c.is_model_ready("broken_onnx")
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}).encode()
    status, _, body = server.request("POST", "/v2/models/broken_onnx/infer", body)
    assert status == 404 and b"broken_onnx" in body
    status, _, body = server.request("POST", "/v2/repository/index", json.dumps({"ready": True}).encode())
    assert status == 200 and all(m["state"] == "READY" for m in json.loads(body))


def test_load_and_unload_refused_outside_explicit_mode(server):
    c = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException) as e:
        c.load_model("add_sub")
    assert "explicit" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        c.unload_model("add_sub")
    assert "explicit" in e.value.message()
    g = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as e:
        g.load_model("add_sub")
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"
    assert c.is_model_ready("add_sub")


def test_exit_on_error_fails_startup(start_server, test_repo):
    p = start_server(test_repo, "--exit-on-error", wait=False)
    assert p.proc.wait(60) == 1
    assert "broken_onnx" in p.log()


def test_explicit_mode_load_unload_reload(start_server, repo):
    p = start_server(repo, "--model-control-mode", "explicit", "--load-model", "alpha")
    c = httpclient.InferenceServerClient(p.http_url)
    g = grpcclient.InferenceServerClient(p.grpc_url)
    assert c.is_model_ready("alpha") and not c.is_model_ready("beta")
    index = {m["name"]: m for m in c.get_model_repository_index()}
    assert index["beta"]["state"] == "UNAVAILABLE"

    g.load_model("beta")
    np.testing.assert_array_equal(add_one(c, "beta"), np.full((1, 4), 5.0))

    # A new version on disk is picked up by loading again; the old one keeps serving until then.
    mb.add_constant(repo / "alpha" / "2" / "model.onnx", 2.0)
    np.testing.assert_array_equal(add_one(c, "alpha"), np.full((1, 4), 1.0))
    c.load_model("alpha")
    np.testing.assert_array_equal(add_one(c, "alpha"), np.full((1, 4), 2.0))
    assert c.get_model_metadata("alpha")["versions"] == ["2"]

    # A broken reload fails the call and leaves the loaded version serving.
    (repo / "alpha" / "3").mkdir()
    (repo / "alpha" / "3" / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(InferenceServerException) as e:
        c.load_model("alpha")
    assert "model.onnx" in e.value.message()
    np.testing.assert_array_equal(add_one(c, "alpha"), np.full((1, 4), 2.0))

    c.unload_model("beta")
    assert not c.is_model_ready("beta")
    with pytest.raises(InferenceServerException) as e:
        add_one(c, "beta")
    assert e.value.status() == "404"
    g.unload_model("alpha")
    assert not g.is_model_ready("alpha")


def test_explicit_load_of_missing_or_escaping_names(start_server, repo):
    outside = repo.parent / "outside"
    mb.add_constant(outside / "1" / "model.onnx", 9.0)
    p = start_server(repo, "--model-control-mode", "explicit")
    c = httpclient.InferenceServerClient(p.http_url)
    for name, status in (("ghost", 404), ("..", 400), ("../outside", 404), ("%2e%2e", 400), ("a%2fb", 400)):
        s, _, body = p.request("POST", f"/v2/repository/models/{name}/load")
        assert s == status and b"error" in body, (name, s, body)
    assert not c.is_model_ready("outside")
    assert "outside" not in {m["name"] for m in c.get_model_repository_index()}
    c.load_model("alpha")  # still works after the refusals
    assert c.is_model_ready("alpha")


def test_poll_mode_picks_up_new_changed_and_removed_models(start_server, repo):
    p = start_server(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.3")
    c = httpclient.InferenceServerClient(p.http_url)
    assert c.is_model_ready("alpha") and c.is_model_ready("beta")

    def wait_for(cond, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(0.1)
        return False

    mb.add_constant(repo / "gamma" / "1" / "model.onnx", 7.0)
    assert wait_for(lambda: c.is_model_ready("gamma"))
    np.testing.assert_array_equal(add_one(c, "gamma"), np.full((1, 4), 7.0))
    shutil.rmtree(repo / "beta")
    assert wait_for(lambda: not c.is_model_ready("beta"))
    mb.add_constant(repo / "alpha" / "2" / "model.onnx", 2.0)
    assert wait_for(lambda: c.get_model_metadata("alpha")["versions"] == ["2"])
    with pytest.raises(InferenceServerException):
        c.load_model("alpha")  # poll mode refuses explicit control


def test_two_repositories(start_server, repo, tmp_path):
    other = tmp_path / "other"
    mb.add_constant(other / "delta" / "1" / "model.onnx", 4.0)
    p = start_server([repo, other])
    c = httpclient.InferenceServerClient(p.http_url)
    np.testing.assert_array_equal(add_one(c, "delta"), np.full((1, 4), 4.0))
    np.testing.assert_array_equal(add_one(c, "alpha"), np.full((1, 4), 1.0))


def test_load_with_config_override(start_server, repo):
    p = start_server(repo, "--model-control-mode", "explicit", "--load-model", "alpha")
    c = httpclient.InferenceServerClient(p.http_url)
    assert c.get_model_config("alpha")["max_batch_size"] == 4  # auto-completed default
    with pytest.raises(InferenceServerException) as e:
        c.load_model("alpha", config='"parameters": {"config": {{"max_batch_size": "16"}}}')
    assert "failed to load" in e.value.message()
    c.load_model("alpha", config='{"max_batch_size": "16"}')
    assert c.get_model_config("alpha")["max_batch_size"] == 16
    g = grpcclient.InferenceServerClient(p.grpc_url)
    g.load_model("alpha", config='{"max_batch_size": 2}')
    assert g.get_model_config("alpha").config.max_batch_size == 2
    with pytest.raises(InferenceServerException) as e:
        c.load_model("wrong_model_name")
    assert "failed to load" in e.value.message() and e.value.status() == "404"


def test_symlinked_model_directory_is_served(start_server, repo, tmp_path):
    """An operator may link a model into the repository (Triton allows it); names still cannot escape."""
    elsewhere = tmp_path / "elsewhere" / "linked"
    mb.add_constant(elsewhere / "1" / "model.onnx", 3.0)
    (repo / "linked").symlink_to(elsewhere, target_is_directory=True)
    p = start_server(repo)
    c = httpclient.InferenceServerClient(p.http_url)
    np.testing.assert_array_equal(add_one(c, "linked"), np.full((1, 4), 3.0))
