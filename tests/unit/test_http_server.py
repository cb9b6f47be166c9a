"""The HTTP/1.1 transport's logic, in one process: HttpProtocol fed bytes split every possible way,
header limits at and past each bound, backpressure, and the timeout sweep.

The transport here is `Wire`, a stand-in for asyncio's that records what is written and can play a
client that stops reading; the end-to-end behaviour over real sockets is tests/e2e/test_http_limits.py.
"""

from __future__ import annotations

import asyncio
import json

import httptools
import pytest

from server.context import CallContext
from server.frontends.http_server import HttpLimits, HttpProtocol, HttpRequest, HttpResponse, HttpServer

SMALL = HttpLimits(max_request_line=64, max_header_line=40, max_headers=4, max_header_bytes=100,
                   header_timeout=2.0, keepalive_timeout=5.0)


class Wire:
    """A transport: collects what is written; with `stalled`, the client reads nothing, so the write
    buffer grows and the protocol is told to pause writing past the high-water mark."""

    def __init__(self, proto: HttpProtocol, stalled: bool = False) -> None:
        self.proto = proto
        self.out = bytearray()
        self.stalled = stalled
        self.buffered = 0
        self.high = self.low = 0
        self.writing_paused = False
        self.reading = True
        self.closed = self.eof = self.aborted = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high, self.low = high or 0, low or 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.out += data
        if self.stalled:
            self.buffered += len(data)
            if self.buffered > self.high and not self.writing_paused:
                self.writing_paused = True
                self.proto.pause_writing()

    def writelines(self, parts: list[bytes]) -> None:
        for p in parts:
            self.write(p)

    def drain(self) -> None:
        """The client reads everything."""
        self.stalled = False
        self.buffered = 0
        if self.writing_paused:
            self.writing_paused = False
            self.proto.resume_writing()

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.reading = False

    def resume_reading(self) -> None:
        assert not self.reading, "resumed twice"
        self.reading = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True


class Responses:
    """Parses what the server wrote: a list of (status, body)."""

    def __init__(self, data: bytes) -> None:
        self.items: list[tuple[int, bytes]] = []
        self._body = b""
        parser = httptools.HttpResponseParser(self)
        self._parser = parser
        parser.feed_data(bytes(data))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.items.append((self._parser.get_status_code(), self._body))
        self._body = b""


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class Conn:
    """One connection to an in-process HttpServer whose handler echoes what it got."""

    def __init__(self, limits: HttpLimits = SMALL, stalled: bool = False, handler=None) -> None:
        self.seen: list[HttpRequest] = []

        async def echo(request: HttpRequest) -> HttpResponse:
            self.seen.append(request)
            return HttpResponse(200, json.dumps({"method": request.method, "path": request.path,
                                                 "body": request.body.decode()}).encode())

        self.server = HttpServer(handler or echo, max_body=1 << 20, error_body=_error_body, limits=limits)
        self.server.loop = asyncio.get_running_loop()
        self.proto = HttpProtocol(self.server)
        self.wire = Wire(self.proto, stalled)
        self.proto.connection_made(self.wire)  # type: ignore[arg-type]

    async def feed(self, chunks: list[bytes]) -> int:
        """Feed the chunks while the protocol reads; returns how many it took."""
        for i, chunk in enumerate(chunks):
            if not self.wire.reading:
                return i
            self.proto.data_received(chunk)
            await asyncio.sleep(0)
        return len(chunks)

    async def settle(self) -> list[tuple[int, bytes]]:
        for _ in range(20):
            await asyncio.sleep(0)
        return Responses(self.wire.out).items


def run(coro):
    return asyncio.run(coro)


def splits(data: bytes):
    """The ways a stream may arrive: whole, in two pieces at every offset, and byte by byte."""
    yield [data]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]
    yield [data[i:i + 1] for i in range(len(data))]


async def _answers(chunks: list[bytes], limits: HttpLimits = SMALL):
    conn = Conn(limits)
    await conn.feed(chunks)
    return await conn.settle(), conn


def post(path: bytes = b"/p", body: bytes = b"hello", extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: a\r\n%sContent-Length: %d\r\n\r\n%s" % (path, extra, len(body), body)


def request_line_of(size: int) -> bytes:
    """A GET whose request line (method, target, version; no CRLF) is `size` bytes."""
    target = b"/" + b"x" * (size - len(b"GET / HTTP/1.1"))
    line = b"GET %s HTTP/1.1" % target
    assert len(line) == size
    return line + b"\r\nHost: a\r\n\r\n"


def header_of(size: int) -> bytes:
    """A GET with a header whose name + value is `size` bytes."""
    return b"GET / HTTP/1.1\r\nX-Long: " + b"v" * (size - len(b"X-Long")) + b"\r\n\r\n"


def headers_count(n: int) -> bytes:
    return b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(n)) + b"\r\n"


def headers_total(total: int) -> bytes:
    """Three headers whose names + values add up to `total` bytes (each within the line limit)."""
    a = total // 3
    sizes = [a, a, total - 2 * a]
    fields = b"".join(b"X%d: " % i + b"v" * (s - 2) + b"\r\n" for i, s in enumerate(sizes))
    return b"GET / HTTP/1.1\r\n" + fields + b"\r\n"


