"""Every kind of bad input gets a clear error with the right status, and the next request succeeds."""

from __future__ import annotations

import json
import socket
import struct

import grpc
import numpy as np
import pytest
from conftest import wait_until
from tritonclient.grpc import service_pb2, service_pb2_grpc

GOOD = json.dumps({"inputs": [
    {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
    {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16}]}).encode()


def infer_body(*inputs: dict, **extra) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def inp(name="INPUT0", datatype="INT32", shape=(1, 16), data=None, **kw) -> dict:
    d = {"name": name, "datatype": datatype, "shape": list(shape), **kw}
    if data is not None or "parameters" not in kw:
        d["data"] = data if data is not None else [0] * int(np.prod(shape))
    return d


I1 = inp("INPUT1")

# (description, path, body, headers, expected status, words the message must contain)
CASES = [
    ("unknown model", "/v2/models/nope/infer", GOOD, {}, 404, ["nope"]),
    ("unknown version", "/v2/models/add_sub/versions/9/infer", GOOD, {}, 404, ["9"]),
    ("malformed JSON", "/v2/models/add_sub/infer", b'{"inputs": [', {}, 400, ["JSON"]),
    ("JSON not an object", "/v2/models/add_sub/infer", b"[1, 2]", {}, 400, ["object"]),
    ("deeply nested JSON", "/v2/models/add_sub/infer", b"[" * 100000 + b"]" * 100000, {}, 400, ["JSON"]),
    ("no inputs", "/v2/models/add_sub/infer", b'{"inputs": []}', {}, 400, ["inputs"]),
    ("wrong input name", "/v2/models/add_sub/infer", infer_body(inp("INPUTX"), I1), {}, 400, ["INPUTX"]),
    ("missing input", "/v2/models/add_sub/infer", infer_body(inp()), {}, 400, ["INPUT1"]),
    ("duplicate input", "/v2/models/add_sub/infer", infer_body(inp(), inp(), I1), {}, 400, ["INPUT0"]),
    ("wrong datatype", "/v2/models/add_sub/infer", infer_body(inp(datatype="FP32"), I1), {}, 400,
     ["INPUT0", "FP32", "INT32"]),
    ("unknown datatype", "/v2/models/add_sub/infer", infer_body(inp(datatype="INT33"), I1), {}, 400, ["INT33"]),
    ("wrong rank", "/v2/models/add_sub/infer", infer_body(inp(shape=(16,)), I1), {}, 400, ["INPUT0", "shape"]),
    ("wrong dims", "/v2/models/add_sub/infer", infer_body(inp(shape=(1, 15)), inp("INPUT1", shape=(1, 15))), {},
     400, ["INPUT0", "[1, 15]"]),
    ("negative dim", "/v2/models/add_sub/infer", infer_body(inp(shape=(1, -16), data=[0] * 16), I1), {}, 400,
     ["shape"]),
    ("count mismatch", "/v2/models/add_sub/infer", infer_body(inp(data=[1, 2, 3]), I1), {}, 400,
     ["INPUT0", "3"]),
    ("absurd shape", "/v2/models/add_sub/infer", infer_body(inp(shape=(1, 2**40), data=[1]), I1), {}, 400,
     ["INPUT0"]),
    ("overflowing dims", "/v2/models/add_sub/infer",
     infer_body(inp(shape=(2**62, 2**62, 2**62), data=[1]), I1), {}, 400, ["INPUT0"]),
    ("ragged data", "/v2/models/add_sub/infer", infer_body(inp(shape=(2, 2), data=[[1, 2], [3]]), I1), {}, 400,
     ["INPUT0"]),
    ("data of wrong type", "/v2/models/add_sub/infer", infer_body(inp(data=["a"] * 16), I1), {}, 400, ["INPUT0"]),
    ("value overflows INT32", "/v2/models/add_sub/infer", infer_body(inp(data=[2**40] * 16), I1), {}, 400,
     ["INPUT0"]),
    ("batch above max_batch_size", "/v2/models/add_sub/infer",
     infer_body(inp(shape=(9, 16)), inp("INPUT1", shape=(9, 16))), {}, 400, ["max_batch_size"]),
    ("batch sizes differ", "/v2/models/add_sub/infer", infer_body(inp(shape=(2, 16)), I1), {}, 400, ["batch"]),
    ("unknown requested output", "/v2/models/add_sub/infer", infer_body(inp(), I1, outputs=[{"name": "OUTX"}]),
     {}, 400, ["OUTX"]),
    ("binary size past the body", "/v2/models/add_sub/infer",
     infer_body(inp(parameters={"binary_data_size": 64}), I1) + b"\0" * 10,
     {"Inference-Header-Content-Length": None}, 400, ["INPUT0", "binary_data_size"]),
    ("binary size not matching shape", "/v2/models/add_sub/infer",
     infer_body(inp(parameters={"binary_data_size": 60}), I1) + b"\0" * 60,
     {"Inference-Header-Content-Length": None}, 400, ["INPUT0", "60"]),
    ("header length past the body", "/v2/models/add_sub/infer", GOOD,
     {"Inference-Header-Content-Length": "999999"}, 400, ["Inference-Header-Content-Length"]),
    ("header length not a number", "/v2/models/add_sub/infer", GOOD,
     {"Inference-Header-Content-Length": "abc"}, 400, ["Inference-Header-Content-Length"]),
    ("truncated BYTES element", "/v2/models/add_sub_string/infer",
     infer_body(inp(datatype="BYTES", parameters={"binary_data_size": 70}), inp("INPUT1", datatype="BYTES",
                                                                               data=["1"] * 16))
     + struct.pack("<I", 1000) + b"x" * 66, {"Inference-Header-Content-Length": None}, 400, ["INPUT0"]),
    ("unclaimed binary bytes", "/v2/models/add_sub/infer", GOOD + b"extra",
     {"Inference-Header-Content-Length": str(len(GOOD))}, 400, ["binary"]),
    ("unknown endpoint", "/v2/nothing/here", b"", {}, 404, ["/v2/nothing/here"]),
    ("bad gzip body", "/v2/models/add_sub/infer", b"not gzip", {"Content-Encoding": "gzip"}, 400, ["decode"]),
]


def _headers(body: bytes, headers: dict) -> dict:
    out = {}
    for k, v in headers.items():
        if v is None:  # header length = the JSON part of the body
            v = str(body.index(b"}]}") + 3)
        out[k] = v
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_http_request_then_good_one(server, case):
    _, path, body, headers, status, words = case
    got_status, got_headers, got_body = server.request("POST", path, body, _headers(body, headers))
    assert got_status == status, got_body
    message = json.loads(got_body)["error"]
    for w in words:
        assert w in message, message
    ok_status, _, ok_body = server.request("POST", "/v2/models/add_sub/infer", GOOD)
    assert ok_status == 200 and json.loads(ok_body)["outputs"][0]["data"][0] == 1


def test_oversized_body_is_refused_before_it_is_read(start_server, test_repo):
    small = start_server(test_repo, "--http-max-input-size", "4096", "--load-model", "add_sub",
                         "--model-control-mode", "explicit")
    with socket.create_connection(("127.0.0.1", small.http_port), timeout=10) as s:
        s.sendall(b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
        s.sendall(b"x" * 10000)
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 400") and b"exceeds" in reply
    status, _, body = small.request("POST", "/v2/models/add_sub/infer", b'{"inputs":[' + b" " * 5000 + b"]}")
    assert status == 400 and b"exceeds" in body
    assert small.request("POST", "/v2/models/add_sub/infer", GOOD)[0] == 200
    # gRPC: the same limit applies to messages
    with grpc.insecure_channel(small.grpc_url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        req = service_pb2.ModelInferRequest(model_name="add_sub")
        req.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
        req.raw_input_contents.append(b"\0" * 10000)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_malformed_http_is_answered_and_connection_closed(server):
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(b"GARBAGE\x00\x01 / HTTP/9\r\n\r\n")
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 400")
    assert server.request("GET", "/v2/health/ready")[0] == 200


GRPC_CASES = [
    ("unknown model", dict(model_name="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    ("unknown version", dict(model_version="5"), grpc.StatusCode.NOT_FOUND, "5"),
    ("wrong datatype", dict(datatype="FP32"), grpc.StatusCode.INVALID_ARGUMENT, "FP32"),
    ("wrong shape", dict(shape=[1, 8]), grpc.StatusCode.INVALID_ARGUMENT, "INPUT0"),
    ("absurd shape", dict(shape=[1, 2**40]), grpc.StatusCode.INVALID_ARGUMENT, "INPUT0"),
    ("negative dim", dict(shape=[1, -16]), grpc.StatusCode.INVALID_ARGUMENT, "non-negative"),
    ("33 dims", dict(shape=[1] * 33), grpc.StatusCode.INVALID_ARGUMENT, "33 dims"),
    ("unknown datatype", dict(datatype="INT31"), grpc.StatusCode.INVALID_ARGUMENT, "INT31"),
    ("raw size mismatch", dict(raw=b"\0" * 63), grpc.StatusCode.INVALID_ARGUMENT, "63"),
    ("wrong name", dict(name="NOPE"), grpc.StatusCode.INVALID_ARGUMENT, "NOPE"),
    ("raw count mismatch", dict(extra_raw=True), grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents"),
]


@pytest.mark.parametrize("case", GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_bad_grpc_request_then_good_one(server, case):
    _, opts, code, word = case

    def request(**o):
        req = service_pb2.ModelInferRequest(model_name=o.get("model_name", "add_sub"),
                                            model_version=o.get("model_version", ""))
        req.inputs.add(name=o.get("name", "INPUT0"), datatype=o.get("datatype", "INT32"),
                       shape=o.get("shape", [1, 16]))
        req.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 16])
        req.raw_input_contents.extend([o.get("raw", b"\0" * 64), b"\1\0\0\0" * 16])
        if o.get("extra_raw"):
            req.raw_input_contents.append(b"")
        return req

    with grpc.insecure_channel(server.grpc_url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request(**opts))
        assert e.value.code() == code and word in e.value.details(), e.value.details()
        ok = stub.ModelInfer(request())
        assert np.frombuffer(ok.raw_output_contents[0], dtype=np.int32)[0] == 1


# ---- the model before the body (Triton's order), and refused bodies counted ----------------------

UNDECODABLE = [b'{"inputs": []}', b"garbage", infer_body(inp(data=[1, 2]), I1)]


def _failures(server, model: str) -> float:
    for family in server.metrics().values():
        for s in family.samples:
            if s.name.startswith("nv_inference_request_failure") and s.labels.get("model") == model \
                    and s.labels.get("reason") == "OTHER":
                return s.value
    return 0.0


def _model_first(server) -> None:
    for body in UNDECODABLE:
        for path in ("/v2/models/nope/infer", "/v2/models/add_sub/versions/9/infer"):
            status, _, got = server.request("POST", path, body)
            assert status == 404, (path, body, got)
            message = json.loads(got)["error"]
            assert message.startswith("Request for unknown model: 'nope' is not found") if "nope" in path \
                else "version 9" in message, message
    before = _failures(server, "add_sub")
    status, _, got = server.request("POST", "/v2/models/add_sub/infer", UNDECODABLE[2])
    assert status == 400 and "INPUT0" in json.loads(got)["error"]
    with grpc.insecure_channel(server.grpc_url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        for model, code in (("nope", grpc.StatusCode.NOT_FOUND), ("add_sub", grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(service_pb2.ModelInferRequest(model_name=model), timeout=30)  # no inputs
            assert e.value.code() == code, e.value.details()
            if model == "nope":
                assert "Request for unknown model: 'nope' is not found" in e.value.details()
        # the same on a stream: the refusal is that request's reply
        replies = stub.ModelStreamInfer(iter([service_pb2.ModelInferRequest(model_name="nope")]), timeout=30)
        assert "Request for unknown model: 'nope'" in next(iter(replies)).error_message
    # HTTP's 400 and gRPC's INVALID_ARGUMENT, each counted against add_sub (the stream's was to nope)
    wait_until(lambda: _failures(server, "add_sub") >= before + 2, timeout=30, what="the failures counted")
    assert _failures(server, "add_sub") == before + 2


def test_an_unknown_model_is_judged_before_the_body_and_refusals_are_counted(server):
    _model_first(server)


def test_the_same_through_frontend_workers(start_server, test_repo):
    _model_first(start_server(test_repo, "--frontend-workers", "2"))
