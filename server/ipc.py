"""The link between frontend worker processes and the scheduler process (`--frontend-workers`).

One Unix socket per worker. Each side queues messages and writes them once per event-loop turn as
one frame: a 4-byte length, then a pickled list of `(kind, request id, payload)` tuples. Requests
and responses travel as tuples of plain values with each tensor's bytes (`pack_request` and
friends): pickling numpy arrays and dataclasses directly costs ~15 us a request each way, these
~4 us (`loadtests/bench_ipc.py`).

Kinds, worker -> scheduler: `infer` (a packed InferRequest), `group` (several inferences of one
model that arrived in one loop turn, their inputs concatenated: see "Groups" below), `cancel` (the
client went away),
`http` (a non-inference REST request, answered by the scheduler's own REST frontend), `grpc` (a
non-inference gRPC call: method path and message bytes), `gstream` (one message of a streaming
gRPC call, ModelStreamInfer: path, message bytes; its replies come back as parts), `credit` (n:
the worker has passed n more parts on), `refused` (an inference the worker could not decode:
model name, version, error class and message; answered `err`), `hello` (the worker is serving).
Scheduler -> worker: `ok` (a packed InferResponse), `gok` (a group's answer: the outputs of all its
requests, concatenated, and the members), `err` (error class name and message), `http`
(status, body, content type, headers), `shttp` (the same, for an answer whose body streams as
parts: /generate_stream), `grpc` (status code, message, reply bytes), `part` (the next bytes of a
streamed answer: events, or serialized gRPC replies, one or a list that leave together), `end`
(that answer is complete), `gerr` (a streaming gRPC call failed: status code, message).

Groups: what costs the scheduler process CPU is the per-request work (a message to unpack, a check,
a queue entry, a response to pack), not the bytes. So a worker sends the
inferences for one model that arrive in one event-loop turn, and that the scheduler would treat
alike (`group_key`: same inputs' names, datatypes and non-batch dims, same outputs, nothing else
that changes how they run), as one request of their rows together plus its members' (request id,
rows, client id). The scheduler runs it as one request where the model allows (server/workers.py
says when), answered with one `gok`, and otherwise unpacks it and answers each member alone; the
worker cuts the `gok`'s outputs back into one response per member (`split_group`).

A streamed answer is credited: the scheduler sends at most STREAM_WINDOW parts the worker has not
passed on, so a client that reads slowly makes the model's sender wait, as without workers, and
neither process holds more than a window of one request's parts.
"""

from __future__ import annotations

import asyncio
import logging
import pickle  # nosec B403  # the worker link only (see below)
import struct
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from . import dtypes, errors
from .framing import Reassembly
from .types import IN_REGION, InferRequest, InferResponse, RegionRef, RequestedOutput, Tensor

log = logging.getLogger(__name__)

_LEN = struct.Struct(">L")
Message = tuple[str, int, Any]
STREAM_WINDOW = 16  # parts of one streamed answer in flight on the link
CREDIT_BATCH = 4  # the worker returns credit this many parts at a time


def _pack_region(ref: RegionRef | None) -> tuple | None:
    return None if ref is None else (ref.name, ref.offset, ref.byte_size)


def _pack_tensor(t: Tensor) -> tuple:
    if t.region is not None:  # its data is in shared memory, which the scheduler process maps
        return t.name, t.datatype, t.shape, None, t.parameters or None, _pack_region(t.region)
    data: Any = t.data.ravel().tolist() if t.datatype == "BYTES" else t.data.tobytes()
    return t.name, t.datatype, t.shape, data, t.parameters or None


def _unpack_tensor(p: tuple) -> Tensor:
    if len(p) == 6:
        name, datatype, shape, _, params, region = p
        return Tensor(name, datatype, tuple(shape), IN_REGION, params or {}, RegionRef(*region))
    name, datatype, shape, data, params = p
    if datatype == "BYTES":
        array = np.empty(len(data), dtype=object)
        array[:] = data
    else:
        array = np.frombuffer(data, dtypes.BY_V2[datatype].numpy)
    return Tensor(name, datatype, tuple(shape), array.reshape(shape), params or {})


def pack_request(r: InferRequest) -> tuple:
    return (r.model_name, r.model_version, r.id, r.parameters or None, [_pack_tensor(t) for t in r.inputs],
            [(o.name, o.binary, o.parameters or None, _pack_region(o.region)) for o in r.outputs], r.shared_memory)


def unpack_request(p: tuple) -> InferRequest:
    name, version, rid, params, inputs, outputs, shared = p
    wanted = [RequestedOutput(n, b, op or {}, RegionRef(*reg) if reg else None) for n, b, op, reg in outputs]
    return InferRequest(name, version, [_unpack_tensor(t) for t in inputs], wanted, rid, params or {}, shared)


def pack_response(r: InferResponse) -> tuple:
    return r.model_name, r.model_version, r.id, r.parameters or None, [_pack_tensor(t) for t in r.outputs]


def unpack_response(p: tuple) -> InferResponse:
    name, version, rid, params, outputs = p
    return InferResponse(name, version, [_unpack_tensor(t) for t in outputs], rid, params or {})