PIPELINE = post(b"/one?q=1", b"first") + b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n" + (
    b"POST /three HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n") + post(b"/four")


def test_every_split_of_a_pipeline_reads_the_same():
    async def main():
        expected, _ = await _answers([PIPELINE])
        assert [s for s, _ in expected] == [200] * 4
        assert [json.loads(b)["path"] for _, b in expected] == ["/one", "/two", "/three", "/four"]
        assert json.loads(expected[2][1])["body"] == "abcde"
        for chunks in splits(PIPELINE):
            got, conn = await _answers(chunks)
            assert got == expected, chunks
            assert conn.proto._held is None and not conn.wire.closed
    run(main())


# SMALL: every read past 40 bytes is checked line by line; WIDE: reads up to 64 bytes are not (the
# fast path), so a pipelined request's header may begin inside a read that was fed whole
WIDE = HttpLimits(max_request_line=64, max_header_line=64, max_headers=4, max_header_bytes=150)
BEFORE = [b"", b"GET /a HTTP/1.1\r\n\r\n", post(b"/p", b"a\nb")]  # what comes first on the connection


@pytest.mark.parametrize("limits", [SMALL, WIDE], ids=["small", "wide"])
@pytest.mark.parametrize("name, build, field, status, flag", [
    ("request line", request_line_of, "max_request_line", 414, "--http-max-request-line"),
    ("header line", header_of, "max_header_line", 431, "--http-max-header-line"),
    ("header count", headers_count, "max_headers", 431, "--http-max-headers"),
    ("header bytes", headers_total, "max_header_bytes", 431, "--http-max-header-bytes"),
])
def test_limits_at_and_past_the_bound_however_the_bytes_arrive(limits, name, build, field, status, flag):
    limit = getattr(limits, field)
    at, past = build(limit), build(limit + 1)

    async def main():
        for before in BEFORE:
            first = [200] if before else []
            for chunks in splits(before + at):
                got, _ = await _answers(chunks, limits)
                assert [s for s, _ in got] == first + [200], (name, chunks)
            for chunks in splits(before + past):
                got, conn = await _answers(chunks, limits)
                assert [s for s, _ in got] == first + [status], (name, chunks)
                assert flag in json.loads(got[-1][1])["error"]
                assert conn.wire.eof  # our side shut, the client's further bytes dropped
    run(main())


def test_a_huge_header_line_is_cut_off_while_it_arrives():
    async def main():
        conn = Conn(HttpLimits())  # the defaults: 8 KiB a line
        piece = b"v" * 1024
        chunks = [b"GET / HTTP/1.1\r\nX-Big: "] + [piece] * 1024 + [b"\r\n\r\n"]
        taken = 0
        for chunk in chunks:
            conn.proto.data_received(chunk)
            await asyncio.sleep(0)
            if conn.wire.out:
                break
            assert conn.proto._held_size <= 9 * 1024  # what is held stays within the limit
            taken += 1
        assert taken == 8  # refused on the KiB that took the line past 8 KiB, not after the whole megabyte
        await conn.feed(chunks[taken + 1:])  # the rest is read and dropped
        got = await conn.settle()
        assert [s for s, _ in got] == [431] and "--http-max-header-line" in got[0][1].decode()
        # and in one read (a client sending faster than we read): refused on that read
        got, _ = await _answers([b"GET / HTTP/1.1\r\nX-Big: " + b"v" * 200_000], HttpLimits())
        assert [s for s, _ in got] == [431]
    run(main())


def test_a_trickled_request_is_held_as_whole_lines_only():
    """httptools joins a header line's pieces with `bytes +=`: it must only ever get whole lines."""
    async def main():
        data = post(b"/t", b"trickle", b"X-A: 1\r\nX-B: 2\r\n")
        conn = Conn(HttpLimits())
        parser, fed = conn.proto.parser, []

        class Watch:  # httptools' parser, noting what it is fed
            def feed_data(self, chunk):
                fed.append(bytes(chunk))
                return parser.feed_data(chunk)

            def __getattr__(self, name):
                return getattr(parser, name)

        conn.proto.parser = Watch()  # type: ignore[assignment]
        await conn.feed([data[i:i + 1] for i in range(len(data))])
        got = await conn.settle()
        assert [s for s, _ in got] == [200] and json.loads(got[0][1])["body"] == "trickle"
        head_size, before = data.index(b"\r\n\r\n") + 4, len(fed[0])
        assert fed[0] == b"P" and b"".join(fed) == data
        for chunk in fed[1:]:
            if before < head_size:  # in the header: whole lines (the first one's rest, then one by one)
                assert chunk.endswith(b"\n"), fed
            before += len(chunk)
        assert len(fed) == 1 + 6 + len(b"trickle")  # 6 lines (the last one empty), then the body as it came
    run(main())


