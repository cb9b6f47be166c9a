#!/usr/bin/env python3
"""What an ensemble adds over its steps: a three-step ensemble (Python, then ONNX, then Python).

    python loadtests/bench_ensemble.py [--requests 3000] [--rounds 3]

Starts `fuserve serve` pinned to core 1 on a repository with the steps (plus_one: Python, add_sub:
ONNX, times_two: Python, as in tests/python_models.py) and the ensemble `pipeline` chaining them,
then sends requests one at a time from core 0: to the ensemble, and to each step alone with the
same tensors. Two figures per round:

- server side, from the statistics extension: the ensemble's time per request (its
  `success.ns / count`) minus the sum of its steps' times per request during the same requests.
  That is what the ensemble itself costs (its task, the step requests, passing tensors), with
  transport and client costs out of it;
- client side: p50 latency of the ensemble, and of each step called alone.

With `--in-process` it drives an `InferenceService` in this process instead (no sockets, no
client): mean time per request of the ensemble against the sum of its steps' alone, one request at
a time; the difference is the ensemble's own cost, transport left out on both sides.

`--in-process --only pipeline|steps` sends only the ensemble's requests, or only its steps' (one
of each per request), `--requests` times, and prints nothing: for counting instructions, which
this machine's drifting speed cannot move. Run it under callgrind for two request counts; the
difference of the totals over the difference of the counts is the cost per request:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python loadtests/bench_ensemble.py --in-process --only pipeline --requests 300   # and 1300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import python_models as pm  # noqa: E402


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _repo() -> Path:
    repo = Path(tempfile.mkdtemp()) / "repo"
    (repo / "add_sub" / "1").mkdir(parents=True)
    shutil.copy(ROOT / "model_repo/add_sub/1/model.onnx", repo / "add_sub/1/model.onnx")
    (repo / "add_sub" / "config.pbtxt").write_text((ROOT / "model_repo/add_sub/config.pbtxt").read_text())
    pm.write(repo, "plus_one", pm.STEP_CONFIG, pm.PLUS_ONE)
    pm.write(repo, "times_two", pm.STEP_CONFIG, pm.TIMES_TWO)
    pm.write(repo, "pipeline", pm.ENSEMBLE_CONFIG)
    return repo


def _stats(port: int, model: str) -> tuple[int, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{model}/stats", timeout=10) as r:
        s = json.loads(r.read())["model_stats"][0]["inference_stats"]["success"]
    return int(s["count"]), int(s["ns"])


def in_process(requests: int, rounds: int, only: str = "") -> None:

    import uvloop

    from server.repository import Repository
    from server.service import InferenceService
    from server.types import InferRequest, Tensor

    async def run() -> None:
        repository = Repository((_repo(),))
        service = InferenceService(repository)
        for name in ("add_sub", "plus_one", "times_two", "pipeline"):
            await repository.load(name)
        service.accepting = True
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        b = np.full((1, 16), 3, np.int32)

        def request(model: str, **arrays: np.ndarray) -> InferRequest:
            return InferRequest(model, "", [Tensor(n, "INT32", x.shape, x) for n, x in arrays.items()], [])

        calls = {"pipeline": request("pipeline", A=a, B=b), "plus_one": request("plus_one", IN=a),
                 "add_sub": request("add_sub", INPUT0=a + 1, INPUT1=b), "times_two": request("times_two", IN=a + 1 + b)}
        if only:
            sent = [calls["pipeline"]] if only == "pipeline" else [r for m, r in calls.items() if m != "pipeline"]
            for _ in range(requests):
                for req in sent:
                    await service.infer(req)
            await repository.close()
            return
        for n in range(1, rounds + 1):
            mean = {}
            for model, req in calls.items():
                for _ in range(200):
                    await service.infer(req)
                t0 = time.perf_counter()
                for _ in range(requests):
                    await service.infer(req)
                mean[model] = (time.perf_counter() - t0) / requests * 1e6
            steps = mean["plus_one"] + mean["add_sub"] + mean["times_two"]
            print(f"round {n} (in process): pipeline {mean['pipeline']:.1f} us per request; plus_one "
                  f"{mean['plus_one']:.1f} + add_sub {mean['add_sub']:.1f} + times_two {mean['times_two']:.1f} = "
                  f"{steps:.1f} us -> the ensemble adds {mean['pipeline'] - steps:.1f} us", flush=True)
        await repository.close()

    os.sched_setaffinity(0, {1})
    uvloop.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--in-process", action="store_true")
    ap.add_argument("--only", choices=("pipeline", "steps"), help="with --in-process: for counting instructions")
    args = ap.parse_args()
    if args.in_process:
        return in_process(args.requests, args.rounds, args.only or "")
    import tritonclient.http as httpclient

    repo = _repo()
    http, grpc, metrics = _free_port(), _free_port(), _free_port()
    server = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-m", "server", "serve", "--model-repository",
                               str(repo), "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port",
                               str(metrics)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    os.sched_setaffinity(0, {0})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not become ready") from None
                time.sleep(0.1)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        b = np.full((1, 16), 3, np.int32)

        def inputs(names: tuple[str, ...], arrays: tuple[np.ndarray, ...]) -> list:
            out = []
            for name, arr in zip(names, arrays, strict=True):
                t = httpclient.InferInput(name, list(arr.shape), "INT32")
                t.set_data_from_numpy(arr, binary_data=True)
                out.append(t)
            return out

        calls = {"pipeline": inputs(("A", "B"), (a, b)), "plus_one": inputs(("IN",), (a,)),
                 "add_sub": inputs(("INPUT0", "INPUT1"), (a + 1, b)), "times_two": inputs(("IN",), (a + 1 + b,))}
        steps = ("plus_one", "add_sub", "times_two")
        for n in range(1, args.rounds + 1):
            p50 = {}
            for _ in range(200):  # warm-up
                client.infer("pipeline", calls["pipeline"])
            mid = {m: _stats(http, m) for m in calls}
            lat = []
            for _ in range(args.requests):
                t0 = time.perf_counter()
                client.infer("pipeline", calls["pipeline"])
                lat.append(time.perf_counter() - t0)
            after = {m: _stats(http, m) for m in calls}
            p50["pipeline"] = float(np.median(lat)) * 1e6
            ens = (after["pipeline"][1] - mid["pipeline"][1]) / (after["pipeline"][0] - mid["pipeline"][0])
            inside = sum((after[s][1] - mid[s][1]) / max(1, after[s][0] - mid[s][0]) for s in steps)
            for model in steps:
                lat = []
                for _ in range(args.requests):
                    t0 = time.perf_counter()
                    client.infer(model, calls[model])
                    lat.append(time.perf_counter() - t0)
                p50[model] = float(np.median(lat)) * 1e6
            print(f"round {n}: server side: ensemble {ens / 1e3:.1f} us per request, its steps {inside / 1e3:.1f} us "
                  f"-> the ensemble adds {(ens - inside) / 1e3:.1f} us; client p50: pipeline {p50['pipeline']:.0f} us, "
                  + ", ".join(f"{m} {p50[m]:.0f} us" for m in steps)
                  + f" (sum {sum(p50[m] for m in steps):.0f} us)", flush=True)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
