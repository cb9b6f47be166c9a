#!/usr/bin/env python3
"""How throughput grows with cores: one process vs `--frontend-workers N`, in one run.

For each setup `CORES:WORKERS` it starts `fuserve serve` confined to the first CORES cores of
--server-cpus (taskset; the workers inherit it) with `--frontend-workers WORKERS` (0: the single
process does everything), drives the batched copy of the model at a fixed concurrency from
--client-cpus (wrk for V2 JSON/binary, h2load for gRPC, every reply checked as in
bench_batching.py), and prints req/s beside the first setup's.

    python loadtests/bench_cores.py --setups 1:0,2:1,2:2,3:2,4:3 --server-cpus 1,2,3,4 \\
        --client-cpus 8-11 --protocols json,binary,grpc

Needs cores to spare for the load generator: on a 2-core machine the numbers say little.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_batching import LUA, ROOT, SAMPLES, bodies, build_repo, free_port, http_get, pinned, wait_idle, wait_ready


def wrk(port: int, model: str, path: Path, marker: str, header_length: int | None, conns: int, threads: int,
        seconds: float, cpus: str) -> float:
    cmd = pinned(cpus, ["wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
                        "-s", str(LUA), f"http://127.0.0.1:{port}/v2/models/{model}/infer"])
    env = {**os.environ, "BODY_FILE": str(path), "MARKER": marker, "HDRLEN": str(header_length or "")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    results = [json.loads(x[len("RESULT "):]) for x in out.splitlines() if x.startswith("RESULT ")]
    bad = sum(r["bad"] + r["errors"] for r in results)
    if bad:
        raise RuntimeError(f"{bad} bad replies")
    return sum(r["ok"] for r in results) / (max(r["duration_us"] for r in results) / 1e6)


def h2load(port: int, path: Path, conns: int, streams: int, threads: int, seconds: float, cpus: str) -> float:
    cmd = pinned(cpus, ["h2load", f"-t{threads}", f"-c{conns}", f"-m{streams}", f"-D{max(1, round(seconds))}",
                        "-d", str(path), "-H", "content-type: application/grpc", "-H", "te: trailers",
                        f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("finished in"))
    return float(line.split(",")[1].split()[0])


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time (user + system) of `pid` and of its live children together: (its own, children's)."""
    tick = os.sysconf("SC_CLK_TCK")

    def of(stat: str) -> float:
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    own = of(Path(f"/proc/{pid}/stat").read_text())
    children = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children += of(stat)
    return own, children


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="add_sub")
    ap.add_argument("--setups", default="1:0,2:1,2:2,3:2", help="CORES:WORKERS,...")
    ap.add_argument("--server-cpus", default="1,2,3", help="the cores a setup's CORES are taken from, in order")
    ap.add_argument("--client-cpus", default="0")
    ap.add_argument("--client-threads", type=int, default=1)
    ap.add_argument("--protocols", default="json,binary,grpc")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    a = ap.parse_args()
    cpus = a.server_cpus.split(",")
    body, marker = SAMPLES[a.model]()
    name = f"{a.model}_batched"
    results: dict[tuple[str, str], float] = {}
    costs: dict[tuple[str, str], tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_repo(a.model, repo)
        files = bodies(Path(tmp), body, a.model)
        for setup in a.setups.split(","):
            cores, workers = (int(x) for x in setup.split(":"))
            port, grpc_port, metrics_port = free_port(), free_port(), free_port()
            cmd = [sys.executable, "-m", "server", "serve", "--model-repository", str(repo), "--http-port",
                   str(port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
                   "--frontend-workers", str(workers)]
            with open(Path(tmp) / f"server-{setup.replace(':', '-')}.log", "wb") as log:
                server = subprocess.Popen(pinned(",".join(cpus[:cores]), cmd), cwd=ROOT, stdout=log,
                                          stderr=subprocess.STDOUT)
                try:
                    wait_ready(port, server)
                    for protocol in a.protocols.split(","):
                        path, header_length = files[protocol]
                        for seconds in (a.warmup, a.duration):
                            wait_idle(port, name)
                            cpu0 = cpu_seconds(server.pid)
                            if protocol == "grpc":
                                conns = max(8, a.client_threads)
                                rps = h2load(grpc_port, path, conns, -(-a.concurrency // conns), a.client_threads,
                                             seconds, a.client_cpus)
                            else:
                                rps = wrk(port, name, path, marker, header_length, a.concurrency, a.client_threads,
                                          seconds, a.client_cpus)
                            cpu1 = cpu_seconds(server.pid)
                        stats = json.loads(http_get(port, f"/v2/models/{name}/stats")[1])["model_stats"][0]
                        n = rps * a.duration
                        sched_us, workers_us = ((cpu1[i] - cpu0[i]) / n * 1e6 for i in (0, 1))
                        results[(setup, protocol)] = rps
                        costs[(setup, protocol)] = (sched_us, workers_us)
                        print(json.dumps({"setup": setup, "protocol": protocol, "rps": rps,
                                          "mean_batch": stats["inference_count"] / max(1, stats["execution_count"]),
                                          "cpu_us_per_request": {"main": sched_us, "workers": workers_us}}),
                              file=sys.stderr)
                finally:
                    server.send_signal(signal.SIGTERM)
                    server.wait(60)
    protocols = a.protocols.split(",")
    setups = a.setups.split(",")
    print("| cores | frontend workers | protocol | req/s | x first setup | CPU us/request: main process | "
          "workers | total |")
    print("|---|---|---|---|---|---|---|---|")
    for setup in setups:
        cores, workers = setup.split(":")
        for p in protocols:
            rps, first = results[(setup, p)], results[(setups[0], p)]
            main_us, workers_us = costs[(setup, p)]
            print(f"| {cores} | {workers} | {p} | {rps:,.0f} | {rps / first:.2f} | {main_us:.1f} | "
                  f"{workers_us:.1f} | {main_us + workers_us:.1f} |")


if __name__ == "__main__":
    main()
