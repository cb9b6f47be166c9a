"""Python models with `fuserve_process_isolation`: each instance in a process of its own, tensors
through shared memory (server/backends/python/isolated.py). A real `fuserve serve`, tritonclient
over HTTP and gRPC: answers, batching, large tensors, crashes (os._exit, a segfault, SIGKILL in
flight and while idle) and restarts, the crash limit, BLS, load failures, finalize and cleanup."""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import python_models as pm
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import wait_until
from tritonclient.utils import InferenceServerException

CLIENTS = {"http": httpclient, "grpc": grpcclient}
ISOLATED = 'parameters { key: "fuserve_process_isolation" value: { string_value: "true" } }\n'
SHM = Path("/dev/shm")

# add_sub with variable-length rows, plus PID (the executing process) and BATCH (requests in the call)
ADD = '''
import os
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            a = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(r, "INPUT1").as_numpy()
            rows = (a.shape[0], 1)
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", a + b), pb_utils.Tensor("OUTPUT1", a - b),
                pb_utils.Tensor("PID", np.full(rows, os.getpid(), np.int64)),
                pb_utils.Tensor("BATCH", np.full(rows, len(requests), np.int32))]))
        return out
'''
ADD_CONFIG = '''
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] }, { name: "INPUT1", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] },
         { name: "OUTPUT1", data_type: TYPE_FP32, dims: [ -1 ] },
         { name: "PID", data_type: TYPE_INT64, dims: [ 1 ] }, { name: "BATCH", data_type: TYPE_INT32, dims: [ 1 ] } ]
dynamic_batching { max_queue_delay_microseconds: 200000 }
instance_group [ { count: 1, kind: KIND_CPU } ]
''' + ISOLATED

# MODE 0: TEXT = the request as the model saw it; 1: os._exit(1); 2: mark, then sleep (to be
# killed); 3: segfault; 4: a BLS call, TEXT = its error. PID always.
CRASH = '''
import ctypes, json, os, time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.folder = args["model_repository"]

    def execute(self, requests):
        out = []
        for r in requests:
            mode = int(pb_utils.get_input_tensor_by_name(r, "MODE").as_numpy().reshape(-1)[0])
            text = ""
            if mode == 0:
                text = json.dumps({"parameters": r.parameters(), "id": r.request_id(),
                                   "requested": sorted(r.requested_output_names())})
            elif mode == 1:
                os._exit(1)
            elif mode == 2:
                _mark(os.path.join(self.folder, "executing"))
                time.sleep(60)
            elif mode == 3:
                ctypes.string_at(0)
            elif mode == 4:
                call = pb_utils.InferenceRequest(model_name="isoadd", requested_output_names=["OUTPUT0"], inputs=[
                    pb_utils.Tensor("INPUT0", np.ones((1, 2), np.float32)),
                    pb_utils.Tensor("INPUT1", np.ones((1, 2), np.float32))])
                response = call.exec()
                text = response.error().message() if response.has_error() else "no error"
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("PID", np.array([os.getpid()], np.int64)),
                                                   pb_utils.Tensor("TEXT", np.array([text.encode()], object))]))
        return out

    def finalize(self):
        _mark(os.path.join(self.folder, "finalized"))


def _mark(path):
    """This process's pid in `path`, written whole then renamed: a test polling for the file never
    reads it empty."""
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
'''
CRASH_CONFIG = '''
backend: "python"
max_batch_size: 0
input [ { name: "MODE", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "PID", data_type: TYPE_INT64, dims: [ 1 ] }, { name: "TEXT", data_type: TYPE_STRING, dims: [ 1 ] } ]
''' + ISOLATED


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("isorepo")
    pm.write(repo, "isoadd", ADD_CONFIG, ADD)
    for name in ("isocrash", "isokill", "isoflaky"):  # one crash budget each
        pm.write(repo, name, CRASH_CONFIG, CRASH)
    pm.write(repo, "bls", pm.BLS_CONFIG, pm.BLS)  # in process, calling isoadd
    pm.write(repo, "isoinitfail", pm.ONE_INT_CONFIG + ISOLATED, pm.INIT_FAILS)
    pm.write(repo, "isoinitexit", pm.ONE_INT_CONFIG + ISOLATED, pm.INIT_FAILS.replace(
        'raise RuntimeError("init boom")', "import os; os._exit(3)"))
    return repo


