"""The sequence batcher against a real `fuserve serve`, with the real tritonclient: Triton's
simple_sequence semantics (START/READY controls), implicit state on an ONNX model carried from one
request to the next, more sequences than slots from many threads and interleaved on one gRPC
stream, CORRID and END controls, flags and string ids in a Python model, the oldest strategy's
batches, idle sequences freed, and Triton 2.51's errors."""

from __future__ import annotations

import concurrent.futures
import json
import queue
import struct
import time
import uuid

import model_builders as mb
import numpy as np
import pytest
import python_models as pm
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import model_stats, wait_until
from tritonclient.utils import InferenceServerException

WAIT = 30  # seconds any one answer may take

SIMPLE_SEQUENCE = '''
platform: "onnxruntime_onnx"
max_batch_size: 8
sequence_batching {
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] }
  ]
}
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU } ]
'''

ACCUMULATE = '''
platform: "onnxruntime_onnx"
max_batch_size: 2
instance_group [ { count: 1, kind: KIND_CPU } ]
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [
  { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "ID" data_type: TYPE_UINT64 dims: [ 1 ] },
  { name: "ENDED" data_type: TYPE_BOOL dims: [ 1 ] }
]
sequence_batching {
  max_sequence_idle_microseconds: 20000000
  control_input [
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END bool_false_true: [ false, true ] } ] }
  ]
  state [ {
    input_name: "STATE_IN" output_name: "STATE_OUT" data_type: TYPE_INT32 dims: [ 1 ]
    initial_state: { data_type: TYPE_INT32 dims: [ 1 ] %s name: "start" }
  } ]
}
'''


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("sequences")
    mb.simple_sequence(repo / "simple_sequence" / "1" / "model.onnx")
    mb.write_config(repo / "simple_sequence", SIMPLE_SEQUENCE)
    for name, init in (("accumulate", "zero_data: true"), ("accumulate_100", 'data_file: "hundred"')):
        mb.accumulator(repo / name / "1" / "model.onnx")
        mb.write_config(repo / name, ACCUMULATE % init)
    (repo / "accumulate_100" / "1" / "initial_state").mkdir()
    (repo / "accumulate_100" / "1" / "initial_state" / "hundred").write_bytes(struct.pack("<i", 100))
    pm.write(repo, "seq_py", pm.SEQUENCE_CONFIG % "direct { }", pm.SEQUENCE)
    pm.write(repo, "seq_py_direct_delay", pm.SEQUENCE_CONFIG % "direct { max_queue_delay_microseconds: 2000000 }",
             pm.SEQUENCE)
    mb.accumulator(repo / "accumulate_backlog_1" / "1" / "model.onnx")  # 2 slots, 1 sequence may wait
    mb.write_config(repo / "accumulate_backlog_1", (ACCUMULATE % "zero_data: true")
                    + 'parameters { key: "fuserve_sequence_backlog" value: { string_value: "1" } }\n')
    pm.write(repo, "seq_py_oldest", pm.SEQUENCE_CONFIG % (
        "oldest { max_candidate_sequences: 4, preferred_batch_size: [ 2 ], max_queue_delay_microseconds: 2000000 }"),
        pm.SEQUENCE)
    # what fails to load, naming the field
    pm.write(repo, "iterative", pm.SEQUENCE_CONFIG.replace("sequence_batching {", "sequence_batching {\n"
                                                           "  iterative_sequence: true") % "", pm.SEQUENCE)
    pm.write(repo, "py_state", pm.SEQUENCE_CONFIG.replace("control_input", 'state [ { input_name: "S" output_name: '
                                                          '"T" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
                                                          "  control_input") % "", pm.SEQUENCE)
    pm.write(repo, "listed_control", pm.SEQUENCE_CONFIG.replace(
        'input [ { name: "IN"', 'input [ { name: "START", data_type: TYPE_FP32, dims: [ 1 ] }, { name: "IN"') % "",
        pm.SEQUENCE)
    mb.accumulator(repo / "missing_state" / "1" / "model.onnx")
    mb.write_config(repo / "missing_state", (ACCUMULATE % "zero_data: true").replace('"STATE_IN"', '"NOPE"'))
    return repo


