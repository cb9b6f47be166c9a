"""A lean HTTP/1.1 server on asyncio + httptools: the transport under the REST frontend.

It owns connections and framing only: keep-alive, pipelining (responses in request order),
chunked and Content-Length bodies, `Expect: 100-continue`, gzip/deflate request bodies, and the
body size limit. What a request means is the handler's business (`frontends/rest.py`): it gets a
complete `HttpRequest` and returns an `HttpResponse`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from ssl import SSLContext
from typing import cast

import httptools

log = logging.getLogger(__name__)


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str  # percent-encoded, as received
    headers: dict[str, str]  # lower-case names
    body: bytes
    # Set when the request could not be read whole (too large, bad encoding): answer it as 400.
    error: str = ""


@dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]
ErrorBody = Callable[[str], bytes]

# Status lines, built once.
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_MAX_PIPELINED = 64  # requests queued on one connection before we stop reading from it


class _Clock:
    """The Date header, refreshed at most once a second rather than formatted per response."""

    def __init__(self) -> None:
        self._second = 0
        self._header = b""

    def date_header(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._header = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._header


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise ValueError(f"unsupported Content-Encoding '{encoding}' (gzip and deflate are)")
    d = zlib.decompressobj(wbits)
    out = d.decompress(body, limit + 1)
    if len(out) > limit:
        raise ValueError(f"the decompressed request body exceeds the {limit}-byte limit")
    return out


class HttpProtocol(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        # protocols exist only once the server has started, so its loop is known
        self.loop = cast(asyncio.AbstractEventLoop, server.loop)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[tuple[HttpRequest, bool]] = deque()
        self.busy = False
        self.closing = False
        self._task: asyncio.Task | None = None
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._error = ""

    # ---- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass it
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        self.queue.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client went away: a queued request is dropped, not executed

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")

    # ---- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body:
            self._refuse(f"request body of {length} bytes exceeds the {self.server.max_body}-byte limit "
                         f"(--http-max-input-size)")
        elif self._headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self._error:
            return
        self._size += len(body)
        if self._size > self.server.max_body:
            self._refuse(f"request body exceeds the {self.server.max_body}-byte limit (--http-max-input-size)")
            return
        self._body.append(body)

    def _refuse(self, error: str) -> None:
        """Answer an oversized request now, without reading its body, then close the connection."""
        self._error = error
        self._body = []
        self._enqueue(HttpRequest(self.parser.get_method().decode("latin-1"), "", self._headers, b"", error), False)

    def on_message_complete(self) -> None:
        if self._error:  # already answered by _refuse
            return
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        error = ""
        encoding = self._headers.get("content-encoding", "identity").lower()
        if encoding != "identity" and body:
            try:
                body = _decompress(body, encoding, self.server.max_body)
            except (ValueError, zlib.error) as exc:
                error = f"cannot decode the request body: {exc}"
        # the path without query or fragment, still percent-encoded: the router splits, then unquotes
        path = self._url.partition(b"?")[0].partition(b"#")[0].decode("latin-1")
        request = HttpRequest(self.parser.get_method().decode("latin-1"), path, self._headers, body, error)
        self._enqueue(request, self.parser.should_keep_alive() and not error)

    def _enqueue(self, request: HttpRequest, keep_alive: bool) -> None:
        self.queue.append((request, keep_alive))
        if len(self.queue) > _MAX_PIPELINED and self.transport is not None:
            self.transport.pause_reading()
        if not self.busy:
            self.busy = True
            self._task = self.loop.create_task(self._serve_queue())

    # ---- responding ---------------------------------------------------------------------------

    async def _serve_queue(self) -> None:
        try:
            while self.queue and self.transport is not None:
                request, keep_alive = self.queue.popleft()
                try:
                    response = await self.server.handler(request)
                except Exception:  # the handler maps its own errors; this is a last resort
                    log.exception("unhandled error in HTTP handler for %s %s", request.method, request.path)
                    response = HttpResponse(500, self.server.error_body("internal server error"))
                keep_alive = keep_alive and not self.closing
                self._write(response, keep_alive)
                if not keep_alive:
                    self._close()
                    return
                if len(self.queue) <= _MAX_PIPELINED // 2 and self.transport is not None:
                    self.transport.resume_reading()
        finally:
            self.busy = False
            if self.closing and not self.queue:
                self._close()

    def _write(self, response: HttpResponse, keep_alive: bool) -> None:
        if self.transport is None:
            return
        status = _STATUS_LINES.get(response.status) or f"HTTP/1.1 {response.status} Unknown\r\n".encode()
        head = b"%s%scontent-type: %s\r\ncontent-length: %d\r\n" % (
            status, self.server.clock.date_header(), response.content_type, len(response.body))
        for name, value in response.headers:
            head += b"%s: %s\r\n" % (name, value)
        head += b"\r\n" if keep_alive else b"connection: close\r\n\r\n"
        if len(response.body) < 65536:  # one buffer, one send
            self.transport.write(head + response.body)
        else:
            self.transport.writelines([head, response.body])

    def _fail(self, status: int, message: str) -> None:
        self._write(HttpResponse(status, self.server.error_body(message)), keep_alive=False)
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def shutdown(self) -> None:
        """Close when idle; a busy connection closes after its current response."""
        self.closing = True
        if not self.busy:
            self._close()


class HttpServer:
    def __init__(self, handler: Handler, *, max_body: int, error_body: ErrorBody) -> None:
        self.handler = handler
        self.max_body = max_body
        self.error_body = error_body
        self.clock = _Clock()
        self.connections: set[HttpProtocol] = set()
        self._server: asyncio.Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # set by start()

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
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        if self._server is not None:
            await self._server.wait_closed()