@pytest.fixture(scope="module")
def server(start_server, repo):
    loads = [arg for name in ("isoadd", "isocrash", "isokill", "isoflaky", "bls") for arg in ("--load-model", name)]
    return start_server(repo, "--model-control-mode", "explicit", *loads)


def _client(protocol: str, server):
    url = server.http_url if protocol == "http" else server.grpc_url
    return CLIENTS[protocol].InferenceServerClient(url)


def _inputs(protocol: str, **arrays: np.ndarray) -> list:
    out = []
    for name, arr in arrays.items():
        datatype = {"float32": "FP32", "int32": "INT32"}[str(arr.dtype)]
        t = CLIENTS[protocol].InferInput(name, list(arr.shape), datatype)
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def _mode(server, model: str, mode: int, protocol: str = "http", **kwargs):
    return _client(protocol, server).infer(model, _inputs(protocol, MODE=np.array([mode], np.int32)), **kwargs)


def _crash(server, model: str, mode: int, protocol: str = "http") -> str:
    with pytest.raises(InferenceServerException) as info:
        _mode(server, model, mode, protocol)
    err = info.value
    assert err.status() == ("500" if protocol == "http" else "StatusCode.INTERNAL"), err
    assert "fuserve_pyiso" not in err.message()  # never a region's name
    return err.message()


def _pid(server, model: str) -> int:
    return int(_mode(server, model, 0).as_numpy("PID")[0])


def _state(pid: int) -> str:
    """'R', 'S' ..., 'Z' once it has exited (every thread: reapable), or '' once it is reaped."""
    try:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except (FileNotFoundError, ProcessLookupError):
        return ""
    state = status["State"].split()[0]
    return "Z?" if state == "Z" and int(status["Threads"]) > 1 else state  # Z?: threads still exiting


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _regions(server) -> list[str]:
    return sorted(p.name for p in SHM.glob(f"fuserve_pyiso_{server.proc.pid}_*"))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_an_isolated_model_answers_from_a_child_process(protocol, server):
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.ones((2, 4), np.float32)
    result = _client(protocol, server).infer("isoadd", _inputs(protocol, INPUT0=a, INPUT1=b))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    pid = int(result.as_numpy("PID")[0, 0])
    assert pid != server.proc.pid and _parent(pid) == server.proc.pid
    assert _regions(server)  # the instance's shared memory, named with the reserved prefix


def test_batched_requests_large_tensors_bytes_and_parameters_cross_intact(server):
    def one(i: int) -> tuple[int, np.ndarray]:
        a = np.full((1, 4), float(i), np.float32)
        result = httpclient.InferenceServerClient(server.http_url).infer("isoadd", _inputs("http", INPUT0=a, INPUT1=a))
        return int(result.as_numpy("BATCH")[0, 0]), result.as_numpy("OUTPUT0")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert max(n for n, _ in results) > 1, results  # batched together, each answered with its own rows
    for i, (_, out) in enumerate(results):
        np.testing.assert_array_equal(out, np.full((1, 4), 2.0 * i, np.float32))
    big = np.random.default_rng(0).random((2, 1 << 19), dtype=np.float32)  # 4 MiB a tensor: the regions grow
    for protocol in ("http", "grpc"):
        result = _client(protocol, server).infer("isoadd", _inputs(protocol, INPUT0=big, INPUT1=big[::-1].copy()))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), big + big[::-1])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), big - big[::-1])
    result = _mode(server, "isocrash", 0, request_id="r-1", parameters={"a": 1, "b": "x"},
                   outputs=[httpclient.InferRequestedOutput("TEXT")])
    seen = json.loads(result.as_numpy("TEXT")[0])
    assert seen == {"parameters": '{"a":1,"b":"x"}', "id": "r-1", "requested": ["TEXT"]}


