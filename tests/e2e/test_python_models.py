"""Triton's Python backend, in process: TritonPythonModel classes served by a real `fuserve serve`,
called with the real tritonclient over HTTP and gRPC. Lifecycle, pb_utils, errors as Triton 2.51
answers them, batching of requests, BLS (and that it cannot deadlock), and refused config fields."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import python_models as pm
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import model_stats, wait_until
from model_builders import generated
from tritonclient.utils import InferenceServerException

CLIENTS = {"http": httpclient, "grpc": grpcclient}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("pyrepo")
    pm.write(repo, "pyadd", pm.ADD_SUB_CONFIG, pm.ADD_SUB)
    pm.write(repo, "pyerrors", pm.ERRORS_CONFIG, pm.ERRORS)
    pm.write(repo, "introspect", pm.INTROSPECT_CONFIG, pm.INTROSPECT)
    pm.write(repo, "autocfg", "", pm.AUTO)  # only 1/model.py
    pm.write(repo, "initfail", pm.ONE_INT_CONFIG, pm.INIT_FAILS)
    pm.write(repo, "finalizer", pm.ONE_INT_CONFIG, pm.FINALIZE)
    pm.write(repo, "bls", pm.BLS_CONFIG, pm.BLS)
    pm.write(repo, "asyncbls", pm.ASYNC_BLS_CONFIG, pm.ASYNC_BLS)
    pm.write(repo, "countdown", pm.COUNTDOWN_CONFIG, pm.COUNTDOWN.format(callee="countdown"))
    pm.write(repo, "ping", pm.COUNTDOWN_CONFIG, pm.COUNTDOWN.format(callee="pong"))
    pm.write(repo, "pong", pm.COUNTDOWN_CONFIG, pm.COUNTDOWN.format(callee="ping"))
    pm.write(repo, "stateful", pm.ONE_INT_CONFIG + "sequence_batching { iterative_sequence: true }\n", pm.FINALIZE)
    pm.write(repo, "widened", pm.ONE_INT_CONFIG, pm.WIDENED)
    generated(repo, "add_sub", "onnx_decoupled")  # decoupled is for Python models only
    cfg = repo / "onnx_decoupled" / "config.pbtxt"
    cfg.write_text(cfg.read_text() + "model_transaction_policy { decoupled: true }\n")
    pm.write(repo, "condaenv", pm.ONE_INT_CONFIG + 'parameters { key: "EXECUTION_ENV_PATH" value: '
                               '{ string_value: "$$TRITON_MODEL_DIRECTORY/env.tar.gz" } }\n', pm.FINALIZE)
    return repo


@pytest.fixture(scope="module")
def server(start_server, repo):
    return start_server(repo, "--model-control-mode", "explicit", "--load-model", "*")


def _client(protocol: str, server):
    url = server.http_url if protocol == "http" else server.grpc_url
    return CLIENTS[protocol].InferenceServerClient(url)


def _inputs(protocol: str, **arrays: np.ndarray) -> list:
    mod = CLIENTS[protocol]
    out = []
    for name, arr in arrays.items():
        datatype = "BYTES" if arr.dtype == object else {"float32": "FP32", "int32": "INT32"}[str(arr.dtype)]
        t = mod.InferInput(name, list(arr.shape), datatype)
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def _error(protocol: str, server, model: str, **arrays: np.ndarray) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        _client(protocol, server).infer(model, _inputs(protocol, **arrays))
    return info.value


def _good_add(protocol: str, server) -> None:
    """The good request after each bad one: the model and the server still serve."""
    a = np.arange(4, dtype=np.float32).reshape(1, 4)
    result = _client(protocol, server).infer("pyadd", _inputs(protocol, INPUT0=a, INPUT1=a))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + a)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_add_sub_runs_unchanged(protocol, server):
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.ones((2, 4), np.float32)
    result = _client(protocol, server).infer("pyadd", _inputs(protocol, INPUT0=a, INPUT1=b))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_execute_gets_the_requests_the_batcher_formed(server):
    """Eight concurrent requests within the queue delay reach one execute() as eight requests, each
    with its own rows (not one concatenated array)."""
    def one(i: int) -> tuple[int, np.ndarray]:
        a = np.full((1, 4), float(i), np.float32)
        result = httpclient.InferenceServerClient(server.http_url).infer("pyadd", _inputs("http", INPUT0=a, INPUT1=a))
        return int(result.as_numpy("BATCH")[0, 0]), result.as_numpy("OUTPUT0")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert max(n for n, _ in results) > 1, results  # batched together...
    for i, (_, out) in enumerate(results):  # ...and each answered with its own rows
        np.testing.assert_array_equal(out, np.full((1, 4), 2.0 * i, np.float32))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize(("mode", "http_status", "grpc_code"), [
    (1, 500, "INTERNAL"), (2, 400, "INVALID_ARGUMENT"), (3, 404, "NOT_FOUND"), (4, 503, "UNAVAILABLE"),
    (5, 501, "UNIMPLEMENTED"), (6, 400, "ALREADY_EXISTS"), (7, 400, "CANCELLED"), (8, 400, "UNKNOWN")])
def test_a_triton_error_answers_with_its_codes_status_and_the_models_text(protocol, server, mode, http_status,
                                                                          grpc_code):
    err = _error(protocol, server, "pyerrors", MODE=np.array([mode], np.int32))
    assert err.message() == f"mode {mode} fails"  # the model's text, exactly
    assert err.status() == (str(http_status) if protocol == "http" else f"StatusCode.{grpc_code}")
    _good_add(protocol, server)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_an_exception_in_execute_is_a_500_naming_the_model_and_the_exception(protocol, server):
    err = _error(protocol, server, "pyerrors", MODE=np.array([9], np.int32))
    assert err.status() == ("500" if protocol == "http" else "StatusCode.INTERNAL")
    assert "pyerrors" in err.message() and "ValueError: model.py chose to raise" in err.message()
    result = _client(protocol, server).infer("pyerrors", _inputs(protocol, MODE=np.array([0], np.int32)))
    assert result.as_numpy("OUT").tolist() == [0]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_an_output_of_another_width_comes_back_as_the_config_declares_it(protocol, server):
    result = _client(protocol, server).infer("widened", _inputs(protocol, N=np.array([21], np.int32)))
    out = result.as_numpy("OUT")
    assert out.dtype == np.int32 and out.tolist() == [21]  # numpy's int64, answered as the declared INT32
    with pytest.raises(InferenceServerException) as info:  # a value INT32 cannot hold is refused
        _client(protocol, server).infer("widened", _inputs(protocol, N=np.array([3], np.int32)),
                                        parameters={"k": 31})
    assert "OUT" in info.value.message() and "TYPE_INT32" in info.value.message(), info.value.message()


def test_get_response_sender_fails_clearly_for_a_model_that_is_not_decoupled(server):
    err = _error("http", server, "pyerrors", MODE=np.array([10], np.int32))
    assert err.status() == "500" and "decoupled" in err.message()


def test_one_error_response_in_a_batch_fails_only_that_request(server):
    """pyerrors has no batching; pyadd's batch-mates are each answered: an error for one request
    is that request's alone (checked here with the error model called concurrently)."""
    def call(mode: int):
        try:
            r = httpclient.InferenceServerClient(server.http_url).infer(
                "pyerrors", _inputs("http", MODE=np.array([mode], np.int32)))
            return r.as_numpy("OUT").tolist()
        except InferenceServerException as exc:
            return exc.message()
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, [0, 2, 0, 3, 0, 0]))
    assert results == [[0], "mode 2 fails", [0], "mode 3 fails", [0], [0]]