def test_backpressure_pauses_reading_until_the_client_reads():
    async def main():
        conn = Conn(HttpLimits(), stalled=True)
        assert (conn.wire.high, conn.wire.low) == (256 * 1024, 64 * 1024)
        one = post(b"/p", b"x" * 1000)
        taken = await conn.feed([one] * 2000)  # each answer ~1 KiB: the buffer fills after ~250
        await conn.settle()
        assert conn.wire.writing_paused and not conn.wire.reading
        answered = len(conn.seen)
        assert 200 < answered < 400 and taken < 400
        assert conn.proto.sweep(0.0) is None and conn.proto._swept is None  # waiting on the client: no timeout
        conn.wire.drain()  # the client reads: answering and reading go on
        await conn.settle()
        assert conn.wire.reading and len(conn.seen) == taken  # what was queued is answered
        rest = await conn.feed([one] * (2000 - taken))
        await conn.settle()
        assert rest == 2000 - taken and len(conn.seen) == 2000
    run(main())


def test_reading_resumes_only_when_no_reason_to_pause_is_left():
    async def main():
        gate = asyncio.Event()

        async def slow(request: HttpRequest) -> HttpResponse:
            await gate.wait()
            return HttpResponse(200, b"x" * 100_000)

        conn = Conn(HttpLimits(), stalled=True, handler=slow)
        await conn.feed([b"GET / HTTP/1.1\r\n\r\n" * 70])  # past _MAX_PIPELINED queued: paused (queue)
        assert not conn.wire.reading
        gate.set()
        await conn.settle()  # three 100 KB answers fill the buffer: paused (write) too
        assert conn.wire.writing_paused and not conn.wire.reading
        conn.wire.drain()
        await conn.settle()  # the queue drained below half, and the buffer: reading again
        assert conn.wire.reading and len(Responses(conn.wire.out).items) == 70
    run(main())


def test_the_sweep_times_out_headers_and_idle_connections_but_not_work():
    async def main():
        conn = Conn(SMALL)  # header timeout 2 s, keep-alive 5 s
        proto, wire = conn.proto, conn.wire
        proto.sweep(100.0)
        proto.sweep(104.9)
        assert not wire.closed
        proto.sweep(105.0)  # idle since its first sweep for the keep-alive timeout: closed
        assert wire.closed and not wire.out

        conn = Conn(SMALL)
        proto, wire = conn.proto, conn.wire
        await conn.feed([b"GET / HTTP/1.1\r\nHost: a\r\n"])
        proto.sweep(10.0)
        await conn.feed([b"X-A: 1\r\n"])  # progress within the header does not restart the clock
        proto.sweep(11.9)
        assert not wire.out
        proto.sweep(12.0)
        got = await conn.settle()
        assert [s for s, _ in got] == [408] and "--http-header-timeout-secs" in got[0][1].decode()
        assert wire.eof and not wire.aborted
        await conn.feed([b"more bytes, dropped\r\n"])
        proto.sweep(12.5)
        proto.sweep(14.5)  # lingering past 2 s: aborted
        assert wire.aborted

        gate = asyncio.Event()

        async def slow(request: HttpRequest) -> HttpResponse:
            await gate.wait()
            return HttpResponse(200, b"{}")

        conn = Conn(SMALL, handler=slow)
        await conn.feed([b"GET / HTTP/1.1\r\n\r\n"])
        for t in (0.0, 50.0, 100.0):  # executing in the model: no timeout
            conn.proto.sweep(t)
        assert not conn.wire.closed
        gate.set()
        await conn.settle()
        conn.proto.sweep(200.0)
        conn.proto.sweep(204.0)
        assert not conn.wire.closed
        conn.proto.sweep(205.0)
        assert conn.wire.closed
    run(main())


def test_sweep_interval_and_server_stop():
    assert HttpServer(None, max_body=1, error_body=_error_body).sweep_interval == 1.0  # type: ignore[arg-type]
    one = HttpLimits(header_timeout=1.0)
    assert HttpServer(None, max_body=1, error_body=_error_body, limits=one).sweep_interval == 0.25  # type: ignore

    async def main():
        server = HttpServer(lambda r: None, max_body=1, error_body=_error_body, limits=one)  # type: ignore
        await server.start("127.0.0.1", 0)
        sweeper = server._sweeper
        assert sweeper is not None and not sweeper.done()
        await server.stop()
        assert sweeper.done() and server._sweeper is None
    run(main())


def test_request_knows_its_peer_and_context():
    async def main():
        conn = Conn(SMALL)
        await conn.feed([post(extra=b"Authorization: x\r\n")])
        await conn.settle()
        request = conn.seen[0]
        assert request.peer == "127.0.0.1:40000"
        ctx = request.context()
        assert isinstance(ctx, CallContext) and ctx.protocol == "http" and ctx.peer == "127.0.0.1:40000"
        assert ctx.headers["authorization"] == "x" and ctx.deadline is None
    run(main())


def test_malformed_request_after_a_good_one_is_answered_in_order():
    async def main():
        got, conn = await _answers([post() + b"GARBAGE\x00 / HTTP/9\r\n\r\n" + post()])
        assert [s for s, _ in got] == [200, 400] and conn.wire.eof
        assert "malformed" in json.loads(got[1][1])["error"]
    run(main())
