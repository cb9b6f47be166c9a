"""SIGTERM with requests in flight: every admitted request is answered, new ones get 503, exit 0."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time

import model_builders as mb
import pytest

WIDTH = 1024


@pytest.fixture
def slow_repo(tmp_path):
    repo = tmp_path / "repo"
    mb.slow(repo / "slow" / "1" / "model.onnx", matmuls=300, width=WIDTH)
    mb.write_config(repo / "slow", 'platform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
                    'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n')
    return repo


def test_sigterm_drains_requests_in_flight(start_server, slow_repo):
    p = start_server(slow_repo, "--exit-timeout-secs", "60")
    body = json.dumps({"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, WIDTH],
                                   "data": [0.01] * WIDTH}]}).encode()
    results: dict[int, int] = {}
    first_done = threading.Event()

    def call(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", p.http_port, timeout=120)
        conn.request("POST", "/v2/models/slow/infer", body)
        resp = conn.getresponse()
        resp.read()
        results[k] = resp.status
        first_done.set()

    threads = [threading.Thread(target=call, args=(k,)) for k in range(5)]
    for t in threads:
        t.start()
    # One instance runs them one at a time: once the first is answered, the rest are queued in flight.
    assert first_done.wait(60)
    in_flight = 5 - len(results)
    p.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while p.request("GET", "/v2/health/ready")[0] == 200:  # readiness turns false first
        assert time.monotonic() < deadline
    assert in_flight >= 2, "the model ran too fast for this test to have requests in flight"
    status, _, refused = p.request("POST", "/v2/models/slow/infer", body)
    assert status == 503 and b"shutting down" in refused
    for t in threads:
        t.join(120)
    assert results == {k: 200 for k in range(5)}
    assert p.proc.wait(60) == 0
    assert "shutting down" in p.log()


def test_sigint_idle_server_exits_zero(start_server, slow_repo):
    p = start_server(slow_repo)
    p.proc.send_signal(signal.SIGINT)
    assert p.proc.wait(30) == 0
