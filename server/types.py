"""The protocol-agnostic request and response that the codecs produce and the service consumes.

Tensors hold numpy arrays already shaped as the client declared them; BYTES tensors hold object
arrays of `bytes`. Nothing here knows about HTTP, gRPC or a particular model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Request / response parameters: V2 allows bool, int, float and string values.
Parameters = dict[str, Any]


@dataclass(frozen=True, slots=True)
class RegionRef:
    """Where a tensor lies in a registered shared memory region (server/shared_memory.py): the
    region's name, and an offset and a byte size within it, as the client gave them (unchecked)."""

    name: str
    offset: Any
    byte_size: Any


# The data of an input that is still in shared memory (its `region` says where), or of an output
# that was written into it: the wire then carries only its name, datatype and shape.
IN_REGION = np.empty(0, dtype=np.uint8)


@dataclass(slots=True)
class Tensor:
    name: str
    datatype: str  # V2 name, e.g. "FP32"
    shape: tuple[int, ...]
    data: np.ndarray  # already reshaped to `shape`; IN_REGION while `region` is set and unread
    parameters: Parameters = field(default_factory=dict)
    region: RegionRef | None = None  # an input read from, or an output written to, shared memory


@dataclass(slots=True)
class RequestedOutput:
    name: str
    # HTTP only: True/False when the client asked for binary_data on this output, None otherwise.
    binary: bool | None = None
    parameters: Parameters = field(default_factory=dict)
    region: RegionRef | None = None  # where to write it: a shared memory region


@dataclass(slots=True)
class InferRequest:
    model_name: str
    model_version: str  # "" means the latest ready version
    inputs: list[Tensor]
    outputs: list[RequestedOutput]  # empty: every output of the model
    id: str = ""
    parameters: Parameters = field(default_factory=dict)
    shared_memory: bool = False  # some input or requested output has a `region`


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[Tensor]
    id: str = ""
    parameters: Parameters = field(default_factory=dict)


# A response of a `Responses` batch: a decoupled model's arrays by output name, a whole response,
# or None (a flag-only final).
Streamed = dict[str, np.ndarray] | InferResponse | None


@dataclass(slots=True)
class Responses:
    """Responses to one request that came together, in order, each with whether it is the last:
    what the service's `stream` yields, so that one write can carry them all. A decoupled model's
    responses stay its arrays by output name until a frontend needs them as InferResponses
    (`responses()`); one that writes them straight to the wire skips making those objects (about
    1.5 us a response, more than the rest of its encoding). A model that is not decoupled gives
    its one InferResponse, parameters and all."""

    model_name: str
    model_version: str
    id: str
    outputs: tuple[tuple[str, str], ...]  # (name, V2 datatype) of the outputs each response returns
    items: Sequence[tuple[Streamed, bool]]  # a list, or the sink's deque

    def responses(self) -> list[tuple[InferResponse | None, bool]]:
        return [(self.response(r) if isinstance(r, dict) else r, final) for r, final in self.items]

    def response(self, arrays: dict[str, np.ndarray]) -> InferResponse:
        return InferResponse(self.model_name, self.model_version,
                             [Tensor(n, dt, (a := arrays[n]).shape, a) for n, dt in self.outputs], self.id)

    @property
    def final(self) -> bool:
        return bool(self.items) and self.items[-1][1]