@pytest.mark.parametrize(("mode", "how"), [(1, "exit code 1"), (3, "signal 11: SIGSEGV")])
def test_a_crash_fails_its_request_clearly_and_the_instance_restarts(server, mode, how):
    before = _pid(server, "isocrash")
    message = _crash(server, "isocrash", mode)
    assert message == (f"model 'isocrash' instance 'isocrash_0_0': its process exited ({how}) while executing; "
                       f"it is being restarted")
    after = _pid(server, "isocrash")  # the next request: a new process, initialized again
    assert after != before and _parent(after) == server.proc.pid
    wait_until(lambda: _state(before) == "", 10, "the crashed process to be reaped")
    assert "isocrash" in server.log() and "restarting it" in server.log()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_sigkill_in_flight_fails_that_call_and_the_instance_recovers(server, repo, protocol):
    mark = repo / "isokill" / "executing"
    mark.unlink(missing_ok=True)
    pid = _pid(server, "isokill")
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(_crash, server, "isokill", 2, protocol)
        wait_until(mark.exists, 30, "the model to be executing")
        assert int(mark.read_text()) == pid
        os.kill(pid, signal.SIGKILL)
        message = call.result(timeout=30)
    assert message == ("model 'isokill' instance 'isokill_0_0': its process exited (signal 9: SIGKILL) while "
                       "executing; it is being restarted")
    assert _pid(server, "isokill") != pid


def test_a_process_killed_while_idle_is_restarted_before_the_next_call(server):
    pid = _pid(server, "isokill")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: _state(pid) in ("Z", ""), 10, "the killed process to exit")
    new = _pid(server, "isokill")  # nothing was in flight: this call is not failed
    assert new != pid
    assert "signal 9: SIGKILL) while idle" in server.log()


def test_repeated_crashes_disable_the_instance_until_the_model_is_reloaded(server):
    pid = _pid(server, "isoflaky")
    for _ in range(4):
        assert _crash(server, "isoflaky", 1).endswith("while executing; it is being restarted")
    assert _crash(server, "isoflaky", 1, "grpc") == (
        "model 'isoflaky' instance 'isoflaky_0_0': its process exited (exit code 1) while executing; it failed 5 "
        "times within 60 s and is disabled until the model is reloaded")
    for protocol in ("http", "grpc"):  # every later call, at once, good ones too
        started = time.monotonic()
        assert _crash(server, "isoflaky", 0, protocol) == (
            "model 'isoflaky' instance 'isoflaky_0_0' is disabled: its process failed 5 times within 60 s (last: its "
            "process exited (exit code 1) while executing); reload the model to start it again")
        assert time.monotonic() - started < 5
    wait_until(lambda: _state(pid) == "", 10, "the first process to be gone")
    assert server.request("POST", "/v2/repository/models/isoflaky/unload")[0] == 200
    assert server.request("POST", "/v2/repository/models/isoflaky/load")[0] == 200
    assert _pid(server, "isoflaky") != pid  # a fresh instance, a fresh crash budget


def test_bls_from_an_isolated_model_is_an_error_response_and_to_one_works(server):
    text = _mode(server, "isocrash", 4).as_numpy("TEXT")[0].decode()
    assert "fuserve_process_isolation" in text and "needs the in-process Python backend" in text
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    target = httpclient.InferInput("TARGET", [1], "BYTES")
    target.set_data_from_numpy(np.array([b"isoadd"], object))
    result = httpclient.InferenceServerClient(server.http_url).infer("bls", [target, *_inputs("http", X=x)])
    assert result.as_numpy("ERROR")[0] == b""
    np.testing.assert_array_equal(result.as_numpy("Y"), x + x)


def test_an_exception_in_initialize_fails_the_load_with_its_text(server, repo):
    status, _, body = server.request("POST", "/v2/repository/models/isoinitfail/load")
    assert status == 400 and b"initialize() failed: RuntimeError: init boom" in body, body
    assert str(repo / "isoinitfail" / "1" / "model.py").encode() in body  # the in-process backend's text
    status, _, body = server.request("POST", "/v2/repository/index")
    row = next(r for r in json.loads(body) if r["name"] == "isoinitfail")
    assert row["state"] == "UNAVAILABLE" and "init boom" in row["reason"]


