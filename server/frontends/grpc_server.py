"""gRPC on asyncio, over the sans-IO HTTP/2 core in `server/http2/`: the transport under the gRPC
frontend (`frontends/grpc_service.py`), as `http_server.py` is under REST.

This layer moves bytes between the socket and `H2Connection`, applies backpressure, and does
gRPC's part: message framing, gzip/deflate, the message size limit (RESOURCE_EXHAUSTED), methods
(unary and bidirectional streaming), one task per call, `grpc-timeout` deadlines
(DEADLINE_EXCEEDED), and the access check (`authorize`) before any method runs. RST_STREAM, a
deadline or a dropped connection cancel the call's tasks, which drops queued work. A unary call
is answered with one buffer (pre-encoded headers, the message and trailers), and the replies of calls
that complete in the same loop turn leave in one write.

Backpressure: reading stops while the socket's write buffer is above its high-water mark
(`pause_writing`), and while input is left over from the HTTP/2 core's per-turn frame budget (the
rest is parsed on the next loop turn, after other connections had theirs). While the socket is
full, replies wait on their streams, counted against `max_held_reply_bytes`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any, cast
from urllib.parse import quote

from ..context import CallContext
from ..http2 import connection as h2
from ..http2.frames import MAX_WINDOW, STATUS_200, literal

log = logging.getLogger(__name__)

# gRPC status codes the transport itself answers with
OK, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL = 0, 4, 8, 12, 13

_MSG_HEAD = struct.Struct(">BL")  # gRPC message: compressed flag, length
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_WRITE_HIGH, _WRITE_LOW = 1 << 20, 256 << 10  # socket write buffer marks: pause reading above
_STREAM_TASKS = 32  # messages of one streaming call being answered at once
_LINGER = 2.0  # seconds a connection closed for an error keeps reading, so its GOAWAY arrives

_REPLY_HEADERS = STATUS_200 + literal(b"content-type", b"application/grpc") + literal(
    b"grpc-accept-encoding", b"identity,deflate,gzip")
_TRAILERS_OK = literal(b"grpc-status", b"0")


def status_block(code: int, message: str) -> bytes:
    block = literal(b"grpc-status", str(code).encode())
    if message:  # percent-encoded, as gRPC's HTTP/2 mapping asks
        block += literal(b"grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode())
    return block


def parse_timeout(value: str) -> float | None:
    """`grpc-timeout`: up to 8 digits and a unit. None when malformed (then there is no deadline)."""
    digits = value[:-1]
    if 2 <= len(value) <= 9 and digits.isascii() and digits.isdigit() and value[-1] in _TIMEOUT_UNITS:
        return int(value[:-1]) * _TIMEOUT_UNITS[value[-1]]
    return None


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
    call: Callable[[Any, CallContext], Any]  # an awaitable reply; an async iterator of them with `replies`
    streaming: bool = False
    # Streaming only: `call` returns an async iterator, and each of its replies goes back as it
    # comes (many replies to one message, as a decoupled model gives). The next one is taken only
    # while the connection holds no more replies than it may: a client that reads slowly makes the
    # iterator wait, and so whoever feeds it (server/sink.py). An item that is a list is several
    # replies that leave together: one DATA frame, one write.
    replies: bool = False
    # Unary only, optional: the same call without a task. `start(request, ctx, reply)` begins it
    # (raising what `call` would raise before it waits) and returns the function that cancels it;
    # `reply(message, None)` or `reply(None, error)` answers it later, from the event loop. A task and
    # its coroutines cost more than the rest of a canned call's framing (see ModelInfer).
    start: Start | None = None


Reply = Callable[[Any, BaseException | None], None]
Start = Callable[[Any, CallContext, Reply], Callable[[], None]]
ErrorStatus = Callable[[BaseException], tuple[int, str]]
# Called with the method's path and the call's context when a stream opens, before anything runs;
# raising (a ServerError) ends the call with that error's status. The access check sits here.
Authorize = Callable[[str, CallContext], None]


_NO_TASKS: set[asyncio.Task] = set()  # shared, always empty: see Call.tasks
_NO_BACKLOG: deque[bytes] = deque(maxlen=0)  # shared, always empty: a unary call's backlog


class Call:
    """One gRPC call (one HTTP/2 stream) as this layer sees it."""

    __slots__ = ("sid", "method", "ctx", "encoding", "buf", "request", "tasks", "deadline", "done", "backlog",
                 "cancel")

    def __init__(self, sid: int, method: Method, ctx: CallContext, encoding: str) -> None:
        self.sid = sid
        self.method = method
        self.ctx = ctx
        self.encoding = encoding
        self.buf = bytearray()  # a message not yet whole
        self.request: bytes | None = None  # a unary call's message, held until the client half-closes
        # a task leaves this set itself, as it finishes; a unary call begun by Method.start has no
        # task and shares one empty set, never added to (an allocation fewer per call)
        self.tasks: set[asyncio.Task] = set() if method.streaming or method.start is None else _NO_TASKS
        self.deadline: asyncio.TimerHandle | None = None
        self.done = False  # trailers queued (or the stream reset): nothing more is sent
        # a streaming call's messages waiting for a task: at most _STREAM_TASKS run at once, and none
        # starts while the connection holds more replies than it may (their bytes count as held input)
        self.backlog: deque[bytes] = deque() if method.streaming else _NO_BACKLOG
        self.cancel: Callable[[], None] | None = None  # a unary call begun by Method.start, not answered yet

    def held(self) -> int:
        """Input bytes this call holds: a partial message, a unary request not started, waiting messages."""
        return len(self.buf) + len(self.request or b"") + sum(map(len, self.backlog))


class GrpcProtocol(asyncio.Protocol):
    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.loop = cast(asyncio.AbstractEventLoop, server.loop)
        self.transport: asyncio.Transport | None = None
        self.conn = h2.H2Connection(server.limits)
        self.conn.held_input = self._held_input
        self.calls: dict[int, Call] = {}
        self.backlogged: set[Call] = set()  # streaming calls with messages waiting (Call.backlog)
        self.peer = ""
        self.write_paused = False
        self.parse_pending = False  # input left for the next loop turn (the frame budget)
        self.write_scheduled = False  # a _write_soon() is pending
        self.room_waiters: list[asyncio.Future[None]] = []  # streams waiting for held replies to go out

    # ---- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(_WRITE_HIGH, _WRITE_LOW)
        name = transport.get_extra_info("peername")
        self.peer = f"{name[0]}:{name[1]}" if isinstance(name, tuple) and len(name) >= 2 else ""
        self.server.connections.add(self)
        self._write_out()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        self._wake_room()
        for call in list(self.calls.values()):
            self._drop(call)  # the client went away: its calls are cancelled, queued work dropped

    def data_received(self, data: bytes) -> None:
        if self.transport is not None:  # else closing: what still arrives is dropped
            self._handle(self.conn.receive_data(data))

    def pause_writing(self) -> None:
        self.write_paused = True
        self.conn.set_output_blocked(True)
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.conn.set_output_blocked(False)
        self._write_out()
        if self.room_waiters:
            self._wake_room()
        if self.transport is not None and not self.parse_pending:
            self.transport.resume_reading()

    def _parse_more(self) -> None:
        self.parse_pending = False
        if self.transport is None:
            return
        self._handle(self.conn.receive_data(b""))
        if not self.parse_pending and not self.write_paused and self.transport is not None:
            self.transport.resume_reading()

    # ---- events from the HTTP/2 core -----------------------------------------------------------

    def _handle(self, events: list[h2.Event]) -> None:
        for kind, sid, payload, end in events:
            if kind == h2.DATA_RECEIVED:
                call = self.calls.get(sid)
                if call is not None and not call.done:
                    if call.buf:  # a message continues
                        call.buf += payload
                        self._messages(call, call.buf)
                    elif payload:
                        rest = self._messages(call, payload)
                        if rest and not call.done:
                            call.buf += rest
                    if end and not call.done:
                        self._remote_closed(call)
            elif kind == h2.REQUEST:
                self._request(sid, payload, end)
            elif kind == h2.STREAM_ENDED:
                call = self.calls.get(sid)
                if call is not None and not call.done:
                    self._remote_closed(call)
            elif kind == h2.STREAM_RESET:
                call = self.calls.get(sid)
                if call is not None:
                    self._drop(call)
        conn = self.conn
        if self.backlogged and conn.held_output <= self.server.limits.max_held_reply_bytes:
            for call in list(self.backlogged):  # replies went out (window opened): start what waits
                self._start_streamed(call)
        if self.room_waiters:
            self._wake_room()
        if conn.input_stalled:
            self._unstall()
        if conn.more_input and self.transport is not None:
            self.parse_pending = True
            self.transport.pause_reading()
            self.loop.call_soon(self._parse_more)
        if conn.output or conn.goaway:
            self._write_out()

    def _request(self, sid: int, headers: dict[str, str], end: bool) -> None:
        if sid not in self.conn.streams:  # reset later in the same read: nothing to answer
            return
        path = headers.get(":path", "")
        if headers.get(":method") != "POST" or not headers.get("content-type", "").startswith("application/grpc"):
            return self._refuse(sid, INTERNAL, "not a gRPC request: expected POST with content-type application/grpc")
        method = self.server.methods.get(path)
        if method is None:
            return self._refuse(sid, UNIMPLEMENTED, f"unknown method {path}")
        encoding = headers.get("grpc-encoding", "identity")
        if encoding not in ("identity", "gzip", "deflate"):
            return self._refuse(sid, UNIMPLEMENTED, f"unsupported grpc-encoding '{encoding}' (gzip and deflate are)")
        timeout = headers.get("grpc-timeout")
        seconds = parse_timeout(timeout) if timeout is not None else None
        deadline = None if seconds is None else self.loop.time() + seconds
        call = Call(sid, method, CallContext("grpc", headers, self.peer, deadline), encoding)
        if self.server.authorize is not None:
            try:
                self.server.authorize(path, call.ctx)
            except Exception as exc:
                return self._refuse(sid, *self._status_of(exc))
        self.calls[sid] = call
        if deadline is not None:
            call.deadline = self.loop.call_at(deadline, self._expire, call)
        if end:
            self._remote_closed(call)

    def _refuse(self, sid: int, code: int, message: str) -> None:
        """Answer a stream that never became a call: trailers-only, then (if the client is still
        sending) RST_STREAM, both from the core."""
        self.conn.send_trailers(sid, _REPLY_HEADERS + status_block(code, message))

    def _held_input(self) -> int:
        return sum(map(Call.held, self.calls.values()))

    def _unstall(self) -> None:
        """Every stream's message is partial and together they fill the connection window: no stream
        can finish, so the call holding the most ends (RESOURCE_EXHAUSTED) and the window moves again."""
        victim = max(self.calls.values(), key=Call.held, default=None)
        if victim is not None and victim.held():
            self._end(victim, RESOURCE_EXHAUSTED, "the connection's partial messages fill its flow-control window "
                      f"({self.conn.recv_window.size} bytes); this call held the most")

    def _messages(self, call: Call, data: memoryview | bytearray) -> memoryview | bytearray:
        """Take every complete gRPC message off `data`; returns what is left (or trims call.buf)."""
        pos, end = 0, len(data)
        limit = self.server.max_message
        while end - pos >= 5 and not call.done:
            compressed, length = _MSG_HEAD.unpack_from(data, pos)
            if length > limit:
                self._end(call, RESOURCE_EXHAUSTED,
                          f"received message of {length} bytes exceeds the {limit}-byte limit")
                return bytearray()
            if end - pos - 5 < length:
                break
            message = bytes(data[pos + 5:pos + 5 + length])
            pos += 5 + length
            self._message(call, compressed, message)
        if data is call.buf:
            del call.buf[:pos]
            return call.buf
        return data[pos:]

    def _message(self, call: Call, compressed: int, message: bytes) -> None:
        if call.request is not None:
            return self._end(call, INTERNAL, "a unary call carries one request message")
        if compressed:
            if call.encoding == "identity":
                return self._end(call, INTERNAL, "compressed message without grpc-encoding")
            wbits = 16 + zlib.MAX_WBITS if call.encoding == "gzip" else zlib.MAX_WBITS
            try:
                d = zlib.decompressobj(wbits)
                message = d.decompress(message, self.server.max_message + 1)
            except zlib.error as exc:
                return self._end(call, INTERNAL, f"cannot decompress the message: {exc}")
            if len(message) > self.server.max_message:
                return self._end(call, RESOURCE_EXHAUSTED,
                                 f"decompressed message exceeds the {self.server.max_message}-byte limit")
        if call.method.streaming:
            call.backlog.append(message)
            self._start_streamed(call)
        else:  # a unary call starts when the client half-closes (_remote_closed)
            call.request = message

    def _remote_closed(self, call: Call) -> None:
        if call.buf:
            return self._end(call, INTERNAL, "the stream ended inside a message")
        if call.method.streaming:
            if not call.tasks and not call.backlog:
                self._end(call, OK, "")
            return
        if call.request is None:
            return self._end(call, INTERNAL, "a unary call needs one request message; none was sent")
        message, call.request = call.request, None
        if call.method.start is not None:
            self._start_unary(call, message)
        else:
            call.tasks.add(self.loop.create_task(self._unary_call(call, message)))
        if self.conn.input_stalled:
            self.conn.release_input()

    # ---- calls ---------------------------------------------------------------------------------

    async def _unary_call(self, call: Call, message: bytes) -> None:
        try:
            reply = await call.method.call(_parse(call.method, message), call.ctx)
            body = reply.SerializeToString()
        except asyncio.CancelledError:
            return  # reset, deadline or connection lost: _drop or _expire answer (or nobody listens)
        except Exception as exc:
            return self._end(call, *self._status_of(exc))
        # (this task stays in call.tasks: _close_call spares the current task, and the call goes)
        self._reply(call, body, end=True)

    def _start_unary(self, call: Call, message: bytes) -> None:
        """A unary call through `Method.start`: no task; `_drop` and `_expire` cancel it by `call.cancel`."""
        def reply(answer: Any, exc: BaseException | None) -> None:
            call.cancel = None
            if call.done:
                return
            if exc is None:
                try:
                    body = answer.SerializeToString()
                except Exception as err:
                    exc = err
                else:
                    return self._reply(call, body, end=True)
            self._end(call, *self._status_of(exc))

        try:
            call.cancel = cast(Start, call.method.start)(_parse(call.method, message), call.ctx, reply)
        except Exception as exc:
            self._end(call, *self._status_of(exc))

    def _start_streamed(self, call: Call) -> None:
        """Start tasks for a streaming call's waiting messages, as far as its limits allow."""
        limit = self.server.limits.max_held_reply_bytes
        while call.backlog and len(call.tasks) < _STREAM_TASKS and self.conn.held_output <= limit and not call.done:
            call.tasks.add(self.loop.create_task(self._stream_call(call, call.backlog.popleft())))
        if call.backlog:
            self.backlogged.add(call)
        else:
            self.backlogged.discard(call)

    async def _stream_call(self, call: Call, message: bytes) -> None:
        try:
            if call.method.replies:
                body = None
                replies = call.method.call(_parse(call.method, message), call.ctx)
                try:
                    async for reply in replies:
                        if type(reply) is list:
                            self._reply(call, _framed(reply), end=False, framed=True)
                        else:
                            self._reply(call, reply.SerializeToString(), end=False)
                        await self._room()
                finally:
                    await replies.aclose()  # now, not when collected: a cancelled request ends at once
            else:
                reply = await call.method.call(_parse(call.method, message), call.ctx)
                body = reply.SerializeToString()
        except asyncio.CancelledError:
            return
        except Exception as exc:  # the frontend answers per-message errors itself; this is a last resort
            return self._end(call, *self._status_of(exc))
        finally:
            # Leave the set now, not in a done callback a loop turn later: a half-close arriving in
            # between would see this task still there and the stream would never end.
            call.tasks.discard(asyncio.current_task())
        if body is not None:
            self._reply(call, body, end=False)
        if call.backlog:
            self._start_streamed(call)
        stream = self.conn.streams.get(call.sid)
        if stream is not None and stream.remote_closed and not call.tasks and not call.backlog and not call.done:
            self._end(call, OK, "")  # the last one

    async def _room(self) -> None:
        """Wait while the connection holds more replies than it may (the client reads slowly)."""
        limit = self.server.limits.max_held_reply_bytes
        while self.conn.held_output > limit and self.transport is not None:
            waiter = self.loop.create_future()
            self.room_waiters.append(waiter)
            await waiter

    def _wake_room(self) -> None:
        if self.transport is None or self.conn.held_output <= self.server.limits.max_held_reply_bytes:
            waiters, self.room_waiters = self.room_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _status_of(self, exc: BaseException) -> tuple[int, str]:
        if isinstance(exc, CallError):
            return exc.code, exc.message
        return self.server.error_status(exc)

    def _expire(self, call: Call) -> None:
        call.deadline = None
        if not call.done:
            self._end(call, DEADLINE_EXCEEDED, "deadline exceeded")

    # ---- replies -------------------------------------------------------------------------------

    def _reply(self, call: Call, body: bytes, end: bool, framed: bool = False) -> None:
        """Send a reply's message (`framed`: messages already in gRPC framing, one after another)."""
        if call.done or self.transport is None:
            return
        conn = self.conn
        stream = conn.streams.get(call.sid)
        if stream is None:
            return
        data = body if framed else _MSG_HEAD.pack(0, len(body)) + body
        if not stream.headers_sent:
            if end:  # a unary call: one buffer, one write
                # _close_call's work, what of it applies: its one task is this one, its input was taken
                call.done = True
                if call.deadline is not None:
                    call.deadline.cancel()
                    call.deadline = None
                del self.calls[call.sid]
                conn.send_response(call.sid, _REPLY_HEADERS, data, _TRAILERS_OK)
                if self.calls and not conn.goaway:  # others are open: they may answer this turn too
                    return self._write_soon()
                return self._write_out()
            conn.send_headers(call.sid, _REPLY_HEADERS)
        conn.send_data(call.sid, data)
        if end:
            self._close_call(call)
            conn.send_trailers(call.sid, _TRAILERS_OK)
            return self._write_out()
        self._write_soon()  # a stream's replies that come in one loop turn leave in one write

    def _end(self, call: Call, code: int, message: str) -> None:
        """End the call with `code`: trailers (or a trailers-only response) after any reply still
        held for window; the core resets the stream if the client is still sending."""
        if call.done:
            return
        self._close_call(call)
        stream = self.conn.streams.get(call.sid)
        if stream is not None:
            self.conn.send_trailers(call.sid, status_block(code, message) if stream.headers_sent
                                    else _REPLY_HEADERS + status_block(code, message))
        self._write_out()

    def _close_call(self, call: Call) -> None:
        """Nothing more will be sent for `call`: stop its other tasks, its deadline, its input."""
        call.done = True
        if call.tasks:
            current = asyncio.current_task()
            for task in list(call.tasks):
                if task is not current:
                    task.cancel()
        if call.deadline is not None:
            call.deadline.cancel()
            call.deadline = None
        if call.cancel is not None:
            cancel, call.cancel = call.cancel, None
            cancel()
        held = bool(call.buf or call.request or call.backlog)
        call.buf = bytearray()
        call.request = None
        if call.backlog:
            call.backlog.clear()
        self.backlogged.discard(call)
        self.calls.pop(call.sid, None)
        if held:
            self.conn.release_input()

    def _drop(self, call: Call) -> None:
        """The peer reset the stream (or left): cancel its calls, send nothing more on it."""
        if not call.done:
            self._close_call(call)
        if self.transport is not None:
            self._write_out()

    # ---- connection ----------------------------------------------------------------------------

    def _write_soon(self) -> None:
        """Write at the end of this loop turn rather than now: the replies of calls that complete in
        the same turn (a batch's, typically) leave in one write instead of a system call each. Only
        while other calls are open on the connection; a lone call's reply is written at once."""
        if not self.write_scheduled:
            self.write_scheduled = True
            self.loop.call_soon(self._write_scheduled)

    def _write_scheduled(self) -> None:
        self.write_scheduled = False
        self._write_out()

    def _write_out(self) -> None:
        if self.transport is None:
            return
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)
        conn = self.conn
        if conn.goaway and (conn.closed is not None or not conn.streams):  # an error, or GOAWAY and done
            if conn.closed is not None:
                log.debug("closing gRPC connection: %s", conn.closed[1])
            self._close()

    def _close(self) -> None:
        transport, self.transport = self.transport, None
        if transport is None:
            return
        if self.conn.closed is not None and transport.can_write_eof():
            # After an error's GOAWAY, close our side but keep reading (and dropping) for a moment: closing
            # with the client's bytes unread would send a TCP reset, which can destroy the GOAWAY before the
            # client reads it (nginx's lingering close). Bounded: at most _LINGER seconds.
            transport.write_eof()
            transport.resume_reading()
            self.loop.call_later(_LINGER, transport.close)
            return
        transport.close()

    def shutdown(self) -> None:
        """GOAWAY: no new streams; the connection closes once its open streams end."""
        self.conn.shutdown()
        self._write_out()


