"""A lean gRPC server on asyncio: HTTP/2 framing (RFC 9113) and gRPC's message framing, nothing else.

It is the transport under the gRPC frontend (`frontends/grpc_service.py`), as `http_server.py` is
under REST. grpc.aio costs ~650 us of CPU per call in its C core and thread hand-offs (docs/perf.md);
this layer parses frames with `struct`, decodes header blocks with the `hpack` library (a block
already seen on the connection, with the decoder's table unchanged since, is not decoded again),
and answers a unary call with one write of pre-encoded headers, the message and trailers.

What it does: h2c with prior knowledge (what every gRPC client speaks), SETTINGS/PING/GOAWAY,
flow control both ways, CONTINUATION, padding, RST_STREAM (the call's task is cancelled, so queued
work is dropped), `grpc-timeout` (DEADLINE_EXCEEDED, work cancelled), gzip/deflate messages, a
message size limit (RESOURCE_EXHAUSTED), unary and bidirectional-streaming methods. Not: TLS,
server push, HTTP/1.1 upgrade, compressing replies (allowed: replies are sent uncompressed).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any, cast
from urllib.parse import quote

import hpack
import hpack.table

from ..context import CallContext
from ..framing import Reassembly

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# error codes
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, COMPRESSION_ERROR = 5, 6, 7, 9
# settings
S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 2, 3, 4, 5, 6

# gRPC status codes the transport itself answers with
OK, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL = 0, 4, 8, 12, 13

_FRAME_HEAD = struct.Struct(">BHBBL")  # length (24 bits as 8 + 16), type, flags, stream id
_MSG_HEAD = struct.Struct(">BL")  # gRPC message: compressed flag, length
_SETTING = struct.Struct(">HL")
_U32 = struct.Struct(">L")

_MAX_WINDOW = 2**31 - 1
_OUR_STREAM_WINDOW = 4 * 1024 * 1024  # per stream: what a client may send ahead of us
_OUR_MAX_FRAME = 1024 * 1024
_MAX_STREAMS = 1024  # concurrent streams per connection
_MAX_HEADER_BLOCK = 64 * 1024
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME_HEAD.pack(n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def _hpack_int(value: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out = bytearray([limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """One header as an HPACK literal without indexing: the same bytes whatever the table holds."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


_STATUS_200 = b"\x88"  # static table entry 8
_REPLY_HEADERS = _STATUS_200 + literal(b"content-type", b"application/grpc") + literal(
    b"grpc-accept-encoding", b"identity,deflate,gzip")
_TRAILERS_OK = literal(b"grpc-status", b"0")


def status_block(code: int, message: str) -> bytes:
    block = literal(b"grpc-status", str(code).encode())
    if message:  # percent-encoded, as gRPC's HTTP/2 mapping asks
        block += literal(b"grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode())
    return block


def parse_timeout(value: str) -> float | None:
    """`grpc-timeout`: up to 8 digits and a unit. None when malformed (then there is no deadline)."""
    if 2 <= len(value) <= 9 and value[:-1].isdigit() and value[-1] in _TIMEOUT_UNITS:
        return int(value[:-1]) * _TIMEOUT_UNITS[value[-1]]
    return None


class _VersionedTable(hpack.table.HeaderTable):
    """The decoder's dynamic table, counting every change so decoded blocks can be reused safely."""

    generation = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.generation += 1
        super().add(name, value)

    def _set_maxsize(self, newmax: int) -> None:
        self.generation += 1
        hpack.table.HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]

    maxsize = property(hpack.table.HeaderTable.maxsize.fget, _set_maxsize)  # type: ignore[attr-defined]


