#!/usr/bin/env python3
"""Learned batch sizes against Triton's rule and the in-process best, interleaved round by round.

This machine's speed drifts by 10-20% over minutes, so a table measured model by model cannot
tell 98% from 90%. Here every round measures, back to back on the same core: onnxruntime called
directly at each batch size, then the fastest size again; then the server's copy
with `dynamic_batching { }` (batch sizes learned), then the copy with `fuserve_batch_learning:
"false"` (everything queued, Triton's rule), and, unless --no-unbatched, the copy without
dynamic batching. Each server figure is divided by the same round's in-process best; the median
over rounds is printed. The in-process best is the best size's rate measured again, in a reading
of its own: the fastest of several noisy readings of sizes that do alike (MiniLM's 1-8 are within
3%) reads high by its own noise (the fastest of seven 2-second readings of one size was 1.3% above
their mean). The ratio to that fastest reading is printed too ("vs the fastest reading"). Before
the first round each copy is driven for --learn seconds (the learning climb and the warm-up
happen there, not in the measured windows).

    python loadtests/bench_learned.py --model minilm --concurrency 64 --rounds 3 --duration 15
    python loadtests/bench_learned.py --model mlp --concurrency 64 --duration 6 --learn 4

One server core (taskset -c --server-cpu), wrk on --client-cpu, V2 JSON, one row per request,
every reply checked.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_batching import (
    ROOT,
    SAMPLES,
    bodies,
    build_repo,
    free_port,
    http_get,
    inprocess,
    pinned,
    server_split,
    wait_idle,
    wait_ready,
    wrk,
)

GREEDY = 'dynamic_batching { }\nparameters { key: "fuserve_batch_learning" value: { string_value: "false" } }'


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", choices=sorted(SAMPLES))
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per server window")
    ap.add_argument("--learn", type=float, default=10.0, help="seconds of load before the first round")
    ap.add_argument("--inprocess-seconds", type=float, default=2.0, help="per batch size")
    ap.add_argument("--sizes", default="1,2,4,8,16,32,64", help="in-process batch sizes")
    ap.add_argument("--server-cpu", default="1")
    ap.add_argument("--client-cpu", default="0")
    ap.add_argument("--no-unbatched", action="store_true")
    a = ap.parse_args()
    body, marker = SAMPLES[a.model]()
    sizes = [int(s) for s in a.sizes.split(",")]
    copies = {"learned": f"{a.model}_batched", "greedy": f"{a.model}_batched1"}
    if not a.no_unbatched:
        copies["unbatched"] = f"{a.model}_unbatched"
    ratios: dict[str, list[float]] = {k: [] for k in copies}
    ratios_fastest: dict[str, list[float]] = {k: [] for k in copies}
    rates: dict[str, list[float]] = {k: [] for k in copies}
    batches: dict[str, list[float]] = {k: [] for k in copies}
    best_rates: list[float] = []
    fastest_rates: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_repo(a.model, repo, ("dynamic_batching { }", GREEDY))
        path, _ = bodies(Path(tmp), body, a.model)["json"]
        port, grpc_port = free_port(), free_port()
        log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115 (lives as long as the server)
        server = subprocess.Popen(pinned(a.server_cpu, [sys.executable, "-m", "server", "serve", "--model-repository",
                                                        str(repo), "--http-port", str(port), "--grpc-port",
                                                        str(grpc_port)]), cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            wait_ready(port, server)
            for name in copies.values():
                wrk(port, name, path, marker, a.concurrency, a.learn, a.client_cpu)
                wait_idle(port, name)
            for rnd in range(a.rounds):
                limit = inprocess(a.model, body, sizes, a.inprocess_seconds, a.server_cpu)
                fastest = max(limit.values())
                best_size = max(limit, key=lambda b: limit[b])
                best = inprocess(a.model, body, [best_size], a.inprocess_seconds, a.server_cpu)[best_size]
                best_rates.append(best)
                fastest_rates.append(fastest)
                print(json.dumps({"round": rnd, "inprocess_rows_per_s": limit, "best_size": best_size,
                                  "best_again": best}), file=sys.stderr)
                for label, name in copies.items():
                    before = json.loads(http_get(port, f"/v2/models/{name}/stats")[1])["model_stats"][0]
                    r = wrk(port, name, path, marker, a.concurrency, a.duration, a.client_cpu)
                    after = json.loads(http_get(port, f"/v2/models/{name}/stats")[1])["model_stats"][0]
                    wait_idle(port, name)
                    if r["bad"] or r["errors"]:
                        raise RuntimeError(f"{label}: {r['bad'] + r['errors']} failed replies")
                    rps = r["ok"] / (r["duration_us"] / 1e6)
                    rates[label].append(rps)
                    ratios[label].append(rps / best)
                    ratios_fastest[label].append(rps / fastest)
                    batches[label].append(server_split(before, after)["batch"])
                    print(json.dumps({"round": rnd, "copy": label, "rps": rps, "ratio": rps / best,
                                      "batch": batches[label][-1], "p99_ms": r["p99_us"] / 1e3}), file=sys.stderr)
            cost = json.loads(http_get(port, f"/v2/models/{copies['learned']}/stats")[1])["model_stats"][0]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
            log.close()
    print(f"{a.model}, concurrency {a.concurrency}, {a.rounds} rounds of {a.duration:g} s; in-process best "
          f"(measured again) {', '.join(f'{b:,.1f}' for b in best_rates)} rows/s; fastest reading "
          f"{', '.join(f'{b:,.1f}' for b in fastest_rates)} rows/s\n")
    print("| copy | req/s per round | mean batch | vs that round's in-process best | median | "
          "vs the fastest reading | median |")
    print("|---|---|---|---|---|---|---|")
    for label in copies:
        print(f"| {label} | {', '.join(f'{x:,.1f}' for x in rates[label])} | "
              f"{statistics.mean(batches[label]):.1f} | {', '.join(f'{x:.3f}' for x in ratios[label])} | "
              f"**{statistics.median(ratios[label]):.3f}** | {', '.join(f'{x:.3f}' for x in ratios_fastest[label])} | "
              f"{statistics.median(ratios_fastest[label]):.3f} |")
    learned = cost["fuserve_batch_cost"]
    print(f"\nLearned: batch size {learned['batch_size']}; buckets " + ", ".join(
        f"{b['batch_size']}: {b['rows_per_second']:,.1f} rows/s ({b['samples']})" for b in learned["buckets"]))


if __name__ == "__main__":
    main()
