"""ONNX Runtime backend: one InferenceSession per model instance.

Config keys honoured (the same as Triton's onnxruntime backend):
  parameters { key: "intra_op_thread_count" value: { string_value: "N" } }   (0: ORT's default)
  parameters { key: "inter_op_thread_count" value: { string_value: "N" } }
  parameters { key: "execution_mode" ... "0" sequential (default) | "1" parallel }
  optimization { graph { level: -1 | 0 | 1 } }   -1 basic, 1 extended, 0/absent all optimizations
  optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" } ] } }
  instance_group { kind: KIND_GPU gpus: [...] }  CUDA (and TensorRT when asked) where available.

A GPU instance on a machine where CUDA cannot be used runs on CPU; the log says so, and the
providers actually in use (`session.get_providers()`, not the ones merely installed) are what the
instance reports as its device.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .. import dtypes
from ..errors import InvalidArgument, ModelLoadError
from ..model_config import InstanceSpec, ModelConfig, ModelIO, TensorIO
from .base import Request, RequestResult

log = logging.getLogger(__name__)

_ONNX_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16

_GRAPH_LEVELS = {
    -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


def _int_param(config: ModelConfig, key: str, default: int) -> int:
    if key not in config.parameters:
        return default
    raw = config.parameters[key].string_value
    try:
        return int(raw)
    except ValueError:
        raise ModelLoadError(f"model '{config.name}': parameter {key} must be an integer, got '{raw}'") from None


def _session_options(config: ModelConfig) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = _int_param(config, "intra_op_thread_count", 0)
    so.inter_op_num_threads = _int_param(config, "inter_op_thread_count", 0)
    if _int_param(config, "execution_mode", 0) == 1:
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    level = config.optimization.graph.level if config.HasField("optimization") else 0
    so.graph_optimization_level = _GRAPH_LEVELS.get(level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    so.log_severity_level = 3
    return so


def _providers(config: ModelConfig, instance: InstanceSpec) -> list:
    available = set(ort.get_available_providers())
    if instance.kind != "KIND_GPU" or "CUDAExecutionProvider" not in available:
        return ["CPUExecutionProvider"]
    providers: list = []
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    if any(a.name == "tensorrt" for a in accelerators) and "TensorrtExecutionProvider" in available:
        providers.append(("TensorrtExecutionProvider", {"device_id": instance.device_id}))
    providers.append(("CUDAExecutionProvider", {"device_id": instance.device_id}))
    providers.append("CPUExecutionProvider")
    return providers


def _tensor_io(arg: ort.NodeArg, where: str) -> TensorIO:
    dtype = dtypes.BY_ONNX.get(arg.type)
    if dtype is None:
        raise ModelLoadError(f"{where}: tensor '{arg.name}' has type {arg.type}, which fuserve cannot serve")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return TensorIO(arg.name, dtype, shape)


def _to_ort_strings(name: str, arr: np.ndarray) -> np.ndarray:
    # ONNX string tensors are UTF-8 text: onnxruntime wants `str` objects, not `bytes`.
    try:
        flat = [b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in arr.reshape(-1)]
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"input '{name}': BYTES elements must be UTF-8 text for this ONNX model: {exc}") from None
    return np.array(flat, dtype=object).reshape(arr.shape)


class OrtInstance:
    executes_requests = False  # one concatenated batch
    inline_ok = True

    def __init__(self, model_path: Path, config: ModelConfig, instance: InstanceSpec) -> None:
        requested = _providers(config, instance)
        try:
            self.session = ort.InferenceSession(str(model_path), _session_options(config), providers=requested)
        except Exception as exc:  # onnxruntime raises several unrelated types for a bad file
            raise ModelLoadError(f"{model_path}: onnxruntime could not load the model: {exc}") from exc
        used = self.session.get_providers()
        if instance.kind == "KIND_GPU" and "CUDAExecutionProvider" not in used:
            log.warning("model '%s' instance %s asked for a GPU but runs on %s (CUDA is not usable here)",
                        config.name, instance.name, used[0])
        self._device = used[0] + (f":{instance.device_id}" if used[0] != "CPUExecutionProvider" else "")
        where = str(model_path)
        self._io = ModelIO(
            tuple(_tensor_io(a, where) for a in self.session.get_inputs()),
            tuple(_tensor_io(a, where) for a in self.session.get_outputs()),
        )
        self._string_inputs = frozenset(t.name for t in self._io.inputs if t.dtype is dtypes.BYTES)
        self._string_outputs = frozenset(t.name for t in self._io.outputs if t.dtype is dtypes.BYTES)
        bf16 = dtypes.BY_V2["BF16"]
        self._bf16 = any(t.dtype is bf16 for t in self._io.inputs + self._io.outputs)

    @property
    def io(self) -> ModelIO:
        return self._io

    @property
    def device(self) -> str:
        return self._device

    def check_inputs(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Nothing beyond the service's checks against the config."""

    def execute_requests(self, requests: Sequence[Request]) -> list[RequestResult]:
        raise NotImplementedError("onnxruntime instances execute one concatenated batch")

    def execute(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        feeds = dict(inputs)
        for name in self._string_inputs.intersection(feeds):
            feeds[name] = _to_ort_strings(name, feeds[name])
        results = self._run_bf16(feeds, outputs) if self._bf16 else self.session.run(list(outputs), feeds)
        out = dict(zip(outputs, results, strict=True))
        for name in self._string_outputs.intersection(out):
            arr = out[name]
            out[name] = np.array([s.encode("utf-8") for s in arr.reshape(-1)], dtype=object).reshape(arr.shape)
        return out

    def _run_bf16(self, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        # onnxruntime's numpy bridge has no bfloat16: pass such tensors as OrtValues of raw uint16.
        values = {}
        for name, arr in feeds.items():
            if arr.dtype == dtypes.BY_V2["BF16"].numpy:
                values[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                    np.ascontiguousarray(arr).view(np.uint16), _ONNX_BFLOAT16)
            else:
                values[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))
        results = []
        for value in self.session.run_with_ort_values(list(outputs), values):
            if value.data_type() == "tensor(bfloat16)":
                shape = tuple(value.shape())
                raw = ctypes.string_at(value.data_ptr(), 2 * int(np.prod(shape)))
                results.append(np.frombuffer(raw, np.uint16).view(dtypes.BY_V2["BF16"].numpy).reshape(shape))
            else:
                results.append(value.numpy())
        return results

    def close(self) -> None:
        del self.session


def _gpu_count() -> int:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return 0
    try:  # onnxruntime-gpu lists CUDA even on machines without a GPU: ask the driver.
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


class OrtBackendFactory:
    name = "onnxruntime"
    model_filename = "model.onnx"
    alternative_filenames: tuple[str, ...] = ()

    @functools.cache  # noqa: B019 (one factory per process)
    def gpu_count(self) -> int:
        return _gpu_count()

    def complete_config(self, model_path: Path, config: ModelConfig, where: str) -> ModelConfig:
        return config  # auto-complete reads the session's inputs and outputs (model_config.autocomplete)

    def create_instance(self, model_path: Path, config: ModelConfig, instance: InstanceSpec) -> OrtInstance:
        return OrtInstance(model_path, config, instance)


FACTORY = OrtBackendFactory()
