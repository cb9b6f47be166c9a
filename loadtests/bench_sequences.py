#!/usr/bin/env python3
"""A sequence model at 64 concurrent sequences against the same model without sequence batching.

    python loadtests/bench_sequences.py [--sequences 64] [--seconds 8] [--rounds 3]

One ONNX model, `accumulate16` (INT32 INPUT and STATE_IN [batch, 16] -> OUTPUT = STATE_OUT =
STATE_IN + INPUT), served twice by one `fuserve serve` pinned to core 1:
- `seq`: sequence_batching with implicit state (the server carries STATE_OUT to the next request's
  STATE_IN), direct strategy, max_batch_size 64, so 64 slots. The sequences are started first (one
  START request each); wrk then sends each connection's requests to ids 1..n in turn.
- `plain`: dynamic_batching, max_batch_size 64; the client sends STATE_IN itself (zeros).
wrk (one thread, `--sequences` connections, V2 JSON) runs from core 0, alternating the two, round
after round. Printed: requests/s of each, their ratio per round, and the median ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loadtests"))
from bench_batching import free_port, http_get, pinned, wait_ready  # noqa: E402

LUA = ROOT / "loadtests" / "wrk_v2.lua"
WIDTH = 16

SEQ_CONFIG = f'''
platform: "onnxruntime_onnx"
max_batch_size: 64
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
input [ {{ name: "INPUT" data_type: TYPE_INT32 dims: [ {WIDTH} ] }} ]
output [ {{ name: "OUTPUT" data_type: TYPE_INT32 dims: [ {WIDTH} ] }} ]
sequence_batching {{
  max_sequence_idle_microseconds: 600000000
  state [ {{ input_name: "STATE_IN" output_name: "STATE_OUT" data_type: TYPE_INT32 dims: [ {WIDTH} ] }} ]
}}
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "1" }} }}
'''

PLAIN_CONFIG = f'''
platform: "onnxruntime_onnx"
max_batch_size: 64
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
input [ {{ name: "INPUT" data_type: TYPE_INT32 dims: [ {WIDTH} ] }},
        {{ name: "STATE_IN" data_type: TYPE_INT32 dims: [ {WIDTH} ] }} ]
output [ {{ name: "OUTPUT" data_type: TYPE_INT32 dims: [ {WIDTH} ] }},
         {{ name: "STATE_OUT" data_type: TYPE_INT32 dims: [ {WIDTH} ] }} ]
dynamic_batching {{ }}
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "1" }} }}
'''


def _model(path: Path) -> None:
    io = [helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", WIDTH]) for n in
          ("INPUT", "STATE_IN", "OUTPUT", "STATE_OUT")]
    nodes = [helper.make_node("Add", ["STATE_IN", "INPUT"], ["OUTPUT"]),
             helper.make_node("Identity", ["OUTPUT"], ["STATE_OUT"])]
    model = helper.make_model(helper.make_graph(nodes, "accumulate16", io[:2], io[2:]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _post(port: int, model: str, body: dict) -> dict:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        doc = json.loads(r.read())
        if r.status != 200:
            raise RuntimeError(f"{model}: {r.status} {doc}")
        return doc
    finally:
        conn.close()


def _wrk(port: int, model: str, body: Path, conns: int, seconds: float, sequences: int | None) -> dict:
    cmd = pinned("0", ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "30s", "-s", str(LUA),
                       f"http://127.0.0.1:{port}/v2/models/{model}/infer"])
    env = {**os.environ, "BODY_FILE": str(body), "MARKER": "OUTPUT", "HDRLEN": ""}
    if sequences:
        env["SEQUENCES"] = str(sequences)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    n = args.sequences
    ones = [1] * WIDTH
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name, config in (("seq", SEQ_CONFIG), ("plain", PLAIN_CONFIG)):
            _model(tmp / "repo" / name / "1" / "model.onnx")
            (tmp / "repo" / name / "config.pbtxt").write_text(config)
        seq_body, plain_body = tmp / "seq.json", tmp / "plain.json"
        seq_body.write_text(json.dumps({"inputs": [{"name": "INPUT", "shape": [1, WIDTH], "datatype": "INT32",
                                                    "data": ones}], "parameters": {"sequence_id": 0}})
                            .replace('"sequence_id": 0', '"sequence_id": SEQUENCE_ID'))
        plain_body.write_text(json.dumps({"inputs": [
            {"name": "INPUT", "shape": [1, WIDTH], "datatype": "INT32", "data": ones},
            {"name": "STATE_IN", "shape": [1, WIDTH], "datatype": "INT32", "data": [0] * WIDTH}]}))
        http_port = free_port()
        server = subprocess.Popen(pinned("1", [sys.executable, "-m", "server", "serve", "--model-repository",
                                               str(tmp / "repo"), "--http-port", str(http_port), "--grpc-port",
                                               str(free_port()), "--metrics-port", str(free_port())]),
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(http_port, server)
            for sid in range(1, n + 1):  # START each sequence; wrk continues them
                _post(http_port, "seq", {"inputs": [{"name": "INPUT", "shape": [1, WIDTH], "datatype": "INT32",
                                                     "data": ones}],
                                         "parameters": {"sequence_id": sid, "sequence_start": True}})
            _wrk(http_port, "seq", seq_body, n, 2, n)  # warm up both
            _wrk(http_port, "plain", plain_body, n, 2, None)
            ratios = []
            for r in range(args.rounds):
                seq = _wrk(http_port, "seq", seq_body, n, args.seconds, n)
                plain = _wrk(http_port, "plain", plain_body, n, args.seconds, None)
                rates = {k: v["ok"] / (v["duration_us"] / 1e6) for k, v in (("seq", seq), ("plain", plain))}
                bad = seq["bad"] + seq["errors"] + plain["bad"] + plain["errors"]
                ratios.append(rates["seq"] / rates["plain"])
                print(f"round {r + 1}: seq {rates['seq']:,.0f} req/s (p50 {seq['p50_us']} us)  plain "
                      f"{rates['plain']:,.0f} req/s (p50 {plain['p50_us']} us)  ratio {ratios[-1]:.2f}"
                      f"{'  BAD REPLIES: ' + str(bad) if bad else ''}")
            # the sums the server carried: each sequence's OUTPUT is its number of requests so far
            check = _post(http_port, "seq", {"inputs": [{"name": "INPUT", "shape": [1, WIDTH], "datatype": "INT32",
                                                         "data": [0] * WIDTH}], "parameters": {"sequence_id": 1}})
            total = int(np.array(check["outputs"][0]["data"])[0])
            print(f"sequence 1 carried its state through {total:,} requests")
            status, body = http_get(http_port, "/v2/models/seq/stats")
            stats = json.loads(body)["model_stats"][0]
            print(f"seq: {stats['inference_count']:,} inferences in {stats['execution_count']:,} executions")
            print(f"median ratio seq/plain: {statistics.median(ratios):.2f} (target: at least 0.80)")
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
