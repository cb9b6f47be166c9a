"""A lean HTTP/1.1 server on asyncio + httptools: the transport under the REST frontend.

It owns connections and framing only: keep-alive, pipelining (responses in request order),
chunked and Content-Length bodies, `Expect: 100-continue`, gzip/deflate request bodies, the body
size limit, and what one client may cost (`HttpLimits`): the request line, header lines, header
count and header bytes, a header-read timeout, a keep-alive idle timeout, and backpressure (a
client that does not read its answers stops being read). What a request means is the handler's
business (`frontends/rest.py`): it gets a complete `HttpRequest` and returns an `HttpResponse`.

Header limits. llhttp keeps no limit of its own, and httptools joins the pieces of a header line
split over several reads with `bytes +=` (quadratic in the number of pieces), so a limit checked
only when a line is complete comes too late. While a request's header is arriving over several
reads, the reads are held here and the parser is fed only whole lines (up to the last b"\\n",
joined once); the length of the line in progress and the header bytes held are counted as they
arrive, and a limit crossed is answered at once (414 or 431, then close). A read that starts
between requests is fed whole, as before: the hot path (a small request in one read) costs a few
attribute updates. Lines complete within one read are checked in the callbacks, exactly, when the
read is longer than the smallest limit (a shorter read cannot break a byte limit). While a line
arrives, its raw bytes count (": " and CR allowed for), so one padded with extra whitespace may be
cut a few bytes before its name + value reach the limit.

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

from ..context import CallContext

log = logging.getLogger(__name__)


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str  # percent-encoded, as received
    headers: dict[str, str]  # lower-case names
    body: bytes
    # Set when the request could not be read whole (too large, bad encoding, a header limit, a
    # timeout): the transport answers it with `error_status` and `{"error": error}`, in its turn.
    error: str = ""
    error_status: int = 400
    peer: str = ""  # the client's "host:port", "" when unknown

    def context(self) -> CallContext:
        return CallContext("http", self.headers, self.peer)


@dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one client may cost the transport (the --http-* flags; defaults as nginx's and Triton's)."""

    max_request_line: int = 8 * 1024  # method, target and version, bytes: past it 414 and close
    max_header_line: int = 8 * 1024  # one header field's name + value, bytes: past it 431 and close
    max_headers: int = 100  # header fields in one request: past it 431 and close
    max_header_bytes: int = 64 * 1024  # all header fields' names + values together: past it 431
    header_timeout: float = 60.0  # secs from a request's first byte to its last header: 408; 0: none
    keepalive_timeout: float = 75.0  # secs an idle connection is kept open; 0: no limit

    def to_dict(self) -> dict[str, float]:
        """For a frontend worker's arguments (JSON); HttpLimits(**d) reads it back."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]
ErrorBody = Callable[[str], bytes]

# Status lines, built once.
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
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
_DISCARD: list[bytes] = []  # HttpProtocol._held when input is dropped (a refusal was queued)
_LINGERING = object()  # the sweep's progress mark for a connection closing after an error answer
# "GET" is the shortest method, "HTTP/1.1" the version: a target shorter than this fits any limit
_REQUEST_LINE_OVERHEAD = len("GET") + len("  HTTP/1.1")


class _Refusal(Exception):
    """Raised in a parser callback to stop the parser: answer `status` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Begun:
    """Counts the requests that begin in some bytes (a throwaway parser's protocol)."""

    def __init__(self) -> None:
        self.count = 0

    def on_message_begin(self) -> None:
        self.count += 1


