"""What the HTTP/1.1 transport hands the REST frontend and gets back, and what one client may cost.

`HttpRequest` is a complete request (headers, body, peer); `HttpResponse` the answer; `HttpLimits`
the per-client limits behind the --http-* flags. Also the bytes built once for every answer (status
lines, the Date header) and request-body decompression within the body limit.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus

from ..context import CallContext


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
    # Set for a streamed answer (server-sent events): the body's pieces as they come, sent chunked,
    # each flushed as it arrives; the next is taken only once the transport has room (backpressure).
    # The transport closes it early when the client goes away. `body` is then unused.
    stream: AsyncGenerator[bytes, None] | None = None


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
STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Clock:
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


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise ValueError(f"unsupported Content-Encoding '{encoding}' (gzip and deflate are)")
    d = zlib.decompressobj(wbits)
    out = d.decompress(body, limit + 1)
    if len(out) > limit:
        raise ValueError(f"the decompressed request body exceeds the {limit}-byte limit")
    return out