@pytest.fixture(scope="module")
def server(start_server, repo):
    return start_server(repo)


def _grpc_inputs(value: int, name: str = "INPUT", rows: int = 1) -> list:
    t = grpcclient.InferInput(name, [rows, 1], "INT32")
    t.set_data_from_numpy(np.full((rows, 1), value, dtype=np.int32))
    return [t]


def _http_inputs(value: int, name: str = "INPUT", rows: int = 1) -> list:
    t = httpclient.InferInput(name, [rows, 1], "INT32")
    t.set_data_from_numpy(np.full((rows, 1), value, dtype=np.int32))
    return [t]


def _http_infer(server, model: str, body: dict) -> tuple[int, dict]:
    status, _, raw = server.request("POST", f"/v2/models/{model}/infer", json.dumps(body).encode(),
                                    {"Content-Type": "application/json"})
    return status, json.loads(raw)


def _body(value: int, **parameters) -> dict:
    return {"inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "INT32", "data": [value]}],
            "parameters": parameters}


# ---- Triton's simple_sequence, as tritonclient's sequence examples use it ---------------------------


def test_simple_sequence_interleaved_on_one_grpc_stream_as_triton_answers(server):
    """Three sequences (two uint64 ids, one string id) sent request by request, interleaved on one
    stream: each START answers INPUT + 1, every other request its INPUT (Triton's example model)."""
    values = [11, 7, 5, 3, 2, 0, 1]
    sequences = {1000: [0, *values], 1001: [100, *(-v for v in values)], str(uuid.uuid4()): [20, *(-v for v in values)]}
    replies: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        for step in range(len(values) + 1):
            for sid, sent in sequences.items():
                client.async_stream_infer("simple_sequence", _grpc_inputs(sent[step]), request_id=f"{sid}_{step}",
                                          sequence_id=sid, sequence_start=step == 0, sequence_end=step == len(values))
        got: dict[str, dict[int, int]] = {str(sid): {} for sid in sequences}
        for _ in range(len(sequences) * (len(values) + 1)):
            result, error = replies.get(timeout=WAIT)
            assert error is None, error
            sid, step = result.get_response().id.rsplit("_", 1)
            got[sid][int(step)] = int(result.as_numpy("OUTPUT")[0][0])
    finally:
        client.stop_stream()
        client.close()
    for sid, sent in sequences.items():
        assert [got[str(sid)][i] for i in range(len(sent))] == [sent[0] + 1, *sent[1:]], sid


def test_simple_sequence_over_http_with_tritonclient(server):
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=WAIT)
    outs = []
    for i, v in enumerate([5, 3, 9]):
        r = client.infer("simple_sequence", _http_inputs(v), sequence_id=77, sequence_start=i == 0, sequence_end=i == 2)
        outs.append(int(r.as_numpy("OUTPUT")[0][0]))
    assert outs == [6, 3, 9]


# ---- implicit state -----------------------------------------------------------------------------


