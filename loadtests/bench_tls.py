#!/usr/bin/env python3
"""What TLS costs per request: add_sub over HTTP and gRPC, plain and over TLS, side by side in one run.

Starts two `fuserve serve` processes pinned to one core (--server-cpu): one plain, one with
`--http-use-ssl` and `--grpc-use-ssl` (a throwaway CA and certificate from `trustme`), loopback
only. For each protocol and mode, in alternating rounds, from another core (--client-cpu):

  sequential   N requests one after another on one connection: wall us/request and the server
               process's CPU us/request (HTTP: a raw keep-alive socket sending a pre-built V2 binary
               request; gRPC: grpcio's own channel, insecure or with ssl_channel_credentials)
  handshake    HTTP only: M connections, each one request then closed: wall and server CPU per
               connection (the TCP set-up, and for TLS the full handshake: ECDHE and the certificate)
  concurrent   wrk (HTTP/1.1, https://) or h2load (gRPC, ALPN h2) at --conns connections for
               --seconds: req/s and server CPU us/request

Every reply is checked (sequential: status and the output's name; wrk: wrk_v2.lua; h2load: the
server's success count). Prints a Markdown table; the median over --rounds.

    apt-get install wrk nghttp2-client
    python loadtests/bench_tls.py --requests 5000 --handshakes 500 --seconds 5 --rounds 3
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_batching import LUA, ROOT, free_port, pinned

MODEL = "add_sub"
INFER = "/inference.GRPCInferenceService/ModelInfer"


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of `pid`, in seconds, at nanosecond resolution (schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that exited meanwhile
    return total / 1e9


def make_certs(root: Path) -> dict[str, Path]:
    try:
        import trustme
    except ImportError:
        sys.exit("bench_tls.py needs trustme (pip install trustme, or the test extra)")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    paths = {"ca": root / "ca.pem", "cert": root / "server.pem", "key": root / "server.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    paths["cert"].write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    return paths


def request_bodies(tmp: Path) -> dict[str, tuple[Path, int]]:
    """One add_sub row as a V2 binary HTTP body (and its JSON header's length) and a framed gRPC message."""
    from server._proto import grpc_service_pb2 as pb

    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    header = json.dumps({"inputs": [{"name": n, "datatype": "INT32", "shape": [1, 16],
                                     "parameters": {"binary_data_size": 64}} for n in ("INPUT0", "INPUT1")],
                         "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}},
                                     {"name": "OUTPUT1", "parameters": {"binary_data": True}}]}).encode()
    msg = pb.ModelInferRequest(model_name=MODEL)
    for name, arr in (("INPUT0", a), ("INPUT1", b)):
        msg.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        msg.raw_input_contents.append(arr.tobytes())
    raw = msg.SerializeToString()
    (tmp / "body.bin").write_bytes(header + a.tobytes() + b.tobytes())
    (tmp / "body.grpc").write_bytes(struct.pack(">BI", 0, len(raw)) + raw)
    return {"http": (tmp / "body.bin", len(header)), "grpc": (tmp / "body.grpc", 0)}


