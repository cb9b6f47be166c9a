"""What a hostile HTTP client can cost a `fuserve serve` process: header limits at and past each bound
(414/431 and close), the header-read and keep-alive timeouts, and backpressure against a client
that pipelines and never reads. Raw sockets on loopback; every wait is bounded by a socket timeout.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time

import model_builders as mb
import pytest
from conftest import rss_bytes

BODY = json.dumps({"inputs": [
    {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
    {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16}]}).encode()
INFER = b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
READY = "/v2/health/ready"




def get(fields: list[tuple[bytes, bytes]], target: bytes = READY.encode()) -> bytes:
    """A GET with exactly these header fields (the first is Host: x unless given)."""
    return b"GET %s HTTP/1.1\r\n%s\r\n" % (target, b"".join(b"%s: %s\r\n" % f for f in fields))


def with_request_line(size: int) -> bytes:
    """A GET of the ready endpoint whose request line (no CRLF) is `size` bytes, padded in the query."""
    pad = size - len(b"GET /v2/health/ready?p= HTTP/1.1")
    req = get([(b"Host", b"x")], b"/v2/health/ready?p=" + b"x" * pad)
    assert req.index(b"\r\n") == size
    return req


def with_header_line(size: int) -> bytes:
    """A GET with one header field whose name + value is `size` bytes."""
    return get([(b"Host", b"x"), (b"X-Pad", b"v" * (size - len(b"X-Pad")))])


def with_fields(count: int) -> bytes:
    return get([(b"Host", b"x")] + [(b"X-%d" % i, b"v") for i in range(count - 1)])


def with_header_bytes(total: int, line: int) -> bytes:
    """A GET whose header names + values add up to `total` bytes, no field past `line` bytes."""
    fields, left, i = [(b"Host", b"x")], total - 5, 0
    while left:
        name = b"X-%d" % i
        value = b"v" * min(left - len(name), line - len(name))
        assert value, "the last field would be empty: pick another total"
        fields.append((name, value))
        left -= len(name) + len(value)
        i += 1
    return get(fields)


def exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, bytes, bool]:
    """Send `data`, read one answer: (status, body, whether the server then closed the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        status, body, rest = read_answer(s)
        closed = rest == b"" and _closed(s)
        return status, body, closed


def read_answer(s: socket.socket) -> tuple[int, bytes, bytes]:
    """One HTTP/1.1 answer with a Content-Length body: (status, body, bytes after it)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before an answer: {buf!r}"
        buf += chunk
    head, _, buf = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                  if line.lower().startswith(b"content-length:"))
    while len(buf) < length:
        chunk = s.recv(65536)
        assert chunk, "connection closed inside an answer"
        buf += chunk
    return status, buf[:length], buf[length:]


def _closed(s: socket.socket) -> bool:
    """True once the server closes (EOF or reset) within the socket's timeout; False if it stays open."""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return True
            raise AssertionError(f"unexpected bytes after the answer: {chunk[:200]!r}")
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def assert_refused(port: int, data: bytes, status: int, flag: str) -> None:
    got, body, closed = exchange(port, data)
    assert got == status, body
    assert flag in json.loads(body)["error"], body
    assert closed, "the connection stays open after a refusal"


def assert_ok(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        status, body, _ = read_answer(s)
        assert status == 200, body


def timed_ready(server) -> float:
    t0 = time.monotonic()
    status, _, _ = server.request("GET", READY)
    assert status == 200
    return time.monotonic() - t0


# ---- limits, at and one past each bound --------------------------------------------------------------


# each limit: how to build a request of a given size, its default, its value on the `tight` server
# (with the line length the header-bytes requests use there), its status past it, and its flag
LIMITS = [
    ("request line", with_request_line, (8192, 200), 414, "--http-max-request-line"),
    ("header line", with_header_line, (8192, 100), 431, "--http-max-header-line"),
    ("header fields", with_fields, (100, 10), 431, "--http-max-headers"),
    ("header bytes", None, (65536, 400), 431, "--http-max-header-bytes"),
]


def _builder(build, line: int):
    return build if build is not None else (lambda n: with_header_bytes(n, line))


@pytest.mark.parametrize("what, build, limits, status, flag", LIMITS)
def test_default_limits_at_and_past_the_bound(server, what, build, limits, status, flag):
    limit, build = limits[0], _builder(build, 8192)
    assert_ok(server.http_port, build(limit))
    assert_refused(server.http_port, build(limit + 1), status, flag)
    assert timed_ready(server) < 2


@pytest.fixture(scope="module")
def tight(start_server, test_repo):
    """Small limits from the flags, served by a frontend worker process (the flags must reach it)."""
    return start_server(test_repo, "--frontend-workers", "1", "--model-control-mode", "explicit",
                        "--load-model", "add_sub", "--http-max-request-line", "200", "--http-max-header-line", "100",
                        "--http-max-headers", "10", "--http-max-header-bytes", "400")


@pytest.mark.parametrize("what, build, limits, status, flag", LIMITS)
def test_limits_follow_the_flags_in_a_frontend_worker(tight, what, build, limits, status, flag):
    limit, build = limits[1], _builder(build, 100)
    assert_ok(tight.http_port, build(limit))
    assert_refused(tight.http_port, build(limit + 1), status, flag)
    assert tight.request("POST", "/v2/models/add_sub/infer", BODY)[0] == 200


def test_refusal_keeps_pipelined_answers_in_order(server):
    """Two good requests, then one past a limit, in one write: 200, 200, 431, then close."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(INFER + get([(b"Host", b"x")]) + with_fields(101))
        statuses = []
        rest = b""
        for _ in range(3):
            status, body, rest = read_answer(_Prefixed(s, rest))
            statuses.append(status)
        assert statuses == [200, 200, 431]
        assert rest == b"" and _closed(s)


class _Prefixed:
    """A socket whose next recv() first returns bytes already read."""

    def __init__(self, s: socket.socket, first: bytes) -> None:
        self.s, self.first = s, first

    def recv(self, n: int) -> bytes:
        if self.first:
            out, self.first = self.first, b""
            return out
        return self.s.recv(n)


# ---- attacks -------------------------------------------------------------------------------------------


def _sample_peak(pid: int, until, peak: float) -> float:
    while not until():
        peak = max(peak, rss_bytes(pid) / 2**20)
        time.sleep(0.02)
    return max(peak, rss_bytes(pid) / 2**20)


def test_pipelined_flood_from_a_client_that_never_reads(server):
    """40,000 pipelined infer requests from a client that reads none of the answers: the server stops
    reading it (its send stalls), memory stays bounded, and everyone else is served meanwhile."""
    pid = server.proc.pid
    for _ in range(100):  # warm: the path's allocations made before measuring
        assert server.request("POST", "/v2/models/add_sub/infer", BODY)[0] == 200
    flood = INFER * 40_000
    before = rss_bytes(pid) / 2**20
    attacker = socket.socket()
    attacker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # little room for answers in the kernel
    attacker.connect(("127.0.0.1", server.http_port))
    attacker.setblocking(False)
    progress = {"sent": 0, "stalled": False}

    def attack() -> None:
        view, deadline, last = memoryview(flood), time.monotonic() + 10, time.monotonic()
        while progress["sent"] < len(flood) and time.monotonic() < deadline:
            select.select([], [attacker], [], 0.05)
            try:
                progress["sent"] += attacker.send(view[progress["sent"]:progress["sent"] + (1 << 20)])
                last = time.monotonic()
            except BlockingIOError:
                if time.monotonic() - last > 1.5:  # nothing accepted for a while: the server stopped reading
                    progress["stalled"] = True
                    return

    sender = threading.Thread(target=attack, daemon=True)
    sender.start()
    window = _after(4.0)  # memory is watched for 4 s at least: what 40,000 answers take to compute
    try:
        time.sleep(0.3)
        latencies = [timed_ready(server) for _ in range(3)]  # during the attack
        assert server.request("POST", "/v2/models/add_sub/infer", BODY)[0] == 200
        peak = _sample_peak(pid, lambda: not sender.is_alive() and window(), before)
        growth = peak - before
        print(f"pipelined flood: sent {progress['sent']} of {len(flood)} bytes, RSS {before:.1f} -> {peak:.1f} MiB "
              f"(+{growth:.1f}), other clients {max(latencies) * 1000:.0f} ms")
        assert progress["stalled"] and progress["sent"] < len(flood), "the server read on; the client never reads"
        assert growth < 12, f"RSS grew {growth:.1f} MiB under the flood"
        assert max(latencies) < 2
    finally:
        attacker.close()
        sender.join(15)
    for _ in range(3):  # the attacker gone, the server serves as before
        assert server.request("POST", "/v2/models/add_sub/infer", BODY)[0] == 200


def _after(seconds: float):
    end = time.monotonic() + seconds
    return lambda: time.monotonic() > end


@pytest.mark.parametrize("what, data, flag", [
    ("1 MB header line", get([(b"Host", b"x"), (b"X-Big", b"a" * 1_000_000)]), "--http-max-header-line"),
    ("10,000 header fields", with_fields(10_000), "--http-max-headers"),
])
def test_huge_headers_are_refused_with_bounded_memory(server, what, data, flag):
    pid = server.proc.pid
    timed_ready(server)
    before = rss_bytes(pid) / 2**20
    done = threading.Event()
    result: dict = {}

    def attack() -> None:
        try:
            result["answer"] = exchange(server.http_port, data)
        finally:
            done.set()

    sender = threading.Thread(target=attack, daemon=True)
    sender.start()
    latency = timed_ready(server)
    peak = _sample_peak(pid, done.is_set, before)
    sender.join(15)
    status, body, closed = result["answer"]
    print(f"{what}: {status}, RSS {before:.1f} -> {peak:.1f} MiB (+{peak - before:.1f})")
    assert status == 431 and flag in json.loads(body)["error"] and closed
    assert peak - before < 10
    assert latency < 2 and timed_ready(server) < 2


# ---- timeouts ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def brisk(start_server, tmp_path_factory):
    """Short timeouts; add_sub_delayed waits 2.5 s in its queue for a batch that never fills."""
    repo = tmp_path_factory.mktemp("limits_repo")
    mb.generated(repo, "add_sub")
    mb.generated(repo, "add_sub", as_name="add_sub_delayed")
    config = repo / "add_sub_delayed" / "config.pbtxt"
    # Triton's rule (learning off): a lone request waits the whole delay for company, where the
    # learned size (1 at first) would send it at once
    config.write_text(config.read_text() + "dynamic_batching { max_queue_delay_microseconds: 2500000 }\n"
                      'parameters { key: "fuserve_batch_learning" value: { string_value: "false" } }\n')
    return start_server(repo, "--http-header-timeout-secs", "1", "--http-keepalive-timeout-secs", "2")


def test_a_trickled_header_is_cut_off_by_the_header_timeout(brisk):
    with socket.create_connection(("127.0.0.1", brisk.http_port), timeout=5) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        while time.monotonic() - t0 < 5:  # one byte every 50 ms, for ever
            if select.select([s], [], [], 0.05)[0]:
                break
            s.send(b"z")
        status, body, rest = read_answer(s)
        waited = time.monotonic() - t0
        assert status == 408 and "--http-header-timeout-secs" in json.loads(body)["error"]
        assert 1.0 <= waited < 2.5, waited
        assert rest == b"" and _closed(s)
    assert brisk.request("GET", READY)[0] == 200


def test_a_slow_but_steady_header_within_the_timeout_is_served(brisk):
    request = get([(b"Host", b"x"), (b"X-A", b"1"), (b"X-B", b"2")])
    with socket.create_connection(("127.0.0.1", brisk.http_port), timeout=5) as s:
        for i in range(0, len(request), 20):  # the whole header over ~0.5 s
            s.sendall(request[i:i + 20])
            time.sleep(0.1)
        assert read_answer(s)[0] == 200


def test_an_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(brisk):
    with socket.create_connection(("127.0.0.1", brisk.http_port), timeout=6) as s:
        s.sendall(get([(b"Host", b"x")]))
        assert read_answer(s)[0] == 200
        t0 = time.monotonic()
        assert _closed(s), "still open after 6 s"
        idle = time.monotonic() - t0
        assert 1.9 <= idle < 3.5, idle
    with socket.create_connection(("127.0.0.1", brisk.http_port), timeout=6) as s:  # one that never sends
        t0 = time.monotonic()
        assert _closed(s)
        assert 1.9 <= time.monotonic() - t0 < 3.5


def test_a_request_executing_in_the_model_has_no_timeout(brisk):
    """2.5 s in the model's queue, past both the header (1 s) and the keep-alive (2 s) timeouts."""
    request = INFER.replace(b"/add_sub/", b"/add_sub_delayed/")
    with socket.create_connection(("127.0.0.1", brisk.http_port), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(request)
        status, body, _ = read_answer(s)
        assert status == 200, body
        assert time.monotonic() - t0 >= 2.4
        s.sendall(INFER)  # and the connection is still there for the next one
        assert read_answer(s)[0] == 200
