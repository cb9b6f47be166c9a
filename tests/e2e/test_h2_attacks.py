"""The published HTTP/2 denial-of-service attacks, driven from raw sockets against a real server.

Each attack asserts what docs/security.md promises: the server process's memory stays bounded
(VmRSS from /proc), another client's gRPC call made during the attack completes promptly, and the
server keeps serving afterwards. Frames are built with hyperframe/hpack (h2's state machine refuses
to send some of these sequences). Loops are bounded in bytes and in time; loopback only.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import hpack
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hyperframe.frame import Frame

from server.http2 import frames as fr

MiB = 1 << 20
RSS_BOUND = 48 * MiB  # growth allowed during one attack (the unbounded cases grew 130-310 MiB)
PROMPT = 1.5  # seconds: another client's call during the attack (normally a few ms)
INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def h2_server(start_server, test_repo):
    """A server of its own, so memory figures are this module's, with the default limits."""
    return start_server(test_repo)


@pytest.fixture(scope="module")
def unlimited_server(start_server, test_repo):
    """No count of frames that ask for no work: what bounds a flood here is backpressure alone."""
    return start_server(test_repo, "--grpc-max-idle-frames", "1000000000")


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return fr.frame(ftype, flags, sid, payload)


def settings(**values: int) -> bytes:
    ids = {"INITIAL_WINDOW_SIZE": fr.S_INITIAL_WINDOW_SIZE, "MAX_FRAME_SIZE": fr.S_MAX_FRAME_SIZE}
    return frame(fr.SETTINGS, 0, 0, b"".join(struct.pack(">HL", ids[k], v) for k, v in values.items()))


GRPC_HEADERS = [(":method", "POST"), (":scheme", "http"), (":authority", "x"),
                ("content-type", "application/grpc"), ("te", "trailers")]


