"""Batch sizes learned from measured cost, and the latency-target mode, against a real server: a
Python model whose cost per batch size the test sets, driven by tritonclient."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import python_models as pm
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import model_stats as stats
from tritonclient.utils import InferenceServerException

# Sleeps for the batch's cost: FIXED seconds a batch plus PER_ROW a row up to CHEAP_UP_TO rows, DEAR
# a row beyond. ROWS says how many rows the batch that answered a request had.
COSTED = '''
import time
import numpy as np
import triton_python_backend_utils as pb_utils

FIXED, PER_ROW, CHEAP_UP_TO, DEAR = {fixed}, {per_row}, {cheap_up_to}, {dear}


class TritonPythonModel:
    def execute(self, requests):
        xs = [pb_utils.get_input_tensor_by_name(r, "X").as_numpy() for r in requests]
        rows = sum(x.shape[0] for x in xs)
        time.sleep(FIXED + rows * PER_ROW if rows <= CHEAP_UP_TO else rows * DEAR)
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("Y", x * 2), pb_utils.Tensor("ROWS", np.full((x.shape[0], 1), rows, np.int32))])
            for x in xs]
'''
CONFIG = '''
backend: "python"
max_batch_size: 16
input [ { name: "X", data_type: TYPE_FP32, dims: [ 2 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ 2 ] }, { name: "ROWS", data_type: TYPE_INT32, dims: [ 1 ] } ]
dynamic_batching { }
instance_group [ { count: 1, kind: KIND_CPU } ]
'''


def param(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    repo = tmp_path_factory.mktemp("learned_repo")
    cheap_at_two = COSTED.format(fixed=0.002, per_row=0.001, cheap_up_to=2, dear=0.006)
    pm.write(repo, "learned", CONFIG, cheap_at_two)
    pm.write(repo, "greedy", CONFIG + param("fuserve_batch_learning", "false"), cheap_at_two)
    pm.write(repo, "targeted", CONFIG + param("fuserve_latency_target_ms", "100"),
             COSTED.format(fixed=0.0, per_row=0.02, cheap_up_to=16, dear=0.02))
    return start_server(repo)


def drive(url: str, model: str, clients: int, each: int, mod=httpclient) -> list:
    """`clients` threads, each sending `each` one-row requests one after another: the rows each
    answer's batch had, or the InferenceServerException."""
    timeout = {"client_timeout": 60} if mod is grpcclient else {}  # HTTP: the client's own 60 s

    def one(c: int) -> list:
        client = mod.InferenceServerClient(url)
        got = []
        for k in range(each):
            x = np.full((1, 2), c * 1000 + k, dtype=np.float32)
            inp = mod.InferInput("X", [1, 2], "FP32")
            inp.set_data_from_numpy(x)
            try:
                r = client.infer(model, [inp], **timeout)
                assert (r.as_numpy("Y") == 2 * x).all()  # its own row back
                got.append(int(r.as_numpy("ROWS")[0, 0]))
            except InferenceServerException as exc:
                got.append(exc)
        client.close()
        return got

    with ThreadPoolExecutor(clients) as pool:
        return [x for part in pool.map(one, range(clients)) for x in part]


def test_batches_settle_where_rows_cost_least_and_the_curve_is_shown(server):
    rows = drive(server.http_url, "learned", 12, 25)
    assert all(isinstance(r, int) for r in rows)
    late = rows[len(rows) // 2:]
    assert sum(r == 2 for r in late) >= 0.7 * len(late), rows  # 2 ms a row at 2, 6 ms beyond
    cost = stats(server, "learned")["fuserve_batch_cost"]
    assert cost["learning"] and cost["batch_size"] == 2
    buckets = {b["batch_size"]: b for b in cost["buckets"]}
    assert buckets[2]["rows_per_second"] > buckets[3]["rows_per_second"]
    families = server.metrics()
    target = [s for s in families["fuserve_batch_size_target"].samples if s.labels["model"] == "learned"]
    assert [s.value for s in target] == [2.0]
    learned = {s.labels["batch_size"]: s.value for s in families["fuserve_batch_cost_us"].samples
               if s.labels["model"] == "learned" and s.labels["version"] == "1"}
    assert set(learned) == {str(b) for b in buckets} and learned["2"] == buckets[2]["mean_us"]


def test_learning_off_takes_everything_queued(server):
    rows = drive(server.http_url, "greedy", 12, 10)
    assert all(isinstance(r, int) for r in rows)
    # Triton's rule: all that waited, though 6 ms a row beyond 2 (learning would form 2, or 3 while
    # it measures that bucket)
    assert max(rows) >= 5, rows
    cost = stats(server, "greedy")["fuserve_batch_cost"]
    assert not cost["learning"] and cost["batch_size"] == 16


@pytest.mark.parametrize("mod, code", [(httpclient, "503"), (grpcclient, "StatusCode.UNAVAILABLE")])
def test_latency_target_refuses_what_it_cannot_serve_in_time(server, mod, code):
    """20 ms a row, a 100 ms target, 12 clients: about four rows fit in the target, so requests are
    refused with the queue-policy status and a message naming the target; the rest are served."""
    url = server.http_url if mod is httpclient else server.grpc_url
    results = drive(url, "targeted", 12, 6, mod)
    refused = [r for r in results if not isinstance(r, int)]
    assert refused and len(refused) < len(results)
    assert all(r.status() == code and "latency target 100 ms" in r.message() for r in refused), \
        [(r.status(), r.message()) for r in refused]
    after = drive(url, "targeted", 1, 2, mod)  # nothing sticks: a lone request is served
    assert all(isinstance(r, int) for r in after), after
    s = stats(server, "targeted")
    assert s["inference_stats"]["fail"]["count"] >= len(refused)
