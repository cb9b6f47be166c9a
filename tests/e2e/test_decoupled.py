"""Decoupled Python models (one request, many responses) against a real `fuserve serve`: gRPC
ModelStreamInfer with tritonclient's streams, as Triton 2.51 answers (triton_final_response on
every data response, the empty final only when asked for, an error ending its request), responses
sent from execute() and from a thread after it, interleaved requests on one stream, cancellation
by the client, a slow reader holding the model's sender back, and the unary endpoints' refusals."""

from __future__ import annotations

import queue
import socket
import struct

import hpack
import numpy as np
import pytest
import python_models as pm
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import model_stats, settled_count, wait_until
from tritonclient.utils import InferenceServerException

WAIT = 30  # seconds any one response may take


WORKERS = {"one process": (), "frontend workers": ("--frontend-workers", "2")}


@pytest.fixture(scope="module", params=list(WORKERS))
def server(start_server, tmp_path_factory, request):
    """Every test twice: in one process, and through frontend workers (whose link carries a
    decoupled model's replies part by part)."""
    repo = tmp_path_factory.mktemp("decoupled")
    pm.write(repo, "repeat", pm.REPEAT_CONFIG, pm.REPEAT)
    pm.write(repo, "add_sub_py", pm.ADD_SUB_CONFIG, pm.ADD_SUB)
    pm.write(repo, "bls_repeat", pm.BLS_REPEAT_CONFIG, pm.BLS_REPEAT)
    return start_server(repo, *WORKERS[request.param])


class Stream:
    """A tritonclient gRPC stream whose callback feeds a queue."""

    def __init__(self, server) -> None:
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self.replies: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.replies.put((result, error)))

    def send(self, values, request_id: str = "", empty_final: bool = False, **parameters) -> None:
        t = grpcclient.InferInput("IN", [len(values)], "INT32")
        t.set_data_from_numpy(np.array(values, dtype=np.int32))
        self.client.async_stream_infer("repeat", [t], request_id=request_id, parameters=parameters or None,
                                       enable_empty_final_response=empty_final)

    def next(self, timeout: float = WAIT):
        return self.replies.get(timeout=timeout)

    def nothing_for(self, seconds: float) -> bool:
        try:
            self.replies.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def _final_flag(result) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


def _values(result) -> tuple[int, int]:
    return int(result.as_numpy("OUT")[0]), int(result.as_numpy("IDX")[0])


@pytest.mark.parametrize("mode", ["execute", "thread"])
def test_responses_stream_in_order_each_marked_not_final(server, mode):
    s = Stream(server)
    try:
        s.send([5, 6, 7], request_id="r1", mode=mode)
        got = [s.next() for _ in range(3)]
        assert all(err is None for _, err in got), got
        assert [_values(r) for r, _ in got] == [(5, 0), (6, 1), (7, 2)]
        assert [_final_flag(r) for r, _ in got] == [False] * 3
        assert all(r.get_response().id == "r1" for r, _ in got)
        assert s.nothing_for(0.5)  # the flag-only final is not sent unless asked for
    finally:
        s.close()


def test_the_empty_final_response_comes_only_when_asked_for(server):
    s = Stream(server)
    try:
        s.send([1, 2], request_id="e", empty_final=True)
        got = [s.next() for _ in range(3)]
        assert [_final_flag(r) for r, _ in got] == [False, False, True]
        last = got[2][0].get_response()
        assert last.id == "e" and not last.outputs and not last.raw_output_contents
        s.send([], request_id="zero", empty_final=True)  # zero responses: just the final
        result, err = s.next()
        assert err is None and _final_flag(result) and not result.get_response().outputs
        s.send([], request_id="silent")  # zero responses, no final asked for: nothing at all
        assert s.nothing_for(0.5)
        s.send([9], request_id="after")  # and the stream goes on
        result, err = s.next()
        assert err is None and _values(result) == (9, 0)
    finally:
        s.close()


