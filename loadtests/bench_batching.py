#!/usr/bin/env python3
"""Dynamic batching on and off, beside the in-process limit, in one run.

For each model, starts `fuserve serve` pinned to one core with two copies of the model (one with
`dynamic_batching { }`, one without; max_batch_size 64, onnxruntime on one thread), drives each at
fixed concurrencies with wrk from another core (V2 JSON over HTTP/1.1 keep-alive, one row per
request, every reply checked), and reads the server-side split (queue, compute, mean batch size)
from the statistics extension. Then it times onnxruntime called directly on the same core at batch
sizes 1..64: the in-process limit. Prints a Markdown table.

    apt-get install wrk          # the load generator
    python loadtests/bench_batching.py --models mlp,minilm --concurrency 1,64 --duration 8

Needs the example models (python model_repo/generate.py) and two cores for the pinning.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LUA = ROOT / "loadtests" / "wrk_v2.lua"
THREADS = 'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n' \
          'parameters { key: "inter_op_thread_count" value: { string_value: "1" } }\n'

# model -> (V2 JSON body for one row, an output name every good reply contains)
SAMPLES = {
    "add_sub": lambda: ({"inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
        {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16}]}, "OUTPUT0"),
    "mlp": lambda: ({"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 256],
                                 "data": np.random.default_rng(7).standard_normal(256).round(4).tolist()}]},
                    "OUTPUT"),
    "minilm": lambda: ({"inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [1, 128],
         "data": [101] + list(range(2000, 2030)) + [102] + [0] * 96},
        {"name": "attention_mask", "datatype": "INT64", "shape": [1, 128], "data": [1] * 32 + [0] * 96}]},
        "sentence_embedding"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpu: str | None, cmd: list[str]) -> list[str]:
    return (["taskset", "-c", cpu] if cpu and shutil.which("taskset") else []) + cmd


def http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def wait_ready(port: int, server: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll the server's readiness; exit with its log's path in mind if it dies or never gets ready."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if http_get(port, "/v2/health/ready")[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            sys.exit(f"fuserve did not become ready on port {port} (exit code {server.poll()})")
        time.sleep(0.1)


def build_repo(model: str, repo: Path, batching: str = "dynamic_batching { }") -> None:
    src = ROOT / "model_repo" / model / "1" / "model.onnx"
    if not src.exists():
        subprocess.run([sys.executable, str(ROOT / "model_repo" / "generate.py"), "--models", model], check=True)
    for name, extra in ((f"{model}_batched", batching + "\n"), (f"{model}_unbatched", "")):
        (repo / name / "1").mkdir(parents=True)
        shutil.copy(src, repo / name / "1" / "model.onnx")
        (repo / name / "config.pbtxt").write_text(f"max_batch_size: 64\n{THREADS}{extra}")


def wrk(port: int, model: str, body: Path, marker: str, conns: int, seconds: float, cpu: str | None) -> dict:
    cmd = pinned(cpu, ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "30s", "-s", str(LUA),
                       f"http://127.0.0.1:{port}/v2/models/{model}/infer"])
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BODY_FILE": str(body),
                                                                    "MARKER": marker}, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def wait_idle(port: int, model: str) -> None:
    while True:
        s = json.loads(http_get(port, f"/v2/models/{model}/stats")[1])["model_stats"][0]
        if s["fuserve_pending"] == 0 and s["fuserve_executing"] == 0:
            return
        time.sleep(0.05)


def server_split(before: dict, after: dict) -> dict:
    def d(key: str, field: str = "ns") -> float:
        return after["inference_stats"][key][field] - before["inference_stats"][key][field]

    n = max(1, d("success", "count"))
    execs = max(1, after["execution_count"] - before["execution_count"])
    return {"queue_us": d("queue") / n / 1e3, "infer_us": d("compute_infer") / n / 1e3,
            "batch": (after["inference_count"] - before["inference_count"]) / execs}


INPROCESS = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
path, sizes, seconds = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], float(sys.argv[3])
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
sample = {k: np.array(data, dtype=dt) for k, (dt, data) in json.loads(sys.stdin.read()).items()}
out = {}
for b in sizes:
    feeds = {k: np.repeat(v, b, 0) for k, v in sample.items()}
    for _ in range(3): s.run(None, feeds)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s.run(None, feeds); n += 1
    out[b] = n * b / (time.perf_counter() - t0)
print(json.dumps(out))
"""


