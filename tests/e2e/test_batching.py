"""Dynamic batching and scheduling against a real server: batches form, rows never mix, nothing is lost."""

from __future__ import annotations

import asyncio
import http.client
import json
import queue
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import model_builders as mb
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpcclient
import tritonclient.http as httpclient
from conftest import cancel_queued_grpc_call, wait_until
from conftest import model_stats as stats
from tritonclient.utils import InferenceServerException

W = mb.ECHO_WIDTH
BASE = 'platform: "onnxruntime_onnx"\nmax_batch_size: {mbs}\n' \
       'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "1" }} }}\n'


def echo_model(repo, name: str, config: str, matmuls: int = 100, mbs: int = 8) -> None:
    mb.echo_slow(repo / name / "1" / "model.onnx", matmuls=matmuls)
    mb.write_config(repo / name, BASE.format(mbs=mbs) + config)


@pytest.fixture(scope="module")
def batching_server(start_server, tmp_path_factory):
    repo = tmp_path_factory.mktemp("batching_repo")
    echo_model(repo, "batched", "dynamic_batching { }")
    echo_model(repo, "unbatched", "")
    echo_model(repo, "preferred", "dynamic_batching { preferred_batch_size: [4] "
                                  "max_queue_delay_microseconds: 5000000 }", matmuls=20)
    echo_model(repo, "delayed", "dynamic_batching { max_queue_delay_microseconds: 50000 }\n"  # Triton's rule
               'parameters { key: "fuserve_batch_learning" value: { string_value: "false" } }', matmuls=5)
    echo_model(repo, "bounded", "dynamic_batching { default_queue_policy { max_queue_size: 2 } }",
               matmuls=1000, mbs=1)
    echo_model(repo, "timeouts", "dynamic_batching { default_queue_policy { default_timeout_microseconds: 5000 "
                                 "allow_timeout_override: true } }", matmuls=200, mbs=1)
    echo_model(repo, "priorities", "dynamic_batching { priority_levels: 2 default_priority_level: 2 "
                                   "priority_queue_policy { key: 1 value: { timeout_action: DELAY "
                                   "default_timeout_microseconds: 1000 } } }", matmuls=200, mbs=1)
    echo_model(repo, "ranked", "dynamic_batching { priority_levels: 2 default_priority_level: 2 }",
               matmuls=200, mbs=1)
    mb.generated(repo, "add_sub_string")
    (repo / "add_sub_string" / "config.pbtxt").write_text(
        (repo / "add_sub_string" / "config.pbtxt").read_text() + "dynamic_batching { }\n")
    mb.generated(repo, "add_sub_string", as_name="strings_gathered")  # batches of exactly 4
    (repo / "strings_gathered" / "config.pbtxt").write_text(
        (repo / "strings_gathered" / "config.pbtxt").read_text()
        + "dynamic_batching { preferred_batch_size: [4] max_queue_delay_microseconds: 20000000 }\n")
    return start_server(repo)


def http_inputs(data: np.ndarray, mod=httpclient):
    x = mod.InferInput("INPUT", list(data.shape), "FP32")
    x.set_data_from_numpy(data)
    w = mod.InferInput("WORK", [data.shape[0], W], "FP32")
    w.set_data_from_numpy(np.zeros((data.shape[0], W), dtype=np.float32))
    return [x, w]