class Attacker:
    """One raw connection: preface and SETTINGS sent, nothing read until asked."""

    def __init__(self, server, *first: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.grpc_port), timeout=5)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # a client that never reads
        self.sock.sendall(fr.PREFACE + frame(fr.SETTINGS, 0, 0) + b"".join(first))
        self.encoder = hpack.Encoder()

    def headers_block(self, path: str) -> bytes:
        return self.encoder.encode([*GRPC_HEADERS[:3], (":path", path), *GRPC_HEADERS[3:]])

    def flood(self, chunks: Iterator[bytes], max_bytes: int, seconds: float) -> int:
        """Send until `max_bytes`, `seconds`, the server closing, or the socket staying full for
        a second (the server stopped reading: backpressure). Returns the bytes sent."""
        self.sock.setblocking(False)
        sent, deadline, stalled = 0, time.monotonic() + seconds, None
        pending = memoryview(b"")
        try:
            while sent < max_bytes and time.monotonic() < deadline:
                if not pending:
                    chunk = next(chunks, None)
                    if chunk is None:
                        break
                    pending = memoryview(chunk)
                try:
                    n = self.sock.send(pending)
                    sent += n
                    pending = pending[n:]
                    stalled = None
                except BlockingIOError:
                    stalled = stalled or time.monotonic()
                    if time.monotonic() - stalled > 1.0:
                        break
                    select.select([], [self.sock], [], 0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return sent

    def frames(self, seconds: float = 5.0, until: Callable[[Frame], bool] | None = None) -> list[Frame]:
        """Read what the server sent, up to `seconds`, the connection's end, or `until` a frame."""
        self.sock.setblocking(True)
        self.sock.settimeout(0.5)
        data, out, pos = b"", [], 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            while len(data) - pos >= 9:
                f, length = Frame.parse_frame_header(memoryview(data[pos:pos + 9]))
                if len(data) - pos - 9 < length:
                    break
                f.parse_body(memoryview(data[pos + 9:pos + 9 + length]))
                pos += 9 + length
                out.append(f)
                if until is not None and until(f):
                    return out
            data, pos = data[pos:], 0
        return out

    def close(self) -> None:
        self.sock.close()


def repeat(unit: bytes, per_chunk: int = 4096) -> Iterator[bytes]:
    chunk = unit * per_chunk
    while True:
        yield chunk


def probe_calls(server, during: Callable[[], None]) -> list[float]:
    """Run `during` (the attack) in a thread; meanwhile time gRPC calls from another client."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    x = np.ones((1, 16), np.int32)
    inputs = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    for i in inputs:
        i.set_data_from_numpy(x)
    client.infer("add_sub", inputs)  # the channel is up before the attack starts
    attack = threading.Thread(target=during)
    attack.start()
    times = []
    try:
        time.sleep(0.5)
        while attack.is_alive() or len(times) < 3:
            t0 = time.monotonic()
            out = client.infer("add_sub", inputs, client_timeout=30).as_numpy("OUTPUT0")
            times.append(time.monotonic() - t0)
            np.testing.assert_array_equal(out, 2 * x)
            time.sleep(0.2)
            if len(times) > 50:
                break
    finally:
        attack.join(30)
        client.close()
    return times


def check_attack(server, attack: Callable[[Attacker], object], *first: bytes) -> Attacker:
    """The three assertions every attack gets; returns the attacker's connection, still open."""
    before = server.rss()
    attacker = Attacker(server, *first)
    result: dict[str, object] = {}
    times = probe_calls(server, lambda: result.setdefault("r", attack(attacker)))
    grown = server.rss() - before  # the attacker's connection still open, its replies unread
    assert max(times) < PROMPT, f"another client waited {max(times):.2f} s during the attack"
    assert grown < RSS_BOUND, f"the server grew {grown / MiB:.0f} MiB"
    assert server.request("GET", "/v2/health/ready")[0] == 200
    return attacker


def goaway(frames: list[Frame]) -> int | None:
    codes = [f.error_code for f in frames if f.type == fr.GOAWAY]
    return codes[-1] if codes else None


# ---- unbounded memory from a client that never reads ----------------------------------------------


@pytest.mark.parametrize("unit", [frame(fr.PING, 0, 0, b"12345678"), frame(fr.SETTINGS, 0, 0)],
                         ids=["ping_flood_CVE-2019-9512", "settings_flood_CVE-2019-9515"])
def test_control_frame_floods_stop_at_backpressure(unlimited_server, unit):
    sent = {}

    def attack(a: Attacker) -> None:
        sent["n"] = a.flood(repeat(unit), 2_000_000 * len(unit), seconds=8)

    a = check_attack(unlimited_server, attack)
    assert sent["n"] < 2_000_000 * len(unit)  # the server stopped reading long before
    a.close()


@pytest.mark.parametrize("unit", [frame(fr.PING, 0, 0, b"12345678"), frame(fr.SETTINGS, 0, 0),
                                  frame(fr.PRIORITY, 0, 1, b"\x00\x00\x00\x00\x10")],
                         ids=["ping", "settings", "priority"])
def test_control_frame_floods_get_goaway_enhance_your_calm(h2_server, unit):
    a = check_attack(h2_server, lambda a: a.flood(repeat(unit), 200_000 * len(unit), seconds=8))
    assert goaway(a.frames(until=lambda f: f.type == fr.GOAWAY)) == fr.ENHANCE_YOUR_CALM
    a.close()


def test_headers_for_an_unknown_method_CVE_2019_9514(h2_server):  # noqa: N802
    def attack(a: Attacker) -> None:
        a.sock.sendall(frame(fr.HEADERS, fr.END_HEADERS | fr.END_STREAM, 1, a.headers_block("/x/Unknown")))
        block = a.headers_block("/x/Unknown")  # the same block from now on: indexed

        def chunks() -> Iterator[bytes]:
            sid = 3
            while True:
                yield b"".join(frame(fr.HEADERS, fr.END_HEADERS | fr.END_STREAM, sid + 2 * i, block)
                               for i in range(1000))
                sid += 2000
        a.flood(chunks(), 600_000 * (9 + len(block)), seconds=8)

    a = check_attack(h2_server, attack)
    frames = a.frames(seconds=2, until=lambda f: f.type == fr.HEADERS)
    assert any(f.type == fr.HEADERS for f in frames)  # the first was answered (UNIMPLEMENTED)
    a.close()


def _fp32_request(a: Attacker, sid: int, floats: int, block: bytes) -> bytes:
    from tritonclient.grpc import service_pb2

    req = service_pb2.ModelInferRequest(model_name="identity_fp32")
    req.inputs.add(name="IN_FP32", datatype="FP32", shape=[1, floats])
    req.raw_input_contents.append(np.zeros(floats, np.float32).tobytes())
    body = req.SerializeToString()
    message = struct.pack(">BL", 0, len(body)) + body
    return frame(fr.HEADERS, fr.END_HEADERS, sid, block) + b"".join(
        frame(fr.DATA, fr.END_STREAM if i + 16384 >= len(message) else 0, sid, message[i:i + 16384])
        for i in range(0, len(message), 16384))


def test_zero_window_streams_asking_for_replies_CVE_2019_9517(h2_server):  # noqa: N802
    refused = {}

    def attack(a: Attacker) -> None:
        block = a.headers_block(INFER)
        first = _fp32_request(a, 1, 16384, block)  # a 64 KiB reply each
        block = a.headers_block(INFER)
        rest = (_fp32_request(a, sid, 16384, block) for sid in range(3, 6001, 2))
        a.flood(iter([first, *rest]), 1 << 30, seconds=10)
        frames = a.frames(seconds=3)
        refused["n"] = sum(1 for f in frames if f.type == fr.RST_STREAM and f.error_code == fr.REFUSED_STREAM)

    a = check_attack(h2_server, attack, settings(INITIAL_WINDOW_SIZE=0))
    assert refused["n"] > 0  # past the held-reply cap (and the stream limit) new streams are refused
    a.close()


# ---- stalls for every other client ----------------------------------------------------------------


def test_data_dribble_of_one_byte_window_updates_CVE_2019_9511(unlimited_server):  # noqa: N802
    def attack(a: Attacker) -> None:
        block = a.headers_block(INFER)
        sids = list(range(1, 21, 2))
        a.sock.sendall(b"".join(_fp32_request(a, sid, 262144, block if sid == 1 else a.headers_block(INFER))
                                for sid in sids))  # ten 1 MiB replies, all waiting for window
        updates = b"".join(frame(fr.WINDOW_UPDATE, 0, sid, b"\x00\x00\x00\x01") for sid in [0, *sids])
        a.flood(repeat(updates, 200), 50 * MiB, seconds=8)

    a = check_attack(unlimited_server, attack, settings(INITIAL_WINDOW_SIZE=0))
    a.close()


def test_a_header_block_of_table_size_updates(h2_server):
    def attack(a: Attacker) -> None:
        a.sock.sendall(settings(MAX_FRAME_SIZE=1 << 20))
        a.flood(iter([frame(fr.HEADERS, fr.END_HEADERS, 1, b"\x20" * 1_000_000)]), 1 << 21, seconds=5)

    a = check_attack(h2_server, attack)
    assert goaway(a.frames(until=lambda f: f.type == fr.GOAWAY)) == fr.PROTOCOL_ERROR  # past 64 KiB
    a.close()
    b = Attacker(h2_server, frame(fr.HEADERS, fr.END_HEADERS, 1, b"\x20\x20\x20" + b"\x82"))
    assert goaway(b.frames(until=lambda f: f.type == fr.GOAWAY)) == fr.COMPRESSION_ERROR  # three updates
    b.close()


@pytest.mark.parametrize("kind", ["data", "continuation"])
def test_empty_frame_floods_CVE_2019_9518(h2_server, unlimited_server, kind):  # noqa: N802
    def attack(a: Attacker) -> None:
        if kind == "data":
            a.sock.sendall(frame(fr.HEADERS, fr.END_HEADERS, 1, a.headers_block(INFER)))
            unit = frame(fr.DATA, 0, 1)
        else:
            a.sock.sendall(frame(fr.HEADERS, 0, 1, a.headers_block(INFER)))
            unit = frame(fr.CONTINUATION, 0, 1)
        a.flood(repeat(unit), 2_000_000 * 9, seconds=6)

    a = check_attack(h2_server, attack)  # counted: GOAWAY
    assert goaway(a.frames(until=lambda f: f.type == fr.GOAWAY)) == fr.ENHANCE_YOUR_CALM
    a.close()
    check_attack(unlimited_server, attack).close()  # not counted: the frame budget keeps others served


def test_continuation_flood_stops_at_the_header_block_limit(h2_server):
    def attack(a: Attacker) -> None:
        a.sock.sendall(frame(fr.HEADERS, 0, 1, a.headers_block(INFER)))
        a.flood(repeat(frame(fr.CONTINUATION, 0, 1, b"\x00" * 16384), 1), 100 * MiB, seconds=5)

    a = check_attack(h2_server, attack)
    assert goaway(a.frames(until=lambda f: f.type == fr.GOAWAY)) == fr.PROTOCOL_ERROR
    a.close()


def test_rapid_reset_CVE_2023_44487(h2_server):  # noqa: N802
    def attack(a: Attacker) -> None:
        a.sock.sendall(frame(fr.HEADERS, fr.END_HEADERS, 1, a.headers_block(INFER)))
        block = a.headers_block(INFER)

        def chunks() -> Iterator[bytes]:
            sid = 3
            while True:
                yield b"".join(frame(fr.HEADERS, fr.END_HEADERS, sid + 2 * i, block)
                               + frame(fr.RST_STREAM, 0, sid + 2 * i, b"\x00\x00\x00\x08") for i in range(500))
                sid += 1000
        a.flood(chunks(), 200_000 * 40, seconds=8)

    check_attack(h2_server, attack).close()


# ---- limits at the limit and one past ---------------------------------------------------------------


def test_concurrent_streams_at_the_limit_and_one_past(h2_server):
    a = Attacker(h2_server)
    block = a.headers_block(INFER)
    blocks = [block] + [a.headers_block(INFER) for _ in range(100)]
    a.sock.sendall(b"".join(frame(fr.HEADERS, fr.END_HEADERS, 2 * i + 1, b) for i, b in enumerate(blocks)))
    frames = a.frames(seconds=1.5)
    resets = [(f.stream_id, f.error_code) for f in frames if f.type == fr.RST_STREAM]
    assert resets == [(201, fr.REFUSED_STREAM)]  # streams 1..199 (100 of them) open, the 101st refused
    settings_frame = next(f for f in frames if f.type == fr.SETTINGS and "ACK" not in f.flags)
    assert settings_frame.settings[fr.S_MAX_CONCURRENT_STREAMS] == 100
    a.close()


def test_stream_window_overflow_is_rst_stream_flow_control_error(h2_server):
    a = Attacker(h2_server)
    a.sock.sendall(frame(fr.HEADERS, fr.END_HEADERS, 1, a.headers_block(INFER))
                   + frame(fr.WINDOW_UPDATE, 0, 1, struct.pack(">L", fr.MAX_WINDOW)))
    frames = a.frames(seconds=3, until=lambda f: f.type == fr.RST_STREAM)
    assert [(f.stream_id, f.error_code) for f in frames if f.type == fr.RST_STREAM] == [(1, fr.FLOW_CONTROL_ERROR)]
    assert goaway(frames) is None
    a.close()
