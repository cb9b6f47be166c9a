"""HTTP/1.1 header limits while a request's header spans several reads (a mixin of HttpProtocol).

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
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import httptools

if TYPE_CHECKING:
    from .http_server import HttpServer

_DISCARD: list[bytes] = []  # HttpProtocol._held when input is dropped (a refusal was queued)
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


class HeaderLimits:
    """HttpProtocol's header-limit checks; the state lives in HttpProtocol's slots."""

    # While a request's header spans reads: the reads not yet fed to the parser (None: feeding
    # reads as they come; _DISCARD: dropping them), their size, the length of the line in progress
    # (held, plus any part the parser has), the header bytes the parser has seen, and the header
    # names + values so far, counted in the callbacks in precise mode (every line checked).
    __slots__ = ("_held", "_held_size", "_line", "_fed", "_in_request_line", "_hsum", "_precise")

    def __init__(self) -> None:
        self._held: list[bytes] | None = None
        self._held_size = 0
        self._line = 0
        self._fed = 0
        self._in_request_line = False
        self._hsum = 0
        self._precise = False  # check every header line's bytes in the callbacks (a long read)

    if TYPE_CHECKING:
        server: HttpServer
        parser: httptools.HttpRequestParser
        _headers: dict[str, str]
        _url: bytes
        _nheaders: int
        _head: bool | None

        def _refuse(self, status: int, message: str) -> None: ...
        def _parser_failed(self, exc: Exception) -> None: ...
        def data_received(self, data: bytes) -> None: ...


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
