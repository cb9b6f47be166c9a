"""deploy/test-image.sh's checks against the running container (ports and names from the
environment): ready, add_sub over HTTP and gRPC with tritonclient, metrics, and SIGTERM with
requests in flight (each answered, exit code 0). Prints the image size and start-to-ready time.
Every wait is bounded."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

HTTP, GRPC, METRICS = (int(os.environ[k]) for k in ("FUSERVE_HTTP", "FUSERVE_GRPC", "FUSERVE_METRICS"))
CONTAINER = os.environ["FUSERVE_CONTAINER"]


def fail(message: str) -> None:
    print(f"FAIL: {message}")
    sys.exit(1)


def wait_ready(deadline: float) -> float:
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{HTTP}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return time.time()
        except OSError:
            pass
        time.sleep(0.02)
    fail("not ready within 60 s")
    raise AssertionError


def add_sub(lib, client) -> None:
    a, b = np.arange(16, dtype=np.int32).reshape(1, 16), np.full((1, 16), 3, np.int32)
    inputs = [lib.InferInput("INPUT0", [1, 16], "INT32"), lib.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("add_sub", inputs)
    if not (np.array_equal(result.as_numpy("OUTPUT0"), a + b) and np.array_equal(result.as_numpy("OUTPUT1"), a - b)):
        fail(f"add_sub over {lib.__name__} answered wrong")


def main() -> None:
    ready = wait_ready(time.time() + 60)
    start_to_ready = ready - float(os.environ["FUSERVE_T0"])
    add_sub(httpclient, httpclient.InferenceServerClient(f"127.0.0.1:{HTTP}", network_timeout=30))
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{GRPC}")
    add_sub(grpcclient, grpc)
    grpc.close()
    print("ok: ready; add_sub over HTTP and over gRPC")

    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS}/metrics", timeout=10) as r:
        text = r.read().decode()
    if 'nv_inference_request_success{model="add_sub",version="1"} 2' not in text:
        fail("metrics do not count the two add_sub requests")
    print("ok: metrics (nv_inference_request_success counts them)")

    # SIGTERM with 4 requests in flight on the slow model (1 s each): all answered, then exit 0
    answers: list[object] = []

    def slow(i: int) -> None:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{HTTP}", network_timeout=30)
        inp = httpclient.InferInput("IN", [1], "INT32")
        inp.set_data_from_numpy(np.array([i], np.int32))
        try:
            answers.append(int(client.infer("slow", [inp]).as_numpy("OUT")[0]))
        except Exception as exc:  # reported below
            answers.append(exc)

    threads = [threading.Thread(target=slow, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the requests are in (each takes a second)
    subprocess.run(["podman", "--runtime", "runc", "kill", "--signal", "TERM", CONTAINER], check=True,
                   capture_output=True, timeout=30)
    for t in threads:
        t.join(30)
    code = subprocess.run(["podman", "--runtime", "runc", "wait", CONTAINER], capture_output=True, text=True,
                          timeout=60).stdout.strip()
    if sorted(a for a in answers if isinstance(a, int)) != [0, 1, 2, 3]:
        fail(f"requests in flight at SIGTERM were not all answered: {answers}")
    if code != "0":
        fail(f"exit code {code} after SIGTERM")
    print("ok: SIGTERM with 4 requests in flight: all answered, exit 0")
    size = int(os.environ["FUSERVE_IMAGE_SIZE"])
    print(f"image size: {size / 1e6:.0f} MB; start to ready: {start_to_ready:.2f} s")
    print("PASS")


if __name__ == "__main__":
    main()
