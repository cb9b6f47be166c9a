#!/usr/bin/env python3
"""Text in vs token ids in: minilm_text (sentences, tokenized on the server) against minilm (the same
sentences tokenized beforehand by the client), over HTTP, in alternating rounds.

    python loadtests/bench_minilm_text.py [--seconds 10] [--rounds 2] [--concurrency 1,16]
    python loadtests/bench_minilm_text.py --url 127.0.0.1:8000      # a server already running

Without --url it starts `fuserve serve --model-repository model_repo` pinned to --server-cpu
(default 1) and drives it from --client-cpu (0). Needs the models (python model_repo/generate.py
--models minilm,minilm_tokenize,minilm_text). Each request carries one sentence, taken in turn from
a fixed set of 64 (4 to ~120 tokens, one truncated at 128), as tritonclient sends it: V2 binary
tensors in and out (TEXT: BYTES [1,1]; input_ids, attention_mask: INT64 [1,128]). The client's
tokenizing for minilm happens before the clock starts. Printed per run: requests/s, client
latency p50 / p99, and for minilm_text the tokenizer's mean batch (requests per execute() call) and
server-side time per request of each step, from the statistics extension.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEQ = 128
TEXT = ("the model server batches requests from many clients so that each forward pass of the encoder does more "
        "useful work while latency stays low enough for interactive search over documents written by people in "
        "many languages about cats mats networks kernels and queues")
WORDS = TEXT.split(" ")


def sentences(n: int = 64) -> list[str]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        words = 3 + (i * 37) % 90 if i else 160  # the first one is over 128 tokens: truncated
        out.append(" ".join(rng.choice(WORDS, words)).capitalize() + ".")
    return out


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bodies(texts: list[str]) -> dict[str, list[tuple[bytes, int]]]:
    """Per model, one binary V2 request body (and its JSON header's length) per sentence."""
    import tritonclient.http as httpclient
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ROOT / "model_repo" / "minilm_tokenize" / "1" / "tokenizer.json"))
    tok.enable_truncation(max_length=SEQ)
    tok.enable_padding(length=SEQ, pad_id=0, pad_token="[PAD]")
    out: dict[str, list[tuple[bytes, int]]] = {"minilm": [], "minilm_text": []}
    wanted = [httpclient.InferRequestedOutput("sentence_embedding", binary_data=True)]
    for text in texts:
        t = httpclient.InferInput("TEXT", [1, 1], "BYTES")
        t.set_data_from_numpy(np.array([[text.encode()]], dtype=object), binary_data=True)
        body, n = httpclient.InferenceServerClient.generate_request_body([t], outputs=wanted)
        out["minilm_text"].append((body, n))
        e = tok.encode(text)
        inputs = []
        for name, values in (("input_ids", e.ids), ("attention_mask", e.attention_mask)):
            i = httpclient.InferInput(name, [1, SEQ], "INT64")
            i.set_data_from_numpy(np.array([values], dtype=np.int64), binary_data=True)
            inputs.append(i)
        body, n = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=wanted)
        out["minilm"].append((body, n))
    return out