def test_request_accessors_args_and_parameters_are_tritons(server, repo):
    text = np.array([b"hello", b"world"], dtype=object)
    client = httpclient.InferenceServerClient(server.http_url)
    result = client.infer("introspect", _inputs("http", TEXT=text), request_id="req-7",
                          parameters={"a": 1, "b": "x", "c": True},
                          outputs=[httpclient.InferRequestedOutput("INFO")])
    info = json.loads(result.as_numpy("INFO")[0])
    assert json.loads(info["parameters"]) == {"a": 1, "b": "x", "c": True}
    assert info["id"] == "req-7" and info["correlation_id"] == 0 and info["flags"] == 0
    assert info["requested"] == ["INFO"] and info["cancelled"] is False
    args = info["args"]
    assert set(args) == {"model_config", "model_instance_kind", "model_instance_name", "model_instance_device_id",
                         "model_repository", "model_version", "model_name"}
    assert all(isinstance(v, str) for v in args.values())
    assert args["model_name"] == "introspect" and args["model_version"] == "1"
    assert args["model_repository"] == str(repo / "introspect") and args["model_instance_kind"] == "CPU"
    assert json.loads(args["model_config"])["name"] == "introspect"
    assert info["model_dir"] == str(repo / "introspect" / "1")
    # no outputs named: every output; no parameters: "{}"
    result = grpcclient.InferenceServerClient(server.grpc_url).infer("introspect", _inputs("grpc", TEXT=text))
    info = json.loads(result.as_numpy("INFO")[0])
    assert info["requested"] == ["ECHO", "INFO"] and info["parameters"] == "{}"
    assert result.as_numpy("ECHO").tolist() == [b"hello", b"world"]


