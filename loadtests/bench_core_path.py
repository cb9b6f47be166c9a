#!/usr/bin/env python3
"""The request path without sockets: V2 JSON decode -> checks -> batcher -> model -> encode.

Drives the real REST handler of a real `InferenceService` (add_sub, dynamic batching, one
onnxruntime thread) with `--concurrency` requests in flight at a time, in-process, so what it
prints is the per-request cost of fuserve's own code, with the HTTP framing and sockets left out.

    taskset -c 1 python loadtests/bench_core_path.py --rounds 300            # req/s and us/request
    taskset -c 1 python loadtests/bench_core_path.py --rounds 100 --profile  # plus cProfile's top 25
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path

import uvloop
from bench_batching import build_repo

from server.frontends.http_messages import HttpRequest
from server.frontends.rest import RestFrontend
from server.repository import Repository
from server.service import InferenceService

BODY = json.dumps({"inputs": [
    {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
    {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16}]}).encode()


async def run(repo: Path, rounds: int, concurrency: int, profile: bool) -> None:
    repository = Repository((repo,), histograms=True)
    await repository.load("add_sub_batched")
    service = InferenceService(repository)
    service.accepting = True
    rest = RestFrontend(service)
    request = HttpRequest("POST", "/v2/models/add_sub_batched/infer", {}, BODY)

    async def one() -> None:
        response = await rest.handle(request)
        assert response.status == 200, response.body

    for _ in range(50):  # warm-up
        await asyncio.gather(*(one() for _ in range(concurrency)))
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    for _ in range(rounds):
        await asyncio.gather(*(one() for _ in range(concurrency)))
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - start
    n = rounds * concurrency
    print(f"{n / seconds:,.0f} req/s in-process ({seconds / n * 1e6:.1f} us per request)")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    await repository.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        build_repo("add_sub", repo)
        uvloop.run(run(repo, a.rounds, a.concurrency, a.profile))


if __name__ == "__main__":
    main()
