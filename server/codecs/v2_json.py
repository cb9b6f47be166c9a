"""KServe V2 over HTTP: the JSON body and Triton's binary tensor data extension.

A request body is a JSON header, optionally followed by binary tensor data; the
`Inference-Header-Content-Length` HTTP header gives the JSON part's length. An input with
`parameters.binary_data_size` takes that many bytes of the binary part, in input order. Outputs go
back as JSON `data` or, when asked (`binary_data` per output or `binary_data_output` for all), as
binary after the JSON header, announced with `parameters.binary_data_size`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from .. import dtypes
from ..errors import InvalidArgument
from ..types import IN_REGION, InferRequest, InferResponse, RequestedOutput, Tensor
from . import raw, regions

_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


def loads(body: bytes | memoryview, what: str = "request body") -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"malformed JSON in {what}: {exc}") from None


def _parameters(obj: dict, where: str) -> dict:
    params = obj.get("parameters")
    if not params:
        return {}
    if type(params) is not dict:
        raise InvalidArgument(f"{where}: 'parameters' must be a JSON object")
    return params


def _json_data(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    dt = dtypes.BY_V2.get(datatype)
    if dt is None:
        raise InvalidArgument(f"input '{name}': unknown datatype '{datatype}'")
    count = raw.element_count(shape)
    if not isinstance(data, list):
        data = [data]
    try:
        if dt is dtypes.BYTES:
            arr = np.array(data, dtype=object)
            flat = arr.reshape(-1)
            for i, item in enumerate(flat):
                if isinstance(item, str):
                    flat[i] = item.encode("utf-8")
                elif not isinstance(item, bytes):
                    raise InvalidArgument(f"input '{name}': BYTES data must be strings, got {type(item).__name__}")
        else:
            arr = np.array(data, dtype=dt.numpy)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidArgument(f"input '{name}': data cannot be read as {datatype}: {exc}") from None
    if arr.size != count:
        raise InvalidArgument(f"input '{name}': {arr.size} data elements do not match shape {list(shape)} "
                              f"({count} elements)")
    return arr.reshape(shape)


def decode_request(body: bytes, header_length: int | None, model_name: str, model_version: str) -> InferRequest:
    """An HTTP infer body -> InferRequest. `header_length` is Inference-Header-Content-Length."""
    if header_length is None or header_length == len(body):
        obj = loads(body, "inference request")
        binary = memoryview(b"")
    elif header_length > len(body):
        raise InvalidArgument(f"Inference-Header-Content-Length is {header_length} but the body has only "
                              f"{len(body)} bytes")
    else:
        view = memoryview(body)
        obj = loads(view[:header_length], "inference request")
        binary = view[header_length:]
    if type(obj) is not dict:
        raise InvalidArgument("the inference request must be a JSON object")
    request_id = obj.get("id", "")
    if type(request_id) is not str:
        raise InvalidArgument("request 'id' must be a string")
    params = _parameters(obj, "request") if "parameters" in obj else {}
    raw_inputs = obj.get("inputs")
    if type(raw_inputs) is not list or not raw_inputs:
        raise InvalidArgument("the request must have a non-empty 'inputs' list")
    offset = 0
    inputs = []
    shared = False
    for item in raw_inputs:
        if type(item) is not dict:
            raise InvalidArgument("each input must be a JSON object with a 'name' string")
        name = item.get("name")
        datatype = item.get("datatype")
        if type(name) is not str:
            raise InvalidArgument("each input must be a JSON object with a 'name' string")
        if type(datatype) is not str:
            raise InvalidArgument(f"input '{name}': 'datatype' must be a string")
        shape = raw.check_shape(name, item.get("shape"))
        in_params = _parameters(item, f"input '{name}'") if "parameters" in item else {}
        size = in_params.get("binary_data_size") if in_params else None
        region = regions.region_ref("input", name, in_params) if in_params else None
        if region is not None:
            if size is not None or "data" in item:
                raise InvalidArgument(f"input '{name}' must set only one of 'data', 'binary_data_size' in "
                                      f"'parameters' and 'shared_memory_region' in 'parameters'")
            inputs.append(Tensor(name, datatype, shape, IN_REGION, in_params, region))
            shared = True
            continue
        if size is not None:
            if type(size) is not int or size < 0:
                raise InvalidArgument(f"input '{name}': binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise InvalidArgument(f"input '{name}': binary_data_size {size} runs past the end of the body "
                                      f"({len(binary) - offset} bytes left)")
            data = raw.decode(name, datatype, shape, binary[offset:offset + size])
            offset += size
        elif "data" in item:
            data = _json_data(name, datatype, shape, item["data"])
        else:
            raise InvalidArgument(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
        inputs.append(Tensor(name, datatype, shape, data, in_params))
    if offset != len(binary):
        raise InvalidArgument(f"the body has {len(binary) - offset} bytes of binary data that no input claims")
    outputs = []
    raw_outputs = obj.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise InvalidArgument("'outputs' must be a list")
    for item in raw_outputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidArgument("each requested output must be a JSON object with a 'name' string")
        o_params = _parameters(item, f"output '{item['name']}'") if "parameters" in item else {}
        want_binary = o_params.get("binary_data")
        region = regions.region_ref("output", item["name"], o_params) if o_params else None
        if region is not None:
            if want_binary:
                raise InvalidArgument("Output can't set both 'shared_memory_region' and 'binary_data'")
            shared = True
        outputs.append(RequestedOutput(item["name"], bool(want_binary) if want_binary is not None else None,
                                       o_params, region))
    return InferRequest(model_name, model_version, inputs, outputs, request_id, params, shared)


def _json_values(t: Tensor) -> Any:
    arr = t.data.reshape(-1)
    if t.datatype == "BYTES":
        try:
            return [b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in arr]
        except UnicodeDecodeError:
            raise InvalidArgument(f"output '{t.name}' holds bytes that are not UTF-8; "
                                  f"request it with binary_data") from None
    if t.datatype == "BF16":
        return arr.astype(np.float32)
    return arr


def encode_response(response: InferResponse, request: InferRequest) -> tuple[bytes, int | None]:
    """InferResponse -> (body, JSON header length or None when the body is only JSON)."""
    default_binary = bool(request.parameters.get("binary_data_output", False))
    wants = {o.name: o.binary for o in request.outputs}
    chunks: list[bytes] = []
    outs = []
    for t in response.outputs:
        want = wants.get(t.name)
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if t.region is not None:
            pass  # written into the client's shared memory: the name, datatype and shape say it all
        elif want if want is not None else default_binary:
            blob = raw.encode(t.data)
            chunks.append(blob)
            entry["parameters"] = {"binary_data_size": len(blob)}
        else:
            entry["data"] = _json_values(t)
        outs.append(entry)
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    doc["outputs"] = outs
    header = orjson.dumps(doc, option=_JSON_OPTS)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)