def payload(k: int) -> np.ndarray:
    rows = 1 + k % 3  # requests of 1, 2 and 3 rows
    width = 3 + k % 2  # two kinds of non-batch dims: they must not be batched together
    return (np.arange(rows * width, dtype=np.float32).reshape(rows, width) + 1000 * k)


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(batching_server):
    server = batching_server
    before = stats(server, "batched")
    n_threads, n_async = 48, 48

    def one(k: int) -> None:
        c = httpclient.InferenceServerClient(server.http_url)
        data = payload(k)
        got = c.infer("batched", http_inputs(data)).as_numpy("OUTPUT")
        np.testing.assert_array_equal(got, data)

    async def many_grpc() -> None:
        c = aiogrpcclient.InferenceServerClient(server.grpc_url)
        try:
            ks = list(range(n_threads, n_threads + n_async))
            results = await asyncio.gather(*(c.infer("batched", http_inputs(payload(k), aiogrpcclient)) for k in ks))
            for k, r in zip(ks, results, strict=True):
                np.testing.assert_array_equal(r.as_numpy("OUTPUT"), payload(k))
        finally:
            await c.close()

    with ThreadPoolExecutor(n_threads) as pool:
        futures = [pool.submit(one, k) for k in range(n_threads)]
        asyncio.run(many_grpc())
        for f in futures:
            f.result()
    after = stats(server, "batched")
    rows = sum(payload(k).shape[0] for k in range(n_threads + n_async))
    assert after["inference_count"] - before["inference_count"] == rows
    executions = after["execution_count"] - before["execution_count"]
    assert executions < n_threads + n_async, after["fuserve_batch_cost"]  # requests shared executions
    assert max(b["batch_size"] for b in after["batch_stats"]) > 1
    assert all(b["batch_size"] <= 8 for b in after["batch_stats"])


def test_without_dynamic_batching_each_request_runs_alone(batching_server):
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: httpclient.InferenceServerClient(batching_server.http_url).infer(
            "unbatched", http_inputs(payload(k))), range(8)))
    s = stats(batching_server, "unbatched")
    assert s["execution_count"] == 8
    assert {b["batch_size"] for b in s["batch_stats"]} <= {1, 2, 3}  # one request's rows each


def test_preferred_batch_size_is_formed_when_enough_requests_wait(batching_server):
    # max_queue_delay is 5 s: only reaching the preferred size (4 rows) dispatches early.
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda k: httpclient.InferenceServerClient(batching_server.http_url).infer(
            "preferred", http_inputs(np.full((1, 3), k, dtype=np.float32))).as_numpy("OUTPUT"), range(4)))
    for k, r in enumerate(results):
        np.testing.assert_array_equal(r, np.full((1, 3), k))
    s = stats(batching_server, "preferred")
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in s["batch_stats"]] == [(4, 1)]
    assert s["inference_stats"]["queue"]["ns"] / 4 < 4_000_000_000  # nobody waited out the 5 s delay


def test_lone_request_waits_at_most_the_queue_delay(batching_server):
    c = httpclient.InferenceServerClient(batching_server.http_url)
    for _ in range(3):
        c.infer("delayed", http_inputs(np.ones((1, 3), dtype=np.float32)))
    s = stats(batching_server, "delayed")
    queue_ns = s["inference_stats"]["queue"]["ns"] / s["inference_stats"]["queue"]["count"]
    assert 40_000_000 <= queue_ns <= 50_000_000 + 20_000_000, queue_ns  # the 50 ms delay, not more


def test_full_queue_rejects_at_once_and_admitted_requests_succeed(batching_server):
    outcomes: queue.Queue = queue.Queue()

    def one(k: int) -> None:
        c = httpclient.InferenceServerClient(batching_server.http_url)
        try:
            c.infer("bounded", http_inputs(np.full((1, 3), k, dtype=np.float32)))
            outcomes.put("ok")
        except InferenceServerException as e:
            outcomes.put((e.status(), e.message()))

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(one, range(10)))
    results = [outcomes.get() for _ in range(10)]
    ok = [r for r in results if r == "ok"]
    rejected = [r for r in results if r != "ok"]
    assert len(ok) >= 3 and rejected  # one executing + two queued are admitted
    assert all(r[0] == "503" and "queue is full" in r[1] for r in rejected), rejected


def test_queue_timeout_rejects_and_client_may_shorten_it(batching_server):
    c = grpcclient.InferenceServerClient(batching_server.grpc_url)
    replies: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        data = np.ones((1, 3), dtype=np.float32)
        c.async_stream_infer("timeouts", http_inputs(data, grpcclient), request_id="first")
        c.async_stream_infer("timeouts", http_inputs(data, grpcclient), request_id="second")
        got = [replies.get(timeout=60) for _ in range(2)]
    finally:
        c.stop_stream()
    errors = [e for _, e in got if e is not None]
    assert len(errors) == 1 and "timed out in the queue" in errors[0].message()
    # A client timeout longer than the policy's is ignored (it may only shorten)...
    h = httpclient.InferenceServerClient(batching_server.http_url)
    h.infer("timeouts", http_inputs(data), timeout=10_000_000)
    s = stats(batching_server, "timeouts")
    assert s["inference_stats"]["fail"]["count"] == 1