def post(conn: http.client.HTTPConnection, model: str, body: bytes, hdr: int) -> bytes:
    conn.request("POST", f"/v2/models/{model}/infer", body=body,
                 headers={"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(hdr)})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"{model}: HTTP {resp.status}: {data[:300]!r}")
    n = int(resp.getheader("Inference-Header-Content-Length"))
    if len(data) - n != 384 * 4:
        raise RuntimeError(f"{model}: {len(data) - n} bytes of embedding, expected {384 * 4}")
    return data[n:]


def stats(host: str, port: int, model: str) -> tuple[int, int, int]:
    """(successful requests, their total ns, execute() calls)."""
    with urllib.request.urlopen(f"http://{host}:{port}/v2/models/{model}/stats", timeout=10) as r:
        s = json.loads(r.read())["model_stats"][0]
    return int(s["inference_stats"]["success"]["count"]), int(s["inference_stats"]["success"]["ns"]), \
        int(s["execution_count"])


def run(host: str, port: int, model: str, requests: list[tuple[bytes, int]], concurrency: int,
        seconds: float) -> tuple[int, list[float]]:
    stop = time.monotonic() + seconds
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        i = k
        try:
            while time.monotonic() < stop:
                body, hdr = requests[i % len(requests)]
                t0 = time.perf_counter()
                post(conn, model, body, hdr)
                lat[k].append(time.perf_counter() - t0)
                i += concurrency
        except BaseException as exc:  # reported after the run
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    flat = [x for per in lat for x in per]
    return len(flat), flat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--url", help="host:port of a running server (default: start one on model_repo)")
    ap.add_argument("--server-cpu", default="1", help="taskset -c list for the server it starts")
    ap.add_argument("--client-cpu", default="0", help="CPUs for this load generator ('' to leave as is)")
    args = ap.parse_args()
    texts = sentences()
    reqs = bodies(texts)
    server = None
    if args.url:
        host, port = args.url.rsplit(":", 1)[0], int(args.url.rsplit(":", 1)[1])
    else:
        host, port = "127.0.0.1", _free_port()
        cmd = [sys.executable, "-m", "server", "serve", "--model-repository", str(ROOT / "model_repo"),
               "--http-port", str(port), "--grpc-port", str(_free_port()), "--metrics-port", str(_free_port())]
        if args.server_cpu:
            cmd = ["taskset", "-c", args.server_cpu, *cmd]
        server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    if args.client_cpu:
        os.sched_setaffinity(0, {int(c) for c in args.client_cpu.split(",")})
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://{host}:{port}/v2/health/ready", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or (server is not None and server.poll() is not None):
                    raise SystemExit("the server did not become ready") from None
                time.sleep(0.2)
        # the two paths answer the same: each sentence's embeddings agree
        conn = http.client.HTTPConnection(host, port, timeout=60)
        worst = 1.0
        for (tb, tn), (ib, i_n) in zip(reqs["minilm_text"], reqs["minilm"], strict=True):
            a = np.frombuffer(post(conn, "minilm_text", tb, tn), np.float32)
            b = np.frombuffer(post(conn, "minilm", ib, i_n), np.float32)
            worst = min(worst, float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
        conn.close()
        print(f"{len(texts)} sentences; minilm_text vs minilm on each: worst cosine {worst:.7f}", flush=True)
        conc = [int(c) for c in args.concurrency.split(",")]
        for c in conc:  # warm-up
            for model in ("minilm", "minilm_text"):
                run(host, port, model, reqs[model], c, 1.0)
        table: dict[tuple[str, int], list[float]] = {}
        for n in range(1, args.rounds + 1):
            for c in conc:
                for model in ("minilm", "minilm_text"):
                    steps = ("minilm_text", "minilm_tokenize", "minilm")
                    before = {s: stats(host, port, s) for s in steps}
                    count, lat = run(host, port, model, reqs[model], c, args.seconds)
                    after = {s: stats(host, port, s) for s in steps}
                    rate = count / args.seconds
                    table.setdefault((model, c), []).append(rate)
                    p50, p99 = np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3
                    line = f"round {n} c={c:<2} {model:<11} {rate:7.1f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms"
                    if model == "minilm_text":
                        d = {s: tuple(x - y for x, y in zip(after[s], before[s], strict=True)) for s in steps}
                        tk, mm = d["minilm_tokenize"], d["minilm"]
                        line += (f"  | tokenizer: {tk[0] / max(1, tk[2]):.2f} requests per execute,"
                                 f" {tk[1] / max(1, tk[0]) / 1e3:.0f} us/request; minilm step"
                                 f" {mm[1] / max(1, mm[0]) / 1e3:.0f} us/request")
                    print(line, flush=True)
        print("mean req/s:", flush=True)
        for c in conc:
            ids, text = np.mean(table[("minilm", c)]), np.mean(table[("minilm_text", c)])
            print(f"  c={c:<2} minilm (ids) {ids:7.1f}   minilm_text (sentences) {text:7.1f}"
                  f"   ratio text/ids {text / ids:.3f}", flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
