"""`--frontend-workers N`: N worker processes serve HTTP and gRPC, one scheduler process owns the
models, batchers, statistics and model control. Everything a client sees must be what the single
process gives, and the batcher must be shared: requests arriving through different workers batch
together."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import model_builders as mb
import numpy as np
import pytest
import python_models as pm
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import cancel_queued_grpc_call, wait_until
from conftest import model_stats as stats
from tritonclient.utils import InferenceServerException

W = mb.ECHO_WIDTH


def worker_pids(server) -> list[int]:
    """The live frontend workers of `server` (its child processes running server.frontend_worker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:  # a process may exit between listing and reading: read each file once, skip it if gone
            cmdline = (entry / "cmdline").read_bytes()
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError, IndexError):
            continue
        if int(ppid) == server.proc.pid and b"server.frontend_worker" in cmdline and state != "Z":
            pids.append(int(entry.name))
    return sorted(pids)


def gather_table(path: Path) -> Path:
    """VAL = TABLE[IDX] with TABLE = 0, 10, ..., 90 and IDX int64 [-1, 1]: onnxruntime fails a batch
    with an index outside -10..9."""
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.arange(10, dtype=np.float32) * 10, "TABLE")
    node = helper.make_node("Gather", ["TABLE", "IDX"], ["VAL"], axis=0)
    return mb.save(mb._model([node], "gather", [helper.make_tensor_value_info("IDX", TensorProto.INT64, ["N", 1])],
                             [helper.make_tensor_value_info("VAL", TensorProto.FLOAT, ["N", 1])], [table]), path)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("workers_repo")
    mb.generated(repo, "add_sub")
    mb.generated(repo, "add_sub", as_name="gathered")  # one batch of 8, however long it takes to gather
    cfg = repo / "gathered" / "config.pbtxt"
    cfg.write_text(cfg.read_text() + "dynamic_batching { preferred_batch_size: [8] "
                                      "max_queue_delay_microseconds: 20000000 }\n")
    gather_table(repo / "gather" / "1" / "model.onnx")
    mb.write_config(repo / "gather", 'platform: "onnxruntime_onnx"\nmax_batch_size: 64\ndynamic_batching { }\n'
                                     'parameters { key: "fuserve_batch_learning" value: { string_value: "false" } }\n')
    pm.write(repo, "repeat", pm.REPEAT_CONFIG, pm.REPEAT)  # decoupled
    mb.echo_slow(repo / "slow" / "1" / "model.onnx", matmuls=1000)
    mb.write_config(repo / "slow", 'platform: "onnxruntime_onnx"\nmax_batch_size: 1\ndynamic_batching { }\n'
                                   'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n')
    return repo


@pytest.fixture(scope="module")
def server(start_server, repo):
    return start_server(repo, "--frontend-workers", "2", "--model-control-mode", "explicit", "--load-model", "*")


def add_sub_inputs(mod, k: int, **binary):
    a = np.arange(16, dtype=np.int32).reshape(1, 16) + k
    b = np.full((1, 16), 3, dtype=np.int32)
    inputs = [mod.InferInput("INPUT0", [1, 16], "INT32"), mod.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(a, **binary)
    inputs[1].set_data_from_numpy(b, **binary)
    return inputs, a + b, a - b


def test_workers_serve_every_protocol(server):
    assert len(worker_pids(server)) == 2

    def one(k: int) -> None:
        mod = (httpclient, grpcclient)[k % 2]
        client = mod.InferenceServerClient(server.http_url if mod is httpclient else server.grpc_url)
        try:
            binary = {"binary_data": k % 4 == 0} if mod is httpclient else {}  # V2 JSON and binary
            inputs, plus, minus = add_sub_inputs(mod, k, **binary)
            result = client.infer("add_sub", inputs)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), plus)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), minus)
        finally:
            client.close()

    before = stats(server, "add_sub")["inference_count"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(64)))
    assert stats(server, "add_sub")["inference_count"] == before + 64  # counted in one place