class Server:
    def __init__(self, tmp: Path, name: str, cpu: str, tls_flags: list[str], client_ctx: ssl.SSLContext | None):
        self.name, self.client_ctx = name, client_ctx
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        cmd = [sys.executable, "-m", "server", "serve", "--model-repository", str(ROOT / "model_repo"),
               "--model-control-mode", "explicit", "--load-model", MODEL, "--http-port", str(self.http_port),
               "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port), *tls_flags]
        self.log = open(tmp / f"server-{name}.log", "wb")  # noqa: SIM115 (open for the process lifetime)
        self.proc = subprocess.Popen(pinned(cpu, cmd), cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"fuserve ({self.name}) exited with {self.proc.returncode}; see {self.log.name}")
            try:
                conn = (http.client.HTTPSConnection("127.0.0.1", self.http_port, context=self.client_ctx, timeout=5)
                        if self.client_ctx else http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=5))
                conn.request("GET", "/v2/health/ready")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
                conn.close()
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.1)
        sys.exit(f"fuserve ({self.name}) not ready after {timeout}s")

    def successes(self) -> int:
        """add_sub's success count, from the statistics extension (over plain or TLS HTTP)."""
        conn = (http.client.HTTPSConnection("127.0.0.1", self.http_port, context=self.client_ctx, timeout=30)
                if self.client_ctx else http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30))
        try:
            conn.request("GET", f"/v2/models/{MODEL}/stats")
            stats = json.loads(conn.getresponse().read())["model_stats"][0]
        finally:
            conn.close()
        return int(stats["inference_stats"]["success"]["count"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _connect(port: int, ctx: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ctx.wrap_socket(sock, server_hostname="localhost") if ctx else sock


def _http_request(body: Path, header_length: int, keep_alive: bool) -> bytes:
    data = body.read_bytes()
    return (b"POST /v2/models/%s/infer HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/octet-stream\r\n"
            b"inference-header-content-length: %d\r\ncontent-length: %d\r\n%s\r\n"
            % (MODEL.encode(), header_length, len(data), b"" if keep_alive else b"connection: close\r\n") + data)


def _read_reply(sock: socket.socket, buf: bytearray) -> None:
    """One HTTP/1.1 reply (content-length framed) off `sock`; checks it; leaves what follows in `buf`."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed mid-reply")
        buf += chunk
    head_end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:head_end]).lower()
    if not head.startswith(b"http/1.1 200"):
        raise RuntimeError("bad reply: " + head[:200].decode("latin-1"))
    length = int(re.search(rb"content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(buf) < head_end + length:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed mid-body")
        buf += chunk
    if b"OUTPUT0" not in buf[head_end:head_end + length]:
        raise RuntimeError("reply without OUTPUT0")
    del buf[:head_end + length]


def http_sequential(server: Server, request: bytes, n: int) -> tuple[float, float]:
    sock = _connect(server.http_port, server.client_ctx)
    buf = bytearray()
    try:
        for _ in range(50):  # warm-up
            sock.sendall(request)
            _read_reply(sock, buf)
        cpu0, t0 = cpu_seconds(server.proc.pid), time.perf_counter()
        for _ in range(n):
            sock.sendall(request)
            _read_reply(sock, buf)
        return (time.perf_counter() - t0) / n * 1e6, (cpu_seconds(server.proc.pid) - cpu0) / n * 1e6
    finally:
        sock.close()


def http_handshakes(server: Server, request: bytes, n: int) -> tuple[float, float]:
    cpu0, t0 = cpu_seconds(server.proc.pid), time.perf_counter()
    for _ in range(n):
        sock = _connect(server.http_port, server.client_ctx)
        try:
            sock.sendall(request)
            _read_reply(sock, bytearray())
        finally:
            sock.close()
    return (time.perf_counter() - t0) / n * 1e6, (cpu_seconds(server.proc.pid) - cpu0) / n * 1e6


def grpc_sequential(server: Server, message: bytes, n: int, ca: Path | None) -> tuple[float, float]:
    import grpc

    target = f"127.0.0.1:{server.grpc_port}"
    channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca.read_bytes()))
               if ca else grpc.insecure_channel(target))
    try:
        call = channel.unary_unary(INFER)  # bytes in, bytes out: no (de)serialization on the client
        for _ in range(50):
            call(message, timeout=30)
        cpu0, t0 = cpu_seconds(server.proc.pid), time.perf_counter()
        for _ in range(n):
            if b"OUTPUT0" not in call(message, timeout=30):
                raise RuntimeError("reply without OUTPUT0")
        return (time.perf_counter() - t0) / n * 1e6, (cpu_seconds(server.proc.pid) - cpu0) / n * 1e6
    finally:
        channel.close()


def wrk(server: Server, body: Path, header_length: int, conns: int, seconds: float, cpu: str) -> tuple[float, float]:
    scheme = "https" if server.client_ctx else "http"
    cmd = pinned(cpu, ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "30s", "-s", str(LUA),
                       f"{scheme}://127.0.0.1:{server.http_port}/v2/models/{MODEL}/infer"])
    env = {**os.environ, "BODY_FILE": str(body), "MARKER": "OUTPUT0", "HDRLEN": str(header_length)}
    cpu0 = cpu_seconds(server.proc.pid)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True,
                         timeout=seconds + 60).stdout
    cpu1 = cpu_seconds(server.proc.pid)
    r = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    if r["bad"] or r["errors"]:
        raise RuntimeError(f"wrk: {r['bad']} bad replies, {r['errors']} errors")
    return r["ok"] / (r["duration_us"] / 1e6), (cpu1 - cpu0) / max(1, r["ok"]) * 1e6


def h2load(server: Server, body: Path, conns: int, seconds: float, cpu: str) -> tuple[float, float]:
    scheme = "https" if server.client_ctx else "http"
    cmd = pinned(cpu, ["h2load", "-t1", f"-c{conns}", "-m1", f"-D{max(1, round(seconds))}", "-d", str(body),
                       "-H", "content-type: application/grpc", "-H", "te: trailers",
                       f"{scheme}://127.0.0.1:{server.grpc_port}{INFER}"])
    before, cpu0 = server.successes(), cpu_seconds(server.proc.pid)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    cpu1 = cpu_seconds(server.proc.pid)
    ok = server.successes() - before
    m = re.search(r"finished in ([\d.]+)(m?s)", out)
    req = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", out)
    if not (m and req):
        raise RuntimeError("h2load gave no result: " + out[-500:])
    if ok < int(req.group(3)):
        raise RuntimeError(f"h2load: {req.group(3)} replies, but the server counts {ok} successes")
    duration = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
    return ok / duration, (cpu1 - cpu0) / max(1, ok) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=5000, help="sequential requests per measurement")
    ap.add_argument("--handshakes", type=int, default=500, help="HTTP connections per handshake measurement")
    ap.add_argument("--seconds", type=float, default=5.0, help="each concurrent run (0 skips them)")
    ap.add_argument("--conns", type=int, default=16, help="connections of the concurrent runs")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is printed")
    ap.add_argument("--server-cpu", default="1")
    ap.add_argument("--client-cpu", default="0")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    figures: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        certs = make_certs(tmp)
        bodies = request_bodies(tmp)
        client_ctx = ssl.create_default_context(cafile=str(certs["ca"]))
        flags = [f for p in ("http", "grpc") for f in (f"--{p}-use-ssl", "true", f"--{p}-server-cert",
                                                        str(certs["cert"]), f"--{p}-server-key", str(certs["key"]))]
        servers = {"plain": Server(tmp, "plain", a.server_cpu, [], None),
                   "tls": Server(tmp, "tls", a.server_cpu, flags, client_ctx)}
        os.sched_setaffinity(0, {int(c) for c in a.client_cpu.split(",")})  # this process is a client too
        try:
            for s in servers.values():
                s.wait_ready()
            http_body, header_length = bodies["http"]
            keep, close = _http_request(http_body, header_length, True), _http_request(http_body, header_length, False)
            message = bodies["grpc"][0].read_bytes()[5:]
            for r in range(a.rounds):
                for mode, s in servers.items():
                    def put(proto: str, what: str, value: float, mode: str = mode) -> None:
                        figures.setdefault((proto, mode, what), []).append(value)

                    wall, cpu = http_sequential(s, keep, a.requests)
                    put("http", "seq_us", wall)
                    put("http", "seq_cpu_us", cpu)
                    wall, cpu = http_handshakes(s, close, a.handshakes)
                    put("http", "conn_us", wall)
                    put("http", "conn_cpu_us", cpu)
                    wall, cpu = grpc_sequential(s, message, a.requests, certs["ca"] if mode == "tls" else None)
                    put("grpc", "seq_us", wall)
                    put("grpc", "seq_cpu_us", cpu)
                    if a.seconds > 0:
                        rps, cpu = wrk(s, http_body, header_length, a.conns, a.seconds, a.client_cpu)
                        put("http", "conc_rps", rps)
                        put("http", "conc_cpu_us", cpu)
                        rps, cpu = h2load(s, bodies["grpc"][0], a.conns, a.seconds, a.client_cpu)
                        put("grpc", "conc_rps", rps)
                        put("grpc", "conc_cpu_us", cpu)
                    print(f"round {r + 1}/{a.rounds} {mode}: done", file=sys.stderr)
        finally:
            for s in servers.values():
                s.stop()

    def med(proto: str, mode: str, what: str) -> float | None:
        values = figures.get((proto, mode, what))
        return statistics.median(values) if values else None

    def cell(value: float | None, fmt: str = "{:.1f}") -> str:
        return "-" if value is None else fmt.format(value)

    print(f"\nadd_sub, loopback, server pinned to CPU {a.server_cpu}, clients on {a.client_cpu}; "
          f"median of {a.rounds} rounds; sequential: {a.requests} requests on one connection; "
          f"concurrent: {a.conns} connections for {a.seconds:g}s\n")
    print("| protocol | mode | sequential us/req | server CPU us/req | new connection + 1 req, us | "
          "server CPU us/conn | concurrent req/s | server CPU us/req |")
    print("|---|---|---|---|---|---|---|---|")
    for proto in ("http", "grpc"):
        for mode in ("plain", "tls"):
            print(f"| {proto} | {mode} | {cell(med(proto, mode, 'seq_us'))} | {cell(med(proto, mode, 'seq_cpu_us'))} | "
                  f"{cell(med(proto, mode, 'conn_us'))} | {cell(med(proto, mode, 'conn_cpu_us'))} | "
                  f"{cell(med(proto, mode, 'conc_rps'), '{:,.0f}')} | {cell(med(proto, mode, 'conc_cpu_us'))} |")
    print("\nTLS minus plain, per request:")
    for proto in ("http", "grpc"):
        parts = []
        for what, label in (("seq_us", "sequential wall"), ("seq_cpu_us", "sequential server CPU"),
                            ("conc_cpu_us", "concurrent server CPU"),
                            ("conn_cpu_us", "per new connection, server CPU")):
            p, t = med(proto, "plain", what), med(proto, "tls", what)
            if p is not None and t is not None:
                parts.append(f"{label} {t - p:+.1f} us")
        print(f"  {proto}: " + ", ".join(parts))


if __name__ == "__main__":
    main()
