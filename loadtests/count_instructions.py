#!/usr/bin/env python3
"""Instructions per gRPC call, before and after a change: a figure that noise cannot move.

    python loadtests/count_instructions.py --trees OLD_TREE NEW_TREE [--target floor|add_sub]

Wall-clock figures on a shared 2-core machine swing by 30% from one run to the next; the number
of instructions a server executes per call does not. Each tree's server runs under valgrind's
callgrind twice, answering h2load's lone stream (one connection, one call at a time) for `--small`
and then `--large` calls; the difference of the two totals over the difference of the counts is
the per-call cost, start-up and shutdown cancelling out. `floor` is the canned-reply transport of
`transport_floors.py ours-grpc`; `add_sub` is `fuserve serve` with add_sub (dynamic batching, one
onnxruntime thread); `py_add_sub` is the same model run by onnxruntime inside a Python model
(execute() concatenates the batch, runs it once and splits it, as the peers harness's model.py does).
`--concurrency N` keeps N calls outstanding (h2load: up to 8 connections, the rest as streams), so
the Python-model and batching paths are counted with full batches. Needs valgrind and h2load;
takes a few minutes (valgrind is ~50x slower).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loadtests"))
from bench_grpc_floor import _free_port, _request_file  # noqa: E402

CONFIG = """name: "add_sub"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ { name: "INPUT0", data_type: TYPE_INT32, dims: [ 16 ] },
        { name: "INPUT1", data_type: TYPE_INT32, dims: [ 16 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_INT32, dims: [ 16 ] },
         { name: "OUTPUT1", data_type: TYPE_INT32, dims: [ 16 ] } ]
dynamic_batching { }
instance_group [ { count: 1, kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""


PY_MODEL = """import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(args["model_repository"] + "/1/model.onnx", so,
                                         providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.sess.get_inputs()]
        self.outs = [o.name for o in self.sess.get_outputs()]

    def execute(self, requests):
        if len(requests) == 1:  # as the peers harness's model.py: a lone request is not concatenated
            r = requests[0]
            results = self.sess.run(self.outs, {n: pb_utils.get_input_tensor_by_name(r, n).as_numpy()
                                                for n in self.names})
            return [pb_utils.InferenceResponse([pb_utils.Tensor(n, a) for n, a in zip(self.outs, results)])]
        per = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.names] for r in requests]
        rows = [p[0].shape[0] for p in per]
        feeds = {n: np.concatenate([p[i] for p in per]) for i, n in enumerate(self.names)}
        results = self.sess.run(self.outs, feeds)
        bounds = np.cumsum(rows)[:-1]
        split = [np.split(r, bounds) for r in results]
        return [pb_utils.InferenceResponse([pb_utils.Tensor(n, split[j][i]) for j, n in enumerate(self.outs)])
                for i in range(len(requests))]
"""


def _repository(target: str) -> Path:
    repo = Path(tempfile.mkdtemp()) / "repo"
    (repo / "add_sub" / "1").mkdir(parents=True)
    config = CONFIG
    if target == "py_add_sub":
        config = config.replace('platform: "onnxruntime_onnx"', 'backend: "python"').replace(
            'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n', "")
        (repo / "add_sub" / "1" / "model.py").write_text(PY_MODEL)
    (repo / "add_sub" / "config.pbtxt").write_text(config)
    (repo / "add_sub" / "1" / "model.onnx").write_bytes((ROOT / "model_repo/add_sub/1/model.onnx").read_bytes())
    return repo


def _wait_ready(target: str, port: int, http_port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            if target == "floor":
                import socket
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            else:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1)
            return
        except OSError:
            time.sleep(1)
    raise SystemExit("the server under valgrind did not become ready in time")


def total(tree: Path, target: str, calls: int, body: Path, repo: Path, concurrency: int = 1) -> int:
    port, http_port, metrics_port = _free_port(), _free_port(), _free_port()
    out = Path(tempfile.mkdtemp()) / "callgrind.out"
    if target == "floor":
        cmd = [sys.executable, str(tree / "loadtests/transport_floors.py"), "ours-grpc", str(port)]
    else:
        cmd = [sys.executable, "-m", "server", "serve", "--model-repository", str(repo), "--grpc-port", str(port),
               "--http-port", str(http_port), "--metrics-port", str(metrics_port)]
    server = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd], cwd=tree,
                              env={**os.environ, "PYTHONPATH": str(tree)}, stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(target, port, http_port, time.monotonic() + 300)
        conns = min(concurrency, 8)
        subprocess.run(["h2load", "-n", str(calls), "-c", str(conns), "-m", str(-(-concurrency // conns)),
                        f"--data={body}",
                        "-H", "content-type: application/grpc", "-H", "te: trailers",
                        f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"],
                       check=True, capture_output=True, timeout=600)
    finally:
        server.send_signal(signal.SIGINT if target == "floor" else signal.SIGTERM)
        try:
            _, err = server.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    found = re.search(r"Collected : (\d+)", err)
    if found is None:
        raise SystemExit(f"no callgrind total for {tree}:\n{err[-2000:]}")
    return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", nargs="+", type=Path, required=True)
    ap.add_argument("--target", choices=("floor", "add_sub", "py_add_sub"), default="floor")
    ap.add_argument("--small", type=int, default=500)
    ap.add_argument("--large", type=int, default=2500)
    ap.add_argument("--concurrency", type=int, default=1, help="calls outstanding at once (default 1)")
    args = ap.parse_args()
    body, repo = _request_file(), _repository(args.target)
    for tree in args.trees:
        tree = tree.resolve()
        small = total(tree, args.target, args.small, body, repo, args.concurrency)
        large = total(tree, args.target, args.large, body, repo, args.concurrency)
        print(f"{tree}: {(large - small) / (args.large - args.small):,.0f} instructions per {args.target} call")


if __name__ == "__main__":
    main()