def _requests_begun(data: bytes) -> int:
    """How many requests begin in `data`, read from the start of a request. Off the hot path: only
    when a read ends inside a header, to know whether that header began with the read."""
    counter = _Begun()
    with contextlib.suppress(httptools.HttpParserError, httptools.HttpParserUpgrade):
        httptools.HttpRequestParser(counter).feed_data(data)
    return counter.count


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
    # slots: attribute access is the hot path's main cost; with this many attributes an instance
    # dict cost ~4% more instructions per request (callgrind, loadtests-style canned handler)
    __slots__ = ("server", "loop", "transport", "parser", "queue", "busy", "closing", "peer", "_task",
                 "_max_headers", "_small", "_paused", "_write_paused", "_head", "_precise", "_held", "_held_size",
                 "_line", "_fed", "_in_request_line", "_hsum", "_lingering", "_swept", "_swept_at",
                 "_url", "_headers", "_body", "_size", "_error", "_nheaders")

    def __init__(self, server: HttpServer) -> None:
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
        # True: reading a request's header; False: its body; None: between requests
        self._head: bool | None = None
        self._precise = False  # check every header line's bytes in the callbacks (a long read)
        # While a request's header spans reads: the reads not yet fed to the parser (None: feeding
        # reads as they come; _DISCARD: dropping them), their size, the length of the line in
        # progress (held, plus any part the parser has) and the header bytes the parser has seen.
        self._held: list[bytes] | None = None
        self._held_size = 0
        self._line = 0
        self._fed = 0
        self._in_request_line = False
        self._hsum = 0  # header names + values so far, counted in the callbacks in precise mode
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
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client went away: a queued request is dropped, not executed

    def pause_writing(self) -> None:
        """The write buffer passed _WRITE_HIGH: answer nothing more and read nothing more."""
        self._write_paused = True
        self._pause(_PAUSE_WRITE)

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume(_PAUSE_WRITE)
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

    # ---- header limits while a header spans reads ---------------------------------------------------

    def _start_holding(self, data: bytes, began_with_data: bool) -> None:
        self._held = []
        self._held_size = 0
        self._precise = True
        nl = data.rfind(b"\n")
        if began_with_data:
            # the request began with this read: the parser has all of `data` of it
            self._fed = len(data)
            self._line = len(data) - nl - 1
            self._in_request_line = nl < 0
            self._hsum = sum(len(k) + len(v) for k, v in self._headers.items())
        else:
            # it began after an earlier request in this read (pipelined): find where, by its request
            # line (method, space and the target so far, as the parser reported them)
            self._hsum = sum(len(k) + len(v) for k, v in self._headers.items())
            start = data.rfind(self.parser.get_method() + b" " + self._url) if self._url else -1
            if start < 0:  # still in the method: a few bytes, counted as none
                self._fed = self._line = 0
                self._in_request_line = True
            else:
                self._fed = len(data) - start
                self._in_request_line = data.find(b"\n", start) < 0
                self._line = len(data) - start if self._in_request_line else len(data) - nl - 1
        self._check_progress()

    def _hold(self, data: bytes) -> None:
        held = self._held
        if held is _DISCARD or held is None:
            return
        fresh = self._line == self._held_size  # the parser holds no part of the line in progress
        held.append(data)
        self._held_size += len(data)
        nl = data.rfind(b"\n")
        if nl < 0:
            self._line += len(data)
            self._check_progress()
            return
        if self._in_request_line:  # the request line ends here: its length, without CRLF
            size = self._line + data.find(b"\n") - 1
            if size > self.server.limits.max_request_line:
                self._refuse(414, self._request_line_message(size))
                return
        buf = b"".join(held) if len(held) > 1 else data
        cut = len(buf) - (len(data) - nl - 1)  # feed every whole line, keep the line in progress
        # where the header ends (its empty line), if it is in what we feed: bytes past it are body
        if fresh and buf.startswith(b"\r\n"):
            end = 2
        else:
            end = buf.find(b"\n\r\n", 0, cut)
            end = end + 3 if end >= 0 else len(buf)
        if self._fed + end > self.server.raw_header_bytes:
            self._refuse(431, self._header_bytes_message())
            return
        headers = self._headers  # a new request gets a new dict
        try:
            self.parser.feed_data(memoryview(buf)[:cut])
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parser_failed(exc)
            return
        rest = buf[cut:]
        if self._head:  # still in a header (this request's, or a pipelined one's begun in `buf`)
            if self._headers is headers:
                self._fed += cut
            else:  # a request began inside what we fed: its whole lines went through the callbacks
                self._hsum = sum(len(k) + len(v) for k, v in self._headers.items())
                self._fed = self._hsum + len(self._url)
            self._held = [rest] if rest else []
            self._held_size = self._line = len(rest)
            self._in_request_line = False
            self._check_progress()
        else:  # the header is complete: what follows is body, or more requests, fed as it comes
            self._held = None
            if rest:
                self.data_received(rest)

    def _check_progress(self) -> None:
        """Refuse once the line in progress, or the header so far, is past a limit."""
        limits = self.server.limits
        if self._in_request_line:
            if self._line > limits.max_request_line + 1:  # + 1: the line's CR may be in
                self._refuse(414, self._request_line_message(self._line))
                return
        elif self._line > limits.max_header_line + 3:  # + 3: ": " and CR
            self._refuse(431, f"a request header line exceeds the {limits.max_header_line}-byte limit "
                              f"(--http-max-header-line)")
            return
        if self._fed + self._held_size > self.server.raw_header_bytes:
            self._refuse(431, self._header_bytes_message())

    def _request_line_message(self, size: int | None = None) -> str:
        limit = self.server.limits.max_request_line
        what = f"of {size} bytes " if size is not None else ""
        return f"the request line {what}exceeds the {limit}-byte limit (--http-max-request-line)"

    def _header_bytes_message(self) -> str:
        return (f"the request headers exceed the {self.server.limits.max_header_bytes}-byte limit "
                f"(--http-max-header-bytes)")

    def _check_header(self, name: bytes, value: bytes) -> None:
        """A whole header line, in precise mode or past the count: raise _Refusal past a limit."""
        limits = self.server.limits
        if self._nheaders > limits.max_headers:
            raise _Refusal(431, f"more than {limits.max_headers} request header fields (--http-max-headers)")
        size = len(name) + len(value)
        if size > limits.max_header_line:
            raise _Refusal(431, f"request header line '{name.decode('latin-1')[:64]}' of {size} bytes exceeds "
                                f"the {limits.max_header_line}-byte limit (--http-max-header-line)")
        if self._nheaders == 1:
            self._hsum = 0
        self._hsum += size
        if self._hsum > limits.max_header_bytes:
            raise _Refusal(431, self._header_bytes_message())

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
            self.transport.write(_CONTINUE)

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
                body = _decompress(body, encoding, self.server.max_body)
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

    def _write(self, response: HttpResponse, keep_alive: bool) -> None:
        if self.transport is None:
            return
        status = _STATUS_LINES.get(response.status) or f"HTTP/1.1 {response.status} Unknown\r\n".encode()
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
        self.clock = _Clock()
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