def test_requests_through_different_workers_batch_together(server):
    """8 connections: with per-worker batchers, one batch of 8 would need all 8 on one worker (1 in
    128 by SO_REUSEPORT's hashing); the shared batcher forms it at once, well inside its 20 s delay."""
    before = stats(server, "gathered")
    results: dict[int, np.ndarray] = {}

    def one(k: int) -> None:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            inputs, plus, _ = add_sub_inputs(httpclient, k)
            results[k] = client.infer("gathered", inputs).as_numpy("OUTPUT0") - plus
        finally:
            client.close()

    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert time.monotonic() - start < 15
    assert sorted(results) == list(range(8)) and all(not r.any() for r in results.values())
    after = stats(server, "gathered")
    assert after["inference_count"] == before["inference_count"] + 8
    assert after["execution_count"] == before["execution_count"] + 1


def _answered(answers: queue.Queue, k: int, result, error) -> None:
    answers.put((k, result, error))


def test_a_worker_groups_requests_and_each_gets_its_own_answer(server):
    """64 calls at once on one gRPC connection reach one worker a few at a time, and it sends those of
    one read to the scheduler as a group, queued and executed as one request (fuserve_grouped counts
    them). Each call still gets its own rows and id back, and is counted as a request; a call the
    model fails on fails alone: its group's execution fails, and the members run again one by one."""
    bad = {7, 40}
    for _ in range(5):  # until some calls travelled grouped (how many arrive in one read is the kernel's)
        before = stats(server, "gather")
        client = grpcclient.InferenceServerClient(server.grpc_url)
        answers: queue.Queue = queue.Queue()
        try:
            for k in range(64):
                idx = grpcclient.InferInput("IDX", [1, 1], "INT64")
                idx.set_data_from_numpy(np.array([[99 if k in bad else k % 10]], dtype=np.int64))
                client.async_infer("gather", [idx], functools.partial(_answered, answers, k), request_id=f"call-{k}")
            got = [answers.get(timeout=30) for _ in range(64)]
        finally:
            client.close()
        assert sorted(k for k, _, _ in got) == list(range(64))
        for k, result, error in got:
            if k in bad:
                assert result is None and "failed to execute" in str(error), (k, error)
            else:
                assert error is None, (k, error)
                np.testing.assert_array_equal(result.as_numpy("VAL"), [[k % 10 * 10.0]])
                assert result.get_response().id == f"call-{k}"
        after = stats(server, "gather")
        assert after["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"] + 62
        assert after["inference_stats"]["fail"]["count"] == before["inference_stats"]["fail"]["count"] + 2
        assert after["inference_count"] == before["inference_count"] + 62
        if after["fuserve_grouped"] > before["fuserve_grouped"]:
            break
    else:
        pytest.fail("no call travelled in a group in 5 bursts of 64")


def test_other_requests_are_answered_by_the_scheduler(server):
    http = httpclient.InferenceServerClient(server.http_url)
    grpcc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert http.is_server_ready() and grpcc.is_server_ready()
        assert http.get_model_metadata("add_sub")["inputs"][0]["name"] == "INPUT0"
        assert grpcc.get_model_metadata("add_sub").inputs[0].name == "INPUT0"
        assert grpcc.get_model_config("add_sub").config.max_batch_size == 8
        names = {m["name"] for m in http.get_model_repository_index()}
        assert names == {"add_sub", "gather", "gathered", "repeat", "slow"}
        grpcc.unload_model("add_sub")
        wait_until(lambda: not http.is_model_ready("add_sub"), what="add_sub unloaded")
        assert not grpcc.is_model_ready("add_sub")
        inputs, _, _ = add_sub_inputs(httpclient, 0)
        with pytest.raises(InferenceServerException) as e:
            http.infer("add_sub", inputs)
        assert e.value.status() == "404"
        http.load_model("add_sub")
        assert grpcc.is_model_ready("add_sub")
    finally:
        http.close()
        grpcc.close()


