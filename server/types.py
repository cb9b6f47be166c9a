"""The protocol-agnostic request and response that the codecs produce and the service consumes.

Tensors hold numpy arrays already shaped as the client declared them; BYTES tensors hold object
arrays of `bytes`. Nothing here knows about HTTP, gRPC or a particular model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Request / response parameters: V2 allows bool, int, float and string values.
Parameters = dict[str, Any]


@dataclass(slots=True)
class Tensor:
    name: str
    datatype: str  # V2 name, e.g. "FP32"
    shape: tuple[int, ...]
    data: np.ndarray  # already reshaped to `shape`
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    name: str
    # HTTP only: True/False when the client asked for binary_data on this output, None otherwise.
    binary: bool | None = None
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    model_name: str
    model_version: str  # "" means the latest ready version
    inputs: list[Tensor]
    outputs: list[RequestedOutput]  # empty: every output of the model
    id: str = ""
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[Tensor]
    id: str = ""
    parameters: Parameters = field(default_factory=dict)
