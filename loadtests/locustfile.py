"""Locust users for fuserve: KServe V2 JSON, V2 binary (HTTP) and gRPC, each reply checked; and
streams: HTTP /generate_stream and gRPC ModelStreamInfer.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000                 # web UI on :8089
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 32 -r 8 -t 60s

Environment:
    FUSERVE_MODEL      model to drive (default add_sub); any model works: each user reads the
                       model's metadata and sends one row of deterministic data of the right
                       shapes and datatypes
    FUSERVE_GRPC       host:port of the gRPC endpoint (default: the --host's host, port 8001)

Every reply is checked: status 200, each output present with batch size 1, and for `add_sub`
(Triton's `simple`) the sums and differences themselves. A wrong reply counts as a failure.

The stream users (`GenerateStreamUser`, `GrpcStreamUser`) work with any model, decoupled (many
responses per request) or not (one). Each request is reported three ways: `<kind>` (the whole
request, first byte to final), `<kind> first` (time to the first response) and `<kind> response`
(one entry per response, its time since the previous one: its rate is the response rate).
"""

from __future__ import annotations

import json
import os
import struct
import time
from urllib.parse import urlparse

import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import FastHttpUser, HttpUser, User, constant, events, task

grpc_gevent.init_gevent()  # grpcio must cooperate with Locust's gevent loop

import tritonclient.grpc as grpcclient  # noqa: E402  (after init_gevent)

MODEL = os.environ.get("FUSERVE_MODEL", "add_sub")


@events.quit.add_listener
def _exit_now(exit_code: int, **_kwargs: object) -> None:
    """Everything is reported by now: exit without the interpreter's shutdown, in which grpcio's
    gevent threads can (rarely, under load) block it for good (seen once in ~40 runs here)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
_NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64}


def one_row(metadata: dict) -> dict[str, np.ndarray]:
    """Deterministic inputs of batch 1 for the model's inputs (variable dims become 4)."""
    rng = np.random.default_rng(0)
    out = {}
    for t in metadata["inputs"]:
        shape = [1] + [int(d) if int(d) > 0 else 4 for d in t["shape"][1:]]
        if t["datatype"] == "BYTES":
            out[t["name"]] = np.array([str(i).encode() for i in range(int(np.prod(shape)))],
                                      dtype=object).reshape(shape)
        else:
            out[t["name"]] = (rng.integers(0, 16, shape)).astype(_NUMPY[t["datatype"]])
    return out


