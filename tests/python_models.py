"""Small Triton Python models (our own, in the shapes of Triton's python_backend examples) for the
end-to-end tests: written into a repository as `<name>/config.pbtxt` + `<name>/1/model.py`."""

from __future__ import annotations

from pathlib import Path

# add_sub as Triton's example has it: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1, plus
# BATCH: how many requests execute() got in the call that answered this one.
ADD_SUB = '''
import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.args = args
        config = json.loads(args["model_config"])
        self.dtype = pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(config, "OUTPUT0")["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            n = np.full((a.shape[0], 1), len(requests), dtype=np.int32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT0", (a + b).astype(self.dtype)),
                pb_utils.Tensor("OUTPUT1", (a - b).astype(self.dtype)),
                pb_utils.Tensor("BATCH", n)]))
        return responses
'''
ADD_SUB_CONFIG = '''
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 4 ] }, { name: "INPUT1", data_type: TYPE_FP32, dims: [ 4 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 4 ] }, { name: "OUTPUT1", data_type: TYPE_FP32, dims: [ 4 ] },
         { name: "BATCH", data_type: TYPE_INT32, dims: [ 1 ] } ]
dynamic_batching { max_queue_delay_microseconds: 200000 }
instance_group [ { count: 1, kind: KIND_CPU } ]
'''

# What the model does is chosen by the request: MODE 0 answers, 1-8 return a TritonError (1: no
# code, 2..8: the codes in MODES), 9 raises in execute, 10 calls get_response_sender().
ERRORS = '''
import numpy as np
import triton_python_backend_utils as pb_utils

CODES = [None, None, pb_utils.TritonError.INVALID_ARG, pb_utils.TritonError.NOT_FOUND,
         pb_utils.TritonError.UNAVAILABLE, pb_utils.TritonError.UNSUPPORTED, pb_utils.TritonError.ALREADY_EXISTS,
         pb_utils.TritonError.CANCELLED, pb_utils.TritonError.UNKNOWN]


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            mode = int(pb_utils.get_input_tensor_by_name(request, "MODE").as_numpy().reshape(-1)[0])
            if mode == 9:
                raise ValueError("model.py chose to raise")
            if mode == 10:
                request.get_response_sender()
            if 1 <= mode <= 8:
                code = CODES[mode]
                error = pb_utils.TritonError(f"mode {mode} fails") if code is None else \\
                    pb_utils.TritonError(f"mode {mode} fails", code)
                out.append(pb_utils.InferenceResponse(error=error))
            else:
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([mode * 10], np.int32))]))
        return out
'''
ERRORS_CONFIG = '''
backend: "python"
max_batch_size: 0
input [ { name: "MODE", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] } ]
'''

# Reports what it was given: initialize's args and each request's accessors, as JSON text.
INTROSPECT = '''
import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.args = args
        self.model_dir = pb_utils.get_model_dir()

    def execute(self, requests):
        out = []
        for r in requests:
            info = {"args": self.args, "parameters": r.parameters(), "id": r.request_id(),
                    "correlation_id": r.correlation_id(), "flags": r.flags(),
                    "requested": sorted(r.requested_output_names()), "cancelled": r.is_cancelled(),
                    "model_dir": self.model_dir}
            text = np.array([json.dumps(info).encode()], dtype=object)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("INFO", text),
                                                   pb_utils.Tensor("ECHO", r.inputs()[0].as_numpy())]))
        return out
'''
INTROSPECT_CONFIG = '''
backend: "python"
max_batch_size: 0
input [ { name: "TEXT", data_type: TYPE_STRING, dims: [ -1 ] } ]
output [ { name: "INFO", data_type: TYPE_STRING, dims: [ 1 ] }, { name: "ECHO", data_type: TYPE_STRING, dims: [ -1 ] } ]
'''

# No config.pbtxt: auto_complete_config declares everything, as Triton's auto_complete example does.
AUTO = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        auto_complete_model_config.add_input({"name": "X", "data_type": "TYPE_FP32", "dims": [3]})
        auto_complete_model_config.add_output({"name": "Y", "data_type": "TYPE_FP32", "dims": [3]})
        auto_complete_model_config.set_max_batch_size(4)
        auto_complete_model_config.set_dynamic_batching()
        return auto_complete_model_config

    async def execute(self, requests):  # async def execute, as Triton allows
        import asyncio
        await asyncio.sleep(0)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X")
                                                            .as_numpy() * 2)]) for r in requests]
'''

INIT_FAILS = '''
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("init boom")

    def execute(self, requests):
        return []