def test_reserved_parameters_are_not_the_models_and_triton_keys_are_refused(server):
    status, _, body = server.request("POST", "/v2/models/introspect/infer", json.dumps({
        "parameters": {"priority": 1, "timeout": 100000, "mine": "kept"},
        "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}).encode())
    assert status == 200, body
    info = json.loads(json.loads(body)["outputs"][0]["data"][0])
    assert json.loads(info["parameters"]) == {"mine": "kept"}
    status, _, body = server.request("POST", "/v2/models/introspect/infer", json.dumps({
        "parameters": {"triton_secret": 1},
        "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}).encode())
    assert status == 400 and b"reserved for Triton" in body


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_folder_with_only_model_py_loads_by_auto_complete_config(protocol, server):
    client = _client(protocol, server)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(client.infer("autocfg", _inputs(protocol, X=x)).as_numpy("Y"), 2 * x)
    status, _, body = server.request("GET", "/v2/models/autocfg/config")
    config = json.loads(body)
    assert status == 200 and config["backend"] == "python" and config["max_batch_size"] == 4
    assert [t["name"] for t in config["input"]] == ["X"] and "dynamic_batching" in config
    status, _, body = server.request("GET", "/v2/models/autocfg")
    assert json.loads(body)["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 3]}]


def test_an_exception_in_initialize_fails_the_load_with_its_text(server):
    status, _, body = server.request("POST", "/v2/repository/models/initfail/load")
    assert status == 400 and b"RuntimeError: init boom" in body
    status, _, body = server.request("POST", "/v2/repository/index")
    row = next(r for r in json.loads(body) if r["name"] == "initfail")
    assert row["state"] == "UNAVAILABLE" and "init boom" in row["reason"]
    _good_add("http", server)


def test_finalize_runs_on_unload(server, repo):
    mark = repo / "finalizer" / "finalized"
    assert not mark.exists()
    assert server.request("POST", "/v2/repository/models/finalizer/unload")[0] == 200
    wait_until(mark.exists, 30, "finalize() to run")
    assert server.request("POST", "/v2/repository/models/finalizer/load")[0] == 200


@pytest.mark.parametrize(("model", "field"), [
    ("stateful", "sequence_batching.iterative_sequence"), ("onnx_decoupled", "model_transaction_policy.decoupled"),
    ("condaenv", "EXECUTION_ENV_PATH")])
def test_config_fields_fuserve_does_not_implement_fail_the_load_naming_them(server, model, field):
    status, _, body = server.request("POST", f"/v2/repository/models/{model}/load")
    assert status == 400 and field.encode() in body and b"not supported" in body, body
    status, _, body = server.request("POST", "/v2/repository/index")
    row = next(r for r in json.loads(body) if r["name"] == model)
    assert row["state"] == "UNAVAILABLE" and field in row["reason"]
    _good_add("http", server)


# ---- BLS ---------------------------------------------------------------------------------------

def _bls(server, target: str, protocol: str = "http") -> tuple[np.ndarray, str]:
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    result = _client(protocol, server).infer("bls", _inputs(protocol, TARGET=np.array([target.encode()], object),
                                                            X=x))
    return result.as_numpy("Y"), result.as_numpy("ERROR")[0].decode()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bls_exec_goes_through_the_callees_core(protocol, server):
    before = model_stats(server, "pyadd")["inference_stats"]["success"]["count"]
    y, error = _bls(server, "pyadd", protocol)
    assert error == ""
    np.testing.assert_array_equal(y, 2 * np.arange(4, dtype=np.float32).reshape(1, 4))
    assert model_stats(server, "pyadd")["inference_stats"]["success"]["count"] == before + 1  # the callee's stats


def test_bls_errors_come_back_as_the_responses_error_with_tritons_wording(server):
    _, error = _bls(server, "missing")
    code, message = error.split("|", 1)
    assert message.startswith("Model missing - Error when running inference: ") and "missing" in message[40:]
    assert code == "2"  # NOT_FOUND kept (Triton 2.51 reports every BLS error as INTERNAL)
    _, error = _bls(server, "pyerrors")  # the callee refuses the inputs: wrong input names
    code, message = error.split("|", 1)
    assert message.startswith("Model pyerrors - Error when running inference: ") and "INPUT0" in message
    assert code == "3"
    _good_add("http", server)


def test_async_execute_with_async_exec(server):
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    result = httpclient.InferenceServerClient(server.http_url).infer("asyncbls", _inputs("http", X=x))
    np.testing.assert_array_equal(result.as_numpy("Y"), (x + x) + (x - x))


def test_a_model_calling_itself_through_its_only_instance_does_not_deadlock(server):
    result = httpclient.InferenceServerClient(server.http_url, network_timeout=60).infer(
        "countdown", _inputs("http", N=np.array([5], np.int32)))
    assert result.as_numpy("OUT").tolist() == [5]


def test_two_models_calling_each_other_concurrently_do_not_deadlock(server):
    """ping and pong have one instance each and call each other: requests entering at both ends at
    once hold both instances while each waits on the other (a cycle Triton hangs on)."""
    def call(model: str) -> list:
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=60)
        return client.infer(model, _inputs("http", N=np.array([4], np.int32))).as_numpy("OUT").tolist()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(call, m) for m in ("ping", "pong", "ping", "pong")]
        assert [f.result(timeout=60) for f in futures] == [[4]] * 4


def test_bls_from_the_event_loop_thread_is_an_error_not_a_hang():
    """exec() on the thread running the server's event loop is answered at once with an error."""
    import asyncio

    from server.backends.python import pb_utils
    from server.frontends.bls import Bridge

    async def main():
        bridge = Bridge(service=None, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
        request = pb_utils.InferenceRequest(model_name="m", requested_output_names=["y"],
                                            inputs=[pb_utils.Tensor("x", np.zeros(1, np.float32))])
        started = time.monotonic()
        response = bridge.exec(request, False)
        return response, time.monotonic() - started

    response, took = asyncio.run(asyncio.wait_for(main(), 10))
    assert response.has_error() and "event loop" in response.error().message()
    assert took < 1.0
    assert threading.active_count() >= 1


def test_python_models_and_bls_behind_frontend_workers(start_server, repo):
    """With --frontend-workers the models run in the scheduler process; a worker forwards the
    decoded requests to it, and BLS calls are answered there."""
    workers = start_server(repo, "--frontend-workers", "1", "--model-control-mode", "explicit",
                           "--load-model", "pyadd", "--load-model", "bls")
    try:
        for protocol in ("http", "grpc"):
            _good_add(protocol, workers)
            y, error = _bls(workers, "pyadd", protocol)
            assert error == ""
            np.testing.assert_array_equal(y, 2 * np.arange(4, dtype=np.float32).reshape(1, 4))
    finally:
        workers.stop()