def test_an_error_response_ends_its_request_and_the_stream_goes_on(server):
    s = Stream(server)
    try:
        s.send([3, 4, 5], request_id="bad", empty_final=True, error_at=1)
        first, err = s.next()
        assert err is None and _values(first) == (3, 0)
        result, err = s.next()
        assert isinstance(err, InferenceServerException) and err.message() == "value 4 refused", err
        assert s.nothing_for(0.5)  # no empty final after an error
        s.send([8], request_id="good")
        result, err = s.next()
        assert err is None and _values(result) == (8, 0)
    finally:
        s.close()


def test_an_execute_that_raises_fails_its_request_with_the_models_message(server):
    s = Stream(server)
    try:
        s.send([1], request_id="boom", empty_final=True, **{"raise": True})
        result, err = s.next()
        assert isinstance(err, InferenceServerException), result
        assert "repeat" in err.message() and "RuntimeError: asked to raise" in err.message(), err.message()
        assert s.nothing_for(0.5)
        s.send([2])
        result, err = s.next()
        assert err is None and _values(result) == (2, 0)
    finally:
        s.close()


def test_requests_on_one_stream_interleave(server):
    s = Stream(server)
    try:
        s.send(list(range(10)), request_id="a", mode="thread", delay_ms=20)
        s.send(list(range(100, 110)), request_id="b", mode="thread", delay_ms=20)
        got = [s.next() for _ in range(20)]
        assert all(err is None for _, err in got)
        order = [r.get_response().id for r, _ in got]
        by_id = {k: [_values(r)[0] for r, _ in got if r.get_response().id == k] for k in "ab"}
        assert by_id == {"a": list(range(10)), "b": list(range(100, 110))}
        assert order != sorted(order), order  # neither waited for the other to finish
    finally:
        s.close()


def test_a_client_that_goes_away_cancels_the_request(server, tmp_path):
    mark = tmp_path / "cancelled"
    s = Stream(server)
    s.send(list(range(10_000)), request_id="long", mode="thread", delay_ms=10, mark=str(mark))
    for _ in range(2):
        _, err = s.next()
        assert err is None
    s.close(cancel=True)
    wait_until(mark.exists, 20, "the model to see is_cancelled()")
    assert int(mark.read_text()) < 10_000
    wait_until(lambda: model_stats(server, "repeat")["inference_stats"]["fail"]["count"] >= 1, 10,
               "the cancelled request to be counted")


def test_a_reader_that_stops_reading_holds_the_models_sender_back(server, tmp_path):
    """Raw HTTP/2 with a small window that the client never opens: the server may hold only so much
    for the stream, so the model's send() waits instead of the server buffering 200,000 replies."""
    progress = tmp_path / "progress"
    from server._proto import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name="repeat", id="slow")
    req.inputs.add(name="IN", datatype="INT32", shape=[200_000])
    req.raw_input_contents.append(np.arange(200_000, dtype=np.int32).tobytes())
    req.parameters["progress"].string_param = str(progress)
    req.parameters["mode"].string_param = "thread"
    body = req.SerializeToString()
    msg = struct.pack(">BI", 0, len(body)) + body
    host, port = server.grpc_url.split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    try:
        sock.sendall(_h2_stream_request(msg))
        wait_until(progress.exists, 20, "the model to start sending")
        # held at the transport's cap for the stream (4 MiB of ~100-byte replies) plus the sink's few
        assert settled_count(progress) < 100_000
        s = Stream(server)  # other clients are served meanwhile
        try:
            s.send([1])
            result, err = s.next()
            assert err is None and _values(result) == (1, 0)
        finally:
            s.close()
    finally:
        sock.close()
    # the connection is gone: the request is cancelled and the sender let go (the model thread ends)
    wait_until(lambda: model_stats(server, "repeat")["inference_stats"]["fail"]["count"] >= 1, 20,
               "the dropped stream's request to end")


def _h2_stream_request(message: bytes) -> bytes:
    """Preface, SETTINGS (initial window 1 KiB), HEADERS and DATA for one ModelStreamInfer call."""

    def frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", sid) + payload

    headers = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path",
                                      "/inference.GRPCInferenceService/ModelStreamInfer"),
                                      (":authority", "localhost"), ("content-type", "application/grpc"),
                                      ("te", "trailers")])
    out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, struct.pack(">HI", 4, 1024))
    out += frame(1, 4, 1, headers)
    for i in range(0, len(message), 16384):
        out += frame(0, 0, 1, message[i:i + 16384])
    return out