'''

# Finalize leaves a mark on disk, so a test can see it was called on unload.
FINALIZE = '''
import os
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.mark = os.path.join(args["model_repository"], "finalized")

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([1], np.int32))]) for _ in requests]

    def finalize(self):
        with open(self.mark, "w") as f:
            f.write("yes")
'''
ONE_INT_CONFIG = '''
backend: "python"
max_batch_size: 0
input [ { name: "N", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] } ]
'''

# BLS: calls `pyadd` (sync exec), or the model named by TARGET with its error passed on as text.
BLS = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            target = pb_utils.get_input_tensor_by_name(request, "TARGET").as_numpy().reshape(-1)[0].decode()
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            call = pb_utils.InferenceRequest(
                model_name=target, requested_output_names=["OUTPUT0"],
                inputs=[pb_utils.Tensor("INPUT0", x), pb_utils.Tensor("INPUT1", x)])
            response = call.exec()
            if response.has_error():
                text = f"{int(response.error().code())}|{response.error().message()}"
                out.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("ERROR", np.array([text.encode()], dtype=object)),
                    pb_utils.Tensor("Y", np.zeros_like(x))]))
                continue
            y = pb_utils.get_output_tensor_by_name(response, "OUTPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", y),
                                                   pb_utils.Tensor("ERROR", np.array([b""], dtype=object))]))
        return out
'''
BLS_CONFIG = '''
backend: "python"
max_batch_size: 0
input [ { name: "TARGET", data_type: TYPE_STRING, dims: [ 1 ] }, { name: "X", data_type: TYPE_FP32, dims: [ 1, 4 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ 1, 4 ] }, { name: "ERROR", data_type: TYPE_STRING, dims: [ 1 ] } ]
'''

# Counts down through BLS calls to `CALLEE` (itself, or its partner): OUT = N. One instance each,
# so every call finds the callee's only instance held by a caller that waits (lending.py).
COUNTDOWN = '''
import numpy as np
import triton_python_backend_utils as pb_utils

CALLEE = "{callee}"


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy().reshape(-1)[0])
            if n <= 0:
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([0], np.int32))]))
                continue
            call = pb_utils.InferenceRequest(model_name=CALLEE, requested_output_names=["OUT"],
                                             inputs=[pb_utils.Tensor("N", np.array([n - 1], np.int32))])
            response = call.exec()
            if response.has_error():
                out.append(pb_utils.InferenceResponse(error=response.error()))
                continue
            below = pb_utils.get_output_tensor_by_name(response, "OUT").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", below + 1)]))
        return out
'''
COUNTDOWN_CONFIG = ONE_INT_CONFIG + 'instance_group [ { count: 1, kind: KIND_CPU } ]\n'

# Async BLS: awaits two async_exec calls to pyadd at once.
ASYNC_BLS = '''
import asyncio
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            calls = [pb_utils.InferenceRequest(model_name="pyadd", requested_output_names=[name],
                                               inputs=[pb_utils.Tensor("INPUT0", x), pb_utils.Tensor("INPUT1", x)])
                     .async_exec() for name in ("OUTPUT0", "OUTPUT1")]
            plus, minus = await asyncio.gather(*calls)
            y = pb_utils.get_output_tensor_by_name(plus, "OUTPUT0").as_numpy() + \\
                pb_utils.get_output_tensor_by_name(minus, "OUTPUT1").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", y)]))
        return out
'''
ASYNC_BLS_CONFIG = '''
backend: "python"
max_batch_size: 0
input [ { name: "X", data_type: TYPE_FP32, dims: [ 1, 4 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ 1, 4 ] } ]
'''

# Ensemble steps: INT32 [16] in, INT32 [16] out.
PLUS_ONE = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(r, "IN")
                                                            .as_numpy() + 1)]) for r in requests]
'''
# *2, and an INVALID_ARG error for a request (only that one) with a negative input
TIMES_TWO = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "IN").as_numpy()
            if (x < 0).any():
                out.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("negative input", pb_utils.TritonError.INVALID_ARG)))
            else:
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", x * 2)]))
        return out
'''
STEP_CONFIG = '''
backend: "python"
max_batch_size: 8
input [ { name: "IN", data_type: TYPE_INT32, dims: [ 16 ] } ]
output [ { name: "OUT", data_type: TYPE_INT32, dims: [ 16 ] } ]
dynamic_batching { }
'''

