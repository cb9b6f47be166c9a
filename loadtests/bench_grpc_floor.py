#!/usr/bin/env python3
"""The gRPC transport's floor, before and after a change, side by side in one run.

    python loadtests/bench_grpc_floor.py --trees OLD_TREE NEW_TREE [--rounds 3] [--seconds 5]

Each tree (a checkout, e.g. `git worktree add /tmp/base main~3`) serves `transport_floors.py
ours-grpc` (a canned ModelInferResponse after parsing the request), pinned to core 1; h2load drives
it from core 0 (8 connections x 8 streams unless told). The trees alternate, round by round, so noise on a shared
machine falls on both. Besides req/s it prints the server's CPU time per request (from
/proc/<pid>/stat), which noise from other processes disturbs less than throughput.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _request_file() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import numpy as np

    from server._proto import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        req.raw_input_contents.append(np.arange(16, dtype=np.int32).tobytes())
    body = req.SerializeToString()
    path = Path(tempfile.mkdtemp()) / "add_sub-grpc.bin"
    path.write_bytes(struct.pack(">BI", 0, len(body)) + body)
    return path


CONNS, STREAMS = 8, 8


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(tree: Path, body: Path, seconds: float) -> tuple[float, float]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    server = subprocess.Popen(["taskset", "-c", "1", sys.executable, str(tree / "loadtests/transport_floors.py"),
                               "ours-grpc", str(port)], env=env)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.1)
        cpu0 = _cpu_seconds(server.pid)
        out = subprocess.run(["taskset", "-c", "0", "h2load", "-t1", f"-c{CONNS}", f"-m{STREAMS}", f"-D{int(seconds)}",
                              "-d", str(body),
                              "-H", "content-type: application/grpc", "-H", "te: trailers",
                              f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"],
                             capture_output=True, text=True, timeout=seconds + 30).stdout
        cpu = _cpu_seconds(server.pid) - cpu0
        done = int(re.search(r"(\d+) succeeded", out).group(1))  # type: ignore[union-attr]
        return done / seconds, cpu / max(done, 1) * 1e6
    finally:
        server.kill()
        server.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs="+", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--streams", type=int, default=8, help="in flight per connection")
    a = ap.parse_args()
    global CONNS, STREAMS
    CONNS, STREAMS = a.connections, a.streams
    body = _request_file()
    results: dict[Path, list[tuple[float, float]]] = {t: [] for t in a.trees}
    for r in range(a.rounds):
        for tree in a.trees:
            rps, us = measure(tree, body, a.seconds)
            results[tree].append((rps, us))
            print(f"round {r + 1} {tree}: {rps:,.0f} req/s, {us:.1f} us CPU/request", flush=True)
    for tree, rows in results.items():
        best = max(r for r, _ in rows)
        cpu = min(u for _, u in rows)
        print(f"{tree}: best {best:,.0f} req/s, least {cpu:.1f} us CPU/request")


if __name__ == "__main__":
    main()