def stream_order(server, model: str, requests: list[tuple[str, int]]) -> list[str]:
    """Send requests (id, priority) on one stream, in order; return ids in reply order."""
    c = grpcclient.InferenceServerClient(server.grpc_url)
    replies: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        for rid, priority in requests:
            c.async_stream_infer(model, http_inputs(np.ones((1, 3), dtype=np.float32), grpcclient),
                                 request_id=rid, priority=priority)
        order = []
        for _ in requests:
            result, error = replies.get(timeout=60)
            assert error is None, error
            order.append(result.get_response().id)
        return order
    finally:
        c.stop_stream()


def test_priority_order(batching_server):
    order = stream_order(batching_server, "ranked", [("blocker", 0), ("low1", 2), ("low2", 0), ("high", 1)])
    assert order == ["blocker", "high", "low1", "low2"]


def test_delay_timeout_action_moves_request_behind(batching_server):
    # Level 1 requests time out after 1 ms with DELAY: while the blocker runs, "urgent" times out
    # and is served after the level-2 request that has not timed out.
    order = stream_order(batching_server, "priorities", [("blocker", 0), ("urgent", 1), ("normal", 2)])
    assert order == ["blocker", "normal", "urgent"]


def test_cancelled_queued_request_never_executes(batching_server):
    server = batching_server
    before = stats(server, "bounded")
    body_json = json.dumps({"inputs": [
        {"name": "INPUT", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
        {"name": "WORK", "datatype": "FP32", "shape": [1, W], "data": [0] * W}]}).encode()
    request = (b"POST /v2/models/bounded/infer HTTP/1.1\r\nHost: x\r\nContent-Length: "
               + str(len(body_json)).encode() + b"\r\n\r\n" + body_json)
    done = threading.Event()

    statuses = []

    def blocker() -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
            conn.request("POST", "/v2/models/bounded/infer", body_json)
            statuses.append(conn.getresponse().status)
        finally:
            done.set()

    t = threading.Thread(target=blocker)
    t.start()
    # until the blocker occupies the only instance
    wait_until(lambda: stats(server, "bounded")["fuserve_executing"] > 0 or done.is_set(), what="the blocker")
    assert not done.is_set(), statuses
    with socket.create_connection(("127.0.0.1", server.http_port)) as s:
        s.sendall(request)
        wait_until(lambda: stats(server, "bounded")["fuserve_pending"] > 0 or done.is_set(), what="queued")
        assert not done.is_set(), "the blocker finished before the request was seen queued"
    t.join(60)
    assert statuses == [200]
    after = stats(server, "bounded")
    assert after["fuserve_cancelled"] == before["fuserve_cancelled"] + 1
    assert after["inference_count"] == before["inference_count"] + 1  # only the blocker ran
    assert after["fuserve_pending"] == 0


def test_backend_failure_fails_only_its_batch(batching_server):
    c = httpclient.InferenceServerClient(batching_server.http_url)

    def strings(values):
        a = httpclient.InferInput("INPUT0", [1, 16], "BYTES")
        b = httpclient.InferInput("INPUT1", [1, 16], "BYTES")
        a.set_data_from_numpy(np.array([values], dtype=object))
        b.set_data_from_numpy(np.array([[b"1"] * 16], dtype=object))
        return [a, b]

    with pytest.raises(InferenceServerException) as e:
        c.infer("add_sub_string", strings([b"not a number"] * 16))
    assert e.value.status() == "500" and "failed to execute" in e.value.message()
    ok = c.infer("add_sub_string", strings([b"2"] * 16))
    assert ok.as_numpy("OUTPUT0")[0][0] in (b"3", "3")


def test_a_request_the_model_rejects_fails_alone_in_its_batch(batching_server):
    """Four requests form one batch; one holds text that is not a number, so the batch fails. Each
    request is then run alone: that one gets the 500, the other three their sums."""
    before = stats(batching_server, "strings_gathered")
    results: dict = {}

    def one(k: int) -> None:
        c = httpclient.InferenceServerClient(batching_server.http_url)
        a = httpclient.InferInput("INPUT0", [1, 16], "BYTES")
        b = httpclient.InferInput("INPUT1", [1, 16], "BYTES")
        a.set_data_from_numpy(np.array([[b"oops" if k == 2 else str(k).encode()] * 16], dtype=object))
        b.set_data_from_numpy(np.array([[b"1"] * 16], dtype=object))
        try:
            results[k] = c.infer("strings_gathered", [a, b]).as_numpy("OUTPUT0")[0][0]
        except InferenceServerException as exc:
            results[k] = exc

    threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(results[2], InferenceServerException) and results[2].status() == "500"
    assert [results[k] for k in (0, 1, 3)] in ([b"1", b"2", b"4"], ["1", "2", "4"])
    after = stats(batching_server, "strings_gathered")
    assert after["execution_count"] - before["execution_count"] == 1  # they did run as one batch first


def test_sigterm_with_a_full_queue_answers_every_admitted_request(start_server, tmp_path):
    echo_model(tmp_path, "busy", "dynamic_batching { }", matmuls=1000, mbs=2)
    p = start_server(tmp_path, "--exit-timeout-secs", "60")
    statuses: queue.Queue = queue.Queue()

    def one(k: int) -> None:
        c = httpclient.InferenceServerClient(p.http_url, network_timeout=120)
        try:
            c.infer("busy", http_inputs(np.full((1, 3), k, dtype=np.float32)))
            statuses.put(200)
        except InferenceServerException as e:
            statuses.put(int(e.status()))

    threads = [threading.Thread(target=one, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    def seen(s: dict) -> int:  # requests queued, executing or answered
        return s["fuserve_pending"] + s["fuserve_executing"] + s["inference_stats"]["success"]["count"]

    wait_until(lambda: seen(stats(p, "busy")) >= 12, what="every request admitted")
    assert stats(p, "busy")["fuserve_pending"] > 0  # ...and some still wait in the queue
    p.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert [statuses.get() for _ in range(12)] == [200] * 12
    assert p.proc.wait(60) == 0


def occupy_bounded(server) -> threading.Thread:
    """Starts one long request on `bounded` (one instance, batch 1) and waits until it executes, so the
    next request waits in the queue."""
    done = threading.Event()

    def blocker() -> None:
        try:
            httpclient.InferenceServerClient(server.http_url).infer("bounded", http_inputs(np.ones((1, 3), np.float32)))
        finally:
            done.set()

    t = threading.Thread(target=blocker)
    t.start()
    wait_until(lambda: stats(server, "bounded")["fuserve_executing"] > 0 or done.is_set(), what="the blocker")
    assert not done.is_set()
    return t


def test_grpc_cancel_drops_the_queued_request(batching_server):
    """A client that cancels its call (HTTP/2 RST_STREAM) gets its queued request dropped, not run."""
    server = batching_server
    before = stats(server, "bounded")
    t = occupy_bounded(server)

    asyncio.run(cancel_queued_grpc_call(server, "bounded"))
    t.join(60)
    wait_until(lambda: stats(server, "bounded")["fuserve_pending"] == 0, what="an empty queue")
    after = stats(server, "bounded")
    assert after["fuserve_cancelled"] == before["fuserve_cancelled"] + 1
    assert after["inference_count"] == before["inference_count"] + 1  # only the blocker ran


def test_grpc_deadline_cancels_the_queued_request(batching_server):
    server = batching_server
    before = stats(server, "bounded")
    t = occupy_bounded(server)
    c = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as e:
        c.infer("bounded", http_inputs(np.ones((1, 3), np.float32), grpcclient), client_timeout=0.02)
    assert "Deadline" in str(e.value.status()) or "DEADLINE" in str(e.value.status())
    t.join(60)
    wait_until(lambda: stats(server, "bounded")["fuserve_pending"] == 0, what="an empty queue")
    after = stats(server, "bounded")
    assert after["fuserve_cancelled"] == before["fuserve_cancelled"] + 1
    assert after["inference_count"] == before["inference_count"] + 1  # only the blocker ran
