"""The gRPC layer's own bounds, against our GrpcServer on a real socket in this process (so the test
can read what a connection holds): concurrent large uploads that fill the connection window make
progress, a streaming call whose client never reads cannot make replies pile up, and a request reset
in the same read as it opened does not disturb the connection. Every wait is bounded."""

from __future__ import annotations

import asyncio
import struct

import hpack

from server.frontends.grpc_server import GrpcServer, Method, parse_timeout
from server.http2 import frames as fr

HEADERS = [(":method", "POST"), (":scheme", "http"), (":authority", "x"), ("content-type", "application/grpc")]


class _Reply:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def SerializeToString(self) -> bytes:  # noqa: N802 (protobuf's name)
        return self.body


class Client:
    """A raw HTTP/2 client on asyncio streams: counts ended streams and the window it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer
        self.encoder = hpack.Encoder()
        self.window = 65535
        self.ended: dict[int, bytes] = {}  # sid -> the closing HEADERS block
        self.changed = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._read())

    def headers(self, sid: int, path: str, end_stream: bool = False) -> bytes:
        flags = fr.END_HEADERS | (fr.END_STREAM if end_stream else 0)
        return fr.frame(fr.HEADERS, flags, sid, self.encoder.encode([*HEADERS, (":path", path)]))

    async def _read(self) -> None:
        buf = b""
        while data := await self.r.read(1 << 20):
            buf += data
            while len(buf) >= 9:
                n = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + n:
                    break
                ftype, flags, sid, payload = buf[3], buf[4], int.from_bytes(buf[5:9], "big"), buf[9:9 + n]
                buf = buf[9 + n:]
                if ftype == fr.WINDOW_UPDATE and sid == 0:
                    self.window += int.from_bytes(payload, "big")
                elif ftype == fr.HEADERS and flags & fr.END_STREAM:
                    self.ended[sid] = payload
                self.changed.set()

    async def wait(self, condition, timeout: float = 10.0) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout
        while not condition():
            self.changed.clear()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                return condition()
        return True

    def close(self) -> None:
        self.task.cancel()
        self.w.close()


async def _serve(methods: dict[str, Method], **kw) -> tuple[GrpcServer, Client]:
    server = GrpcServer(methods, error_status=lambda exc: (13, str(exc)), **kw)
    port = await server.start("127.0.0.1", 0)
    client = Client(*await asyncio.open_connection("127.0.0.1", port))
    return server, client


async def _ok(request: bytes, ctx) -> _Reply:
    return _Reply(b"ok")


def test_concurrent_uploads_that_fill_the_connection_window_still_finish():
    """Twelve ~1 MiB messages interleaved on a 4 MiB connection window: every stream's message is
    partial when the window runs out. The call holding the most is ended (RESOURCE_EXHAUSTED), the
    window moves again, and every call gets its answer; none hangs."""
    async def main() -> None:
        server, c = await _serve({"/s/U": Method(bytes, _ok)}, max_message=1 << 20)
        sids = list(range(1, 25, 2))
        c.w.write(fr.PREFACE + fr.frame(fr.SETTINGS, 0, 0) + b"".join(c.headers(s, "/s/U") for s in sids))
        size = (1 << 20) - 100
        message = struct.pack(">BL", 0, size) + b"x" * size
        sent = dict.fromkeys(sids, 0)
        while any(n < len(message) for n in sent.values()):
            for s in sids:
                k = min(16384, len(message) - sent[s], c.window)
                if k > 0:
                    last = sent[s] + k == len(message)
                    c.w.write(fr.frame(fr.DATA, fr.END_STREAM if last else 0, s, message[sent[s]:sent[s] + k]))
                    sent[s] += k
                    c.window -= k
            await c.w.drain()
            if c.window <= 0:
                assert await c.wait(lambda: c.window > 0, 10.0), "the connection window never came back"
        assert await c.wait(lambda: len(c.ended) == len(sids), 10.0), f"answered {len(c.ended)} of {len(sids)}"
        statuses = [hpack.Decoder().decode(b) for b in c.ended.values()]  # trailers-only or trailers
        assert any(("grpc-status", "8") in h for h in statuses)  # RESOURCE_EXHAUSTED for the victims
        c.close()
        await server.stop(0.1)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_streaming_call_whose_client_never_reads_holds_bounded_replies():
    async def main() -> None:
        reply = _Reply(b"r" * 100_000)

        async def stream(request: bytes, ctx) -> _Reply:
            return reply

        server, c = await _serve({"/s/S": Method(bytes, stream, streaming=True)}, max_message=1 << 20)
        init = fr.frame(fr.SETTINGS, 0, 0, struct.pack(">HL", fr.S_INITIAL_WINDOW_SIZE, 0))  # never a window
        one = fr.frame(fr.DATA, 0, 1, struct.pack(">BL", 0, 1) + b"m")
        c.w.write(fr.PREFACE + init + c.headers(1, "/s/S") + one * 5000)  # 5,000 requests, 500 MB of replies
        await c.w.drain()
        peak = 0
        for _ in range(50):
            await asyncio.sleep(0.02)
            peak = max([peak, *(p.conn.held_output for p in server.connections)])
        limit = server.limits.max_held_reply_bytes
        assert 0 < peak <= limit + 33 * 100_005, peak  # the cap, plus the replies of the tasks running
        c.close()
        await server.stop(0.1)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_request_reset_in_the_read_that_opened_it_leaves_the_connection_serving():
    async def main() -> None:
        server, c = await _serve({"/s/U": Method(bytes, _ok)}, max_message=1 << 20)
        c.w.write(fr.PREFACE + fr.frame(fr.SETTINGS, 0, 0) + c.headers(1, "/s/Unknown")
                  + fr.frame(fr.RST_STREAM, 0, 1, struct.pack(">L", fr.CANCEL)))
        c.w.write(c.headers(3, "/s/U") + fr.frame(fr.DATA, fr.END_STREAM, 3, struct.pack(">BL", 0, 1) + b"x"))
        assert await c.wait(lambda: 3 in c.ended, 10.0)
        assert ("grpc-status", "0") in hpack.Decoder().decode(c.ended[3])  # our trailers are literals
        assert 1 not in c.ended  # nothing sent on the stream the client reset
        c.close()
        await server.stop(0.1)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_grpc_timeout_takes_ascii_digits_only():
    assert parse_timeout("5S") == 5.0 and parse_timeout("100m") == 0.1
    assert parse_timeout("\u00b2S") is None and parse_timeout("S") is None and parse_timeout("123456789S") is None


def test_replies_completing_in_one_loop_turn_leave_in_one_write():
    class CountingTransport:
        def __init__(self, inner) -> None:
            self.inner, self.writes = inner, 0

        def write(self, data: bytes) -> None:
            self.writes += b"grpc-status" in data  # writes that carry replies (not SETTINGS ACKs)
            self.inner.write(data)

        def __getattr__(self, name: str):
            return getattr(self.inner, name)

    async def main() -> None:
        server, c = await _serve({"/s/U": Method(bytes, _ok)}, max_message=1 << 20)
        c.w.write(fr.PREFACE + fr.frame(fr.SETTINGS, 0, 0))
        assert await c.wait(lambda: bool(server.connections), 5.0)
        protocol = next(iter(server.connections))
        counting = protocol.transport = CountingTransport(protocol.transport)
        sids = list(range(1, 17, 2))
        c.w.write(b"".join(c.headers(s, "/s/U") + fr.frame(fr.DATA, fr.END_STREAM, s, struct.pack(">BL", 0, 1) + b"x")
                           for s in sids))  # eight calls in one read
        assert await c.wait(lambda: len(c.ended) == len(sids), 10.0)
        assert counting.writes == 1  # not one per reply
        c.w.write(c.headers(17, "/s/U") + fr.frame(fr.DATA, fr.END_STREAM, 17, struct.pack(">BL", 0, 1) + b"x"))
        assert await c.wait(lambda: 17 in c.ended, 10.0)  # a lone call is answered at once
        assert counting.writes == 2
        c.close()
        await server.stop(0.1)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_unary_call_through_method_start_is_answered_cancelled_or_refused():
    """Method.start (ModelInfer's path, no task): a later reply answers the call; a deadline calls the
    cancel function and a reply after it sends nothing more; an error raised by start is the
    call's status; an error passed to reply is too."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        pending: dict[bytes, object] = {}
        cancelled: list[bytes] = []

        def start(request: bytes, ctx, reply):
            if request == b"refuse":
                raise ValueError("refused at once")
            pending[request] = reply
            if request in (b"ok", b"fail"):
                loop.call_later(0.01, reply, *((_Reply(b"done"), None) if request == b"ok" else
                                               (None, RuntimeError("failed later"))))
            return lambda: cancelled.append(request)

        server, c = await _serve({"/s/U": Method(bytes, _ok, start=start)}, max_message=1 << 20)
        c.w.write(fr.PREFACE + fr.frame(fr.SETTINGS, 0, 0))
        for sid, body in ((1, b"ok"), (3, b"slow"), (5, b"refuse"), (7, b"fail")):
            block = c.encoder.encode([*HEADERS, (":path", "/s/U")] + ([("grpc-timeout", "50m")] if sid == 3 else []))
            c.w.write(fr.frame(fr.HEADERS, fr.END_HEADERS, sid, block)
                      + fr.frame(fr.DATA, fr.END_STREAM, sid, struct.pack(">BL", 0, len(body)) + body))
        assert await c.wait(lambda: len(c.ended) == 4, 10.0), f"answered {sorted(c.ended)}"
        dec = hpack.Decoder()
        status = {sid: dict(dec.decode(c.ended[sid])) for sid in (1, 3, 5, 7)}
        assert status[1]["grpc-status"] == "0"
        assert status[3]["grpc-status"] == "4"  # DEADLINE_EXCEEDED
        assert cancelled == [b"slow"]  # the deadline withdrew it; the others were answered
        assert status[5]["grpc-status"] == "13" and "refused at once" in status[5]["grpc-message"]
        assert status[7]["grpc-status"] == "13" and "failed later" in status[7]["grpc-message"]
        before = len(c.ended)
        pending[b"slow"](_Reply(b"late"), None)  # a reply after the cancel: nothing is sent
        await asyncio.sleep(0.05)
        assert len(c.ended) == before and server.connections
        c.close()
        await server.stop(0.1)

    asyncio.run(asyncio.wait_for(main(), 30))
