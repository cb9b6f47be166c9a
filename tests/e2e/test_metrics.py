"""/metrics against a real server, parsed with prometheus-client's own parser."""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import model_builders as mb
import numpy as np
import pytest
import tritonclient.http as httpclient
from conftest import wait_until
from test_batching import echo_model, http_inputs, stats
from tritonclient.utils import InferenceServerException

FAKE_NVML = '''
"""A stand-in for nvidia-ml-py's pynvml: two GPUs with fixed readings."""
class _Mem:
    def __init__(self, total, used): self.total, self.used = total, used
class _Util:
    def __init__(self, gpu): self.gpu = gpu
def nvmlInit(): pass
def nvmlShutdown(): pass
def nvmlDeviceGetCount(): return 2
def nvmlDeviceGetHandleByIndex(i): return i
def nvmlDeviceGetUUID(h): return "GPU-fake-%d" % h
def nvmlDeviceGetMemoryInfo(h): return _Mem(80 * 2**30, (h + 1) * 2**30)
def nvmlDeviceGetUtilizationRates(h): return _Util(25 * (h + 1))
def nvmlDeviceGetPowerUsage(h): return 150000 + h * 1000       # milliwatts
def nvmlDeviceGetEnforcedPowerLimit(h): return 700000
def nvmlDeviceGetTotalEnergyConsumption(h): return 5000000 + h  # millijoules
'''


@pytest.fixture(scope="module")
def metrics_server(start_server, tmp_path_factory):
    repo = tmp_path_factory.mktemp("metrics_repo")
    mb.generated(repo, "add_sub")
    mb.generated(repo, "add_sub_string")
    echo_model(repo, "batched", "dynamic_batching { }", matmuls=50)
    echo_model(repo, "bounded", "dynamic_batching { default_queue_policy { max_queue_size: 1 } }",
               matmuls=1000, mbs=1)
    echo_model(repo, "timeouts", "dynamic_batching { default_queue_policy { default_timeout_microseconds: 2000 } }",
               matmuls=500, mbs=1)
    return start_server(repo, "--metrics-interval-ms", "200")


def value(families: dict, name: str, **labels) -> float:
    """One sample's value. The parser names counter samples `<family>_total`; histogram samples
    are `<family>_bucket`, `_count` and `_sum`."""
    for family in families.values():
        for s in family.samples:
            if s.name in (name, name + "_total") and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{name} {labels}")


def add_sub(client, rows: int = 1):
    a = np.ones((rows, 16), dtype=np.int32)
    ins = [httpclient.InferInput("INPUT0", [rows, 16], "INT32"), httpclient.InferInput("INPUT1", [rows, 16], "INT32")]
    for i in ins:
        i.set_data_from_numpy(a)
    return client.infer("add_sub", ins)


def test_triton_names_types_and_labels(metrics_server):
    m = metrics_server.metrics()
    for name, kind in (("nv_inference_request_success", "counter"), ("nv_inference_request_failure", "counter"),
                       ("nv_inference_count", "counter"), ("nv_inference_exec_count", "counter"),
                       ("nv_inference_request_duration_us", "counter"), ("nv_inference_queue_duration_us", "counter"),
                       ("nv_inference_compute_input_duration_us", "counter"),
                       ("nv_inference_compute_infer_duration_us", "counter"),
                       ("nv_inference_compute_output_duration_us", "counter"),
                       ("nv_inference_pending_request_count", "gauge"), ("nv_model_load_duration_secs", "gauge"),
                       ("fuserve_request_duration_ms", "histogram"), ("fuserve_batch_size", "histogram")):
        assert m[name].type == kind, name
    assert {(s.labels["model"], s.labels["version"]) for s in m["nv_inference_count"].samples} == {
        ("add_sub", "1"), ("add_sub_string", "1"), ("batched", "1"), ("bounded", "1"), ("timeouts", "1")}
    reasons = {s.labels["reason"] for s in m["nv_inference_request_failure"].samples}
    assert reasons == {"REJECTED", "CANCELED", "BACKEND", "OTHER"}
    assert value(m, "nv_model_load_duration_secs", model="add_sub") > 0
    # Triton's exact exposition: counter samples carry no `_total` suffix.
    conn = http.client.HTTPConnection("127.0.0.1", metrics_server.metrics_port)
    conn.request("GET", "/metrics")
    raw = conn.getresponse().read().decode()
    assert "# TYPE nv_inference_request_success counter\n" in raw
    assert '\nnv_inference_count{model="add_sub",version="1"} ' in raw and "_total{" not in raw


