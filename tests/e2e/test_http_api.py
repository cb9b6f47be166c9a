"""KServe V2 over HTTP against a real fuserve process, through tritonclient.http and raw requests."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException

V2_TYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
            "FP16", "FP32", "FP64", "BYTES"]


def sample(datatype: str, shape=(2, 3)) -> np.ndarray:
    rng = np.random.default_rng(abs(hash(datatype)) % 1000)
    n = int(np.prod(shape))
    if datatype == "BOOL":
        return rng.integers(0, 2, n).astype(bool).reshape(shape)
    if datatype == "BYTES":
        return np.array([f"s{i}-ü".encode() for i in range(n)], dtype=object).reshape(shape)
    if datatype == "BF16":
        return rng.standard_normal(n).astype(ml_dtypes.bfloat16).reshape(shape)
    np_type = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}.get(datatype)
    if np_type is not None:
        return rng.standard_normal(n).astype(np_type).reshape(shape)
    info = np.iinfo(np.dtype(datatype.lower()))
    return rng.integers(info.min, info.max, n, dtype=np.dtype(datatype.lower()), endpoint=True).reshape(shape)


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(server.http_url)
    yield c
    c.close()


def add_sub_inputs(rows: int = 1):
    a = np.arange(16 * rows, dtype=np.int32).reshape(rows, 16)
    b = np.full((rows, 16), 3, dtype=np.int32)
    i0 = httpclient.InferInput("INPUT0", list(a.shape), "INT32")
    i1 = httpclient.InferInput("INPUT1", list(b.shape), "INT32")
    return a, b, i0, i1


def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    md = client.get_server_metadata()
    assert md["name"] == "triton" and md["version"].endswith("+fuserve")
    assert {"binary_tensor_data", "model_repository"} <= set(md["extensions"])


def test_model_ready_and_metadata(client):
    assert client.is_model_ready("add_sub")
    assert client.is_model_ready("add_sub", "1")
    assert not client.is_model_ready("add_sub", "7")
    assert not client.is_model_ready("no_such_model")
    md = client.get_model_metadata("add_sub")
    assert md["name"] == "add_sub" and md["versions"] == ["1"] and md["platform"] == "onnxruntime_onnx"
    assert md["inputs"] == [{"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]},
                            {"name": "INPUT1", "datatype": "INT32", "shape": [-1, 16]}]
    assert [o["name"] for o in md["outputs"]] == ["OUTPUT0", "OUTPUT1"]


def test_model_config_is_tritons_json_form(client):
    cfg = client.get_model_config("add_sub")
    assert cfg["name"] == "add_sub" and cfg["max_batch_size"] == 8
    # dims are numbers, as Triton 2.51 writes them
    assert cfg["input"][0]["data_type"] == "TYPE_INT32" and cfg["input"][0]["dims"] == [16]
    assert cfg["parameters"]["fuserve_execution_providers"]["string_value"] == "CPUExecutionProvider"


@pytest.mark.parametrize("binary", [True, False])
def test_add_sub_infer(client, binary):
    a, b, i0, i1 = add_sub_inputs(rows=3)
    i0.set_data_from_numpy(a, binary_data=binary)
    i1.set_data_from_numpy(b, binary_data=binary)
    outs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary),
            httpclient.InferRequestedOutput("OUTPUT1", binary_data=not binary)]
    r = client.infer("add_sub", [i0, i1], outputs=outs, request_id="req-42")
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
    assert r.get_response()["id"] == "req-42"
    assert r.get_response()["model_version"] == "1"


def test_requested_output_subset(client):
    a, b, i0, i1 = add_sub_inputs()
    i0.set_data_from_numpy(a)
    i1.set_data_from_numpy(b)
    r = client.infer("add_sub", [i0, i1], outputs=[httpclient.InferRequestedOutput("OUTPUT1")])
    assert [o["name"] for o in r.get_response()["outputs"]] == ["OUTPUT1"]
    assert r.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)


@pytest.mark.parametrize("datatype", V2_TYPES)
@pytest.mark.parametrize("binary", [True, False])
def test_every_datatype_round_trips(client, datatype, binary):
    data = sample(datatype)
    inp = httpclient.InferInput(f"IN_{datatype}", list(data.shape), datatype)
    inp.set_data_from_numpy(data, binary_data=binary)
    out = httpclient.InferRequestedOutput(f"OUT_{datatype}", binary_data=binary)
    r = client.infer(f"identity_{datatype.lower()}", [inp], outputs=[out])
    got = r.as_numpy(f"OUT_{datatype}")
    assert got.shape == data.shape
    if datatype == "BYTES":
        # tritonclient gives JSON BYTES back as str and binary BYTES as bytes
        assert [x.encode() if isinstance(x, str) else x for x in got.reshape(-1)] == list(data.reshape(-1))
    else:
        np.testing.assert_array_equal(got, data)


def test_bf16_binary_round_trip(server):
    data = sample("BF16")
    raw = data.tobytes()
    header = json.dumps({"inputs": [{"name": "IN_BF16", "datatype": "BF16", "shape": [2, 3],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "OUT_BF16", "parameters": {"binary_data": True}}]}).encode()
    status, headers, body = server.request("POST", "/v2/models/identity_bf16/infer", header + raw,
                                           {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200, body
    hl = int(headers["inference-header-content-length"])
    meta = json.loads(body[:hl])
    assert meta["outputs"][0]["datatype"] == "BF16"
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == len(raw)
    assert body[hl:] == raw


def test_json_nested_and_flat_data_with_curl_style_request(server):
    body = {"id": "nested", "inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [2, 16], "data": [list(range(16)), list(range(16, 32))]},
        {"name": "INPUT1", "datatype": "INT32", "shape": [2, 16], "data": [1] * 32}]}
    status, headers, raw = server.request("POST", "/v2/models/add_sub/infer", json.dumps(body).encode(),
                                          {"Content-Type": "application/json"})
    assert status == 200 and headers["content-type"] == "application/json"
    out = json.loads(raw)
    assert out["id"] == "nested" and out["model_name"] == "add_sub"
    by_name = {o["name"]: o for o in out["outputs"]}
    assert by_name["OUTPUT0"]["shape"] == [2, 16]
    assert by_name["OUTPUT0"]["data"] == [x + 1 for x in range(32)]
    assert by_name["OUTPUT1"]["data"] == [x - 1 for x in range(32)]


def test_binary_data_output_parameter_makes_every_output_binary(server):
    body = {"parameters": {"binary_data_output": True}, "inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
        {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [2] * 16}]}
    status, headers, raw = server.request("POST", "/v2/models/add_sub/infer", json.dumps(body).encode())
    assert status == 200
    hl = int(headers["inference-header-content-length"])
    outs = json.loads(raw[:hl])["outputs"]
    assert all(o["parameters"]["binary_data_size"] == 64 for o in outs)
    sums = np.frombuffer(raw[hl:hl + 64], dtype=np.int32)
    np.testing.assert_array_equal(sums, np.arange(16) + 2)


def test_string_model(client):
    a = np.array([[str(i).encode() for i in range(16)]], dtype=object)
    b = np.array([[b"1"] * 16], dtype=object)
    i0 = httpclient.InferInput("INPUT0", [1, 16], "BYTES")
    i1 = httpclient.InferInput("INPUT1", [1, 16], "BYTES")
    i0.set_data_from_numpy(a)
    i1.set_data_from_numpy(b, binary_data=False)
    r = client.infer("add_sub_string", [i0, i1])
    assert [int(x) for x in r.as_numpy("OUTPUT0").reshape(-1)] == [i + 1 for i in range(16)]
    assert [int(x) for x in r.as_numpy("OUTPUT1").reshape(-1)] == [i - 1 for i in range(16)]


def test_versions_all_policy_and_default_latest(client):
    x = np.zeros((1, 4), dtype=np.float32)
    for version, add in (("1", 1), ("2", 2), ("3", 3), ("", 3)):
        inp = httpclient.InferInput("INPUT", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        r = client.infer("versioned", [inp], model_version=version)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT"), x + add)
        assert r.get_response()["model_version"] == (version or "3")
    assert client.get_model_metadata("versioned")["versions"] == ["1", "2", "3"]
    # Default policy: only the latest version is served.
    assert client.get_model_metadata("latest_only")["versions"] == ["3"]
    assert not client.is_model_ready("latest_only", "1")
    inp = httpclient.InferInput("INPUT", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as e:
        client.infer("latest_only", [inp], model_version="1")
    assert e.value.status() == "404" and "version 1" in e.value.message()


def test_non_batching_model(client):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    inp = httpclient.InferInput("INPUT", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    r = client.infer("no_batch", [inp])
    np.testing.assert_array_equal(r.as_numpy("OUTPUT"), x + 10)
    assert client.get_model_metadata("no_batch")["inputs"][0]["shape"] == [2, 4]


def test_autocompleted_config(client):
    cfg = client.get_model_config("identity_fp32")
    assert cfg["max_batch_size"] == 4  # Triton's default-max-batch-size for a batchable model
    assert [(i["name"], i["data_type"], i["dims"]) for i in cfg["input"]] == [("IN_FP32", "TYPE_FP32", [-1])]
    assert [(o["name"], o["data_type"], o["dims"]) for o in cfg["output"]] == [("OUT_FP32", "TYPE_FP32", [-1])]
    assert cfg["backend"] == "onnxruntime"


def test_gzip_request_body(client):
    a, b, i0, i1 = add_sub_inputs()
    i0.set_data_from_numpy(a)
    i1.set_data_from_numpy(b)
    r = client.infer("add_sub", [i0, i1], request_compression_algorithm="gzip")
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)


def test_async_client(server):
    import asyncio

    async def main():
        c = aiohttpclient.InferenceServerClient(server.http_url)
        try:
            assert await c.is_server_ready()
            results = []
            for k in range(8):
                a = np.full((1, 16), k, dtype=np.int32)
                i0 = aiohttpclient.InferInput("INPUT0", [1, 16], "INT32")
                i1 = aiohttpclient.InferInput("INPUT1", [1, 16], "INT32")
                i0.set_data_from_numpy(a)
                i1.set_data_from_numpy(a)
                results.append((k, c.infer("add_sub", [i0, i1])))
            for k, fut in results:
                r = await fut
                np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), np.full((1, 16), 2 * k))
        finally:
            await c.close()

    asyncio.run(main())


def test_sync_client_async_infer(client):
    handles = []
    for k in range(6):
        a = np.full((1, 16), k, dtype=np.int32)
        i0 = httpclient.InferInput("INPUT0", [1, 16], "INT32")
        i1 = httpclient.InferInput("INPUT1", [1, 16], "INT32")
        i0.set_data_from_numpy(a)
        i1.set_data_from_numpy(np.ones_like(a))
        handles.append((k, client.async_infer("add_sub", [i0, i1])))
    for k, h in handles:
        np.testing.assert_array_equal(h.get_result().as_numpy("OUTPUT1"), np.full((1, 16), k - 1))


def test_keep_alive_and_pipelining(server):
    import socket

    body = json.dumps({"inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [5] * 16},
        {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16}]}).encode()
    req = (b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode()
           + b"\r\n\r\n" + body)
    chunked = (b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               + hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(req + chunked + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 200 OK") < 3:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    first, second = data.index(b"HTTP/1.1 200 OK"), data.index(b"HTTP/1.1 200 OK", 1)
    assert b'"data":[6,6' in data[first:second] and b'"data":[6,6' in data[second:]


def test_raw_struct_binary_bytes_input(server):
    elems = [b"7", b"8"] + [b"0"] * 14
    raw = b"".join(struct.pack("<I", len(e)) + e for e in elems)
    ones = b"".join(struct.pack("<I", 1) + b"1" for _ in range(16))
    header = json.dumps({"inputs": [
        {"name": "INPUT0", "datatype": "BYTES", "shape": [1, 16], "parameters": {"binary_data_size": len(raw)}},
        {"name": "INPUT1", "datatype": "BYTES", "shape": [1, 16], "parameters": {"binary_data_size": len(ones)}}],
        "outputs": [{"name": "OUTPUT0"}]}).encode()
    status, _, body = server.request("POST", "/v2/models/add_sub_string/infer", header + raw + ones,
                                     {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200, body
    assert json.loads(body)["outputs"][0]["data"][:3] == ["8", "9", "1"]


def test_statistics_extension(client, server):
    a, b, i0, i1 = add_sub_inputs(rows=2)
    i0.set_data_from_numpy(a)
    i1.set_data_from_numpy(b)
    before = client.get_inference_statistics("add_sub")["model_stats"][0]
    for _ in range(3):
        client.infer("add_sub", [i0, i1])
    after = client.get_inference_statistics("add_sub", "1")["model_stats"][0]
    assert after["name"] == "add_sub" and after["version"] == "1"
    assert after["inference_count"] - before["inference_count"] == 6  # rows, not requests
    assert after["execution_count"] - before["execution_count"] == 3
    s = after["inference_stats"]
    assert s["success"]["count"] - before["inference_stats"]["success"]["count"] == 3
    assert s["compute_infer"]["ns"] > before["inference_stats"]["compute_infer"]["ns"]
    assert s["cache_hit"] == {"count": 0, "ns": 0}
    assert any(b["batch_size"] == 2 for b in after["batch_stats"])
    every = client.get_inference_statistics()["model_stats"]
    assert {"add_sub", "versioned"} <= {m["name"] for m in every}
    assert len([m for m in every if m["name"] == "versioned"]) == 3
    status, _, body = server.request("GET", "/v2/models/nope/stats")
    assert status == 404 and b"nope" in body


def test_expect_100_continue_gets_an_interim_response(server):
    import socket

    body = json.dumps({"inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": [2] * 16},
        {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16}]}).encode()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        assert s.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"  # sent before the body is
        s.sendall(body)
        reply = b""
        while b'"OUTPUT1"' not in reply:
            reply += s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200 OK") and b'"data":[3,3' in reply


def test_http10_and_connection_close_and_query_strings(server):
    import socket

    for request in (b"GET /v2/health/live HTTP/1.0\r\n\r\n",
                    b"GET /v2/health/live?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
            s.sendall(request)
            data = b""
            while chunk := s.recv(65536):  # the server closes the connection after the reply
                data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in data.lower()


def test_bf16_as_json_numbers(server):
    values = [0.5, -1.25, 3.0, 0.0, 100.0, -0.125]  # exactly representable in bfloat16
    body = json.dumps({"inputs": [{"name": "IN_BF16", "datatype": "BF16", "shape": [2, 3], "data": values}]})
    status, _, raw = server.request("POST", "/v2/models/identity_bf16/infer", body.encode())
    assert status == 200, raw
    out = json.loads(raw)["outputs"][0]
    assert out["datatype"] == "BF16" and out["shape"] == [2, 3] and out["data"] == values
