"""KServe V2 over gRPC: ModelInferRequest -> InferRequest and InferResponse -> ModelInferResponse.

Inputs arrive either in `raw_input_contents` (one entry per input, in order; what tritonclient
sends) or typed in `InferInputTensor.contents`. Outputs always go back in `raw_output_contents`,
as Triton does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import dtypes
from .._proto import grpc_service_pb2 as pb
from ..errors import InvalidArgument
from ..types import IN_REGION, InferRequest, InferResponse, RequestedOutput, Tensor
from . import raw, regions

_BY_V2 = dtypes.BY_V2

# V2 datatype -> the InferTensorContents field that carries it
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameters_from_proto(params: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, which) if which else None
    return out


def parameters_to_proto(params: dict[str, Any], target: Any) -> None:
    for key, value in params.items():
        p = target[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        else:
            p.string_param = str(value)


def _typed(name: str, datatype: str, shape: tuple[int, ...], contents: Any) -> np.ndarray:
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidArgument(f"input '{name}': {datatype} cannot be sent in typed contents; use raw_input_contents")
    values = getattr(contents, field)
    count = raw.element_count(shape)
    if len(values) != count:
        raise InvalidArgument(f"input '{name}': {len(values)} elements in contents do not match shape "
                              f"{list(shape)} ({count} elements)")
    dt = dtypes.BY_V2[datatype]
    if dt is dtypes.BYTES:
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    try:
        return np.array(values, dtype=dt.numpy).reshape(shape)
    except OverflowError as exc:
        raise InvalidArgument(f"input '{name}': a value does not fit {datatype}: {exc}") from None


def decode_request(msg: pb.ModelInferRequest) -> InferRequest:
    """Every field is read once: on upb messages each attribute access builds a Python object, and
    on a small request these reads are most of what decoding costs. An input in shared memory has
    no entry in raw_input_contents (Triton's layout): the entries are the other inputs', in order."""
    raws = msg.raw_input_contents
    tensors = msg.inputs
    if not tensors:
        raise InvalidArgument("the request has no inputs")
    inputs = []
    shared = False
    taken = 0
    for t in tensors:
        name, datatype = t.name, t.datatype
        dt = _BY_V2.get(datatype)
        if dt is None:
            raise InvalidArgument(f"input '{name}': unknown datatype '{datatype}'")
        shape = tuple(t.shape)
        if len(shape) > 32 or (shape and min(shape) < 0):
            raw.check_shape(name, shape)  # raises, naming what is wrong
        params = t.parameters
        in_params = parameters_from_proto(params) if params else {}
        region = regions.region_ref("input", name, in_params) if in_params else None
        if region is not None:
            if t.HasField("contents"):
                raise InvalidArgument(f"unexpected 'content' provided when using shared memory for input tensor "
                                      f"'{name}' for model '{msg.model_name}'")
            inputs.append(Tensor(name, datatype, shape, IN_REGION, in_params, region))
            shared = True
            continue
        if not raws:
            data = _typed(name, datatype, shape, t.contents)
        elif taken >= len(raws):
            raise InvalidArgument(f"unable to find data for input tensor '{name}' for model '{msg.model_name}' "
                                  f"in request")
        elif dt is dtypes.BYTES:
            data = raw.decode(name, datatype, shape, raws[taken])
            taken += 1
        else:
            buf = raws[taken]
            taken += 1
            if raw.element_count(shape) * dt.itemsize != len(buf):
                raw.decode(name, datatype, shape, buf)  # raises, naming the sizes
            data = np.frombuffer(buf, dt.numpy).reshape(shape)
        inputs.append(Tensor(name, datatype, shape, data, in_params))
    if raws and taken != len(raws):
        raise InvalidArgument(f"raw_input_contents has {len(raws)} entries but the request has {taken} inputs "
                              f"that are not in shared memory")
    wanted = msg.outputs
    outputs = []
    for o in wanted:
        o_params = parameters_from_proto(o.parameters) if o.parameters else {}
        region = regions.region_ref("output", o.name, o_params) if o_params else None
        shared = shared or region is not None
        outputs.append(RequestedOutput(o.name, None, o_params, region))
    params = msg.parameters
    return InferRequest(msg.model_name, msg.model_version, inputs, outputs, msg.id,
                        parameters_from_proto(params) if params else {}, shared)


class Serialized(bytes):
    """A message already in wire form, where a protobuf message is expected (`SerializeToString`)."""

    def SerializeToString(self) -> bytes:  # noqa: N802 (protobuf's name)
        return bytes(self)


def varint(n: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_VARINTS = [varint(n) for n in range(1 << 14)]  # the varints of lengths under 16 KiB, made once


def _varint(n: int) -> bytes:
    return _VARINTS[n] if n < 16384 else varint(n)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2) with a one-byte tag (field numbers < 16)."""
    return bytes((number << 3 | 2,)) + _varint(len(data)) + data


def _final_parameter(final: bool) -> bytes:
    """ModelInferResponse.parameters["triton_final_response"] = InferParameter{bool_param: final}."""
    return _field(4, _field(1, b"triton_final_response") + _field(2, b"\x08" + (b"\x01" if final else b"\x00")))


_FINAL_PARAMETER = {True: _final_parameter(True), False: _final_parameter(False)}


class StreamReplies:
    """One stream request's replies, ModelStreamInferResponse{infer_response: a response with the
    parameter triton_final_response}, written straight to wire form from a decoupled model's
    arrays (types.Responses): its replies share their model name, version and id, and mostly their
    outputs' shapes, so those fields are encoded once per request. Byte for byte what protobuf
    writes (1.1-1.8 us a reply of one small output, against 8.9 us making the response objects
    and serializing the two messages)."""

    __slots__ = ("_prefix", "_outputs", "_headers", "_shape", "_heads")

    def __init__(self, model_name: str, model_version: str, request_id: str,
                 outputs: tuple[tuple[str, str], ...]) -> None:
        self._prefix = b"".join([_field(1, model_name.encode()) if model_name else b"",
                                 _field(2, model_version.encode()) if model_version else b"",
                                 _field(3, request_id.encode()) if request_id else b""])
        self._outputs = outputs
        self._headers: dict[tuple[str, tuple[int, ...]], bytes] = {}
        # One numeric output (the common case, a token at a time): its shape the last time, and
        # everything before its contents for that shape, final or not.
        self._shape: tuple[int, ...] | None = None
        self._heads: tuple[bytes, bytes] = (b"", b"")

    def encode(self, arrays: dict[str, np.ndarray], final: bool) -> bytes:
        """The reply's message in wire form."""
        outputs = self._outputs
        if len(outputs) == 1 and outputs[0][1] != "BYTES":
            arr = arrays[outputs[0][0]]
            if arr.shape != self._shape:
                header = self._header(outputs[0][0], outputs[0][1], arr.shape) + b"\x32"
                self._heads = (self._prefix + _FINAL_PARAMETER[False] + header,
                               self._prefix + _FINAL_PARAMETER[True] + header)
                self._shape = arr.shape
            head = self._heads[final]
            data = arr.tobytes()
            size = _varint(len(data))
            return b"".join((b"\x12", _varint(len(head) + len(size) + len(data)), head, size, data))
        parts = [self._prefix, _FINAL_PARAMETER[final]]
        contents = []
        headers = self._headers
        for name, datatype in outputs:
            arr = arrays[name]
            known = headers.get((name, arr.shape))
            parts.append(known if known is not None else self._header(name, datatype, arr.shape))
            data = arr.tobytes() if datatype != "BYTES" else raw.encode(arr)
            contents.append(b"\x32" + _varint(len(data)))  # raw_output_contents, field 6
            contents.append(data)
        inner = b"".join(parts + contents)
        return b"\x12" + _varint(len(inner)) + inner

    def _header(self, name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
        """An output's InferOutputTensor (name, datatype, shape), cached: a bounded cache, for
        outputs whose shapes keep changing."""
        if len(self._headers) >= 64:
            self._headers.clear()
        dims = b"".join([varint(d) for d in shape])
        header = self._headers[(name, shape)] = _field(5, _field(1, name.encode()) + _field(2, datatype.encode())
                                                        + (_field(3, dims) if dims else b""))
        return header


def encode_response(response: InferResponse) -> pb.ModelInferResponse:
    msg = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version,
                                id=response.id)
    for t in response.outputs:
        msg.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        # an output written into shared memory keeps an empty entry, so the indexes stay aligned
        msg.raw_output_contents.append(raw.encode(t.data) if t.region is None else b"")
    if response.parameters:
        parameters_to_proto(response.parameters, msg.parameters)
    return msg