# Python -> ONNX add_sub -> Python: FINAL = 2 * ((A + 1) + B); SUM (the ONNX step's output) is an
# ensemble output too, and also the last step's input.
ENSEMBLE_CONFIG = '''
platform: "ensemble"
max_batch_size: 8
input [ { name: "A", data_type: TYPE_INT32, dims: [ 16 ] }, { name: "B", data_type: TYPE_INT32, dims: [ 16 ] } ]
output [ { name: "FINAL", data_type: TYPE_INT32, dims: [ 16 ] }, { name: "SUM", data_type: TYPE_INT32, dims: [ 16 ] } ]
ensemble_scheduling {
  step [
    { model_name: "plus_one" model_version: -1
      input_map { key: "IN" value: "A" } output_map { key: "OUT" value: "A1" } },
    { model_name: "add_sub" model_version: -1
      input_map { key: "INPUT0" value: "A1" } input_map { key: "INPUT1" value: "B" }
      output_map { key: "OUTPUT0" value: "SUM" } },
    { model_name: "times_two" model_version: -1
      input_map { key: "IN" value: "SUM" } output_map { key: "OUT" value: "FINAL" } }
  ]
}
'''


def write(repo: Path, name: str, config: str, source: str | None = None) -> Path:
    folder = repo / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    if config:
        (folder / "config.pbtxt").write_text(config)
    if source is not None:
        (folder / "1" / "model.py").write_text(source)
    return folder


# Decoupled (model_transaction_policy { decoupled: true }): one response per value of IN (OUT: the
# value, IDX: its index), then a flag-only final. Request parameters steer it:
#   "mode": "thread"  sends from a thread after execute() has returned;
#   "raise"           execute() raises;
#   "error_at": k     an error response (ending the request) instead of the k-th;
#   "delay_ms"        a sleep between responses;
#   "mark"            a file written (with the index reached) once is_cancelled() turns true;
#   "progress"        a file replaced, every 100 responses, with the number sent so far.
REPEAT = '''
import json
import os
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            params = json.loads(request.parameters())
            if params.get("raise"):
                raise RuntimeError("asked to raise")
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            sender = request.get_response_sender()
            if params.get("mode") == "thread":
                threading.Thread(target=self._send, args=(sender, values, params), daemon=True).start()
            else:
                self._send(sender, values, params)
        return None

    def _send(self, sender, values, params):
        delay = params.get("delay_ms", 0) / 1000
        for i, v in enumerate(values.tolist()):
            if sender.is_cancelled():
                if params.get("mark"):  # written whole, then renamed: a reader never sees it empty
                    with open(params["mark"] + ".tmp", "w") as f:
                        f.write(str(i))
                    os.replace(params["mark"] + ".tmp", params["mark"])
                return
            if i == params.get("error_at", -1):
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"value {v} refused", pb_utils.TritonError.INVALID_ARG)), flags=FINAL)
                return
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([v], np.int32)),
                                                    pb_utils.Tensor("IDX", np.array([i], np.int32))]))
            if params.get("progress") and (i + 1) % 100 == 0:
                with open(params["progress"] + ".tmp", "w") as f:
                    f.write(str(i + 1))
                os.replace(params["progress"] + ".tmp", params["progress"])
            if delay:
                time.sleep(delay)
        sender.send(flags=FINAL)
'''
REPEAT_CONFIG = '''
backend: "python"
max_batch_size: 0
input [ { name: "IN", data_type: TYPE_INT32, dims: [ -1 ] } ]
output [ { name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] }, { name: "IDX", data_type: TYPE_INT32, dims: [ 1 ] } ]
model_transaction_policy { decoupled: true }
instance_group [ { count: 4, kind: KIND_CPU } ]
'''

# BLS to the decoupled REPEAT: exec(decoupled=True) (or, with the parameter "async",
# async_exec(decoupled=True)) on IN, passing on "error_at"; answers SUM of the OUTs it got, N the
# number of responses (the flag-only final is an empty one), ERROR the last error's message or "".
BLS_REPEAT = '''
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        responses = []
        for request in requests:
            params = json.loads(request.parameters())
            call = pb_utils.InferenceRequest(
                model_name="repeat", inputs=[pb_utils.get_input_tensor_by_name(request, "IN")],
                requested_output_names=["OUT", "IDX"],
                parameters={k: v for k, v in params.items() if k == "error_at"})
            got = await call.async_exec(decoupled=True) if params.get("async") else call.exec(decoupled=True)
            total, n, error = 0, 0, ""
            for r in got:
                n += 1
                if r.has_error():
                    error = r.error().message()
                elif r.output_tensors():
                    total += int(pb_utils.get_output_tensor_by_name(r, "OUT").as_numpy()[0])
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("SUM", np.array([total], np.int32)), pb_utils.Tensor("N", np.array([n], np.int32)),
                pb_utils.Tensor("ERROR", np.array([error.encode()], dtype=object))]))
        return responses
'''
BLS_REPEAT_CONFIG = '''
backend: "python"
max_batch_size: 0
input [ { name: "IN", data_type: TYPE_INT32, dims: [ -1 ] } ]
output [ { name: "SUM", data_type: TYPE_INT32, dims: [ 1 ] }, { name: "N", data_type: TYPE_INT32, dims: [ 1 ] },
         { name: "ERROR", data_type: TYPE_STRING, dims: [ 1 ] } ]
'''

