"""Ensembles (`platform: "ensemble"`) against a real `fuserve serve`: Python -> ONNX -> Python,
any subset of outputs (an intermediate tensor that is also an output included), a step's error with
its own status, metadata, config and statistics, and the load-time refusals naming the step."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import python_models as pm
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import model_stats
from model_builders import generated
from tritonclient.utils import InferenceServerException

CLIENTS = {"http": httpclient, "grpc": grpcclient}
A = np.arange(16, dtype=np.int32).reshape(1, 16)
B = np.full((1, 16), 3, dtype=np.int32)


def _variant(old: str, new: str) -> str:
    assert old in pm.ENSEMBLE_CONFIG
    return pm.ENSEMBLE_CONFIG.replace(old, new)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("ensrepo")
    generated(repo, "add_sub")
    pm.write(repo, "plus_one", pm.STEP_CONFIG, pm.PLUS_ONE)
    pm.write(repo, "times_two", pm.STEP_CONFIG, pm.TIMES_TWO)
    pm.write(repo, "pipeline", pm.ENSEMBLE_CONFIG)
    pm.write(repo, "ens_missing", _variant('model_name: "times_two"', 'model_name: "nonexistent"'))
    pm.write(repo, "ens_cycle", _variant('input_map { key: "IN" value: "A" }', 'input_map { key: "IN" value: "FINAL" }')
             .replace('input [ { name: "A", data_type: TYPE_INT32, dims: [ 16 ] }, ', 'input [ '))
    pm.write(repo, "ens_dangling", _variant('value: "B" }', 'value: "NOWHERE" }')
             .replace('{ name: "B", data_type: TYPE_INT32, dims: [ 16 ] } ]', '{ name: "Bx", data_type: TYPE_INT32, '
                                                                                'dims: [ 16 ] } ]'))
    # a step whose model returns half of what its config declares: the next step's checks catch it
    pm.write(repo, "half_width", pm.STEP_CONFIG, pm.PLUS_ONE.replace('.as_numpy() + 1', '.as_numpy()[:, :8] + 1'))
    pm.write(repo, "ens_shape", _variant('model_name: "plus_one"', 'model_name: "half_width"'))
    pm.write(repo, "ens_dtype", _variant('{ name: "B", data_type: TYPE_INT32', '{ name: "B", data_type: TYPE_FP32'))
    return repo


@pytest.fixture(scope="module")
def server(start_server, repo):
    # explicit mode, only the ensemble named: its step models are loaded with it, as Triton does
    return start_server(repo, "--model-control-mode", "explicit", "--load-model", "pipeline")


def _infer(protocol: str, server, outputs: list[str] | None = None, a: np.ndarray = A):
    mod = CLIENTS[protocol]
    inputs = []
    for name, arr in (("A", a), ("B", B)):
        t = mod.InferInput(name, list(arr.shape), "INT32")
        t.set_data_from_numpy(arr)
        inputs.append(t)
    url = server.http_url if protocol == "http" else server.grpc_url
    wanted = [mod.InferRequestedOutput(n) for n in outputs] if outputs else None
    return mod.InferenceServerClient(url).infer("pipeline", inputs, outputs=wanted)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_python_onnx_python_ensemble(protocol, server):
    result = _infer(protocol, server)
    np.testing.assert_array_equal(result.as_numpy("SUM"), (A + 1) + B)
    np.testing.assert_array_equal(result.as_numpy("FINAL"), 2 * ((A + 1) + B))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("wanted", [["FINAL"], ["SUM"], ["SUM", "FINAL"]])
def test_any_subset_of_outputs_including_an_intermediate_one(protocol, server, wanted):
    """SUM is an ensemble output and also the last step's input: Triton 2.51 answers a request for
    only one of them with "unexpected deadlock"."""
    result = _infer(protocol, server, wanted)
    expected = {"SUM": (A + 1) + B, "FINAL": 2 * ((A + 1) + B)}
    for name in ("SUM", "FINAL"):
        if name in wanted:
            np.testing.assert_array_equal(result.as_numpy(name), expected[name])
        else:
            assert result.as_numpy(name) is None


def test_only_the_steps_a_subset_needs_run(server):
    before = model_stats(server, "times_two")["inference_stats"]["success"]["count"]
    _infer("http", server, ["SUM"])
    assert model_stats(server, "times_two")["inference_stats"]["success"]["count"] == before


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_steps_error_keeps_its_status_and_names_the_ensemble(protocol, server):
    def bad():
        with pytest.raises(InferenceServerException) as info:
            _infer(protocol, server, a=np.full((1, 16), -10, np.int32))
        return info.value

    with ThreadPoolExecutor(4) as pool:  # neighbours at the same time are unharmed
        goods = [pool.submit(_infer, protocol, server) for _ in range(3)]
        err = bad()
        for g in goods:
            np.testing.assert_array_equal(g.result(timeout=30).as_numpy("SUM"), (A + 1) + B)
    assert err.message() == "in ensemble 'pipeline', negative input"
    assert err.status() == ("400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT")


def test_metadata_and_config_are_the_ensembles_own(server):
    status, _, body = server.request("GET", "/v2/models/pipeline")
    md = json.loads(body)
    assert status == 200 and md["platform"] == "ensemble"
    assert [t["name"] for t in md["inputs"]] == ["A", "B"] and [t["name"] for t in md["outputs"]] == ["FINAL", "SUM"]
    assert md["inputs"][0] == {"name": "A", "datatype": "INT32", "shape": [-1, 16]}
    status, _, body = server.request("GET", "/v2/models/pipeline/config")
    config = json.loads(body)
    assert [s["model_name"] for s in config["ensemble_scheduling"]["step"]] == ["plus_one", "add_sub", "times_two"]


def test_statistics_per_ensemble_and_per_composing_model(server):
    names = ("pipeline", "plus_one", "add_sub", "times_two")
    before = {n: model_stats(server, n)["inference_stats"]["success"]["count"] for n in names}
    for _ in range(3):
        _infer("http", server)
    after = {n: model_stats(server, n)["inference_stats"]["success"]["count"] for n in names}
    assert all(after[n] == before[n] + 3 for n in names), (before, after)
    stats = model_stats(server, "pipeline")
    assert stats["execution_count"] >= 3 and stats["inference_stats"]["compute_infer"]["ns"] > 0


@pytest.mark.parametrize(("model", "expected"), [
    ("ens_missing", ["step 2 (model 'nonexistent')", "not ready"]),
    ("ens_cycle", ["cycle", "step 0 (model 'plus_one')"]),
    ("ens_dangling", ["step 1 (model 'add_sub')", "NOWHERE"]),
    ("ens_dtype", ["'B'", "FP32", "step 1 (model 'add_sub')", "INT32"]),
])
def test_a_bad_ensemble_is_refused_at_load_naming_the_step(server, model, expected):
    status, _, body = server.request("POST", f"/v2/repository/models/{model}/load")
    text = json.loads(body)["error"]
    assert status == 400 and all(e in text for e in expected), text
    status, _, body = server.request("POST", "/v2/repository/index")
    row = next(r for r in json.loads(body) if r["name"] == model)
    assert row["state"] == "UNAVAILABLE" and expected[0] in row["reason"]
    np.testing.assert_array_equal(_infer("http", server).as_numpy("SUM"), (A + 1) + B)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_tensor_of_the_wrong_shape_between_steps_fails_at_the_step_that_reads_it(protocol, server):
    assert server.request("POST", "/v2/repository/models/ens_shape/load")[0] == 200
    with pytest.raises(InferenceServerException) as info:
        mod = CLIENTS[protocol]
        inputs = [mod.InferInput(n, [1, 16], "INT32") for n in ("A", "B")]
        inputs[0].set_data_from_numpy(A)
        inputs[1].set_data_from_numpy(B)
        mod.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url).infer("ens_shape", inputs)
    assert info.value.message() == ("in ensemble 'ens_shape', input 'INPUT0' has shape [1, 8]; model 'add_sub' "
                                    "expects [-1, 16]"), info.value.message()
    assert info.value.status() == ("400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT")
    np.testing.assert_array_equal(_infer(protocol, server).as_numpy("SUM"), (A + 1) + B)  # then a good one


def test_an_unloaded_step_makes_the_ensemble_answer_with_the_reason(server):
    assert server.request("POST", "/v2/repository/models/times_two/unload")[0] == 200
    try:
        with pytest.raises(InferenceServerException) as info:
            _infer("http", server)
        assert "in ensemble 'pipeline'" in info.value.message() and "times_two" in info.value.message()
        np.testing.assert_array_equal(_infer("http", server, ["SUM"]).as_numpy("SUM"), (A + 1) + B)
    finally:
        assert server.request("POST", "/v2/repository/models/times_two/load")[0] == 200


def test_at_start_up_ensembles_load_after_their_steps(start_server, repo, tmp_path):
    """In the default mode every model loads at start-up; the ensemble waits for its steps whatever
    the names' order (here it sorts first)."""
    (tmp_path / "r").mkdir()
    for name in ("add_sub", "plus_one", "times_two"):
        (tmp_path / "r" / name).symlink_to(repo / name)
    pm.write(tmp_path / "r", "a_pipeline", pm.ENSEMBLE_CONFIG)
    other = start_server(tmp_path / "r")
    try:
        status, _, body = other.request("POST", "/v2/repository/index")
        states = {r["name"]: r["state"] for r in json.loads(body)}
        assert states == dict.fromkeys(("a_pipeline", "add_sub", "plus_one", "times_two"), "READY"), states
    finally:
        other.stop()