def test_unary_endpoints_refuse_a_decoupled_model_as_triton_does(server):
    t = httpclient.InferInput("IN", [1], "INT32")
    t.set_data_from_numpy(np.array([1], np.int32))
    with pytest.raises(InferenceServerException) as info:
        httpclient.InferenceServerClient(server.http_url).infer("repeat", [t])
    assert info.value.status() == "501"
    assert info.value.message() == "HTTP end point doesn't support models with decoupled transaction policy"
    g = grpcclient.InferInput("IN", [1], "INT32")
    g.set_data_from_numpy(np.array([1], np.int32))
    with pytest.raises(InferenceServerException) as info:
        grpcclient.InferenceServerClient(server.grpc_url).infer("repeat", [g])
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"
    assert info.value.message() == "ModelInfer RPC doesn't support models with decoupled transaction policy"


def test_a_model_that_is_not_decoupled_answers_once_on_the_stream(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    replies: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            t = grpcclient.InferInput(name, [1, 4], "FP32")
            t.set_data_from_numpy(np.ones((1, 4), np.float32))
            inputs.append(t)
        client.async_stream_infer("add_sub_py", inputs, enable_empty_final_response=True)
        result, err = replies.get(timeout=WAIT)
        assert err is None and result.as_numpy("OUTPUT0").tolist() == [[2, 2, 2, 2]]
        assert "triton_final_response" not in result.get_response().parameters
        with pytest.raises(queue.Empty):
            replies.get(timeout=0.5)
    finally:
        client.stop_stream()
        client.close()


def test_stream_metrics_count_first_responses_and_responses_per_request(server):
    def sample(name: str, **labels) -> float:
        for family in server.metrics().values():
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        raise KeyError(name)

    before = sample("nv_inference_first_response_histogram_ms_count", model="repeat", version="1")
    first_ms = sample("nv_inference_first_response_histogram_ms_sum", model="repeat", version="1")
    sent = sample("fuserve_responses_per_request_sum", model="repeat", version="1")
    s = Stream(server)
    try:
        s.send([1, 2, 3], request_id="m", empty_final=True, mode="thread", delay_ms=100)
        got = [s.next() for _ in range(4)]
        assert all(err is None for _, err in got)
    finally:
        s.close()
    wait_until(lambda: sample("nv_inference_first_response_histogram_ms_count", model="repeat",
                              version="1") == before + 1, 10, "the request in the first-response histogram")
    assert sample("fuserve_responses_per_request_sum", model="repeat", version="1") == sent + 3
    # the request took 300 ms (three sends 100 ms apart); its first response came long before that
    assert sample("nv_inference_first_response_histogram_ms_sum", model="repeat", version="1") - first_ms < 150
    assert "nv_inference_first_response_histogram_ms" not in {
        f for f, fam in server.metrics().items() if any(s.labels.get("model") == "add_sub_py" for s in fam.samples)}


@pytest.mark.parametrize("how", ["exec", "async_exec"])
def test_bls_exec_decoupled_iterates_the_callees_responses(server, how):
    def call(values, **parameters):
        t = httpclient.InferInput("IN", [len(values)], "INT32")
        t.set_data_from_numpy(np.array(values, np.int32))
        params = {"async": True, **parameters} if how == "async_exec" else parameters
        r = httpclient.InferenceServerClient(server.http_url).infer("bls_repeat", [t], parameters=params or None)
        return int(r.as_numpy("SUM")[0]), int(r.as_numpy("N")[0]), r.as_numpy("ERROR")[0].decode()

    assert call([1, 2, 3]) == (6, 4, "")  # three responses and the flag-only final
    assert call([]) == (0, 1, "")  # just the final
    assert call([5, 6, 7], error_at=1) == (5, 2, "value 6 refused")  # the error is the last response