# Returns N * 2**K as a numpy int64 (numpy's default) for its TYPE_INT32 output, K the parameter "k"
# (default 0): it fits for small values and does not past 2**31.
WIDENED = '''
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            n = int(pb_utils.get_input_tensor_by_name(r, "N").as_numpy()[0])
            k = json.loads(r.parameters()).get("k", 0)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([n * 2 ** k]))]))
        return out
'''


# A sequence model in Python (sequence_batching, no implicit state): a running sum of IN per
# correlation ID, kept by the model, started over on START; OUT the sum, BATCH how many requests
# the call got, FLAGS the request's flags(), START/END the control inputs as the model saw them.
SEQUENCE = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.sums = {}

    def execute(self, requests):
        responses = []
        for request in requests:
            cid = request.correlation_id()
            value = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy().reshape(-1)[0])
            start = pb_utils.get_input_tensor_by_name(request, "START").as_numpy()
            end = pb_utils.get_input_tensor_by_name(request, "END").as_numpy()
            if start.reshape(-1)[0]:
                self.sums[cid] = 0
            self.sums[cid] = self.sums.get(cid, 0) + value
            out = [pb_utils.Tensor("OUT", np.array([[self.sums[cid]]], dtype=np.int64)),
                   pb_utils.Tensor("BATCH", np.array([[len(requests)]], dtype=np.int32)),
                   pb_utils.Tensor("FLAGS", np.array([[request.flags()]], dtype=np.int32)),
                   pb_utils.Tensor("START_SEEN", start.astype(np.float32).reshape(1, 1)),
                   pb_utils.Tensor("END_SEEN", end.astype(np.float32).reshape(1, 1))]
            responses.append(pb_utils.InferenceResponse(out))
        return responses
'''

SEQUENCE_CONFIG = '''
backend: "python"
max_batch_size: 4
input [ { name: "IN", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [
  { name: "OUT", data_type: TYPE_INT64, dims: [ 1 ] },
  { name: "BATCH", data_type: TYPE_INT32, dims: [ 1 ] },
  { name: "FLAGS", data_type: TYPE_INT32, dims: [ 1 ] },
  { name: "START_SEEN", data_type: TYPE_FP32, dims: [ 1 ] },
  { name: "END_SEEN", data_type: TYPE_FP32, dims: [ 1 ] }
]
instance_group [ { count: 1, kind: KIND_CPU } ]
sequence_batching {
  max_sequence_idle_microseconds: 300000
  %s
  control_input [
    { name: "START", control [ { kind: CONTROL_SEQUENCE_START, fp32_false_true: [ 0, 1 ] } ] },
    { name: "END", control [ { kind: CONTROL_SEQUENCE_END, bool_false_true: [ false, true ] } ] }
  ]
}
'''


# Triton's example backend `repeat_int32` (src/backends/backend/examples/repeat.cc) as a decoupled
# Python model, for tritonclient's simple_grpc_custom_repeat.py: one response per element of IN
# (OUT: the value, IDX: its index), each after DELAY[i] ms, then the final flag after WAIT ms.
REPEAT_INT32 = '''
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self.repeat, args=(request,), daemon=True).start()
        return None

    def repeat(self, request):
        sender = request.get_response_sender()
        values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
        delays = pb_utils.get_input_tensor_by_name(request, "DELAY").as_numpy()
        wait = pb_utils.get_input_tensor_by_name(request, "WAIT").as_numpy()
        for i, value in enumerate(values):
            time.sleep(float(delays[i]) / 1000)
            sender.send(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUT", np.array([value], dtype=np.int32)),
                pb_utils.Tensor("IDX", np.array([i], dtype=np.uint32))]))
        time.sleep(float(wait[0]) / 1000)
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
'''

REPEAT_INT32_CONFIG = '''
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [
  { name: "IN", data_type: TYPE_INT32, dims: [ -1 ] },
  { name: "DELAY", data_type: TYPE_UINT32, dims: [ -1 ] },
  { name: "WAIT", data_type: TYPE_UINT32, dims: [ 1 ] }
]
output [
  { name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] },
  { name: "IDX", data_type: TYPE_UINT32, dims: [ 1 ] }
]
instance_group [ { count: 1, kind: KIND_CPU } ]
'''