def _framed(replies: list[Any]) -> bytes:
    """Replies one after another, each a gRPC message (those already bytes are not copied)."""
    parts = []
    head = _MSG_HEAD.pack
    for reply in replies:
        body = reply if isinstance(reply, bytes) else reply.SerializeToString()
        parts.append(head(0, len(body)))
        parts.append(body)
    return b"".join(parts)


def _parse(method: Method, message: bytes) -> Any:
    try:
        return method.parse(message)
    except Exception as exc:
        raise CallError(INTERNAL, f"cannot parse the request message: {exc}") from None


class GrpcServer:
    def __init__(self, methods: dict[str, Method], *, max_message: int, error_status: ErrorStatus,
                 authorize: Authorize | None = None, limits: h2.Limits | None = None) -> None:
        self.methods = methods
        self.authorize = authorize
        self.max_message = max_message
        # Partial messages one connection may hold before flow control stops its client: room for
        # four messages at the size limit (at least 1 MiB, at most HTTP/2's largest window). The
        # connection window is that size, so a connection never holds much more.
        window = max(1 << 20, min(MAX_WINDOW, 4 * max_message))
        limits = limits or h2.Limits()
        self.limits = h2.Limits(**{**limits.__dict__, "connection_window": window})
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
        while any(c.conn.streams for c in self.connections) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn._close()
        if self._server is not None:
            await self._server.wait_closed()