class CallError(Exception):
    """Ends one call with a gRPC status (the transport's own failures: bad framing, size, encoding)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class Method:
    """One RPC: `parse` turns the message bytes into a request, `call` answers it.

    `call(request, ctx)` gets the call's `CallContext` (metadata, peer, deadline) with each message.
    Unary: `call` returns the reply message. Streaming (bidirectional): `call` is invoked
    once per message on the stream and each reply goes back as soon as it is ready, in the order
    they complete; the call ends OK when the client has half-closed and every reply is sent.
    """

    parse: Callable[[bytes], Any]
    call: Callable[[Any, CallContext], Awaitable[Any]]
    streaming: bool = False


ErrorStatus = Callable[[BaseException], tuple[int, str]]
# Called with the method's path and the call's context when a stream opens, before anything runs;
# raising (a ServerError) ends the call with that error's status. The access check sits here.
Authorize = Callable[[str, CallContext], None]


class Stream:
    __slots__ = ("sid", "method", "buf", "remote_closed", "send_window", "out", "out_trailers",
                 "headers_sent", "tasks", "deadline", "encoding", "done", "request", "unacked", "ctx")

    def __init__(self, sid: int, method: Method | None, send_window: int) -> None:
        self.sid = sid
        self.method = method
        self.buf = bytearray()
        self.remote_closed = False
        self.send_window = send_window
        self.out: list[bytes] = []  # DATA payload waiting for flow-control window
        self.out_trailers: bytes | None = None  # trailers waiting behind `out`
        self.headers_sent = False
        self.tasks: set[asyncio.Task] = set()
        self.deadline: asyncio.TimerHandle | None = None
        self.encoding = "identity"
        self.done = False
        self.request: bytes | None = None  # a unary call's message, held until the client half-closes
        self.unacked = 0  # bytes received and not yet returned by WINDOW_UPDATE
        self.ctx: CallContext = _NO_CONTEXT


_NO_CONTEXT = CallContext("grpc", {})


class GrpcProtocol(asyncio.Protocol):
    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.loop = cast(asyncio.AbstractEventLoop, server.loop)
        self.transport: asyncio.Transport | None = None
        self.input = Reassembly()
        self.preface_seen = False
        self.streams: dict[int, Stream] = {}
        self.last_sid = 0
        self.send_window = 65535  # the peer's connection window for what we send
        self.peer_initial_window = 65535
        self.peer_max_frame = 16384
        self.unacked = 0
        self.decoder = hpack.Decoder(max_header_list_size=_MAX_HEADER_BLOCK)
        self.table = self.decoder.header_table = _VersionedTable()
        self.header_cache: dict[bytes, tuple[int, dict[str, str]]] = {}
        self.pending_block: tuple[int, int, bytearray] | None = None  # sid, flags, fragments so far
        self.goaway_sent = False

    # ---- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer = _peer(transport)
        self.server.connections.add(self)
        settings = b"".join(_SETTING.pack(k, v) for k, v in (
            (S_MAX_CONCURRENT_STREAMS, _MAX_STREAMS), (S_INITIAL_WINDOW_SIZE, _OUR_STREAM_WINDOW),
            (S_MAX_FRAME_SIZE, _OUR_MAX_FRAME), (S_MAX_HEADER_LIST_SIZE, _MAX_HEADER_BLOCK), (S_ENABLE_PUSH, 0)))
        self.transport.write(frame(SETTINGS, 0, 0, settings)
                             + frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.server.buffer_limit - 65535)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        for stream in list(self.streams.values()):
            self._drop(stream)  # the client went away: its calls are cancelled, queued work dropped

    def data_received(self, data: bytes) -> None:
        buf = self.input.feed(data)
        if buf is None:
            return
        pos = 0
        if not self.preface_seen:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(buf):
                    return self._abort(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                return self.input.keep(buf, 0)
            if not buf.startswith(PREFACE):
                return self._abort(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            self.preface_seen = True
            pos = len(PREFACE)
        end = len(buf)
        unpack = _FRAME_HEAD.unpack_from
        while end - pos >= 9 and self.transport is not None:
            hi, lo, ftype, flags, sid = unpack(buf, pos)
            length = (hi << 16) | lo
            if length > _OUR_MAX_FRAME:
                return self._abort(FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds SETTINGS_MAX_FRAME_SIZE")
            if end - pos - 9 < length:
                return self.input.keep(buf, pos, 9 + length)
            payload = buf[pos + 9:pos + 9 + length]
            pos += 9 + length
            try:
                self._frame(ftype, flags, sid & 0x7FFFFFFF, payload)
            except _ConnectionError as exc:
                return self._abort(exc.code, exc.message)
        self.input.keep(buf, pos)

    # ---- frames --------------------------------------------------------------------------------

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self.pending_block is not None and ftype != CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR, "expected a CONTINUATION frame")
        if ftype == DATA:
            self._data(flags, sid, payload)
        elif ftype == HEADERS:
            self._headers(flags, sid, payload)
        elif ftype == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif ftype == SETTINGS:
            self._settings(flags, sid, payload)
        elif ftype == PING:
            if len(payload) != 8 or sid:
                raise _ConnectionError(FRAME_SIZE_ERROR if len(payload) != 8 else PROTOCOL_ERROR, "bad PING frame")
            if not flags & ACK:
                self._write(frame(PING, ACK, 0, payload))
        elif ftype == RST_STREAM:
            if len(payload) != 4 or not sid:
                raise _ConnectionError(PROTOCOL_ERROR, "bad RST_STREAM frame")
            stream = self.streams.get(sid)
            if stream is not None:
                self._drop(stream)
        elif ftype == CONTINUATION:
            self._continuation(flags, sid, payload)
        elif ftype == GOAWAY:
            self.goaway_sent = True  # the peer is leaving: finish what is open, then close
            if not self.streams:
                self._close()
        elif ftype == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "clients cannot push")
        # PRIORITY and unknown frame types are ignored, as the RFC asks

    def _settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS payload is not a multiple of 6")
        for i in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, i)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == S_MAX_FRAME_SIZE:
                if not 16384 <= value <= 16777215:
                    raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            # header table size: our replies never use the dynamic table, so nothing to do
        self._write(frame(SETTINGS, ACK, 0))
        self._flush_all()

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE payload is not 4 bytes")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if not increment:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > _MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window overflow")
            self._flush_all()
            return
        stream = self.streams.get(sid)
        if stream is not None:
            stream.send_window += increment
            self._flush(stream)

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid % 2 == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "client streams have odd identifiers")
        start, end = 0, len(payload)
        if flags & PADDED:
            if not payload:
                raise _ConnectionError(PROTOCOL_ERROR, "PADDED HEADERS frame without a pad length")
            start, end = 1, len(payload) - payload[0]
        if flags & PRIORITY_FLAG:
            start += 5
        if start > end or end > len(payload):
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS padding exceeds the frame")
        if flags & END_HEADERS:
            self._header_block(sid, flags, payload[start:end])
        else:
            self.pending_block = (sid, flags, bytearray(payload[start:end]))

    def _continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if self.pending_block is None or self.pending_block[0] != sid:
            raise _ConnectionError(PROTOCOL_ERROR, "unexpected CONTINUATION frame")
        block = self.pending_block[2]
        block += payload
        if len(block) > _MAX_HEADER_BLOCK:
            raise _ConnectionError(PROTOCOL_ERROR, "header block too large")
        if flags & END_HEADERS:
            first_flags = self.pending_block[1]
            self.pending_block = None
            self._header_block(sid, first_flags, bytes(block))

    def _decode_headers(self, block: bytes) -> dict[str, str]:
        cached = self.header_cache.get(block)
        table = self.table
        if cached is not None and cached[0] == table.generation:
            return cached[1]
        try:
            headers = cast(dict[str, str], dict(self.decoder.decode(block)))
        except hpack.HPACKError as exc:
            raise _ConnectionError(COMPRESSION_ERROR, f"cannot decode header block: {exc}") from None
        if len(self.header_cache) >= 256:
            self.header_cache.clear()
        self.header_cache[block] = (table.generation, headers)
        return headers

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        headers = self._decode_headers(block)  # always: the decoder's table must follow the peer's
        stream = self.streams.get(sid)
        if stream is not None:  # trailers from the client: only END_STREAM matters
            if flags & END_STREAM:
                self._remote_closed(stream)
            return
        if sid <= self.last_sid:
            raise _ConnectionError(STREAM_CLOSED, f"stream {sid} was already used")
        self.last_sid = sid
        if self.goaway_sent:
            return self._write(frame(RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM)))
        if len(self.streams) >= _MAX_STREAMS:
            return self._write(frame(RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM)))
        method = self.server.methods.get(headers.get(":path", ""))
        stream = self.streams[sid] = Stream(sid, method, self.peer_initial_window)
        if headers.get(":method") != "POST" or not headers.get("content-type", "").startswith("application/grpc"):
            return self._end(stream, INTERNAL, "not a gRPC request: expected POST with content-type application/grpc")
        if method is None:
            return self._end(stream, UNIMPLEMENTED, f"unknown method {headers.get(':path', '')}")
        encoding = headers.get("grpc-encoding", "identity")
        if encoding not in ("identity", "gzip", "deflate"):
            return self._end(stream, UNIMPLEMENTED, f"unsupported grpc-encoding '{encoding}' (gzip and deflate are)")
        stream.encoding = encoding
        timeout = headers.get("grpc-timeout")
        deadline = None
        if timeout is not None and (seconds := parse_timeout(timeout)) is not None:
            stream.deadline = self.loop.call_later(seconds, self._expire, stream)
            deadline = stream.deadline.when()
        stream.ctx = CallContext("grpc", headers, self.peer, deadline)
        if self.server.authorize is not None:
            try:
                self.server.authorize(headers.get(":path", ""), stream.ctx)
            except Exception as exc:
                return self._end(stream, *self._status_of(exc))
        if flags & END_STREAM:
            self._remote_closed(stream)

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        size = len(payload)
        self.unacked += size
        stream = self.streams.get(sid)
        if stream is None or stream.remote_closed:
            if sid == 0 or sid > self.last_sid:
                raise _ConnectionError(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            return  # a stream we already ended: drop it (the window above still counts it)
        if flags & PADDED:
            if not payload or payload[0] >= size:
                raise _ConnectionError(PROTOCOL_ERROR, "DATA padding exceeds the frame")
            payload = payload[1:size - payload[0]]
        if not stream.done:
            stream.unacked += size
            if stream.unacked >= _OUR_STREAM_WINDOW // 2 and not flags & END_STREAM:
                self._write(frame(WINDOW_UPDATE, 0, sid, _U32.pack(stream.unacked)))
                stream.unacked = 0
            if stream.buf:
                stream.buf += payload
                self._messages(stream, stream.buf)
            elif payload:
                rest = self._messages(stream, payload)
                if rest and not stream.done:
                    stream.buf += rest
        if flags & END_STREAM:
            self._remote_closed(stream)
        self._refill()

    def _refill(self) -> None:
        """Return the connection's window to the client once half of it is used, unless the partial
        messages held for it already fill `buffer_limit`: then flow control makes the client wait
        until messages complete (a connection never holds more than about twice the limit)."""
        if self.unacked < self.server.buffer_limit // 2 or self.transport is None:
            return
        held = sum(len(s.buf) + len(s.request or b"") for s in self.streams.values())
        if held < self.server.buffer_limit:
            self._write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.unacked)))
            self.unacked = 0

    def _messages(self, stream: Stream, data: bytes | bytearray) -> bytes | bytearray:
        """Take every complete gRPC message off `data`; returns what is left (or trims stream.buf)."""
        pos, end = 0, len(data)
        limit = self.server.max_message
        while end - pos >= 5 and not stream.done:
            compressed, length = _MSG_HEAD.unpack_from(data, pos)
            if length > limit:
                self._end(stream, RESOURCE_EXHAUSTED,
                          f"received message of {length} bytes exceeds the {limit}-byte limit")
                return b""
            if end - pos - 5 < length:
                break
            message = bytes(data[pos + 5:pos + 5 + length])
            pos += 5 + length
            self._message(stream, compressed, message)
        if data is stream.buf:
            del stream.buf[:pos]
            return stream.buf
        return data[pos:]

    def _message(self, stream: Stream, compressed: int, message: bytes) -> None:
        method = cast(Method, stream.method)
        if stream.request is not None:
            return self._end(stream, INTERNAL, "a unary call carries one request message")
        if compressed:
            if stream.encoding == "identity":
                return self._end(stream, INTERNAL, "compressed message without grpc-encoding")
            wbits = 16 + zlib.MAX_WBITS if stream.encoding == "gzip" else zlib.MAX_WBITS
            try:
                d = zlib.decompressobj(wbits)
                message = d.decompress(message, self.server.max_message + 1)
            except zlib.error as exc:
                return self._end(stream, INTERNAL, f"cannot decompress the message: {exc}")
            if len(message) > self.server.max_message:
                return self._end(stream, RESOURCE_EXHAUSTED,
                                 f"decompressed message exceeds the {self.server.max_message}-byte limit")
        if method.streaming:
            self._start(stream, self._stream_call(stream, method, message))
        else:  # a unary call starts when the client half-closes (_remote_closed)
            stream.request = message

    def _remote_closed(self, stream: Stream) -> None:
        stream.remote_closed = True
        if stream.done:
            return
        method = cast(Method, stream.method)
        if stream.buf:
            return self._end(stream, INTERNAL, "the stream ended inside a message")
        if method.streaming:
            if not stream.tasks:
                self._end(stream, OK, "")
            return
        if stream.request is None:
            return self._end(stream, INTERNAL, "a unary call needs one request message; none was sent")
        message, stream.request = stream.request, None
        self._start(stream, self._unary_call(stream, method, message))

    # ---- calls ---------------------------------------------------------------------------------

    def _start(self, stream: Stream, coro: Any) -> None:
        task = self.loop.create_task(coro)
        stream.tasks.add(task)
        task.add_done_callback(stream.tasks.discard)

    async def _unary_call(self, stream: Stream, method: Method, message: bytes) -> None:
        try:
            reply = await method.call(_parse(method, message), stream.ctx)
            body = reply.SerializeToString()
        except asyncio.CancelledError:
            return  # reset, deadline or connection lost: _drop or _expire answer (or nobody listens)
        except Exception as exc:
            code, text = self._status_of(exc)
            return self._end(stream, code, text)
        self._reply(stream, body, end=True)

    async def _stream_call(self, stream: Stream, method: Method, message: bytes) -> None:
        try:
            reply = await method.call(_parse(method, message), stream.ctx)
            body = reply.SerializeToString()
        except asyncio.CancelledError:
            return
        except Exception as exc:  # the frontend answers per-message errors itself; this is a last resort
            code, text = self._status_of(exc)
            return self._end(stream, code, text)
        self._reply(stream, body, end=False)
        # Leave the stream's task set now, not in the task's done callback (which runs a loop turn
        # later): a half-close arriving in between would see this task still there and never end it.
        stream.tasks.discard(cast(asyncio.Task, asyncio.current_task()))
        if stream.remote_closed and not stream.tasks and not stream.done:  # this task was the last
            self._end(stream, OK, "")

    def _status_of(self, exc: BaseException) -> tuple[int, str]:
        if isinstance(exc, CallError):
            return exc.code, exc.message
        return self.server.error_status(exc)

    def _expire(self, stream: Stream) -> None:
        stream.deadline = None
        if not stream.done:
            for task in list(stream.tasks):
                task.cancel()
            self._end(stream, DEADLINE_EXCEEDED, "deadline exceeded")

    # ---- replies -------------------------------------------------------------------------------

    def _reply(self, stream: Stream, body: bytes, end: bool) -> None:
        if stream.done or self.transport is None:
            return
        data = _MSG_HEAD.pack(0, len(body)) + body
        head = b""
        if not stream.headers_sent:
            stream.headers_sent = True
            head = frame(HEADERS, END_HEADERS, stream.sid, _REPLY_HEADERS)
        trailers = frame(HEADERS, END_HEADERS | END_STREAM, stream.sid, _TRAILERS_OK) if end else None
        n = len(data)
        if not stream.out and n <= self.send_window and n <= stream.send_window and n <= self.peer_max_frame:
            self.send_window -= n
            stream.send_window -= n
            self.transport.write(head + frame(DATA, 0, stream.sid, data) + (trailers or b""))
            if end:
                self._finish(stream)
            return
        if head:
            self.transport.write(head)
        stream.out.append(data)
        if end:
            stream.out_trailers = trailers
            stream.done = True
            self._cancel_deadline(stream)
        self._flush(stream)

    def _end(self, stream: Stream, code: int, message: str) -> None:
        """Ends the call with `code`: trailers (or trailers-only headers) then, if the client is
        still sending, RST_STREAM so it stops."""
        if stream.done:
            return
        if stream.headers_sent:
            trailers = frame(HEADERS, END_HEADERS | END_STREAM, stream.sid, status_block(code, message))
        else:
            stream.headers_sent = True
            trailers = frame(HEADERS, END_HEADERS | END_STREAM, stream.sid,
                             _REPLY_HEADERS + status_block(code, message))
        for task in list(stream.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        stream.buf = bytearray()
        if stream.out:
            stream.out_trailers = trailers
            stream.done = True
            self._cancel_deadline(stream)
            self._flush(stream)
            return
        self._write(trailers)
        self._finish(stream)

    def _flush(self, stream: Stream) -> None:
        while stream.out and self.transport is not None:
            data = stream.out[0]
            n = min(len(data), self.send_window, stream.send_window, self.peer_max_frame)
            if n <= 0:
                return
            self.send_window -= n
            stream.send_window -= n
            self.transport.write(frame(DATA, 0, stream.sid, data[:n]))
            if n == len(data):
                stream.out.pop(0)
            else:
                stream.out[0] = data[n:]
        if not stream.out and stream.out_trailers is not None:
            self._write(stream.out_trailers)
            stream.out_trailers = None
            self._finish(stream)

    def _flush_all(self) -> None:
        for stream in list(self.streams.values()):
            if stream.out:
                self._flush(stream)

    def _finish(self, stream: Stream) -> None:
        stream.done = True
        stream.buf = bytearray()
        self._cancel_deadline(stream)
        if not stream.remote_closed:
            self._write(frame(RST_STREAM, 0, stream.sid, _U32.pack(NO_ERROR)))
        self.streams.pop(stream.sid, None)
        self._refill()
        if self.goaway_sent and not self.streams:
            self._close()

    def _drop(self, stream: Stream) -> None:
        """The peer reset the stream (or left): cancel its calls, send nothing more on it."""
        stream.done = True
        self._cancel_deadline(stream)
        for task in list(stream.tasks):
            task.cancel()
        self.streams.pop(stream.sid, None)
        self._refill()
        if self.goaway_sent and not self.streams:
            self._close()

    @staticmethod
    def _cancel_deadline(stream: Stream) -> None:
        if stream.deadline is not None:
            stream.deadline.cancel()
            stream.deadline = None

    # ---- connection ----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _abort(self, code: int, message: str) -> None:
        log.debug("closing gRPC connection: %s", message)
        self._write(frame(GOAWAY, 0, 0, _U32.pack(self.last_sid) + _U32.pack(code) + message.encode()[:256]))
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def shutdown(self) -> None:
        """GOAWAY: no new streams; the connection closes once its open streams end."""
        if not self.goaway_sent:
            self.goaway_sent = True
            self._write(frame(GOAWAY, 0, 0, _U32.pack(self.last_sid) + _U32.pack(NO_ERROR)))
        if not self.streams:
            self._close()


def _peer(transport: asyncio.BaseTransport) -> str:
    name = transport.get_extra_info("peername")
    return f"{name[0]}:{name[1]}" if isinstance(name, tuple) and len(name) >= 2 else ""


def _parse(method: Method, message: bytes) -> Any:
    try:
        return method.parse(message)
    except Exception as exc:
        raise CallError(INTERNAL, f"cannot parse the request message: {exc}") from None


class _ConnectionError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class GrpcServer:
    def __init__(self, methods: dict[str, Method], *, max_message: int, error_status: ErrorStatus,
                 authorize: Authorize | None = None) -> None:
        self.methods = methods
        self.authorize = authorize
        self.max_message = max_message
        # Partial messages one connection may hold before flow control stops its client: room for
        # four messages at the size limit (at least 1 MiB, at most HTTP/2's largest window).
        self.buffer_limit = max(1 << 20, min(_MAX_WINDOW, 4 * max_message))
        self.error_status = error_status
        self.connections: set[GrpcProtocol] = set()
        self._server: asyncio.Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self, host: str, port: int, sock: socket.socket | None = None,
                    ssl: SSLContext | None = None) -> int:
        """Listen on host:port, or accept on `sock`, a listening socket shared with other processes;
        over TLS when `ssl` is given."""
        loop = self.loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(lambda: GrpcProtocol(self), sock=sock, backlog=2048, ssl=ssl)
        else:
            self._server = await loop.create_server(lambda: GrpcProtocol(self), host, port, backlog=2048,
                                                    reuse_address=True, ssl=ssl)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = asyncio.get_running_loop().time() + grace
        while any(c.streams for c in self.connections) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn._close()
        if self._server is not None:
            await self._server.wait_closed()
