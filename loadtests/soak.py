#!/usr/bin/env python3
"""Memory soak: a fixed request rate for a long time, good, bad and cancelled requests mixed;
prints the server's RSS over time and its growth after warm-up.

    python loadtests/soak.py --minutes 10 --rate 1000

Mix per second: 80% good add_sub requests (V2 JSON, reply checked), 15% bad ones (malformed JSON,
wrong datatype, unknown model, absurd shape: each must get its 4xx), 5% requests to a slow model
whose client disconnects while they are queued (each must be dropped, not leak).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_batching import ROOT, build_repo, free_port, wait_ready

GOOD = json.dumps({"inputs": [
    {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
    {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16}]}).encode()
BAD = [
    (b'{"inputs": [', 400),
    (GOOD.replace(b'"INT32"', b'"FP32"', 1), 400),
    (json.dumps({"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 2**40], "data": [1]}]}).encode(),
     400),
]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def post(port: int, path: str, body: bytes, close_early: bool = False) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
    await writer.drain()
    if close_early:  # the client goes away while its request waits in the queue
        await asyncio.sleep(0.005)
        writer.close()
        return 0
    status = int((await reader.readline()).split()[1])
    writer.close()
    return status


async def drive(port: int, seconds: float, rate: int, counts: dict) -> None:
    tick, k, tasks = 1.0 / rate, 0, set()
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        k += 1
        r = k % 100
        if r < 80:
            coro, want = post(port, "/v2/models/add_sub_batched/infer", GOOD), 200
        elif r < 95:
            body, want = BAD[k % len(BAD)]
            if k % 7 == 0:  # a well-formed request for a model that does not exist
                coro, want = post(port, f"/v2/models/no_such_model_{k % 1000}/infer", GOOD), 404
            else:
                coro = post(port, "/v2/models/add_sub_batched/infer", body)
        else:
            coro, want = post(port, "/v2/models/slow/infer", SLOW_BODY, close_early=True), 0

        async def run(c=coro, w=want):
            try:
                got = await c
                counts["ok" if got == w else "unexpected"] += 1
            except OSError:
                counts["errors"] += 1

        t = asyncio.ensure_future(run())
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        await asyncio.sleep(max(0.0, start + k * tick - time.monotonic()))
    await asyncio.gather(*tasks)


SLOW_BODY = json.dumps({"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 1024],
                                    "data": [0.01] * 1024}]}).encode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=1000, help="requests per second")
    ap.add_argument("--sample-secs", type=float, default=30.0)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import model_builders as mb

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_repo("add_sub", repo)
        mb.slow(repo / "slow" / "1" / "model.onnx", matmuls=50, width=1024)
        mb.write_config(repo / "slow", "max_batch_size: 8\ndynamic_batching { }\n")
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "server", "serve", "--model-repository", str(repo),
                                   "--http-port", str(port), "--grpc-port", str(free_port()),
                                   "--metrics-port", str(free_port())], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(port, server)
            counts = {"ok": 0, "unexpected": 0, "errors": 0}
            asyncio.run(drive(port, 30, a.rate, counts))  # warm-up
            base = rss_kb(server.pid)
            counts = dict.fromkeys(counts, 0)
            print(f"after 30 s warm-up: RSS {base / 1024:.1f} MiB", flush=True)
            samples = []
            end = time.monotonic() + a.minutes * 60
            while time.monotonic() < end:
                asyncio.run(drive(port, min(a.sample_secs, end - time.monotonic()), a.rate, counts))
                samples.append(rss_kb(server.pid))
                print(f"t={len(samples) * a.sample_secs:5.0f}s RSS {samples[-1] / 1024:.1f} MiB  {counts}", flush=True)
            print(f"\nRSS after warm-up {base / 1024:.1f} MiB, max {max(samples) / 1024:.1f} MiB, end "
                  f"{samples[-1] / 1024:.1f} MiB, growth {(samples[-1] - base) / 1024:+.1f} MiB over "
                  f"{a.minutes:g} min at {a.rate} req/s; replies as expected {counts['ok']:,}, unexpected "
                  f"{counts['unexpected']}, connection errors {counts['errors']}")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)


if __name__ == "__main__":
    main()
