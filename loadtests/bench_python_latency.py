#!/usr/bin/env python3
"""The lone request: a Python model against the ONNX model it wraps, in one server, alternating.

    python loadtests/bench_python_latency.py [--rounds 8] [--duration 3] [--protocol v2-binary|grpc]

One `fuserve serve` (pinned to core 1) serves `add_sub` (ONNX) and `py_add_sub` (onnxruntime on the
same model.onnx inside a Python model: count_instructions.py's PY_MODEL). One client connection
from core 0 (wrk -c1 over V2 binary, or h2load -c1 -m1 over gRPC) sends to one model, then the
other, in alternating order, for `--rounds` windows each. Printed: each window's p50, and the
median over rounds of the difference (Python minus ONNX), so the machine's drift cancels out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loadtests"))
from bench_grpc_floor import _free_port  # noqa: E402
from count_instructions import PY_MODEL, _repository  # noqa: E402

LUA = """
wrk.method = "POST"
wrk.body = io.open(os.getenv("BODY_FILE"), "rb"):read("*a")
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Inference-Header-Content-Length"] = os.getenv("HDRLEN")
function done(summary, latency, requests)
  io.write(string.format("P50 %d N %d ERR %d\\n", latency:percentile(50), summary.requests,
           summary.errors.status + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def _repo() -> Path:
    repo = _repository("add_sub")
    py = _repository("py_add_sub") / "add_sub"
    dest = repo / "py_add_sub"
    shutil.copytree(py, dest)
    config = (dest / "config.pbtxt").read_text().replace('name: "add_sub"', 'name: "py_add_sub"')
    (dest / "config.pbtxt").write_text(config)
    assert (dest / "1" / "model.py").read_text() == PY_MODEL
    return repo


def _bodies(folder: Path) -> dict[str, tuple[Path, Path, int]]:
    """Per model: the V2 binary body, the gRPC body, the binary body's JSON length."""
    from server._proto import grpc_service_pb2 as pb

    a = np.arange(16, dtype=np.int32).tobytes()
    out = {}
    for model in ("add_sub", "py_add_sub"):
        header = json.dumps({"inputs": [{"name": n, "shape": [1, 16], "datatype": "INT32",
                                         "parameters": {"binary_data_size": 64}} for n in ("INPUT0", "INPUT1")],
                             "outputs": [{"name": n, "parameters": {"binary_data": True}}
                                         for n in ("OUTPUT0", "OUTPUT1")]}).encode()
        http = folder / f"{model}.bin"
        http.write_bytes(header + a + a)
        req = pb.ModelInferRequest(model_name=model)
        for name in ("INPUT0", "INPUT1"):
            req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
            req.raw_input_contents.append(a)
        msg = req.SerializeToString()
        grpc = folder / f"{model}-grpc.bin"
        grpc.write_bytes(struct.pack(">BI", 0, len(msg)) + msg)
        out[model] = (http, grpc, len(header))
    return out


def _window(protocol: str, model: str, bodies: dict, http_port: int, grpc_port: int, seconds: int,
            lua: Path) -> float:
    """p50 in microseconds over one window."""
    http, grpc, hdrlen = bodies[model]
    if protocol == "v2-binary":
        out = subprocess.run(["taskset", "-c", "0", "wrk", "-t1", "-c1", f"-d{seconds}s", "-s", str(lua),
                              f"http://127.0.0.1:{http_port}/v2/models/{model}/infer"],
                             env={**os.environ, "BODY_FILE": str(http), "HDRLEN": str(hdrlen)},
                             capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
        found = re.search(r"P50 (\d+) N (\d+) ERR (\d+)", out)
        if found is None or int(found.group(3)):
            raise SystemExit(f"wrk failed or saw errors:\n{out}")
        return float(found.group(1))
    log = lua.parent / "h2load.log"
    subprocess.run(["taskset", "-c", "0", "h2load", "-c1", "-m1", f"-D{seconds}", "-d", str(grpc),
                    "-H", "content-type: application/grpc", "-H", "te: trailers", "--log-file", str(log),
                    f"http://127.0.0.1:{grpc_port}/inference.GRPCInferenceService/ModelInfer"],
                   capture_output=True, check=True, timeout=seconds + 60)
    rows = [line.split("\t") for line in log.read_text().splitlines() if line]
    if not rows or any(r[1] != "200" for r in rows):
        raise SystemExit("h2load saw a failed request")
    return statistics.median(int(r[2]) for r in rows)  # the third column: microseconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--duration", type=int, default=3)
    ap.add_argument("--protocol", choices=("v2-binary", "grpc"), default="v2-binary")
    a = ap.parse_args()
    folder = Path(tempfile.mkdtemp())
    lua = folder / "p50.lua"
    lua.write_text(LUA)
    bodies = _bodies(folder)
    http_port, grpc_port, metrics_port = _free_port(), _free_port(), _free_port()
    server = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-m", "server", "serve", "--model-repository",
                               str(_repo()), "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                               "--metrics-port", str(metrics_port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not become ready") from None
                time.sleep(0.3)
        for model in ("add_sub", "py_add_sub"):
            _window(a.protocol, model, bodies, http_port, grpc_port, 1, lua)  # warm-up
        p50: dict[str, list[float]] = {"add_sub": [], "py_add_sub": []}
        for r in range(a.rounds):
            for model in (("add_sub", "py_add_sub") if r % 2 == 0 else ("py_add_sub", "add_sub")):
                p50[model].append(_window(a.protocol, model, bodies, http_port, grpc_port, a.duration, lua))
            print(f"round {r + 1} ({a.protocol}, one request at a time): p50 ONNX {p50['add_sub'][-1]:.0f} us, "
                  f"Python {p50['py_add_sub'][-1]:.0f} us", flush=True)
        diffs = [p - o for p, o in zip(p50["py_add_sub"], p50["add_sub"], strict=True)]
        print(f"{a.protocol}: the Python model's p50 minus the ONNX model's, median of {a.rounds} rounds: "
              f"{statistics.median(diffs):+.0f} us (rounds {min(diffs):+.0f} to {max(diffs):+.0f}); medians "
              f"{statistics.median(p50['py_add_sub']):.0f} against {statistics.median(p50['add_sub']):.0f} us")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