def _run_sequence(server, protocol: str, model: str, sid: int, values: list[int]) -> list[tuple[int, int, bool]]:
    """One sequence start to end, a request at a time: (OUTPUT, ID, ENDED) per request."""
    out = []
    if protocol == "grpc":
        client = grpcclient.InferenceServerClient(server.grpc_url)
        for i, v in enumerate(values):
            r = client.infer(model, _grpc_inputs(v), sequence_id=sid, sequence_start=i == 0,
                             sequence_end=i == len(values) - 1, client_timeout=WAIT)
            out.append((int(r.as_numpy("OUTPUT")[0][0]), int(r.as_numpy("ID")[0][0]), bool(r.as_numpy("ENDED")[0][0])))
        client.close()
    else:
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=WAIT)
        for i, v in enumerate(values):
            r = client.infer(model, _http_inputs(v), sequence_id=sid, sequence_start=i == 0,
                             sequence_end=i == len(values) - 1)
            out.append((int(r.as_numpy("OUTPUT")[0][0]), int(r.as_numpy("ID")[0][0]), bool(r.as_numpy("ENDED")[0][0])))
        client.close()
    return out


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_implicit_state_with_more_sequences_than_slots_from_many_threads(server, protocol):
    """Eight sequences from eight threads on a model with two sequence slots: the others wait for a
    slot, and every sequence gets its own running sum, its CORRID, and END on its last request only."""
    before = model_stats(server, "accumulate")["inference_stats"]["success"]["count"]
    base = 5000 if protocol == "http" else 6000
    work = {base + k: [k + 1, 10 * (k + 1), 100, -3, 7] for k in range(8)}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = {sid: pool.submit(_run_sequence, server, protocol, "accumulate", sid, values)
                   for sid, values in work.items()}
        results = {sid: f.result(timeout=WAIT * 2) for sid, f in futures.items()}
    for sid, values in work.items():
        sums = list(np.cumsum(values))
        assert results[sid] == [(int(s), sid, i == len(values) - 1) for i, s in enumerate(sums)], sid
    after = model_stats(server, "accumulate")["inference_stats"]["success"]["count"]
    assert after - before == 8 * 5


def test_sequences_through_frontend_workers(start_server, repo):
    """With --frontend-workers the workers pass the sequence parameters on: the same sums, over
    HTTP and gRPC, from several threads."""
    workers = start_server(repo, "--frontend-workers", "2")
    work = {(protocol, 7000 + k): [k, 1, 2, 3] for protocol in ("http", "grpc") for k in range(4)}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = {key: pool.submit(_run_sequence, workers, key[0], "accumulate", key[1] + (key[0] == "grpc") * 100,
                                    values) for key, values in work.items()}
        for key, f in futures.items():
            assert [o for o, _, _ in f.result(timeout=WAIT * 2)] == list(np.cumsum(work[key])), key
    status, doc = _http_infer(workers, "accumulate", _body(1, sequence_id=31337))
    assert status == 400 and "must specify the START flag" in doc["error"]
    replies: queue.Queue = queue.Queue()  # and interleaved on one gRPC stream
    client = grpcclient.InferenceServerClient(workers.grpc_url)
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        for step, v in enumerate([4, 5, 6]):
            for sid in (8001, 8002):
                client.async_stream_infer("simple_sequence", _grpc_inputs(v * (sid - 8000)), request_id=f"{sid}_{step}",
                                          sequence_id=sid, sequence_start=step == 0, sequence_end=step == 2)
        got = {}
        for _ in range(6):
            result, error = replies.get(timeout=WAIT)
            assert error is None, error
            got[result.get_response().id] = int(result.as_numpy("OUTPUT")[0][0])
    finally:
        client.stop_stream()
        client.close()
    assert got == {"8001_0": 5, "8001_1": 5, "8001_2": 6, "8002_0": 9, "8002_1": 10, "8002_2": 12}


def test_initial_state_from_a_data_file(server):
    assert [o for o, _, _ in _run_sequence(server, "grpc", "accumulate_100", 42, [1, 2, 3])] == [101, 103, 106]


def test_start_on_a_live_sequence_restarts_its_state(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)

    def send(v, **flags):
        return int(client.infer("accumulate", _grpc_inputs(v), sequence_id=91, client_timeout=WAIT,
                                **flags).as_numpy("OUTPUT")[0][0])

    assert [send(5, sequence_start=True), send(5), send(1, sequence_start=True), send(2, sequence_end=True)] == \
        [5, 10, 1, 3]
    client.close()


