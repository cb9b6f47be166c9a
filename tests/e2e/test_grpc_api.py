"""KServe V2 over gRPC against a real fuserve process, through tritonclient.grpc (sync, async, stream)."""

from __future__ import annotations

import asyncio
import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpcclient
from test_http_api import V2_TYPES, sample
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def add_sub_inputs(k: int = 0, rows: int = 1):
    a = np.arange(16 * rows, dtype=np.int32).reshape(rows, 16) + k
    b = np.full((rows, 16), 2, dtype=np.int32)
    i0 = grpcclient.InferInput("INPUT0", [rows, 16], "INT32")
    i1 = grpcclient.InferInput("INPUT1", [rows, 16], "INT32")
    i0.set_data_from_numpy(a)
    i1.set_data_from_numpy(b)
    return a, b, [i0, i1]


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("add_sub") and not client.is_model_ready("nope")
    md = client.get_server_metadata(as_json=True)
    assert md["name"] == "triton" and md["version"].endswith("+fuserve") and "binary_tensor_data" in md["extensions"]
    mm = client.get_model_metadata("add_sub", as_json=True)
    assert mm["versions"] == ["1"] and mm["inputs"][0] == {"name": "INPUT0", "datatype": "INT32", "shape": ["-1", "16"]}
    cfg = client.get_model_config("add_sub").config
    assert cfg.name == "add_sub" and cfg.max_batch_size == 8 and list(cfg.input[0].dims) == [16]


def test_infer_raw_contents(client):
    a, b, inputs = add_sub_inputs(rows=2)
    r = client.infer("add_sub", inputs, request_id="g-1")
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
    assert r.get_response().id == "g-1"


def test_requested_outputs(client):
    a, b, inputs = add_sub_inputs()
    r = client.infer("add_sub", inputs, outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    assert [o.name for o in r.get_response().outputs] == ["OUTPUT1"]
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)


@pytest.mark.parametrize("datatype", V2_TYPES + ["BF16"])
def test_every_datatype_round_trips(client, datatype):
    data = sample(datatype)
    inp = grpcclient.InferInput(f"IN_{datatype}", list(data.shape), datatype)
    inp.set_data_from_numpy(data)
    got = client.infer(f"identity_{datatype.lower()}", [inp]).as_numpy(f"OUT_{datatype}")
    if datatype == "BYTES":
        assert list(got.reshape(-1)) == list(data.reshape(-1))
    elif datatype == "BF16":  # tritonclient hands BF16 back as float32
        np.testing.assert_array_equal(got, data.astype(np.float32))
    else:
        np.testing.assert_array_equal(got, data)


def test_typed_contents(server):
    """Inputs in InferTensorContents (not raw_input_contents), as some non-Triton clients send them."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        req = service_pb2.ModelInferRequest(model_name="add_sub", id="typed")
        for name, values in (("INPUT0", list(range(16))), ("INPUT1", [4] * 16)):
            t = req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
            t.contents.int_contents.extend(values)
        resp = stub.ModelInfer(req)
        out = np.frombuffer(resp.raw_output_contents[0], dtype=np.int32)
        np.testing.assert_array_equal(out, np.arange(16) + 4)
        assert resp.id == "typed"
        s = service_pb2.ModelInferRequest(model_name="add_sub_string")
        for name, values in (("INPUT0", [b"5"] * 16), ("INPUT1", [b"2"] * 16)):
            t = s.inputs.add(name=name, datatype="BYTES", shape=[1, 16])
            t.contents.bytes_contents.extend(values)
        resp = stub.ModelInfer(s)
        assert resp.raw_output_contents[1][:5] == b"\x01\x00\x00\x003"


def test_versions(client):
    x = np.zeros((1, 4), dtype=np.float32)
    for version, add in (("1", 1), ("2", 2), ("", 3)):
        inp = grpcclient.InferInput("INPUT", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        r = client.infer("versioned", [inp], model_version=version)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT"), x + add)


def test_errors_have_grpc_codes(client):
    _, _, inputs = add_sub_inputs()
    with pytest.raises(InferenceServerException) as e:
        client.infer("nope", inputs)
    assert e.value.status() == "StatusCode.NOT_FOUND" and "nope" in e.value.message()
    bad = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 16), dtype=np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("add_sub", [bad, inputs[1]])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "INPUT0" in e.value.message()
    assert client.infer("add_sub", inputs).as_numpy("OUTPUT0") is not None


def test_async_infer_callbacks(client):
    done: queue.Queue = queue.Queue()
    expected = {}
    for k in range(8):
        a, b, inputs = add_sub_inputs(k)
        expected[str(k)] = a + b
        client.async_infer("add_sub", inputs, callback=lambda result, error: done.put((result, error)),
                           request_id=str(k))
    for _ in range(8):
        result, error = done.get(timeout=30)
        assert error is None
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), expected[result.get_response().id])


def test_stream_infer_each_reply_carries_its_id_and_bad_requests_error_alone(client):
    replies: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        expected = {}
        for k in range(5):
            a, b, inputs = add_sub_inputs(k)
            expected[f"s{k}"] = a - b
            client.async_stream_infer("add_sub", inputs, request_id=f"s{k}")
        bad = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
        bad.set_data_from_numpy(np.zeros((1, 16), dtype=np.int32))
        client.async_stream_infer("add_sub", [bad], request_id="bad")
        a, b, inputs = add_sub_inputs(99)
        expected["after"] = a - b
        client.async_stream_infer("add_sub", inputs, request_id="after")
        got, errors = {}, []
        for _ in range(7):
            result, error = replies.get(timeout=30)
            if error is not None:
                errors.append(error)
            else:
                got[result.get_response().id] = result.as_numpy("OUTPUT1")
        assert len(errors) == 1 and "INPUT1" in errors[0].message()
        assert set(got) == set(expected)
        for rid, arr in got.items():
            np.testing.assert_array_equal(arr, expected[rid])
    finally:
        client.stop_stream()


def test_aio_client(server):
    async def main():
        c = aiogrpcclient.InferenceServerClient(server.grpc_url)
        try:
            assert await c.is_server_ready()
            tasks = []
            for k in range(8):
                a = np.full((1, 16), k, dtype=np.int32)
                i0 = aiogrpcclient.InferInput("INPUT0", [1, 16], "INT32")
                i1 = aiogrpcclient.InferInput("INPUT1", [1, 16], "INT32")
                i0.set_data_from_numpy(a)
                i1.set_data_from_numpy(a)
                tasks.append(c.infer("add_sub", [i0, i1]))
            for k, r in enumerate(await asyncio.gather(*tasks)):
                np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), np.full((1, 16), 2 * k))
        finally:
            await c.close()

    asyncio.run(main())


def test_repository_index_over_grpc(client):
    index = client.get_model_repository_index(as_json=True)["models"]
    by_name = {m["name"]: m for m in index}
    assert by_name["add_sub"]["state"] == "READY"
    assert by_name["broken_onnx"]["state"] == "UNAVAILABLE"
    assert "model.onnx" in by_name["broken_onnx"]["reason"]


def test_statistics_over_grpc(client):
    _, _, inputs = add_sub_inputs()
    before = client.get_inference_statistics("add_sub").model_stats[0].execution_count
    client.infer("add_sub", inputs)
    stats = client.get_inference_statistics("add_sub", as_json=True)["model_stats"][0]
    assert int(stats["execution_count"]) == before + 1
    assert int(stats["inference_stats"]["success"]["count"]) >= 1
