#!/usr/bin/env python3
"""What metrics cost: throughput with metrics on (scraped every second) and off, side by side.

Runs the same server (pinned to one core) alternately with `--allow-metrics true` and `false`,
drives `add_sub` (dynamic batching on) with wrk at a fixed concurrency from the other core, and
while metrics are on scrapes /metrics every second (Prometheus' default is every 15 s, so this is
the harsher case). Rounds alternate so drift on a shared machine hits both sides alike.

    python loadtests/bench_metrics.py --rounds 3 --duration 10 --concurrency 64
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench_batching import ROOT, SAMPLES, build_repo, free_port, http_get, pinned, wait_idle, wait_ready, wrk


def scrape_every_second(port: int, stop: threading.Event, sizes: list[int]) -> None:
    while not stop.wait(1.0):
        status, body = http_get(port, "/metrics")
        assert status == 200
        sizes.append(len(body))


def run_once(repo: Path, metrics: bool, a: argparse.Namespace, body: Path, marker: str, tmp: Path) -> dict:
    http_port, metrics_port = free_port(), free_port()
    log = open(tmp / f"server-{metrics}.log", "wb")  # noqa: SIM115 (lives as long as the server)
    server = subprocess.Popen(pinned(a.server_cpu, [
        sys.executable, "-m", "server", "serve", "--model-repository", str(repo), "--http-port", str(http_port),
        "--grpc-port", str(free_port()), "--metrics-port", str(metrics_port),
        "--allow-metrics", "true" if metrics else "false"]), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(http_port, server)
        model = "add_sub_batched"
        wrk(http_port, model, body, marker, a.concurrency, 2, a.client_cpu)  # warm-up
        wait_idle(http_port, model)
        stop, sizes = threading.Event(), []
        scraper = threading.Thread(target=scrape_every_second, args=(metrics_port, stop, sizes))
        if metrics:
            scraper.start()
        r = wrk(http_port, model, body, marker, a.concurrency, a.duration, a.client_cpu)
        stop.set()
        if metrics:
            scraper.join()
        return {"metrics": metrics, "rps": r["ok"] / (r["duration_us"] / 1e6), "p99_ms": r["p99_us"] / 1e3,
                "failed": r["bad"] + r["errors"], "scrapes": len(sizes), "scrape_bytes": max(sizes, default=0)}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--server-cpu", default="1")
    ap.add_argument("--client-cpu", default="0")
    a = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install wrk")
    body_json, marker = SAMPLES["add_sub"]()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_repo("add_sub", repo)
        body = Path(tmp) / "body.json"
        body.write_text(json.dumps(body_json))
        for _ in range(a.rounds):
            for metrics in (True, False):
                results.append(run_once(repo, metrics, a, body, marker, Path(tmp)))
                print(json.dumps(results[-1]), file=sys.stderr)
    on = [r["rps"] for r in results if r["metrics"]]
    off = [r["rps"] for r in results if not r["metrics"]]
    print("| metrics | req/s per round | median | p99 ms (median) | failed |")
    print("|---|---|---|---|---|")
    for flag, values in (("on, scraped every 1 s", on), ("off", off)):
        rows = [r for r in results if r["metrics"] == flag.startswith("on")]
        print(f"| {flag} | {', '.join(f'{v:,.0f}' for v in values)} | {statistics.median(values):,.0f} | "
              f"{statistics.median(r['p99_ms'] for r in rows):.2f} | {sum(r['failed'] for r in rows)} |")
    print(f"\non/off = {statistics.median(on) / statistics.median(off):.3f}; "
          f"/metrics body {max(r['scrape_bytes'] for r in results):,} bytes")


if __name__ == "__main__":
    main()