def check(metadata: dict, outputs: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> str | None:
    """None when the reply is right, else what is wrong."""
    for t in metadata["outputs"]:
        arr = outputs.get(t["name"])
        if arr is None or arr.shape[0] != 1:
            return f"output {t['name']} missing or not batch 1"
    if MODEL == "add_sub":
        a, b = inputs["INPUT0"], inputs["INPUT1"]
        if not (np.array_equal(outputs["OUTPUT0"], a + b) and np.array_equal(outputs["OUTPUT1"], a - b)):
            return "wrong sum or difference"
    return None


def _bytes_blob(arr: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in arr.reshape(-1))


def _from_binary(datatype: str, shape: list[int], blob: bytes) -> np.ndarray:
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(blob):
            (n,) = struct.unpack_from("<I", blob, pos)
            items.append(blob[pos + 4:pos + 4 + n])
            pos += 4 + n
        return np.array(items, dtype=object).reshape(shape)
    return np.frombuffer(blob, dtype=_NUMPY[datatype]).reshape(shape)


class _V2Http(FastHttpUser):
    abstract = True
    wait_time = constant(0)

    def on_start(self) -> None:
        with self.client.get(f"/v2/models/{MODEL}", name="metadata", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"metadata: HTTP {r.status_code}")
                self.stop()
                return
            self.metadata = json.loads(r.content)
        self.inputs = one_row(self.metadata)


class V2JsonUser(_V2Http):
    """V2 JSON tensors in and out."""

    def on_start(self) -> None:
        super().on_start()
        self.body = json.dumps({"inputs": [
            {"name": n, "datatype": t["datatype"], "shape": list(a.shape),
             "data": [x.decode() if isinstance(x, bytes) else x for x in a.reshape(-1).tolist()]}
            for (n, a), t in zip(self.inputs.items(), self.metadata["inputs"], strict=True)]}).encode()

    @task
    def infer(self) -> None:
        with self.client.post(f"/v2/models/{MODEL}/infer", data=self.body, name="v2-json",
                              headers={"Content-Type": "application/json"}, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            reply = json.loads(r.content)
            outs = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in reply["outputs"]}
            problem = check(self.metadata, outs, self.inputs)
            if problem:
                r.failure(problem)


class V2BinaryUser(_V2Http):
    """The binary tensor data extension both ways (what tritonclient.http sends by default)."""

    def on_start(self) -> None:
        super().on_start()
        blobs = [_bytes_blob(a) if a.dtype == object else a.tobytes() for a in self.inputs.values()]
        header = json.dumps({
            "inputs": [{"name": n, "datatype": t["datatype"], "shape": list(a.shape),
                        "parameters": {"binary_data_size": len(b)}}
                       for (n, a), t, b in zip(self.inputs.items(), self.metadata["inputs"], blobs, strict=True)],
            "outputs": [{"name": t["name"], "parameters": {"binary_data": True}} for t in self.metadata["outputs"]],
        }).encode()
        self.body = header + b"".join(blobs)
        self.headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}

    @task
    def infer(self) -> None:
        with self.client.post(f"/v2/models/{MODEL}/infer", data=self.body, name="v2-binary", headers=self.headers,
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            hl = int(r.headers["Inference-Header-Content-Length"])
            reply, pos, outs = json.loads(r.content[:hl]), hl, {}
            for o in reply["outputs"]:
                size = o["parameters"]["binary_data_size"]
                outs[o["name"]] = _from_binary(o["datatype"], o["shape"], r.content[pos:pos + size])
                pos += size
            problem = check(self.metadata, outs, self.inputs)
            if problem:
                r.failure(problem)


def _grpc_setup(user: User) -> None:
    """A tritonclient.grpc client, the model's metadata and one row of inputs for it, on `user`."""
    host = urlparse(user.host or "http://127.0.0.1:8000").hostname or "127.0.0.1"
    user.client = grpcclient.InferenceServerClient(os.environ.get("FUSERVE_GRPC", f"{host}:8001"))
    user.metadata = user.client.get_model_metadata(MODEL, as_json=True)
    user.inputs = one_row(user.metadata)
    user.grpc_inputs = []
    for (name, arr), t in zip(user.inputs.items(), user.metadata["inputs"], strict=True):
        i = grpcclient.InferInput(name, list(arr.shape), t["datatype"])
        i.set_data_from_numpy(arr)
        user.grpc_inputs.append(i)


class GrpcUser(User):
    """KServe V2 gRPC through tritonclient.grpc, reported to Locust as request type 'grpc'."""

    wait_time = constant(0)

    def on_start(self) -> None:
        _grpc_setup(self)

    def on_stop(self) -> None:
        self.client.close()

    @task
    def infer(self) -> None:
        start = time.perf_counter()
        exception: Exception | None = None
        length = 0
        try:
            result = self.client.infer(MODEL, self.grpc_inputs)
            outs = {t["name"]: result.as_numpy(t["name"]) for t in self.metadata["outputs"]}
            length = sum(o.nbytes for o in outs.values() if o is not None)
            problem = check(self.metadata, outs, self.inputs)
            if problem:
                exception = AssertionError(problem)
        except Exception as exc:
            exception = exc
        self.environment.events.request.fire(request_type="grpc", name="grpc", response_length=length,
                                             response_time=(time.perf_counter() - start) * 1000,
                                             exception=exception, context={})


def _fire(user: User, kind: str, name: str, seconds: float, exception: Exception | None = None) -> None:
    user.environment.events.request.fire(request_type=kind, name=name, response_length=0,
                                         response_time=seconds * 1000, exception=exception, context={})


class GenerateStreamUser(HttpUser):
    """The generate extension's server-sent events, read as they arrive."""

    wait_time = constant(0)

    def on_start(self) -> None:
        r = self.client.get(f"/v2/models/{MODEL}", name="metadata")
        self.metadata = r.json()
        self.inputs = one_row(self.metadata)
        config = self.client.get(f"/v2/models/{MODEL}/config", name="config").json()
        batching = config.get("max_batch_size", 0) > 0
        self.body = json.dumps({n: [x.decode() if isinstance(x, bytes) else x for x in
                                    (a[0] if batching else a).reshape(-1).tolist()]
                                for n, a in self.inputs.items()})

    @task
    def stream(self) -> None:
        start = last = time.perf_counter()
        exception: Exception | None = None
        events = 0
        try:
            with self.client.post(f"/v2/models/{MODEL}/generate_stream", data=self.body, stream=True,
                                  headers={"Content-Type": "application/json"}, name="generate_stream http",
                                  catch_response=True) as r:
                if r.status_code != 200:
                    raise AssertionError(f"HTTP {r.status_code}: {r.text[:200]}")
                for line in r.iter_lines():
                    if not line:
                        continue
                    now = time.perf_counter()
                    doc = json.loads(line[len(b"data: "):])
                    if "error" in doc:
                        raise AssertionError(doc["error"])
                    if MODEL == "add_sub":
                        a, b = self.inputs["INPUT0"][0], self.inputs["INPUT1"][0]
                        if doc["OUTPUT0"] != (a + b).tolist() or doc["OUTPUT1"] != (a - b).tolist():
                            raise AssertionError("wrong sum or difference")
                    _fire(self, "sse", "generate_stream first" if not events else "generate_stream response",
                          now - (start if not events else last))
                    events, last = events + 1, now
                r.success()
        except Exception as exc:
            exception = exc
        _fire(self, "sse", "generate_stream", time.perf_counter() - start, exception)


class GrpcStreamUser(User):
    """ModelStreamInfer through tritonclient's stream: one request at a time, until its final."""

    wait_time = constant(0)

    def on_start(self) -> None:
        import queue

        _grpc_setup(self)
        self.decoupled = self.client.get_model_config(MODEL, as_json=True)["config"].get(
            "model_transaction_policy", {}).get("decoupled", False)
        self.replies: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.replies.put((result, error)))

    def on_stop(self) -> None:
        self.client.stop_stream()
        self.client.close()

    @task
    def stream(self) -> None:
        start = last = time.perf_counter()
        exception: Exception | None = None
        responses = 0
        try:
            self.client.async_stream_infer(MODEL, self.grpc_inputs, enable_empty_final_response=self.decoupled)
            while True:
                result, error = self.replies.get(timeout=60)
                if error is not None:
                    raise error
                now = time.perf_counter()
                final = result.get_response().parameters.get("triton_final_response")
                if result.get_response().outputs:
                    _fire(self, "grpc-stream", "grpc-stream first" if not responses else "grpc-stream response",
                          now - (start if not responses else last))
                    responses, last = responses + 1, now
                if not self.decoupled or (final is not None and final.bool_param):
                    break
        except Exception as exc:
            exception = exc
        _fire(self, "grpc-stream", "grpc-stream", time.perf_counter() - start, exception)