def test_a_waiting_sequence_gets_the_slot_an_ended_one_frees(server):
    """Two slots: a third sequence's START waits (unanswered, while the two live ones are served)
    until one of them ends."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.infer("accumulate", _grpc_inputs(1), sequence_id=301, sequence_start=True, client_timeout=WAIT)
    client.infer("accumulate", _grpc_inputs(2), sequence_id=302, sequence_start=True, client_timeout=WAIT)
    answered: queue.Queue = queue.Queue()
    client.async_infer("accumulate", _grpc_inputs(3), lambda result, error: answered.put((result, error)),
                       sequence_id=303, sequence_start=True)
    for _ in range(3):  # the live sequences are served meanwhile; the third still waits
        client.infer("accumulate", _grpc_inputs(1), sequence_id=301, client_timeout=WAIT)
        client.infer("accumulate", _grpc_inputs(1), sequence_id=302, client_timeout=WAIT)
    assert answered.empty()
    assert int(client.infer("accumulate", _grpc_inputs(0), sequence_id=301, sequence_end=True, client_timeout=WAIT)
               .as_numpy("OUTPUT")[0][0]) == 4
    result, error = answered.get(timeout=WAIT)
    assert error is None and int(result.as_numpy("OUTPUT")[0][0]) == 3
    client.infer("accumulate", _grpc_inputs(0), sequence_id=302, sequence_end=True, client_timeout=WAIT)
    client.infer("accumulate", _grpc_inputs(0), sequence_id=303, sequence_end=True, client_timeout=WAIT)
    client.close()


# ---- a Python sequence model: controls, flags, string ids, strategies, idle --------------------------


def test_python_model_sees_control_tensors_flags_and_string_ids(server):
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=WAIT)
    rows = []
    for i, v in enumerate([4, 5, 6]):
        r = client.infer("seq_py", _http_inputs(v, "IN"), sequence_id="session-a", sequence_start=i == 0,
                         sequence_end=i == 2)
        rows.append(tuple(float(r.as_numpy(n)[0][0]) for n in ("OUT", "FLAGS", "START_SEEN", "END_SEEN")))
    assert rows == [(4, 1, 1.0, 0.0), (9, 0, 0.0, 0.0), (15, 2, 0.0, 1.0)]
    client.close()


@pytest.mark.parametrize("model", ["seq_py_oldest", "seq_py_direct_delay"])
def test_a_queue_delay_batches_the_live_sequences(server, model):
    """Two sequences' requests arrive together: with a queue delay of 2 s the first is held until
    the other's joins it (oldest: the preferred batch of 2; direct: every live slot has its request),
    and they execute in one call."""
    def one(sid: int) -> list[tuple[int, int]]:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        out = []
        for i, v in enumerate([1, 2, 3]):
            r = client.infer(model, _grpc_inputs(v, "IN"), sequence_id=sid, sequence_start=i == 0,
                             sequence_end=i == 2, client_timeout=WAIT)
            out.append((int(r.as_numpy("OUT")[0][0]), int(r.as_numpy("BATCH")[0][0])))
        client.close()
        return out

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a, b = pool.map(one, (801, 802))
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 3, 6]
    assert max(n for _, n in a + b) == 2


def test_past_the_backlog_a_new_sequence_is_rejected(server):
    """Two slots and fuserve_sequence_backlog 1: a third sequence waits, a fourth is refused (503 /
    UNAVAILABLE), and once a slot frees the waiting one is answered."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    for sid in (1, 2):
        client.infer("accumulate_backlog_1", _grpc_inputs(sid), sequence_id=sid, sequence_start=True,
                     client_timeout=WAIT)
    waiting: queue.Queue = queue.Queue()
    client.async_infer("accumulate_backlog_1", _grpc_inputs(3), lambda result, error: waiting.put((result, error)),
                       sequence_id=3, sequence_start=True, sequence_end=True, client_timeout=WAIT)
    wait_until(lambda: model_stats(server, "accumulate_backlog_1")["fuserve_pending"] == 1, WAIT, "the third to wait")
    status, doc = _http_infer(server, "accumulate_backlog_1", _body(4, sequence_id=4, sequence_start=True))
    assert status == 503 and "fuserve_sequence_backlog" in doc["error"], doc
    client.infer("accumulate_backlog_1", _grpc_inputs(0), sequence_id=1, sequence_end=True, client_timeout=WAIT)
    result, error = waiting.get(timeout=WAIT)
    assert error is None and int(result.as_numpy("OUTPUT")[0][0]) == 3
    client.infer("accumulate_backlog_1", _grpc_inputs(0), sequence_id=2, sequence_end=True, client_timeout=WAIT)
    client.close()


