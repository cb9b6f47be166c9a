"""PyTorch backend (`platform: "pytorch_libtorch"` or `backend: "pytorch"`): TorchScript programs
(`model.pt`) and torch.export programs (`model.pt2`), on CPU or CUDA.

Loading never unpickles arbitrary objects: `model.pt` goes through `torch.jit.load` (TorchScript
archives only) and `model.pt2` through `torch.export.load`. As in Triton's PyTorch backend, the
config must declare the inputs and outputs: inputs are passed to `forward` positionally in the
order the config lists them; the outputs are the returned tensor, the returned tuple/list in
config order, or the returned dict by name.

Config keys:
  instance_group { kind: KIND_GPU gpus: [...] }   CUDA when torch sees a GPU (else CPU, logged);
                                                   one CUDA stream per instance, inputs staged in
                                                   pinned memory and copied without blocking
  parameters { key: "intra_op_thread_count" value: { string_value: "N" } }  torch.set_num_threads
                                                   (process-wide in torch; the last model loaded wins)
  parameters { key: "torch_compile" value: { string_value: "true" } }  torch.compile (torch.export
                                                   programs only; dynamic shapes) at load, with a
                                                   warm-up run on zeros (counted in the load time)
  parameters { key: "fuserve_kernels" ... }       fused kernels on the serving path: see
                                                   server/backends/torch_kernels.py
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import dtypes
from ..errors import BackendError, ModelLoadError
from ..model_config import InstanceSpec, ModelConfig, ModelIO, TensorIO, mc
from ..sequence_config import hidden_names
from .base import Request, RequestResult

log = logging.getLogger(__name__)
# Inputs arrive as read-only views of the request's bytes; the models only read them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

_TORCH_DTYPES = {"BOOL": "bool", "UINT8": "uint8", "INT8": "int8", "INT16": "int16", "INT32": "int32",
                 "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64", "BF16": "bfloat16",
                 "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64"}


def _param(config: ModelConfig, key: str, default: str = "") -> str:
    return config.parameters[key].string_value if key in config.parameters else default


def declared_io(config: ModelConfig, where: str) -> ModelIO:
    """The config's inputs and outputs as the model's own IO (a TorchScript file does not say)."""
    if not config.input or not config.output:
        raise ModelLoadError(f"{where}: a PyTorch model's config must declare its inputs and outputs")
    batch = (-1,) if config.max_batch_size > 0 else ()

    def tensor(t: Any, kind: str) -> TensorIO:
        dtype = dtypes.BY_CONFIG.get(mc.DataType.Name(t.data_type))
        if dtype is None or dtype.v2 not in _TORCH_DTYPES:
            raise ModelLoadError(f"{where}: {kind} '{t.name}' has a datatype the PyTorch backend cannot serve")
        return TensorIO(t.name, dtype, batch + tuple(int(d) for d in t.dims))

    return ModelIO(tuple(tensor(t, "input") for t in config.input), tuple(tensor(t, "output") for t in config.output))


def _positional(declared: list[str], hidden: list[str], where: str) -> list[str]:
    """Declared names then the sequence batcher's, or all by `__<n>` index when every name has one."""
    names = declared + [n for n in hidden if n not in declared]
    suffixes = [n.rpartition("__")[2] for n in names]
    if hidden and all("__" in n and x.isdigit() for n, x in zip(names, suffixes, strict=True)):
        indexes = [int(x) for x in suffixes]
        if sorted(indexes) != list(range(len(names))):
            raise ModelLoadError(f"{where}: the inputs or outputs {', '.join(names)} (with the sequence "
                                 f"batcher's) must be numbered __0 to __{len(names) - 1}, each once")
        return [n for _, n in sorted(zip(indexes, names, strict=True))]
    return names