def test_errors_keep_their_status_through_a_worker(server):
    status, _, body = server.request("POST", "/v2/models/nope/infer", json.dumps({"inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))}]}).encode())
    assert status == 404 and "nope" in json.loads(body)["error"]
    status, _, body = server.request("POST", "/v2/models/add_sub/infer", json.dumps({"inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]}).encode())
    assert status == 400 and "error" in json.loads(body)
    status, _, body = server.request("POST", "/v2/models/add_sub/infer", b"{not json")
    assert status == 400
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        inputs, _, _ = add_sub_inputs(grpcclient, 0)
        with pytest.raises(InferenceServerException) as e:
            client.infer("nope", inputs)
        assert e.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as e:
            client.get_model_metadata("nope")
        assert e.value.status() == "StatusCode.NOT_FOUND" and "nope" in e.value.message()
    finally:
        client.close()


def test_stream_infer_through_a_worker(server):
    replies: list = []
    done = threading.Event()

    def callback(result, error):
        replies.append((result, error))
        if len(replies) == 5:
            done.set()

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.start_stream(callback)
        for k in range(4):
            inputs, _, _ = add_sub_inputs(grpcclient, k)
            client.async_stream_infer("add_sub", inputs, request_id=str(k))
        client.async_stream_infer("nope", add_sub_inputs(grpcclient, 9)[0], request_id="bad")
        assert done.wait(30)
        client.stop_stream()
    finally:
        client.close()
    good = sorted(r.get_response().id for r, e in replies if e is None)
    assert good == ["0", "1", "2", "3"]
    assert sum(1 for _, e in replies if e is not None and "nope" in e.message()) == 1


def test_a_decoupled_model_streams_through_a_worker_and_unary_endpoints_refuse_it(server):
    """The worker link carries a decoupled model's replies part by part (tests/e2e/test_decoupled.py
    and test_generate.py run whole through workers too); the unary endpoints refuse it as in one process."""
    replies: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    t = grpcclient.InferInput("IN", [2], "INT32")
    t.set_data_from_numpy(np.array([1, 2], np.int32))
    try:
        client.start_stream(lambda result, error: replies.put((result, error)))
        client.async_stream_infer("repeat", [t], request_id="d", enable_empty_final_response=True)
        got = [replies.get(timeout=30) for _ in range(3)]
        client.stop_stream()
    finally:
        client.close()
    assert all(e is None for _, e in got), got
    assert [r.as_numpy("OUT").tolist() for r, _ in got[:2]] == [[1], [2]]
    assert [r.get_response().parameters["triton_final_response"].bool_param for r, _ in got] == [False, False, True]
    h = httpclient.InferInput("IN", [1], "INT32")
    h.set_data_from_numpy(np.array([1], np.int32))
    with pytest.raises(InferenceServerException) as info:
        httpclient.InferenceServerClient(server.http_url).infer("repeat", [h])
    assert info.value.status() == "501" and "decoupled" in info.value.message()


def test_a_cancelled_call_drops_its_queued_request(server):
    """RST_STREAM at a worker reaches the scheduler: the queued request is dropped, never executed."""
    before = stats(server, "slow")

    def blocker() -> None:
        x = [httpclient.InferInput("INPUT", [1, 3], "FP32"), httpclient.InferInput("WORK", [1, W], "FP32")]
        x[0].set_data_from_numpy(np.ones((1, 3), np.float32))
        x[1].set_data_from_numpy(np.zeros((1, W), np.float32))
        httpclient.InferenceServerClient(server.http_url).infer("slow", x)

    t = threading.Thread(target=blocker)
    t.start()
    wait_until(lambda: stats(server, "slow")["fuserve_executing"] > 0, what="the blocker executing")

    asyncio.run(cancel_queued_grpc_call(server, "slow"))
    t.join(60)
    after = stats(server, "slow")
    assert after["fuserve_cancelled"] == before["fuserve_cancelled"] + 1
    assert after["inference_count"] == before["inference_count"] + 1  # only the blocker ran


def test_a_killed_worker_is_replaced(server):
    old = worker_pids(server)
    os.kill(old[0], signal.SIGKILL)
    wait_until(lambda: len(worker_pids(server)) == 2 and old[0] not in worker_pids(server), timeout=30,
               what="a new worker")
    wait_until(lambda: "frontend worker" in server.log() and "starting another" in server.log(), what="the log")
    time.sleep(1.0)  # the new worker starts listening
    for k in range(20):  # new connections land on either worker
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            inputs, plus, _ = add_sub_inputs(httpclient, k)
            np.testing.assert_array_equal(client.infer("add_sub", inputs).as_numpy("OUTPUT0"), plus)
        finally:
            client.close()


def test_sigterm_stops_the_workers_too(start_server, repo):
    p = start_server(repo, "--frontend-workers", "2", "--model-control-mode", "explicit", "--load-model", "add_sub")
    pids = worker_pids(p)
    assert len(pids) == 2
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(60) == 0
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue  # gone
        assert state == "Z", f"worker {pid} still running after the server exited"