def test_counters_rise_by_exactly_the_traffic(metrics_server):
    c = httpclient.InferenceServerClient(metrics_server.http_url)
    before = metrics_server.metrics()
    for rows in (1, 2, 3):
        add_sub(c, rows)
    after = metrics_server.metrics()

    def delta(name, **labels):
        return value(after, name, model="add_sub", **labels) - value(before, name, model="add_sub", **labels)

    assert delta("nv_inference_request_success") == 3
    assert delta("nv_inference_count") == 6
    assert delta("nv_inference_exec_count") == 3
    assert delta("nv_inference_request_duration_us") > 0
    assert delta("fuserve_request_duration_ms_count") == 3
    assert delta("fuserve_queue_duration_ms_count") == 3
    assert delta("fuserve_batch_size_count") == 3 and delta("fuserve_batch_size_sum") == 6
    assert delta("fuserve_request_duration_ms_bucket", le="+Inf") == 3


def test_failures_are_counted_with_their_reason(metrics_server):
    server = metrics_server
    c = httpclient.InferenceServerClient(server.http_url)
    before = server.metrics()

    # OTHER: a request to a loaded model that fails validation
    bad = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 16), dtype=np.float32))
    with pytest.raises(InferenceServerException):
        c.infer("add_sub", [bad])
    # BACKEND: the model's execution fails
    s0, s1 = httpclient.InferInput("INPUT0", [1, 16], "BYTES"), httpclient.InferInput("INPUT1", [1, 16], "BYTES")
    s0.set_data_from_numpy(np.array([[b"x"] * 16], dtype=object))
    s1.set_data_from_numpy(np.array([[b"1"] * 16], dtype=object))
    with pytest.raises(InferenceServerException):
        c.infer("add_sub_string", [s0, s1])
    # REJECTED: timed out in the queue behind a running request
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda _: _try(server, "timeouts"), range(2)))
    assert sorted(outcomes) == [200, 503]
    # REJECTED: queue full; CANCELED: a queued request whose client disconnects
    done = threading.Event()
    t = threading.Thread(target=lambda: (_try(server, "bounded"), done.set()))
    t.start()
    wait_until(lambda: stats(server, "bounded")["fuserve_executing"] > 0 or done.is_set(), what="the blocker")
    assert not done.is_set()
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port)
    body = json.dumps({"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 1], "data": [1]},
                                  {"name": "WORK", "datatype": "FP32", "shape": [1, mb.ECHO_WIDTH],
                                   "data": [0] * mb.ECHO_WIDTH}]}).encode()
    conn.request("POST", "/v2/models/bounded/infer", body)
    wait_until(lambda: stats(server, "bounded")["fuserve_pending"] > 0 or done.is_set(), what="queued")
    assert not done.is_set()
    assert _try(server, "bounded") == 503  # queue (max_queue_size 1) is full
    conn.close()  # the queued request's client goes away
    t.join(60)
    canceled_before = value(before, "nv_inference_request_failure", model="bounded", reason="CANCELED")
    wait_until(lambda: value(server.metrics(), "nv_inference_request_failure", model="bounded",
                             reason="CANCELED") > canceled_before, what="the cancellation")
    after = server.metrics()

    def failures(model, reason):
        return (value(after, "nv_inference_request_failure", model=model, reason=reason)
                - value(before, "nv_inference_request_failure", model=model, reason=reason))

    assert failures("add_sub", "OTHER") == 1
    assert failures("add_sub_string", "BACKEND") == 1
    assert failures("timeouts", "REJECTED") == 1
    assert failures("bounded", "REJECTED") == 1
    assert failures("bounded", "CANCELED") == 1
    assert failures("add_sub", "BACKEND") == 0 and failures("add_sub", "REJECTED") == 0


def _try(server, model: str) -> int:
    c = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    try:
        c.infer(model, http_inputs(np.ones((1, 3), dtype=np.float32)))
        return 200
    except InferenceServerException as e:
        return int(e.status())