class TorchInstance:
    executes_requests = False  # one concatenated batch
    inline_ok = True
    def __init__(self, model_path: Path, config: ModelConfig, instance: InstanceSpec) -> None:
        try:
            import torch
        except ImportError:
            raise ModelLoadError(f"{model_path}: the PyTorch backend needs torch, which is not installed "
                                 f"(pip install 'fuserve[torch]')") from None

        self.torch = torch
        where = str(model_path)
        self._io = declared_io(config, where)
        # A sequence model's control and state inputs (and state outputs) are positional arguments
        # (and results) too: after the declared ones, or in the order of their `__<n>` suffixes.
        hidden_in, hidden_out = hidden_names(config)
        self.input_names = _positional([t.name for t in self._io.inputs], list(hidden_in), where)
        self.output_names = _positional([t.name for t in self._io.outputs], list(hidden_out), where)
        threads = _param(config, "intra_op_thread_count")
        if threads.isdigit() and int(threads) > 0:
            torch.set_num_threads(int(threads))
        self.stream: Any = None  # the instance's CUDA stream
        if instance.kind == "KIND_GPU" and torch.cuda.is_available():
            self.torch_device = torch.device("cuda", instance.device_id)
            self.stream = torch.cuda.Stream(self.torch_device)
        else:
            if instance.kind == "KIND_GPU":
                log.warning("model '%s' instance %s asked for a GPU but runs on CPU (torch sees no CUDA device)",
                            config.name, instance.name)
            self.torch_device = torch.device("cpu")
        self.module = _load_module(model_path, self.torch_device)
        from .torch_kernels import wrap_with_kernels

        self.module = wrap_with_kernels(self.module, config, self.torch_device, where)
        self._check = getattr(self.module, "check_inputs", None)  # the kernels' path's value check
        if _param(config, "torch_compile").lower() in ("1", "true", "yes"):
            if model_path.suffix != ".pt2":
                raise ModelLoadError(f"{where}: torch_compile needs a torch.export program (model.pt2), "
                                     f"not TorchScript")
            self.module = torch.compile(self.module, dynamic=True)  # one graph for every batch size
            self._warm_up(config)

    def _warm_up(self, config: ModelConfig) -> None:
        if len(self.input_names) != len(self._io.inputs):
            return  # a sequence model: its first request compiles the graph
        feeds = {}
        for t in self._io.inputs:
            shape = tuple(1 if d < 0 else d for d in t.shape)
            feeds[t.name] = np.zeros(shape, dtype=t.dtype.numpy)
        self.execute(feeds, self.output_names)

    @property
    def io(self) -> ModelIO:
        return self._io

    def check_inputs(self, feeds: Mapping[str, np.ndarray]) -> None:
        """The kernels' path's check of input values (token ids within the vocabulary), when it has one."""
        if self._check is not None:
            self._check(feeds)

    def execute_requests(self, requests: Sequence[Request]) -> list[RequestResult]:
        raise NotImplementedError("PyTorch instances execute one concatenated batch")

    @property
    def device(self) -> str:
        """Where it runs: 'cpu' or 'cuda:N'."""
        return str(self.torch_device)

    def execute(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            if self.stream is None:
                args = [_to_torch(inputs[name]) for name in self.input_names]
                result = self.module(*args)
                named = self._name(result)
                return {name: _to_numpy(named[name]) for name in outputs}
            with torch.cuda.stream(self.stream):
                args = [_to_torch(inputs[name]).pin_memory().to(self.torch_device, non_blocking=True)
                        for name in self.input_names]
                named = self._name(self.module(*args))
                host = {name: named[name].to("cpu", non_blocking=True) for name in outputs}
            self.stream.synchronize()
            return {name: _to_numpy(t) for name, t in host.items()}

    def _name(self, result: Any) -> dict[str, Any]:
        torch = self.torch
        if isinstance(result, torch.Tensor):
            result = (result,)
        if isinstance(result, dict):
            missing = [n for n in self.output_names if n not in result]
            if missing:
                raise BackendError(f"the model returned no output named {', '.join(missing)} "
                                   f"(it returned {', '.join(map(str, result))})")
            return result
        if not isinstance(result, (tuple, list)) or len(result) < len(self.output_names):
            raise BackendError(f"the model returned {type(result).__name__} of {len(result)} value(s); "
                               f"the config declares {len(self.output_names)} output(s)")
        return dict(zip(self.output_names, result, strict=False))

    def close(self) -> None:
        del self.module


def _load_module(path: Path, device: Any) -> Any:
    import torch

    try:
        if path.suffix == ".pt2":
            module = torch.export.load(str(path)).module()
            return module.to(device)
        module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # a bad file raises many unrelated types
        kind = "a torch.export program (.pt2)" if path.suffix == ".pt2" else "a TorchScript archive"
        raise ModelLoadError(f"{path}: cannot load {kind}: {type(exc).__name__}: {exc}") from exc
    module.eval()
    return module


def _to_torch(arr: np.ndarray) -> Any:
    import torch

    if arr.dtype == dtypes.BY_V2["BF16"].numpy:
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(dtypes.BY_V2["BF16"].numpy)
    return t.numpy()


class TorchBackendFactory:
    name = "pytorch"
    model_filename = "model.pt"
    alternative_filenames = ("model.pt2",)

    @functools.cache  # noqa: B019 (one factory per process)
    def gpu_count(self) -> int:
        try:
            import torch

            return int(torch.cuda.device_count())
        except Exception:
            return 0

    def complete_config(self, model_path: Path, config: ModelConfig, where: str) -> ModelConfig:
        return config  # auto-complete reads the program's inputs and outputs (model_config.autocomplete)

    def create_instance(self, model_path: Path, config: ModelConfig, instance: InstanceSpec) -> TorchInstance:
        return TorchInstance(model_path, config, instance)


FACTORY = TorchBackendFactory()