GroupMember = tuple[int, int, str]  # the worker's request id, its rows, the client's request id
# Request parameters that change only how the answer is encoded (in the worker), not how it runs.
_ENCODING_ONLY = frozenset(("binary_data_output",))


def group_key(r: InferRequest) -> tuple | None:
    """What a request must share with others to travel in one group (None: it travels alone):
    its model and version, its inputs' names, datatypes and non-batch dims in order, its outputs'
    names; no parameters but those of its encoding, no shared memory, no BYTES (their elements
    travel as a list, not as bytes), no classification, one batch size of at least 1 for all
    inputs. Whether the model batches is the scheduler's to judge."""
    if r.shared_memory or not r.inputs or (r.parameters and not _ENCODING_ONLY.issuperset(r.parameters)):
        return None
    shape = r.inputs[0].shape
    if not shape or shape[0] < 1:
        return None
    rows = shape[0]
    inputs = []
    for t in r.inputs:
        if t.datatype == "BYTES" or len(t.shape) == 0 or t.shape[0] != rows:
            return None
        inputs.append((t.name, t.datatype, t.shape[1:]))
    outputs = []
    for o in r.outputs:
        if "classification" in o.parameters:
            return None
        outputs.append(o.name)
    return r.model_name, r.model_version, tuple(inputs), tuple(outputs)


def pack_group(members: list[tuple[int, InferRequest]]) -> tuple:
    """Requests with one `group_key` as one packed request (each input's rows concatenated, in
    order) and the members."""
    first = members[0][1]
    inputs = []
    for i, t in enumerate(first.inputs):
        data = b"".join([r.inputs[i].data.tobytes() for _, r in members])
        rows = sum(r.inputs[i].shape[0] for _, r in members)
        inputs.append((t.name, t.datatype, (rows, *t.shape[1:]), data, None))
    packed = (first.model_name, first.model_version, "", None, inputs,
              [(o.name, None, None, None) for o in first.outputs], False)
    return packed, [(rid, r.inputs[0].shape[0], r.id) for rid, r in members]


def slice_request(r: InferRequest, start: int, stop: int, rid: str = "") -> InferRequest:
    """Rows start:stop of a group's request (views, no copies), as a request of its own."""
    inputs = [Tensor(t.name, t.datatype, (stop - start, *t.shape[1:]), t.data[start:stop]) for t in r.inputs]
    return InferRequest(r.model_name, r.model_version, inputs, r.outputs, rid)


def split_group(response: InferResponse, members: list[GroupMember]) -> list[tuple[int, InferResponse]]:
    """A group's answer as one response per member: each output's rows cut at the members' rows
    (views, no copies); the scheduler checked that every output has the group's rows."""
    out = []
    start = 0
    for rid, rows, client_id in members:
        stop = start + rows
        tensors = [Tensor(t.name, t.datatype, (rows, *t.shape[1:]), t.data[start:stop]) for t in response.outputs]
        out.append((rid, InferResponse(response.model_name, response.model_version, tensors, client_id)))
        start = stop
    return out


def pack_error(exc: BaseException) -> tuple[str, str]:
    err = errors.as_server_error(exc)
    return type(err).__name__, err.message


def unpack_error(p: tuple[str, str]) -> errors.ServerError:
    cls = getattr(errors, p[0], errors.ServerError)
    if not (isinstance(cls, type) and issubclass(cls, errors.ServerError)):
        cls = errors.ServerError
    return cls(p[1])


class Link(asyncio.Protocol):
    """One end of a worker <-> scheduler socket: `send` queues, a frame goes out once per loop turn,
    and every frame received is handed whole to `on_messages`."""

    def __init__(self, on_messages: Callable[[list[Message]], None],
                 on_lost: Callable[[], None] | None = None) -> None:
        self.on_messages = on_messages
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.outbox: list[Message] = []
        self.input = Reassembly()
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.on_lost is not None:
            self.on_lost()

    def send(self, message: Message) -> None:
        if not self.outbox:
            self._loop.call_soon(self._flush)
        self.outbox.append(message)

    def _flush(self) -> None:
        if self.transport is None or not self.outbox:
            self.outbox.clear()
            return
        data = pickle.dumps(self.outbox, protocol=pickle.HIGHEST_PROTOCOL)
        self.outbox = []
        self.transport.write(_LEN.pack(len(data)) + data)

    def data_received(self, data: bytes) -> None:
        buf = self.input.feed(data)
        if buf is None:
            return
        pos, end = 0, len(buf)
        while end - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if end - pos - 4 < n:
                self.input.keep(buf, pos, 4 + n)
                return
            messages = pickle.loads(buf[pos + 4:pos + 4 + n])  # nosec B301  # peer: our own socketpair() child
            pos += 4 + n
            try:
                self.on_messages(messages)
            except Exception:
                log.exception("error handling messages on the worker link")
        self.input.keep(buf, pos)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_link(sock: Any, on_messages: Callable[[list[Message]], None],
                    on_lost: Callable[[], None] | None = None) -> Link:
    loop = asyncio.get_running_loop()
    _, link = await loop.connect_accepted_socket(lambda: Link(on_messages, on_lost), sock)
    return link
