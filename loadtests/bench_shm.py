#!/usr/bin/env python3
"""Large tensors: a 64 MiB FP32 identity request through system shared memory, against the same
request as V2 binary over HTTP and over gRPC, at 1 and 8 concurrent.

    python loadtests/bench_shm.py [--mib 64] [--seconds 6] [--rounds 1]

One `fuserve serve --allow-client-shm=true` pinned to core 1 serves two identity models, FP32 [-1]
-> [-1]: `identity` on ONNX Runtime (whose Identity copies the input into an output it allocates)
and `identity_py`, a Python model returning its input array. tritonclient runs on core 0, one
thread per concurrent request. Through shared
memory each thread has its own input and output region, the request names them (a few hundred
bytes on the wire) and the server reads the input from the mapping and writes the output into it;
binary HTTP and gRPC carry both tensors in the request and the reply. Printed: GB/s, counting the
input tensor's bytes (64 MiB a request) per second, the median latency, the server's CPU time per
request (from /proc: what the server spends, whatever the client costs), and any failed requests.
The server holds up to 1 GiB of replies for a connection (--grpc-max-held-reply-bytes; by default 4
MiB, past which it refuses new streams until the client reads), so 8 concurrent 64 MiB gRPC calls
on one connection are not refused.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import onnx
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loadtests"))
from bench_grpc_floor import _free_port  # noqa: E402


def _repo(folder: Path) -> Path:
    x = helper.make_tensor_value_info("IN", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("OUT", TensorProto.FLOAT, ["n"])
    graph = helper.make_graph([helper.make_node("Identity", ["IN"], ["OUT"])], "identity", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (folder / "identity" / "1").mkdir(parents=True)
    onnx.save(model, str(folder / "identity" / "1" / "model.onnx"))
    (folder / "identity" / "config.pbtxt").write_text(
        'platform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        'input [ { name: "IN", data_type: TYPE_FP32, dims: [ -1 ] } ]\n'
        'output [ { name: "OUT", data_type: TYPE_FP32, dims: [ -1 ] } ]\n'
        'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n')
    (folder / "identity_py" / "1").mkdir(parents=True)
    (folder / "identity_py" / "1" / "model.py").write_text(IDENTITY_PY)
    (folder / "identity_py" / "config.pbtxt").write_text(
        'backend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "IN", data_type: TYPE_FP32, dims: [ -1 ] } ]\n'
        'output [ { name: "OUT", data_type: TYPE_FP32, dims: [ -1 ] } ]\n')
    return folder


IDENTITY_PY = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(r, "IN")
                                                           .as_numpy())]) for r in requests]
'''


class Server:
    def __init__(self, repo: Path) -> None:
        self.http, self.grpc, metrics = _free_port(), _free_port(), _free_port()
        self.proc = subprocess.Popen(
            ["taskset", "-c", "1", sys.executable, "-m", "server", "serve", "--model-repository", str(repo),
             "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(metrics),
             "--allow-client-shm=true", "--max-input-size", str(160 << 20), "--allow-metrics", "false",
             "--grpc-max-held-reply-bytes", str(1 << 30)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("fuserve did not become ready")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _shm_worker(server: Server, model: str, protocol: str, data: np.ndarray, stop: float, times: list[float]) -> None:
    lib = httpclient if protocol == "http" else grpcclient
    url = f"127.0.0.1:{server.http if protocol == 'http' else server.grpc}"
    client = (httpclient.InferenceServerClient(url, network_timeout=120) if protocol == "http"
              else grpcclient.InferenceServerClient(url))
    tag = uuid.uuid4().hex[:8]
    size = data.nbytes
    i_h = shm.create_shared_memory_region(f"in_{tag}", f"/bench_in_{tag}", size)
    o_h = shm.create_shared_memory_region(f"out_{tag}", f"/bench_out_{tag}", size)
    try:
        shm.set_shared_memory_region(i_h, [data])
        client.register_system_shared_memory(f"in_{tag}", f"/bench_in_{tag}", size)
        client.register_system_shared_memory(f"out_{tag}", f"/bench_out_{tag}", size)
        inp = lib.InferInput("IN", [data.size], "FP32")
        inp.set_shared_memory(f"in_{tag}", size)
        out = lib.InferRequestedOutput("OUT")
        out.set_shared_memory(f"out_{tag}", size)
        first = True
        while time.monotonic() < stop:
            t = time.perf_counter()
            client.infer(model, [inp], outputs=[out])
            times.append(time.perf_counter() - t)
            if first:  # the output really is in the region
                assert shm.get_contents_as_numpy(o_h, np.float32, [data.size])[-1] == data[-1]
                first = False
        client.unregister_system_shared_memory(f"in_{tag}")
        client.unregister_system_shared_memory(f"out_{tag}")
    finally:
        client.close()
        shm.destroy_shared_memory_region(i_h)
        shm.destroy_shared_memory_region(o_h)


def _wire_worker(server: Server, model: str, protocol: str, data: np.ndarray, stop: float, times: list[float]) -> None:
    if protocol == "http":
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}", network_timeout=120)
        inp = httpclient.InferInput("IN", [data.size], "FP32")
        inp.set_data_from_numpy(data, binary_data=True)
        outputs = [httpclient.InferRequestedOutput("OUT", binary_data=True)]
    else:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
        inp = grpcclient.InferInput("IN", [data.size], "FP32")
        inp.set_data_from_numpy(data)
        outputs = [grpcclient.InferRequestedOutput("OUT")]
    try:
        first = True
        while time.monotonic() < stop:
            t = time.perf_counter()
            result = client.infer(model, [inp], outputs=outputs)
            times.append(time.perf_counter() - t)
            if first:
                assert result.as_numpy("OUT")[-1] == data[-1]
                first = False
    finally:
        client.close()


def run(server: Server, model: str, mode: str, concurrency: int, data: np.ndarray,
        seconds: float) -> tuple[float, float, float]:
    kind, protocol = mode.split("-")
    worker = _shm_worker if kind == "shm" else _wire_worker
    times: list[float] = []
    failed: list[BaseException] = []

    def loop() -> None:
        while time.monotonic() < stop:
            try:
                worker(server, model, protocol, data, stop, times)
            except Exception as exc:  # counted and printed: the benchmark goes on
                failed.append(exc)

    cpu = server.cpu_seconds()
    start = time.monotonic()
    stop = start + seconds
    threads = [threading.Thread(target=loop) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    cpu = server.cpu_seconds() - cpu
    if failed:
        print(f"  {model} {mode} x{concurrency}: {len(failed)} failed, e.g. {failed[0]}", flush=True)
    p50 = statistics.median(times) * 1e3 if times else float("nan")
    return len(times) * data.nbytes / elapsed / 1e9, p50, cpu / max(len(times), 1) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    os.sched_setaffinity(0, {0})
    data = np.random.default_rng(0).standard_normal(args.mib << 18).astype(np.float32)  # MiB * 2**20 / 4
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(_repo(Path(tmp)))
        try:
            print(f"{args.mib} MiB FP32 identity, server on core 1, clients on core 0; GB/s of input tensor, "
                  f"p50 latency, server CPU per request")
            for rnd in range(args.rounds):
                for model in ("identity", "identity_py"):
                    for concurrency in (1, 8):
                        row = []
                        for mode in ("shm-http", "shm-grpc", "binary-http", "binary-grpc"):
                            rate, p50, cpu = run(server, model, mode, concurrency, data, args.seconds)
                            row.append(f"{mode} {rate:5.2f} GB/s (p50 {p50:6.1f} ms, server {cpu:5.1f} ms)")
                        print(f"round {rnd + 1}, {model}, {concurrency} concurrent: " + " | ".join(row), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