def inprocess(model: str, body: dict, sizes: list[int], seconds: float, cpu: str | None) -> dict[int, float]:
    dtypes = {"INT32": "int32", "INT64": "int64", "FP32": "float32"}
    sample = {i["name"]: (dtypes[i["datatype"]], np.array(i["data"]).reshape(i["shape"]).tolist())
              for i in body["inputs"]}
    path = ROOT / "model_repo" / model / "1" / "model.onnx"
    out = subprocess.run(pinned(cpu, [sys.executable, "-c", INPROCESS, str(path), ",".join(map(str, sizes)),
                                      str(seconds)]), input=json.dumps(sample), capture_output=True, text=True,
                         check=True).stdout
    return {int(k): v for k, v in json.loads(out).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="add_sub,mlp,minilm")
    ap.add_argument("--concurrency", default="1,64")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--server-cpu", default="1", help="taskset list for the server and the in-process limit")
    ap.add_argument("--client-cpu", default="0", help="taskset list for wrk")
    ap.add_argument("--batching", default="dynamic_batching { }",
                    help="the batched copy's scheduling block, e.g. 'dynamic_batching { preferred_batch_size: [2] }'")
    a = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install wrk")
    concurrencies = [int(c) for c in a.concurrency.split(",")]
    rows = []
    limits: dict[str, dict[int, float]] = {}
    for model in a.models.split(","):
        body, marker = SAMPLES[model]()
        with tempfile.TemporaryDirectory() as tmp:
            repo = Path(tmp) / "repo"
            build_repo(model, repo, a.batching)
            body_file = Path(tmp) / "body.json"
            body_file.write_text(json.dumps(body))
            port = free_port()
            log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115 (lives as long as the server)
            server = subprocess.Popen(pinned(a.server_cpu, [sys.executable, "-m", "server", "serve",
                                                            "--model-repository", str(repo), "--http-port",
                                                            str(port), "--grpc-port", str(free_port())]),
                                      cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_ready(port, server)
                for variant in ("unbatched", "batched"):
                    name = f"{model}_{variant}"
                    for c in concurrencies:
                        wait_idle(port, name)  # what the previous run left queued or executing
                        wrk(port, name, body_file, marker, c, a.warmup, a.client_cpu)
                        wait_idle(port, name)
                        before = json.loads(http_get(port, f"/v2/models/{name}/stats")[1])["model_stats"][0]
                        r = wrk(port, name, body_file, marker, c, a.duration, a.client_cpu)
                        after = json.loads(http_get(port, f"/v2/models/{name}/stats")[1])["model_stats"][0]
                        rps = r["ok"] / (r["duration_us"] / 1e6)
                        rows.append({"model": model, "batching": variant == "batched", "c": c, "rps": rps,
                                     "p50_ms": r["p50_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3,
                                     "failed": r["bad"] + r["errors"], **server_split(before, after)})
                        print(json.dumps(rows[-1]), file=sys.stderr)
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(60)
                log.close()
        limits[model] = inprocess(model, body, [1, 2, 4, 8, 16, 32, 64], 2.0, a.server_cpu)
        print(json.dumps({"model": model, "inprocess_rows_per_s": limits[model]}), file=sys.stderr)

    print("| model | batching | concurrency | req/s | p50 ms | p99 ms | failed | mean batch | queue us/req | "
          "infer us/req | in-process at that batch | ratio | vs best in-process |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lim = limits[r["model"]]
        best = max(lim.values())
        # the in-process rate at the largest measured batch size not above the server's mean batch
        at = lim[max(b for b in lim if b <= max(1.0, r["batch"]))]
        print(f"| {r['model']} | {'on' if r['batching'] else 'off'} | {r['c']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['failed']} | {r['batch']:.1f} | {r['queue_us']:,.0f} | "
              f"{r['infer_us']:,.0f} | {at:,.0f} | {r['rps'] / at:.2f} | {r['rps'] / best:.2f} |")
    print("\nIn-process onnxruntime on the server's core (rows/s by batch size):\n")
    sizes = sorted(next(iter(limits.values())))
    print("| model | " + " | ".join(f"b{b}" for b in sizes) + " | best |")
    print("|---|" + "---|" * (len(sizes) + 1))
    for model, lim in limits.items():
        print(f"| {model} | " + " | ".join(f"{lim[b]:,.0f}" for b in sizes) + f" | {max(lim.values()):,.0f} |")


if __name__ == "__main__":
    main()