def test_exec_count_below_inference_count_under_batching(metrics_server):
    before = metrics_server.metrics()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda _: _try(metrics_server, "batched"), range(64)))
    after = metrics_server.metrics()
    infers = value(after, "nv_inference_count", model="batched") - value(before, "nv_inference_count", model="batched")
    execs = (value(after, "nv_inference_exec_count", model="batched")
             - value(before, "nv_inference_exec_count", model="batched"))
    assert infers == 64 and execs < 64
    sizes = value(after, "fuserve_batch_size_sum", model="batched") - value(before, "fuserve_batch_size_sum",
                                                                           model="batched")
    assert sizes == 64


def test_unknown_model_names_add_no_label_sets(metrics_server):
    before = metrics_server.metrics()
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [0] * 16}]})
    for k in range(50):  # well-formed requests, so each one reaches the model lookup
        status, _, reply = metrics_server.request("POST", f"/v2/models/ghost{k}/infer", body.encode())
        assert status == 404 and f"ghost{k}".encode() in reply
    after = metrics_server.metrics()
    assert sum(len(f.samples) for f in after.values() if f.name.startswith(("nv_inference", "fuserve"))) == \
        sum(len(f.samples) for f in before.values() if f.name.startswith(("nv_inference", "fuserve")))
    assert not any("ghost" in str(s.labels) for f in after.values() for s in f.samples)


def test_host_gauges_and_no_gpu_here(metrics_server):
    deadline = time.monotonic() + 10
    while "nv_cpu_utilization" not in (m := metrics_server.metrics()):
        assert time.monotonic() < deadline
    assert 0.0 <= value(m, "nv_cpu_utilization") <= 1.0
    assert value(m, "nv_cpu_memory_total_bytes") > value(m, "nv_cpu_memory_used_bytes") > 0
    assert not any(name.startswith("nv_gpu") for name in m)
    assert metrics_server.log().count("GPU metrics disabled") == 1


def test_gpu_gauges_from_an_injected_nvml(start_server, tmp_path):
    fake = tmp_path / "fake_nvml"
    fake.mkdir()
    (fake / "pynvml.py").write_text(FAKE_NVML)
    repo = tmp_path / "repo"
    mb.generated(repo, "add_sub")
    p = start_server(repo, "--metrics-interval-ms", "100", env={"PYTHONPATH": str(fake)})
    deadline = time.monotonic() + 10
    while "nv_gpu_utilization" not in (m := p.metrics()):
        assert time.monotonic() < deadline
    assert value(m, "nv_gpu_utilization", gpu_uuid="GPU-fake-0") == 0.25
    assert value(m, "nv_gpu_utilization", gpu_uuid="GPU-fake-1") == 0.5
    assert value(m, "nv_gpu_memory_total_bytes", gpu_uuid="GPU-fake-1") == 80 * 2**30
    assert value(m, "nv_gpu_memory_used_bytes", gpu_uuid="GPU-fake-1") == 2 * 2**30
    assert value(m, "nv_gpu_power_usage", gpu_uuid="GPU-fake-1") == 151.0
    assert value(m, "nv_gpu_power_limit", gpu_uuid="GPU-fake-0") == 700.0
    assert value(m, "nv_energy_consumption", gpu_uuid="GPU-fake-0") == 5000.0
    assert m["nv_energy_consumption"].type == "counter"


def test_metrics_can_be_turned_off(start_server, tmp_path):
    repo = tmp_path / "repo"
    mb.generated(repo, "add_sub")
    p = start_server(repo, "--allow-metrics", "false")
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", p.metrics_port, timeout=5).request("GET", "/metrics")
    assert p.request("GET", "/v2/health/ready")[0] == 200


def test_docs_and_dashboard_name_only_real_metrics(metrics_server):
    import re
    from pathlib import Path

    docs = Path(__file__).resolve().parents[2] / "docs"
    exported = set(metrics_server.metrics())
    gpu = {"nv_gpu_utilization", "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes", "nv_gpu_power_usage",
           "nv_gpu_power_limit", "nv_energy_consumption"}  # exported in test_gpu_gauges_from_an_injected_nvml
    text = (docs / "metrics.md").read_text()
    for name in exported | gpu:
        assert f"`{name}`" in text, f"{name} is not documented in docs/metrics.md"
    dashboard = json.loads((docs / "grafana" / "fuserve-dashboard.json").read_text())
    tokens = {m for p in dashboard["panels"] for t in p["targets"]
              for m in re.findall(r"\b(?:nv|fuserve)_[a-z_]+\b", t["expr"])}
    used = {t if t in exported else re.sub(r"_(bucket|sum|count)$", "", t) for t in tokens}
    assert used and used <= exported | gpu, used - exported - gpu