def test_unload_runs_finalize_in_the_child_and_ends_it(server, repo):
    mark = repo / "isocrash" / "finalized"
    pid = _pid(server, "isocrash")
    assert server.request("POST", "/v2/repository/models/isocrash/unload")[0] == 200
    wait_until(mark.exists, 30, "finalize() to run")
    assert int(mark.read_text()) == pid
    wait_until(lambda: _state(pid) == "", 15, "the child to exit")
    assert server.request("POST", "/v2/repository/models/isocrash/load")[0] == 200
    assert _pid(server, "isocrash") != pid


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_or_killing_the_server_leaves_no_process_or_region(start_server, repo, how):
    own = start_server(repo, "--model-control-mode", "explicit", "--load-model", "isoadd")
    a = np.ones((1, 4), np.float32)
    pid = int(_client("http", own).infer("isoadd", _inputs("http", INPUT0=a, INPUT1=a)).as_numpy("PID")[0, 0])
    assert _regions(own)
    own.proc.send_signal(how)
    own.proc.wait(30)
    wait_until(lambda: _state(pid) in ("Z", ""), 15, "the child to exit")  # its socket closed
    wait_until(lambda: not _regions(own), 15, "the regions to be unlinked")  # SIGKILL: by the resource tracker
    own.stop()


def test_a_process_exiting_in_initialize_fails_the_load(server):
    status, _, body = server.request("POST", "/v2/repository/models/isoinitexit/load")
    assert status == 400 and b"its process exited (exit code 3) while loading the model" in body, body


# ---- the instance itself, in this process (no server) ------------------------------------------

EXPAND = '''
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.repeat(
            pb_utils.get_input_tensor_by_name(r, "IN").as_numpy(), 8, axis=-1))]) for r in requests]

    def finalize(self):
        time.sleep(60)
'''
EXPAND_CONFIG = '''
backend: "python"
max_batch_size: 0
input [ { name: "IN", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "OUT", data_type: TYPE_FP32, dims: [ -1 ] } ]
''' + ISOLATED


def test_without_room_in_dev_shm_a_call_fails_clearly_and_the_next_one_works(tmp_path, monkeypatch):
    from server.backends.base import Request
    from server.backends.python import isolated
    from server.model_config import InstanceSpec, read_config

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    def _request(x: np.ndarray) -> Request:
        return Request({"IN": x}, ("OUT",), "", {}, lambda: False)

    config = read_config(pm.write(tmp_path, "expand", EXPAND_CONFIG, EXPAND))
    config.name = "expand"
    instance = isolated.IsolatedInstance(tmp_path / "expand" / "1" / "model.py", config,
                                         InstanceSpec("expand_0_0", "KIND_CPU", -1))
    monkeypatch.setattr(isolated, "CLOSE_TIMEOUT_S", 1.0)
    try:
        small = np.arange(4, dtype=np.float32)
        assert instance.execute_requests([_request(small)])[0]["OUT"].tolist() == np.repeat(small, 8).tolist()
        big = np.ones(1 << 17, np.float32)  # 512 KiB fits the 1 MiB request region; its 4 MiB output does not
        with monkeypatch.context() as m:
            m.setattr(isolated.os, "posix_fallocate", full)
            with pytest.raises(isolated.BackendError, match="not enough shared memory for its outputs"):
                instance.execute_requests([_request(big)])  # the response region cannot grow
            with pytest.raises(isolated.BackendError, match="not enough shared memory for 2097152 bytes"):
                instance.execute_requests([_request(np.ones(1 << 19, np.float32))])  # nor the request region
        np.testing.assert_array_equal(instance.execute_requests([_request(big)])[0]["OUT"], np.repeat(big, 8))
        pid = instance.pid
    finally:
        started = time.monotonic()
        instance.close()  # its finalize() sleeps: killed after CLOSE_TIMEOUT_S
    assert time.monotonic() - started < 8 and _state(pid) == ""
    assert not list(SHM.glob(f"fuserve_pyiso_{os.getpid()}_*"))
