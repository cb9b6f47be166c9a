#!/usr/bin/env python3
"""Dynamic batching on and off, beside the in-process limit, in one run.

For each model, starts `fuserve serve` pinned to one core with copies of the model (one with
`dynamic_batching { }`, or one per --batching given; and one without; max_batch_size 64,
onnxruntime on one thread), drives each at fixed concurrencies from another core (wrk for V2
JSON and V2 binary over HTTP/1.1 keep-alive, h2load for gRPC; one row per request, every reply
checked), and reads the server-side split (queue, compute, mean batch size) from the statistics
extension. Then it times onnxruntime called
directly on the same core at batch sizes 1..64: the in-process limit. Prints a Markdown table.

    apt-get install wrk nghttp2-client          # the load generators (wrk, h2load)
    python loadtests/bench_batching.py --models mlp,minilm --concurrency 1,64 --duration 8
    python loadtests/bench_batching.py --models add_sub --protocols json,binary,grpc
    python loadtests/bench_batching.py --models minilm --concurrency 64 --duration 30 --no-unbatched \
        --batching 'dynamic_batching { }' --batching 'dynamic_batching { }
        parameters { key: "fuserve_batch_learning" value: { string_value: "false" } }'

Needs the example models (python model_repo/generate.py) and two cores for the pinning.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import re
import shutil
import signal
import socket
import struct
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

NUMPY = {"INT32": np.int32, "INT64": np.int64, "FP32": np.float32}  # the datatypes the samples use

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


def variant_name(i: int) -> str:
    return "batched" if i == 0 else f"batched{i}"


def build_repo(model: str, repo: Path, variants: tuple[str, ...] = ("dynamic_batching { }",)) -> None:
    """`<model>_unbatched`, and `<model>_batched`, `<model>_batched1`, ... with the scheduling
    blocks in `variants`."""
    src = ROOT / "model_repo" / model / "1" / "model.onnx"
    if not src.exists():
        subprocess.run([sys.executable, str(ROOT / "model_repo" / "generate.py"), "--models", model], check=True)
    copies = [(f"{model}_{variant_name(i)}", block + "\n") for i, block in enumerate(variants)]
    copies.append((f"{model}_unbatched", ""))
    for name, extra in copies:
        (repo / name / "1").mkdir(parents=True)
        shutil.copy(src, repo / name / "1" / "model.onnx")
        (repo / name / "config.pbtxt").write_text(f"max_batch_size: 64\n{THREADS}{extra}")


def wrk(port: int, model: str, body: Path, marker: str, conns: int, seconds: float, cpu: str | None,
        header_length: int | None = None) -> dict:
    cmd = pinned(cpu, ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "30s", "-s", str(LUA),
                       f"http://127.0.0.1:{port}/v2/models/{model}/infer"])
    env = {**os.environ, "BODY_FILE": str(body), "MARKER": marker, "HDRLEN": str(header_length or "")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def h2load(port: int, body: Path, conc: int, seconds: float, cpu: str | None, log: Path) -> dict:
    """gRPC ModelInfer with h2load: `conc` streams in flight over up to 8 connections; replies checked
    by status (h2load sees only HTTP status; a gRPC error still counts as sent, so the server's
    statistics are the check: the caller compares successes)."""
    conns = min(conc, 8)
    cmd = pinned(cpu, ["h2load", "-t1", f"-c{conns}", f"-m{-(-conc // conns)}", f"-D{max(1, round(seconds))}",
                       "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers",
                       "--log-file", str(log),
                       f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"finished in ([\d.]+)(m?s)", out)
    req = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    if not (m and req):
        raise RuntimeError("h2load gave no result: " + out[-500:])
    duration = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
    lats = sorted(int(x.split()[2]) for x in log.read_text().splitlines() if len(x.split()) >= 3)

    def pct(q: float) -> int:
        return lats[min(len(lats) - 1, int(q * len(lats)))] if lats else 0

    return {"ok": int(req.group(3)), "duration_us": duration * 1e6, "bad": int(req.group(4)), "errors": 0,
            "p50_us": pct(0.5), "p90_us": pct(0.9), "p99_us": pct(0.99)}


def bodies(tmp: Path, body: dict, model: str) -> dict[str, tuple[Path, int | None]]:
    """The same one-row request as V2 JSON, V2 binary and a framed gRPC ModelInferRequest."""
    from server._proto import grpc_service_pb2 as pb

    arrays = [(i, np.array(i["data"], dtype=NUMPY[i["datatype"]]).reshape(i["shape"])) for i in body["inputs"]]
    header = json.dumps({"inputs": [{"name": i["name"], "datatype": i["datatype"], "shape": i["shape"],
                                     "parameters": {"binary_data_size": a.nbytes}} for i, a in arrays],
                         "parameters": {"binary_data_output": True}}).encode()
    msg = pb.ModelInferRequest(model_name=f"{model}_batched")
    for i, a in arrays:
        msg.inputs.add(name=i["name"], datatype=i["datatype"], shape=i["shape"])
        msg.raw_input_contents.append(a.tobytes())
    raw = msg.SerializeToString()
    out = {"json": (tmp / "body.json", None), "binary": (tmp / "body.bin", len(header)),
           "grpc": (tmp / "body.grpc", None)}
    out["json"][0].write_text(json.dumps(body))
    out["binary"][0].write_bytes(header + b"".join(a.tobytes() for _, a in arrays))
    out["grpc"][0].write_bytes(struct.pack(">BI", 0, len(raw)) + raw)
    return out


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
    sample = {i["name"]: (np.dtype(NUMPY[i["datatype"]]).name, np.array(i["data"]).reshape(i["shape"]).tolist())
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
    ap.add_argument("--protocols", default="json",
                    help="comma-separated: json (V2 JSON), binary (V2 binary extension), "
                         "grpc (h2load; the first batched copy only)")
    ap.add_argument("--batching", action="append",
                    help="a batched copy's scheduling block (repeat to compare several side by side), e.g. "
                         "'dynamic_batching { preferred_batch_size: [2] }'; default 'dynamic_batching { }'")
    ap.add_argument("--no-unbatched", action="store_true", help="skip the copy without dynamic batching")
    a = ap.parse_args()
    variants = tuple(a.batching or ["dynamic_batching { }"])
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install wrk")
    concurrencies = [int(c) for c in a.concurrency.split(",")]
    rows = []
    limits: dict[str, dict[int, float]] = {}
    for model in a.models.split(","):
        body, marker = SAMPLES[model]()
        with tempfile.TemporaryDirectory() as tmp:
            repo = Path(tmp) / "repo"
            build_repo(model, repo, variants)
            files = bodies(Path(tmp), body, model)
            port, grpc_port = free_port(), free_port()
            log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115 (lives as long as the server)
            server = subprocess.Popen(pinned(a.server_cpu, [sys.executable, "-m", "server", "serve",
                                                            "--model-repository", str(repo), "--http-port",
                                                            str(port), "--grpc-port", str(grpc_port)]),
                                      cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_ready(port, server)
                for protocol in a.protocols.split(","):
                    labels = {variant_name(i): block for i, block in enumerate(variants)}
                    if protocol == "grpc":  # the request body names the first copy
                        labels = {"batched": variants[0]}
                    elif not a.no_unbatched:
                        labels = {"unbatched": "off", **labels}
                    for variant, label in labels.items():
                        name = f"{model}_{variant}"
                        path, header_length = files[protocol]
                        for c in concurrencies:
                            if protocol == "grpc":
                                load = functools.partial(h2load, grpc_port, path, c, cpu=a.client_cpu,
                                                         log=Path(tmp) / "h2.log")
                            else:
                                load = functools.partial(wrk, port, name, path, marker, c, cpu=a.client_cpu,
                                                         header_length=header_length)
                            wait_idle(port, name)  # what the previous run left queued or executing
                            load(seconds=a.warmup)
                            wait_idle(port, name)
                            before = json.loads(http_get(port, f"/v2/models/{name}/stats")[1])["model_stats"][0]
                            r = load(seconds=a.duration)
                            after = json.loads(http_get(port, f"/v2/models/{name}/stats")[1])["model_stats"][0]
                            rps = r["ok"] / (r["duration_us"] / 1e6)
                            split = server_split(before, after)
                            if protocol == "grpc":  # h2load cannot read gRPC status: the server's count checks
                                succeeded = after["inference_stats"]["success"]["count"]
                                served = succeeded - before["inference_stats"]["success"]["count"]
                                r["bad"] += max(0, r["ok"] - served - c)
                            rows.append({"model": model, "protocol": protocol, "batching": label,
                                         "c": c, "rps": rps, "p50_ms": r["p50_us"] / 1e3, "p90_ms": r["p90_us"] / 1e3,
                                         "p99_ms": r["p99_us"] / 1e3, "failed": r["bad"] + r["errors"], **split})
                            print(json.dumps(rows[-1]), file=sys.stderr)
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(60)
                log.close()
        limits[model] = inprocess(model, body, [1, 2, 4, 8, 16, 32, 64], 2.0, a.server_cpu)
        print(json.dumps({"model": model, "inprocess_rows_per_s": limits[model]}), file=sys.stderr)

    print("| model | protocol | batching | concurrency | req/s | p50 ms | p90 ms | p99 ms | failed | mean batch | "
          "queue us/req | infer us/req | in-process at that batch | ratio | vs best in-process |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lim = limits[r["model"]]
        best = max(lim.values())
        # the in-process rate at the largest measured batch size not above the server's mean batch
        at = lim[max(b for b in lim if b <= max(1.0, r["batch"]))]
        mode = r["batching"]
        print(f"| {r['model']} | {r['protocol']} | {mode} | {r['c']} | {r['rps']:,.0f} | "
              f"{r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['failed']} | {r['batch']:.1f} | "
              f"{r['queue_us']:,.0f} | {r['infer_us']:,.0f} | {at:,.0f} | {r['rps'] / at:.2f} | "
              f"{r['rps'] / best:.2f} |")
    print("\nIn-process onnxruntime on the server's core (rows/s by batch size):\n")
    sizes = sorted(next(iter(limits.values())))
    print("| model | " + " | ".join(f"b{b}" for b in sizes) + " | best |")
    print("|---|" + "---|" * (len(sizes) + 1))
    for model, lim in limits.items():
        print(f"| {model} | " + " | ".join(f"{lim[b]:,.0f}" for b in sizes) + f" | {max(lim.values()):,.0f} |")


if __name__ == "__main__":
    main()
