"""Triton's generate extension over HTTP: a flat JSON object in, a flat JSON object per response out.

    POST /v2/models/<m>/generate          {"text_input": "...", "max_tokens": 8, "parameters": {...}}
    POST /v2/models/<m>/generate_stream   the same; answered as server-sent events

A top-level field named like one of the model's inputs becomes that input: a scalar has shape
[1], a list [n] (a nested list its nesting), with the model's batch dim of 1 in front when the
model batches. Every other top-level field, and each member of `parameters`, becomes a request
parameter (a string, number or bool). A response is one object: each output is a field (its only
element when it has one, else a flat list; BYTES as text), with `model_name` and `model_version`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from ..errors import InvalidArgument
from ..types import InferRequest, InferResponse, Tensor
from . import v2_json


def decode_request(body: bytes, model_name: str, model_version: str, inputs: Mapping[str, str],
                   batching: bool) -> InferRequest:
    """`inputs`: the model's input names and their V2 datatypes; `batching`: max_batch_size > 0."""
    doc = v2_json.loads(body, "generate request")
    if type(doc) is not dict:
        raise InvalidArgument("the generate request must be a JSON object")
    parameters: dict[str, Any] = {}
    given = doc.get("parameters")
    if given is not None:
        if type(given) is not dict:
            raise InvalidArgument("'parameters' must be a JSON object")
        parameters.update(given)
    tensors = []
    for key, value in doc.items():
        if key == "parameters":
            continue
        datatype = inputs.get(key)
        if datatype is None:
            parameters[key] = value
            continue
        shape = tuple(np.shape(value)) if isinstance(value, list) else (1,)
        data = v2_json._json_data(key, datatype, shape, value)
        if batching:
            shape, data = (1, *shape), data[np.newaxis]
        tensors.append(Tensor(key, datatype, shape, data))
    for key, value in parameters.items():
        if not isinstance(value, str | int | float | bool) or value is None:
            raise InvalidArgument(f"parameter '{key}' must be a string, number or boolean")
    if not tensors:
        raise InvalidArgument(f"the generate request names none of the model's inputs ({', '.join(inputs)})")
    return InferRequest(model_name, model_version, tensors, [], "", parameters)


def encode_response(response: InferResponse) -> bytes:
    outputs = tuple((t.name, t.datatype) for t in response.outputs)
    return encode_arrays(response.model_name, response.model_version, outputs,
                         {t.name: t.data for t in response.outputs})


def encode_arrays(model_name: str, model_version: str, outputs: tuple[tuple[str, str], ...],
                  arrays: Mapping[str, np.ndarray]) -> bytes:
    """A response from its arrays by output name; `outputs`: (name, V2 datatype) of each, in order
    (a decoupled model's responses, types.Responses, are not made InferResponses for this)."""
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    for name, datatype in outputs:
        flat = arrays[name].reshape(-1)
        values = flat if datatype not in _CONVERTED else v2_json._json_values(Tensor(name, datatype, flat.shape, flat))
        doc[name] = values[0] if len(values) == 1 else values
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


_CONVERTED = ("BYTES", "BF16")  # datatypes whose values v2_json turns into JSON's


def event(data: bytes) -> bytes:
    """One server-sent event carrying `data` (a JSON object: it holds no newline)."""
    return b"data: " + data + b"\n\n"