def test_an_idle_sequence_is_freed_and_its_next_request_needs_start(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.infer("seq_py", _grpc_inputs(1, "IN"), sequence_id=555, sequence_start=True, client_timeout=WAIT)
    time.sleep(1.0)  # max_sequence_idle_microseconds is 300000
    with pytest.raises(InferenceServerException) as err:
        client.infer("seq_py", _grpc_inputs(1, "IN"), sequence_id=555, client_timeout=WAIT)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "inference request for sequence 555 to model 'seq_py' must specify the START flag on the first request " \
           "of the sequence" in err.value.message()
    r = client.infer("seq_py", _grpc_inputs(2, "IN"), sequence_id=555, sequence_start=True, sequence_end=True,
                     client_timeout=WAIT)
    assert int(r.as_numpy("OUT")[0][0]) == 2
    client.close()


# ---- errors, as Triton 2.51 answers them --------------------------------------------------------


def test_requests_without_an_id_or_start_or_with_batch_2_fail_as_triton_answers(server):
    cases = [
        (_body(1), "inference request to model 'accumulate' must specify a non-zero or non-empty correlation ID"),
        (_body(1, sequence_id=0, sequence_start=True),
         "inference request to model 'accumulate' must specify a non-zero or non-empty correlation ID"),
        (_body(1, sequence_id=123456), "inference request for sequence 123456 to model 'accumulate' must specify the "
                                       "START flag on the first request of the sequence"),
        (_body(1, sequence_id="abc", sequence_start=True), "string correlation ID 'abc'"),
        (_body(1, sequence_id=5, sequence_start="yes"), "'sequence_start' must be a boolean"),
    ]
    for body, message in cases:
        status, doc = _http_infer(server, "accumulate", body)
        assert status == 400 and message in doc["error"], (body, doc)
    two = {"inputs": [{"name": "INPUT", "shape": [2, 1], "datatype": "INT32", "data": [1, 2]}],
           "parameters": {"sequence_id": 9, "sequence_start": True}}
    status, doc = _http_infer(server, "accumulate", two)
    assert status == 400 and doc["error"] == ("inference request to model 'accumulate' must specify batch-size 1 due "
                                              "to requirements of sequence batcher")
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as err:
        client.infer("accumulate", _grpc_inputs(1), sequence_id=424242, client_timeout=WAIT)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "START flag" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("accumulate", _grpc_inputs(1), client_timeout=WAIT)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "correlation ID" in err.value.message()
    client.close()


def test_what_the_sequence_batcher_does_not_take_fails_the_load_naming_it(server):
    status, _, body = server.request("POST", "/v2/repository/index", b"{}")
    assert status == 200
    reasons = {row["name"]: row.get("reason", "") for row in json.loads(body)}
    assert "sequence_batching.iterative_sequence is not supported" in reasons["iterative"]
    assert "sequence_batching.state (implicit state) is supported for ONNX and PyTorch" in reasons["py_state"]
    assert "START is a sequence control or state tensor" in reasons["listed_control"]
    assert "sequence_batching names input 'NOPE', which is not in the model file" in reasons["missing_state"]
    wait_until(lambda: server.request("GET", "/v2/models/accumulate/ready")[0] == 200, WAIT, "accumulate ready")
