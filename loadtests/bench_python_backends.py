#!/usr/bin/env python3
"""fuserve's and Triton's Python backends on one and the same model.py, in alternating windows.

    python loadtests/bench_python_backends.py [--models add_sub,mlp] [--protocols v2-binary,grpc]
                                              [--concurrency 64] [--rounds 6] [--duration 4]

Uses the peers harness (`../shared/peers`: its launchers, samples and load generators; run its
setup first). Both servers, `fuserve-python` (the `fuserve` on PATH) and `triton-batch` (NVIDIA
Triton 2.51), run at once, pinned to the same server core, on their own ports; only one is loaded
at a time. Each round measures both, back to back, in alternating order, so the machine's drift
(this one's speed swings by 2x within minutes) hits both alike. The `run.sh` harness measures
one target after the other, minutes apart, which on this machine made the same pair's ratio
swing from 0.86 to 2.9. Printed: each window's req/s, and per model and protocol the median of
the per-round ratios with their range.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _environment(peers: Path) -> None:
    """The peers harness's environment (its env.sh), read once into this process."""
    out = subprocess.run(["bash", "-c", f"source {peers / 'env.sh'} && env -0"], check=True, capture_output=True)
    for item in out.stdout.split(b"\0"):
        key, _, value = item.decode().partition("=")
        if key.startswith("PEERS_") or key == "OMP_NUM_THREADS":
            os.environ[key] = value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=Path, default=ROOT.parent / "shared" / "peers")
    ap.add_argument("--models", default="add_sub,mlp")
    ap.add_argument("--protocols", default="v2-binary,grpc")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=int, default=4, help="seconds per window")
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args()
    _environment(a.peers)
    sys.path.insert(0, str(a.peers / "bench"))
    import protocols as P  # noqa: N812
    import run as R  # noqa: N812
    try:
        import tomllib
    except ImportError:  # pragma: no cover (Python < 3.11)
        sys.exit("needs Python 3.11+ (tomllib)")
    targets = tomllib.loads((a.peers / "targets.toml").read_text())["targets"]
    names = ("fuserve-python", "triton-batch")
    ports = {"fuserve-python": (18700, 18701), "triton-batch": (18710, 18711)}
    work = Path(os.environ["PEERS_SCRATCH"]) / "ab"
    summary = []
    for model in a.models.split(","):
        sample = P.Sample(os.environ["PEERS_DATA"], model)
        servers = {}
        try:
            for name in names:
                wd = work / name
                wd.mkdir(parents=True, exist_ok=True)
                servers[name] = R.Server(name, targets[name], model, R.model_repo_for(model), str(wd),
                                         str(work / f"server-{name}.log"), *ports[name])
                servers[name].start()
            for proto in a.protocols.split(","):
                req = P.build(proto, sample)
                body = work / f"{model}-{proto}.bin"
                body.write_bytes(req.body)
                rps: dict[str, list[float]] = {n: [] for n in names}
                for r in range(a.rounds):
                    for name in (names if r % 2 == 0 else names[::-1]):
                        http, grpc = ports[name]
                        port = grpc if req.transport == "grpc" else http
                        ok, msg, reply = P.check_live(proto, R.HOST, port, req, sample)
                        if not ok:
                            sys.exit(f"{name} {model} {proto}: the check failed: {msg}")
                        res = R.measure(req, proto, port, a.concurrency, a.duration, a.warmup, str(body),
                                        servers[name], str(work), reply)
                        if res["errors"] or not res["rps"]:
                            sys.exit(f"{name} {model} {proto}: {res['errors']} errors, {res['rps']} req/s in the "
                                     f"window")
                        rps[name].append(res["rps"])
                        print(f"round {r + 1} {model} {proto} c={a.concurrency} {name}: {res['rps']:,.0f} req/s "
                              f"(server cpu {res['server_cpu']:.2f}, other {res['other_cpu']:.2f})", flush=True)
                ratios = [f / t for f, t in zip(rps[names[0]], rps[names[1]], strict=True)]
                summary.append(f"{model} {proto} c={a.concurrency}: fuserve-python / triton-batch median "
                               f"{statistics.median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f}); "
                               f"medians {statistics.median(rps[names[0]]):,.0f} vs "
                               f"{statistics.median(rps[names[1]]):,.0f} req/s")
                print(summary[-1], flush=True)
        finally:
            for s in servers.values():
                s.stop()
    print("\n".join(["", "summary:", *summary]))


if __name__ == "__main__":
    main()
