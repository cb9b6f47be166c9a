#!/usr/bin/env python3
"""Streaming throughput: a decoupled model answering each request with 100 small responses.

    python loadtests/bench_streams.py [--streams 16] [--responses 100] [--seconds 8] [--rounds 2]

One `fuserve serve` pinned to core 1 serves `burst` (a decoupled Python model: for a request with
IN = [n], n responses of one INT32 each, sent from execute(), then the final flag). From core 0:
- gRPC ModelStreamInfer with h2load: each "request" is one stream carrying one request message
  (half-closed at once), answered with n replies and the trailers; `--streams` of them at a time;
- HTTP /generate_stream with wrk: `--streams` connections, each POST answered with n events.
Printed: responses per second for each (requests/s times n); and, one call at a time over gRPC,
the p50 of a stream request answered with one response (`burst` with n = 1: its first response,
then at once its final) against a unary ModelInfer of `once`, a model that is not decoupled and
returns the same response from execute().
"""

from __future__ import annotations

import argparse
import json
import os
import re
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

BURST = '''
import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()[0])
            sender = request.get_response_sender()
            for i in range(n):
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([i], np.int32))]))
            sender.send(flags=FINAL)
        return None
'''
ONCE = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([0], np.int32))]) for _ in requests]
'''
CONFIG = '''
backend: "python"
max_batch_size: 0
input [ { name: "IN", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] } ]
model_transaction_policy { decoupled: true }
instance_group [ { count: 4, kind: KIND_CPU } ]
'''
LUA = """
wrk.method = "POST"
wrk.body = os.getenv("BODY")
wrk.headers["Content-Type"] = "application/json"
function done(summary, latency, requests)
  io.write(string.format("N %d ERR %d\\n", summary.requests,
           summary.errors.status + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def _repo() -> Path:
    repo = Path(tempfile.mkdtemp()) / "repo"
    (repo / "burst" / "1").mkdir(parents=True)
    (repo / "burst" / "config.pbtxt").write_text(CONFIG)
    (repo / "burst" / "1" / "model.py").write_text(BURST)
    (repo / "once" / "1").mkdir(parents=True)
    (repo / "once" / "config.pbtxt").write_text(CONFIG.replace("model_transaction_policy { decoupled: true }\n", ""))
    (repo / "once" / "1" / "model.py").write_text(ONCE)
    return repo


def _grpc_body(n: int, folder: Path, model: str = "burst") -> Path:
    sys.path.insert(0, str(ROOT))
    from server._proto import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="IN", datatype="INT32", shape=[1])
    req.raw_input_contents.append(np.array([n], np.int32).tobytes())
    msg = req.SerializeToString()
    path = folder / f"{model}-{n}.bin"
    path.write_bytes(struct.pack(">BI", 0, len(msg)) + msg)
    return path


def grpc_rate(port: int, body: Path, streams: int, seconds: int, n: int) -> float:
    out = subprocess.run(["taskset", "-c", "0", "h2load", "-c1", f"-m{streams}", f"-D{seconds}", "-d", str(body),
                          "-H", "content-type: application/grpc", "-H", "te: trailers",
                          f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelStreamInfer"],
                         capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    found = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", out)
    if found is None:
        raise SystemExit(f"h2load gave no result:\n{out}")
    return int(found.group(3)) * n / seconds


def p50_us(port: int, body: Path, method: str, seconds: int, folder: Path) -> float:
    """One call at a time: the median of h2load's per-call times (microseconds)."""
    log = folder / "calls.log"
    subprocess.run(["taskset", "-c", "0", "h2load", "-c1", "-m1", f"-D{seconds}", "-d", str(body),
                    "-H", "content-type: application/grpc", "-H", "te: trailers", "--log-file", str(log),
                    f"http://127.0.0.1:{port}/inference.GRPCInferenceService/{method}"],
                   capture_output=True, check=True, timeout=seconds + 60)
    times = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line)
    return float(times[len(times) // 2])


def http_rate(port: int, streams: int, seconds: int, n: int, lua: Path) -> float:
    out = subprocess.run(["taskset", "-c", "0", "wrk", "-t1", f"-c{streams}", f"-d{seconds}s", "-s", str(lua),
                          f"http://127.0.0.1:{port}/v2/models/burst/generate_stream"],
                         env={**os.environ, "BODY": json.dumps({"IN": n})}, capture_output=True, text=True,
                         check=True, timeout=seconds + 60).stdout
    found = re.search(r"N (\d+) ERR (\d+)", out)
    if found is None or int(found.group(2)):
        raise SystemExit(f"wrk failed or saw errors:\n{out}")
    return int(found.group(1)) * n / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--responses", type=int, default=100)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    folder = Path(tempfile.mkdtemp())
    lua = folder / "count.lua"
    lua.write_text(LUA)
    body = _grpc_body(a.responses, folder)
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
        grpc_rate(grpc_port, body, a.streams, 1, a.responses)  # warm-up
        http_rate(http_port, a.streams, 1, a.responses, lua)
        for r in range(a.rounds):
            g = grpc_rate(grpc_port, body, a.streams, a.seconds, a.responses)
            h = http_rate(http_port, a.streams, a.seconds, a.responses, lua)
            print(f"round {r + 1}: {a.streams} streams, {a.responses} responses per request: gRPC ModelStreamInfer "
                  f"{g:,.0f} responses/s, HTTP /generate_stream {h:,.0f} responses/s", flush=True)
        one, unary = _grpc_body(1, folder), _grpc_body(0, folder, "once")
        for r in range(a.rounds):
            s = p50_us(grpc_port, one, "ModelStreamInfer", a.seconds // 2 or 1, folder)
            u = p50_us(grpc_port, unary, "ModelInfer", a.seconds // 2 or 1, folder)
            print(f"round {r + 1}: one call at a time, p50: a stream request answered once {s:.0f} us, a unary "
                  f"ModelInfer {u:.0f} us ({s - u:+.0f} us)", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
