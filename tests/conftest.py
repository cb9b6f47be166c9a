"""Shared fixtures: a real `fuserve serve` process on free ports, and a test model repository."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import model_builders as mb
import pytest

ROOT = Path(__file__).resolve().parents[1]

# tests/kernels run the Triton kernels in Triton's interpreter where there is no GPU. The variable
# must be set before anything imports triton (torch may, while other tests' modules are collected),
# so here; a GPU machine compiles them for real unless told otherwise.
os.environ.setdefault("TRITON_INTERPRET", "0" if Path("/dev/nvidiactl").exists() else "1")


def wait_until(condition, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll `condition()` until it is true; fail the test (never hang) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)


def settled_count(path, still: float = 1.5, timeout: float = 60.0) -> int:
    """The count a model keeps rewriting in `path` (tests/python_models.py REPEAT's "progress"),
    once it has not changed for `still` seconds; fail the test after `timeout` seconds."""
    seen, quiet = -1, 0.0
    deadline = time.monotonic() + timeout
    while quiet < still:
        if time.monotonic() > deadline:
            raise AssertionError(f"the count in {path} kept changing for {timeout}s (last {seen})")
        time.sleep(0.25)
        now = int(path.read_text())
        quiet = quiet + 0.25 if now == seen else 0.0
        seen = now
    return seen


def model_stats(server, model: str) -> dict:
    """The statistics extension's entry for `model` (its one loaded version)."""
    status, _, body = server.request("GET", f"/v2/models/{model}/stats")
    assert status == 200, body
    return json.loads(body)["model_stats"][0]


async def cancel_queued_grpc_call(server, model: str) -> None:
    """Send one request to an echo_slow `model` over gRPC, wait until it is queued, cancel the call
    (HTTP/2 RST_STREAM) and, with the connection still open, wait until the server counts it as
    cancelled. The caller keeps the model's instance busy so that the request queues."""
    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    before = model_stats(server, model)["fuserve_cancelled"]
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, cols in (("INPUT", 3), ("WORK", mb.ECHO_WIDTH)):
        request.inputs.add(name=name, datatype="FP32", shape=[1, cols])
        request.raw_input_contents.append(np.ones((1, cols), np.float32).tobytes())
    async with grpc.aio.insecure_channel(server.grpc_url) as channel:
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
        for _ in range(500):  # until the request is queued (the loop must run to send it)
            if model_stats(server, model)["fuserve_pending"] > 0:
                break
            await asyncio.sleep(0.02)
        assert model_stats(server, model)["fuserve_pending"] > 0
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        for _ in range(250):  # the connection stays open: the RST_STREAM alone must drop the request
            if model_stats(server, model)["fuserve_cancelled"] > before:
                break
            await asyncio.sleep(0.02)
        assert model_stats(server, model)["fuserve_cancelled"] == before + 1  # before the connection closes


def rss_bytes(pid: int) -> int:
    """A process's resident memory in bytes (VmRSS from /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_env() -> dict[str, str]:
    """The servers run as a user's would: kernels compiled on a GPU, torch fallbacks elsewhere."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


class FuserveProcess:
    """`python -m server serve` on free ports; stop() sends SIGTERM and returns the exit code."""

    def __init__(self, repos: list[Path] | Path, *args: str, log_dir: Path, env: dict | None = None) -> None:
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        repos = [repos] if isinstance(repos, Path) else repos
        cmd = [sys.executable, "-m", "server", "serve", "--http-port", str(self.http_port),
               "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port), *args]
        for r in repos:
            cmd += ["--model-repository", str(r)]
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"fuserve-{self.http_port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (open for the process lifetime)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**_server_env(), "PYTHONUNBUFFERED": "1", **(env or {})})

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def metrics(self) -> dict:
        """GET /metrics, parsed with prometheus-client: family name -> list of samples."""
        from prometheus_client.parser import text_string_to_metric_families

        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=30)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            assert resp.status == 200
            text = resp.read().decode()
        finally:
            conn.close()
        return {f.name: f for f in text_string_to_metric_families(text)}

    def wait_ready(self, timeout: float = 90.0) -> FuserveProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fuserve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.request("GET", "/v2/health/ready")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"fuserve not ready after {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Start a fuserve process; every process started is stopped at the end of the session."""
    started: list[FuserveProcess] = []
    log_dir = tmp_path_factory.mktemp("logs")

    def start(repos, *args: str, wait: bool = True, env: dict | None = None) -> FuserveProcess:
        p = FuserveProcess(repos, *args, log_dir=log_dir, env=env)
        started.append(p)
        return p.wait_ready() if wait else p

    yield start
    for p in started:
        p.stop()


@pytest.fixture(scope="session")
def test_repo(tmp_path_factory) -> Path:
    """The repository the shared server serves: bundled models plus small test models."""
    repo = tmp_path_factory.mktemp("repo")
    mb.generated(repo, "add_sub")
    mb.generated(repo, "add_sub_string")
    for v2 in mb.ONNX_TYPES:  # no config.pbtxt: auto-complete
        mb.identity(repo / f"identity_{v2.lower()}" / "1" / "model.onnx", v2)
    for v in (1, 2, 3):
        mb.add_constant(repo / "versioned" / str(v) / "model.onnx", float(v))
        mb.add_constant(repo / "latest_only" / str(v) / "model.onnx", float(v))
    mb.write_config(repo / "versioned", 'platform: "onnxruntime_onnx"\nmax_batch_size: 4\n'
                                        "version_policy: { all: {} }\n")
    mb.add_constant(repo / "no_batch" / "1" / "model.onnx", 10.0, batch=False)
    mb.write_config(repo / "no_batch", 'backend: "onnxruntime"\nmax_batch_size: 0\n')
    mb.write_config(repo / "broken_config", "name: \"broken_config\"\nmax_batch_size: [oops\n")
    (repo / "broken_onnx" / "1").mkdir(parents=True)
    (repo / "broken_onnx" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    mb.write_config(repo / "broken_onnx", 'platform: "onnxruntime_onnx"\n')
    return repo


@pytest.fixture(scope="session")
def server(start_server, test_repo) -> FuserveProcess:
    """One shared server over `test_repo` (model control mode none) for read-only tests."""
    return start_server(test_repo)
