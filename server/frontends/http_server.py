"""A lean HTTP/1.1 server on asyncio + httptools: the transport under the REST frontend.

It owns connections and framing only: keep-alive, pipelining (responses in request order),
chunked and Content-Length bodies, `Expect: 100-continue`, gzip/deflate request bodies, the body
size limit, and what one client may cost (`HttpLimits`): the request line, header lines, header
count and header bytes, a header-read timeout, a keep-alive idle timeout, and backpressure (a
client that does not read its answers stops being read). What a request means is the handler's
business (`frontends/rest.py`): it gets a complete `HttpRequest` and returns an `HttpResponse`.

Header limits: `http_header_limits.py`. Requests, answers and limits: `http_messages.py`.

Timeouts. One sweep per server (`HttpServer._sweep`, at most every second) looks at every
connection: its progress mark is the request it is reading or last read (each request gets a new
headers dict: the sweep keeps the dict it saw and compares identities, so nothing is counted per
request), and the sweep notes when it first saw that mark. Still reading the same request's header
after `header_timeout` -> 408 and close; idle since the same request after `keepalive_timeout` ->
close. No timer per request; a connection whose request is executing (or whose answers wait for the
client to read them) has no timeout.

Refusals (400, 408, 414, 431) are queued behind the requests before them, so answers
stay in order, and answered here without the handler; then the connection closes gracefully: our
side is shut for writing and what the client still sends is read and dropped for a little while,
so that the client reads the answer instead of a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import zlib
from collections import deque
from collections.abc import AsyncGenerator
from ssl import SSLContext
from typing import cast

import httptools

from .http_header_limits import _DISCARD, _REQUEST_LINE_OVERHEAD, HeaderLimits, _Refusal, _requests_begun
from .http_messages import (
    CONTINUE,
    STATUS_LINES,
    Clock,
    ErrorBody,
    Handler,
    HttpLimits,
    HttpRequest,
    HttpResponse,
    decompress,
)

__all__ = ["ErrorBody", "Handler", "HttpLimits", "HttpProtocol", "HttpRequest", "HttpResponse", "HttpServer"]

log = logging.getLogger(__name__)


_MAX_PIPELINED = 64  # requests queued on one connection before we stop reading from it
# The transport's write buffer: above HIGH we stop answering and reading until it drains to LOW.
# asyncio's and uvloop's default is 64 KiB / 16 KiB; set here so the bound does not depend on the
# loop. 256 KiB holds ~500 small pipelined answers (or one big tensor) beyond the kernel's own socket
# buffer (MiBs on loopback), so a client that reads is never paused; the 4x gap keeps a steady
# reader from flapping between pause and resume at every answer, and resuming at 64 KiB still has
# data queued, so the socket never runs dry.
_WRITE_HIGH = 256 * 1024
_WRITE_LOW = 64 * 1024
# Why reading is paused; it resumes when none is left.
_PAUSE_QUEUE = 1  # too many pipelined requests queued
_PAUSE_WRITE = 2  # the client is not reading our answers
_LINGER_SECS = 2.0  # after an error answer, how long the client's further bytes are read and dropped
_LINGERING = object()  # the sweep's progress mark for a connection closing after an error answer


class HttpProtocol(HeaderLimits, asyncio.Protocol):
    # slots: attribute access is the hot path's main cost; with this many attributes an instance
    # dict cost ~4% more instructions per request (callgrind, loadtests-style canned handler)
    __slots__ = ("server", "loop", "transport", "parser", "queue", "busy", "closing", "peer", "_task",
                 "_max_headers", "_small", "_paused", "_write_paused", "_head", "_lingering", "_swept", "_swept_at",
                 "_url", "_headers", "_body", "_size", "_error", "_nheaders", "_room")

    def __init__(self, server: HttpServer) -> None:
        super().__init__()
        self.server = server
        # protocols exist only once the server has started, so its loop is known
        self.loop = cast(asyncio.AbstractEventLoop, server.loop)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[tuple[HttpRequest, bool]] = deque()
        self.busy = False
        self.closing = False
        self.peer = ""
        self._task: asyncio.Task | None = None
        limits = server.limits
        self._max_headers = limits.max_headers
        self._small = server.small_read
        self._paused = 0  # why reading is paused: _PAUSE_* bits
        self._write_paused = False  # the _PAUSE_WRITE bit, as a bool for the hot path
        self._room: asyncio.Future[None] | None = None  # a streamed answer waiting for the buffer to drain
        # True: reading a request's header; False: its body; None: between requests
        self._head: bool | None = None
        self._lingering = False
        self._swept: object = None  # the progress mark the sweep saw last, and when it first saw it
        self._swept_at = 0.0
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._error = ""
        self._nheaders = 0

    # ---- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass it
        self.transport.set_write_buffer_limits(high=_WRITE_HIGH, low=_WRITE_LOW)
        name = transport.get_extra_info("peername")
        self.peer = f"{name[0]}:{name[1]}" if isinstance(name, tuple) and len(name) >= 2 else ""
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        self.queue.clear()
        self._wake_room()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client went away: a queued request is dropped, not executed

    def _wake_room(self) -> None:
        waiter, self._room = self._room, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        """The write buffer passed _WRITE_HIGH: answer nothing more and read nothing more."""
        self._write_paused = True
        self._pause(_PAUSE_WRITE)

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume(_PAUSE_WRITE)
        self._wake_room()
        if self.queue and not self.busy and self.transport is not None:
            self.busy = True
            self._task = self.loop.create_task(self._serve_queue())

    def data_received(self, data: bytes) -> None:
        if self._held is not None:  # a request's header is arriving over several reads
            self._hold(data)
            return
        idle = self._head is None
        self._precise = len(data) > self._small
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parser_failed(exc)
            return
        if self._head:  # the read ended inside a header: hold what follows until lines are whole
            self._start_holding(data, idle and _requests_begun(data) == 1)

    # ---- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()
        self._head = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        if self._precise and len(self._url) > self.server.limits.max_request_line - _REQUEST_LINE_OVERHEAD:
            size = len(self.parser.get_method()) + len(self._url) + len("  HTTP/1.1")
            if size > self.server.limits.max_request_line:
                raise _Refusal(414, self._request_line_message(size))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._nheaders += 1
        if self._precise or self._nheaders > self._max_headers:
            self._check_header(name, value)
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._head = False
        headers = self._headers
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body:
            self._refuse_body(f"request body of {length} bytes exceeds the {self.server.max_body}-byte limit "
                              f"(--http-max-input-size)")
            return
        expect = headers.get("expect")
        if expect is not None and expect.lower() == "100-continue" and self.transport is not None:
            self.transport.write(CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self._error:
            return
        self._size += len(body)
        if self._size > self.server.max_body:
            self._refuse_body(f"request body exceeds the {self.server.max_body}-byte limit (--http-max-input-size)")
            return
        self._body.append(body)

    def _refuse_body(self, error: str) -> None:
        """Answer an oversized request now, without reading its body, then close the connection."""
        self._error = error
        self._body = []
        self._enqueue(HttpRequest(self.parser.get_method().decode("latin-1"), "", self._headers, b"", error,
                                  400, self.peer), False)

    def on_message_complete(self) -> None:
        self._head = None
        if self._error:  # already answered by _refuse_body
            return
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        error = ""
        encoding = self._headers.get("content-encoding")
        if encoding is not None and body and (encoding := encoding.lower()) != "identity":
            try:
                body = decompress(body, encoding, self.server.max_body)
            except (ValueError, zlib.error) as exc:
                error = f"cannot decode the request body: {exc}"
        # the path without query or fragment, still percent-encoded: the router splits, then unquotes
        url = self._url
        if 63 in url or 35 in url:  # b"?", b"#" (`bytes in bytes` tries int first, at an exception's cost)
            url = url.partition(b"?")[0].partition(b"#")[0]
        path = url.decode("latin-1")
        request = HttpRequest(self.parser.get_method().decode("latin-1"), path, self._headers, body, error,
                              400, self.peer)
        self._enqueue(request, self.parser.should_keep_alive() and not error)

    def _enqueue(self, request: HttpRequest, keep_alive: bool) -> None:
        self.queue.append((request, keep_alive))
        if len(self.queue) > _MAX_PIPELINED:
            self._pause(_PAUSE_QUEUE)
        if not self.busy and not self._write_paused:
            self.busy = True
            self._task = self.loop.create_task(self._serve_queue())

    # ---- refusing --------------------------------------------------------------------------------

    def _parser_failed(self, exc: Exception) -> None:
        refusal = exc.__context__
        if isinstance(refusal, _Refusal):
            self._refuse(refusal.status, refusal.message)
        elif isinstance(exc, httptools.HttpParserUpgrade):
            self._refuse(400, "protocol upgrades are not supported")
        else:
            self._refuse(400, f"malformed HTTP request: {exc}")

    def _refuse(self, status: int, message: str) -> None:
        """Queue an error answer behind the requests before it; read nothing more; close after it."""
        if self._held is _DISCARD:
            return
        self._held = _DISCARD
        self._head = False  # not reading a header any more (no header timeout)
        try:
            method = self.parser.get_method().decode("latin-1")
        except Exception:
            method = ""
        path = self._url.partition(b"?")[0].decode("latin-1", "replace")[:256]
        self._enqueue(HttpRequest(method, path, self._headers, b"", message, status, self.peer), False)

    # ---- reading on and off ------------------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and self.transport is not None:
                self.transport.resume_reading()

    # ---- responding ---------------------------------------------------------------------------

    async def _serve_queue(self) -> None:
        try:
            while self.queue and self.transport is not None and not self._write_paused:
                request, keep_alive = self.queue.popleft()
                if request.error:  # the transport's own refusal, or a body it could not read
                    response = HttpResponse(request.error_status, self.server.error_body(request.error))
                else:
                    try:
                        response = await self.server.handler(request)
                    except Exception:  # the handler maps its own errors; this is a last resort
                        log.exception("unhandled error in HTTP handler for %s %s", request.method, request.path)
                        response = HttpResponse(500, self.server.error_body("internal server error"))
                keep_alive = keep_alive and not self.closing
                if response.stream is not None:
                    await self._write_stream(response, keep_alive)
                    if self.transport is None:
                        return
                else:
                    self._write(response, keep_alive)
                if not keep_alive:
                    self._close(linger=bool(request.error))
                    return
                if self._paused and self._paused & _PAUSE_QUEUE and len(self.queue) <= _MAX_PIPELINED // 2:
                    self._resume(_PAUSE_QUEUE)
        finally:
            self.busy = False
            if self.closing and not self.queue:
                self._close()

    async def _write_stream(self, response: HttpResponse, keep_alive: bool) -> None:
        """A streamed answer: chunked, each piece written as it comes; while the transport's buffer
        is over its high mark the next piece waits (and so whoever feeds the stream)."""
        stream = cast(AsyncGenerator[bytes, None], response.stream)
        try:
            if self.transport is None:
                return
            status = STATUS_LINES.get(response.status) or f"HTTP/1.1 {response.status} Unknown\r\n".encode()
            head = b"%s%scontent-type: %s\r\ntransfer-encoding: chunked\r\ncache-control: no-cache\r\n" % (
                status, self.server.clock.date_header(), response.content_type)
            for name, value in response.headers:
                head += b"%s: %s\r\n" % (name, value)
            self.transport.write(head + (b"\r\n" if keep_alive else b"connection: close\r\n\r\n"))
            async for piece in stream:
                if self.transport is None:
                    return
                if piece:
                    self.transport.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                while self._write_paused and self.transport is not None:
                    waiter = self.loop.create_future()
                    self._room = waiter
                    await waiter
            if self.transport is not None:
                self.transport.write(b"0\r\n\r\n")
        finally:
            await stream.aclose()  # now: a client that went away cancels the request at once

    def _write(self, response: HttpResponse, keep_alive: bool) -> None:
        if self.transport is None:
            return
        status = STATUS_LINES.get(response.status) or f"HTTP/1.1 {response.status} Unknown\r\n".encode()
        body = response.body
        if keep_alive and not response.headers and len(body) < 65536:  # the usual answer: one format
            self.transport.write(b"%s%scontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (
                status, self.server.clock.date_header(), response.content_type, len(body), body))
            return
        head = b"%s%scontent-type: %s\r\ncontent-length: %d\r\n" % (
            status, self.server.clock.date_header(), response.content_type, len(response.body))
        for name, value in response.headers:
            head += b"%s: %s\r\n" % (name, value)
        head += b"\r\n" if keep_alive else b"connection: close\r\n\r\n"
        if len(response.body) < 65536:  # one buffer, one send
            self.transport.write(head + response.body)
        else:
            self.transport.writelines([head, response.body])

    def _close(self, linger: bool = False) -> None:
        transport = self.transport
        if transport is None or self._lingering:
            return
        if linger and transport.can_write_eof():
            # Shut our side once the answer is out, and read and drop what the client still sends
            # (for up to _LINGER_SECS, then the sweep aborts): closing with its bytes unread would
            # reset the connection, and a client still sending would lose our answer.
            self._held = _DISCARD
            self._lingering = True
            self._swept = None
            transport.write_eof()
            if self._paused:
                self._paused = 0
                transport.resume_reading()
            return
        transport.close()
        self.transport = None

    def shutdown(self) -> None:
        """Close when idle; a busy connection closes after its current response."""
        self.closing = True
        if self._lingering and self.transport is not None:
            self.transport.abort()  # its answer is out; what it still sends no longer matters
        elif not self.busy:
            self._close()

    # ---- the sweep ---------------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Called about every second by the server: close what has waited past its timeout."""
        transport = self.transport
        if transport is None:
            return
        limits = self.server.limits
        if self._lingering:
            timeout = _LINGER_SECS
        elif self.busy or self.queue or self._write_paused:
            self._swept = None  # executing, or its answers wait for the client: no timeout
            return
        elif self._head:
            timeout = limits.header_timeout
        elif self._head is None:
            timeout = limits.keepalive_timeout
        else:
            self._swept = None  # reading a body
            return
        if timeout <= 0:
            return
        mark = _LINGERING if self._lingering else self._headers
        if mark is not self._swept:
            self._swept = mark
            self._swept_at = now
            return
        if now - self._swept_at < timeout:
            return
        if self._lingering:
            transport.abort()
        elif self._head:
            self._refuse(408, f"the request header did not arrive whole within {limits.header_timeout:g} s "
                              f"(--http-header-timeout-secs)")
        elif transport.get_write_buffer_size():
            transport.abort()  # idle, with an answer the client has not read for that long
        else:
            transport.close()
            self.transport = None


