"""Wire codecs: raw tensor bytes, V2 JSON + binary extension, V2 protobuf."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from server._proto import grpc_service_pb2 as pb
from server.codecs import raw, v2_json, v2_proto
from server.errors import InvalidArgument
from server.types import InferResponse, Tensor


def test_raw_fixed_size_is_zero_copy_and_checked():
    buf = np.arange(6, dtype=np.float32).tobytes()
    arr = raw.decode("x", "FP32", (2, 3), buf)
    assert arr.shape == (2, 3) and arr[1, 2] == 5.0
    assert not arr.flags.owndata  # a view on the received bytes
    with pytest.raises(InvalidArgument, match="24 bytes expected"):
        raw.decode("x", "FP32", (2, 3), buf[:-1])
    with pytest.raises(InvalidArgument):
        raw.decode("x", "FP32", (2**40, 2**40), buf)


def test_raw_bytes_round_trip_and_truncation():
    arr = np.array([b"a", b"", "ü".encode()], dtype=object)
    blob = raw.encode(arr)
    assert blob == struct.pack("<I", 1) + b"a" + struct.pack("<I", 0) + struct.pack("<I", 2) + "ü".encode()
    assert list(raw.decode("s", "BYTES", (3,), blob)) == list(arr)
    for cut in (1, 5, len(blob) - 1):
        with pytest.raises(InvalidArgument, match="'s'"):
            raw.decode("s", "BYTES", (3,), blob[:cut])
    with pytest.raises(InvalidArgument, match="left over"):
        raw.decode("s", "BYTES", (3,), blob + b"x")
    with pytest.raises(InvalidArgument, match="cannot hold"):
        raw.decode("s", "BYTES", (2**40,), blob)  # refused before looping or allocating


@pytest.mark.parametrize("shape", [[1, -1], "12", [1.5], [True], None])
def test_shape_must_be_non_negative_ints(shape):
    with pytest.raises(InvalidArgument, match="shape"):
        raw.check_shape("x", shape)


def http_body(inputs, binary=b"", **extra):
    header = json.dumps({"inputs": inputs, **extra}).encode()
    return header + binary, len(header) if binary else None


def test_json_decode_flat_nested_and_binary():
    blob = np.array([7, 8], dtype=np.int64).tobytes()
    body, hl = http_body([
        {"name": "a", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]},
        {"name": "b", "datatype": "BYTES", "shape": [2], "data": ["x", "yz"]},
        {"name": "c", "datatype": "INT64", "shape": [1, 2], "parameters": {"binary_data_size": 16}},
    ], blob, id="r1", outputs=[{"name": "o", "parameters": {"binary_data": True}}])
    req = v2_json.decode_request(body, hl, "m", "2")
    assert req.model_name == "m" and req.model_version == "2" and req.id == "r1"
    a, b, c = req.inputs
    assert a.data.dtype == np.float32 and a.data.tolist() == [[1, 2], [3, 4]]
    assert list(b.data) == [b"x", b"yz"]
    assert c.data.tolist() == [[7, 8]]
    assert req.outputs[0].name == "o" and req.outputs[0].binary is True


def test_json_encode_mixed_binary_and_json():
    resp = InferResponse("m", "1", [Tensor("o1", "INT32", (2,), np.array([1, 2], dtype=np.int32)),
                                    Tensor("o2", "BYTES", (1,), np.array([b"hi"], dtype=object))], id="q")
    req = v2_json.decode_request(*http_body([{"name": "i", "datatype": "INT32", "shape": [1], "data": [1]}],
                                            outputs=[{"name": "o1", "parameters": {"binary_data": True}},
                                                     {"name": "o2"}]), "m", "")
    body, hl = v2_json.encode_response(resp, req)
    head = json.loads(body[:hl])
    assert head["id"] == "q" and head["outputs"][0]["parameters"]["binary_data_size"] == 8
    assert head["outputs"][1]["data"] == ["hi"]
    assert np.frombuffer(body[hl:], dtype=np.int32).tolist() == [1, 2]


def test_json_encode_all_json_has_no_header_length():
    resp = InferResponse("m", "1", [Tensor("o", "FP16", (2,), np.array([0.5, 1.5], dtype=np.float16))])
    req = v2_json.decode_request(*http_body([{"name": "i", "datatype": "INT32", "shape": [1], "data": [1]}]),
                                 "m", "")
    body, hl = v2_json.encode_response(resp, req)
    assert hl is None and json.loads(body)["outputs"][0]["data"] == [0.5, 1.5]


@pytest.mark.parametrize("body, word", [
    (b"{", "malformed JSON"), (b"[]", "JSON object"), (b'{"inputs": {}}', "inputs"),
    (b'{"id": 3, "inputs": []}', "id"),
    (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1]}]}', "neither"),
    (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1]}]}', "do not match"),
    (b'{"inputs": [{"name": "a", "datatype": "BYTES", "shape": [1], "data": [1]}]}', "strings"),
    (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": {}}', "outputs"),
])
def test_json_decode_errors(body, word):
    with pytest.raises(InvalidArgument, match=word):
        v2_json.decode_request(body, None, "m", "")


def test_proto_decode_raw_typed_and_encode():
    msg = pb.ModelInferRequest(model_name="m", id="g")
    msg.inputs.add(name="a", datatype="INT32", shape=[2])
    msg.raw_input_contents.append(np.array([3, 4], dtype=np.int32).tobytes())
    req = v2_proto.decode_request(msg)
    assert req.inputs[0].data.tolist() == [3, 4] and req.id == "g"
    typed = pb.ModelInferRequest(model_name="m")
    t = typed.inputs.add(name="a", datatype="UINT8", shape=[3])
    t.contents.uint_contents.extend([1, 2, 255])
    assert v2_proto.decode_request(typed).inputs[0].data.dtype == np.uint8
    t.contents.uint_contents.append(9)
    with pytest.raises(InvalidArgument, match="4 elements"):
        v2_proto.decode_request(typed)
    out = v2_proto.encode_response(InferResponse("m", "1", [Tensor("o", "INT32", (2,), np.array([5, 6],
                                                                                             dtype=np.int32))], id="g"))
    assert out.id == "g" and list(out.outputs[0].shape) == [2]
    assert np.frombuffer(out.raw_output_contents[0], dtype=np.int32).tolist() == [5, 6]


def test_proto_parameters_round_trip():
    msg = pb.ModelInferRequest()
    v2_proto.parameters_to_proto({"b": True, "i": 3, "f": 0.5, "s": "x"}, msg.parameters)
    assert v2_proto.parameters_from_proto(msg.parameters) == {"b": True, "i": 3, "f": 0.5, "s": "x"}


@pytest.mark.parametrize("final", [False, True])
@pytest.mark.parametrize(("name", "version", "rid"), [("m", "1", "req-7"), ("model_" * 30, "", "")])
def test_a_stream_reply_written_by_hand_is_the_message_protobuf_writes(final, name, version, rid):
    outputs = [Tensor("OUT", "INT32", (2, 3), np.arange(6, dtype=np.int32).reshape(2, 3)),
               Tensor("TEXT", "BYTES", (2,), np.array([b"a", "\u00e9".encode()], dtype=object)),
               Tensor("EMPTY", "FP32", (0, 300), np.zeros((0, 300), np.float32)),
               Tensor("SCALAR", "FP64", (), np.array(2.5))]
    response = InferResponse(name, version, outputs, rid)
    expected = pb.ModelStreamInferResponse(infer_response=v2_proto.encode_response(response))
    expected.infer_response.parameters["triton_final_response"].bool_param = final
    replies = v2_proto.StreamReplies(name, version, rid, tuple((t.name, t.datatype) for t in outputs))
    arrays = {t.name: t.data for t in outputs}
    for _ in range(2):  # the second time from its cache of output headers
        wire = replies.encode(arrays, final)
        got = pb.ModelStreamInferResponse.FromString(wire)
        assert got == expected
        assert got.infer_response.parameters["triton_final_response"].WhichOneof("parameter_choice") == "bool_param"
        assert wire == expected.SerializeToString()
    other = InferResponse(name, version, [Tensor("OUT", "INT32", (1, 3), np.arange(3, dtype=np.int32).reshape(1, 3))],
                          rid)  # another shape of the same output
    replies = v2_proto.StreamReplies(name, version, rid, (("OUT", "INT32"),))
    replies.encode({"OUT": np.zeros((2, 3), np.int32)}, final)
    for _ in range(2):  # one numeric output: its own path, the second time from its cached head
        assert replies.encode({"OUT": other.outputs[0].data}, final) == _expected(other, final).SerializeToString()


def _expected(response, final):
    message = pb.ModelStreamInferResponse(infer_response=v2_proto.encode_response(response))
    message.infer_response.parameters["triton_final_response"].bool_param = final
    return message