class HttpServer:
    def __init__(self, handler: Handler, *, max_body: int, error_body: ErrorBody,
                 limits: HttpLimits | None = None) -> None:
        self.handler = handler
        self.max_body = max_body
        self.error_body = error_body
        self.limits = limits = limits or HttpLimits()
        # a read no longer than this cannot hold a request line, header line or header past a limit
        self.small_read = min(limits.max_request_line, limits.max_header_line, limits.max_header_bytes)
        # the header's raw size (separators, CRLFs and the request line included) past which it is
        # over the names + values limit whatever its layout: a bound on what is held while it arrives
        self.raw_header_bytes = (limits.max_header_bytes + limits.max_request_line + 4
                                 + limits.max_headers * 4)
        self.clock = Clock()
        self.connections: set[HttpProtocol] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # set by start()

    @property
    def sweep_interval(self) -> float:
        """Timeouts are kept to within this: a quarter of the shortest, at most a second."""
        timeouts = [t for t in (self.limits.header_timeout, self.limits.keepalive_timeout) if t > 0]
        return max(0.05, min([1.0, *(t / 4 for t in timeouts)]))

    async def start(self, host: str, port: int, sock: socket.socket | None = None,
                    ssl: SSLContext | None = None) -> int:
        """Listen on host:port, or accept on `sock`, a listening socket shared with other processes;
        over TLS when `ssl` is given."""
        loop = self.loop = asyncio.get_running_loop()  # kept: get_running_loop() costs a getpid()
        if sock is not None:
            self._server = await loop.create_server(lambda: HttpProtocol(self), sock=sock, backlog=2048, ssl=ssl)
        else:
            self._server = await loop.create_server(lambda: HttpProtocol(self), host, port, backlog=2048,
                                                    reuse_address=True, ssl=ssl)
        self._sweeper = loop.create_task(self._sweep(self.sweep_interval))
        return int(self._server.sockets[0].getsockname()[1])

    async def _sweep(self, interval: float) -> None:
        loop = cast(asyncio.AbstractEventLoop, self.loop)
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for conn in list(self.connections):
                try:
                    conn.sweep(now)
                except Exception:  # one connection's trouble must not stop the sweep for the others
                    log.exception("HTTP connection sweep failed for %s", conn.peer)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        if self._server is not None:
            await self._server.wait_closed()
