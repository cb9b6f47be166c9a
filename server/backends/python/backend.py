"""PythonBackend (the factory) and PythonInstance (one TritonPythonModel object); see __init__.py."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import inspect
import itertools
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ... import dtypes
from ...errors import BackendError, ModelError, ModelLoadError
from ...model_config import (
    InstanceSpec,
    ModelConfig,
    ModelIO,
    TensorIO,
    config_to_json,
    mc,
    parse_config_json,
    refuse_unimplemented,
)
from ..base import Instance, Request, RequestResult
from . import pb_utils
from .pb_model_config import _auto_complete
from .response_sender import InferenceResponseSender

log = logging.getLogger(__name__)

_loads = itertools.count()  # each import of a model.py gets its own module name
def _import(path: Path, tag: str) -> ModuleType:
    """Import `path` under a module name of its own. Its directory is on sys.path (at the end, so
    it shadows nothing) only while it is imported, for the sibling modules it imports."""
    name = f"_fuserve_model_{next(_loads)}_{''.join(c if c.isalnum() else '_' for c in tag)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    added = folder not in sys.path
    if added:
        sys.path.append(folder)
    sys.modules[name] = module  # dataclasses and pickle look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        log.exception("importing %s failed", path)
        raise ModelLoadError(f"{path}: cannot import the model: {type(exc).__name__}: {exc}") from exc
    finally:
        if added:
            sys.path.remove(folder)
    return module


def _model_class(module: ModuleType, path: Path) -> type:
    cls = getattr(module, "TritonPythonModel", None)
    if not isinstance(cls, type):
        raise ModelLoadError(f"{path}: defines no class TritonPythonModel")
    if not callable(getattr(cls, "execute", None)):
        raise ModelLoadError(f"{path}: TritonPythonModel has no execute method")
    return cls


def _io(config: ModelConfig) -> ModelIO:
    """A Python model declares its tensors only in its config: that is its "model file's" view."""
    batch = (-1,) if config.max_batch_size > 0 else ()

    def tensors(entries: Sequence[Any]) -> tuple[TensorIO, ...]:
        out = []
        for e in entries:
            dtype = dtypes.BY_CONFIG.get(mc.DataType.Name(e.data_type))
            if dtype is not None:
                out.append(TensorIO(e.name, dtype, batch + tuple(int(d) for d in e.dims)))
        return tuple(out)

    return ModelIO(tensors(config.input), tensors(config.output))


class PythonInstance:
    executes_requests = True  # execute() gets the batched requests themselves
    inline_ok = False  # user code may block (I/O, BLS): never on the event loop

    def __init__(self, model_path: Path, config: ModelConfig, instance: InstanceSpec) -> None:
        self.name = config.name
        self.where = str(model_path)
        self.version_dir = model_path.parent
        self._module_name = ""
        module = _import(model_path, f"{config.name}_{instance.name}")
        self._module_name = module.__name__
        try:
            self.model = _model_class(module, model_path)()
            args = {
                "model_config": json.dumps(config_to_json(config)),
                "model_instance_kind": "GPU" if instance.kind == "KIND_GPU" else "CPU",
                "model_instance_name": instance.name,
                "model_instance_device_id": str(max(0, instance.device_id)),
                "model_repository": str(model_path.parent.parent),  # the model's own folder, as Triton's
                "model_version": model_path.parent.name,
                "model_name": config.name,
            }
            initialize = getattr(self.model, "initialize", None)
            if initialize is not None:
                with pb_utils._model_dir_scope(self.version_dir):
                    try:
                        initialize(args)
                    except Exception as exc:
                        log.exception("model '%s': initialize() failed", config.name)
                        raise ModelLoadError(f"{model_path}: initialize() failed: {type(exc).__name__}: {exc}") \
                            from exc
        except BaseException:
            sys.modules.pop(self._module_name, None)
            raise
        self._async = inspect.iscoroutinefunction(self.model.execute)
        self._loop = asyncio.new_event_loop() if self._async else None  # the instance's own
        self._io = _io(config)
        self._dtypes = {t.name: t.dtype for t in self._io.outputs}
        self._device = "GPU" if instance.kind == "KIND_GPU" else "CPU"
        self._decoupled = config.model_transaction_policy.decoupled

    @property
    def io(self) -> ModelIO:
        return self._io

    @property
    def device(self) -> str:
        return self._device

    def check_inputs(self, feeds: Mapping[str, np.ndarray]) -> None:
        """A Python model checks its own inputs in execute()."""

    def execute(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError("Python models execute requests (execute_requests)")

    def execute_requests(self, requests: Sequence[Request]) -> list[RequestResult | None]:
        incoming = [pb_utils.InferenceRequest._incoming(
            [_tensor(name, arr) for name, arr in r.inputs.items()], r.outputs, r.id, r.correlation_id,
            json.dumps(r.parameters, separators=(",", ":")) if r.parameters else "{}", r.flags, r.is_cancelled,
            model_name=self.name) for r in requests]
        if self._decoupled:
            for r, req in zip(requests, incoming, strict=True):
                if r.respond is None:
                    raise BackendError(f"model '{self.name}' is decoupled: its requests need a response sink")
                req._sender = InferenceResponseSender(functools.partial(self._result, r), r.respond, r.is_cancelled)
        with pb_utils._model_dir_scope(self.version_dir):
            try:
                if self._loop is not None:
                    responses = self._loop.run_until_complete(self.model.execute(incoming))
                else:
                    responses = self.model.execute(incoming)
            except Exception as exc:
                log.exception("model '%s': execute() raised", self.name)
                raise BackendError(f"Failed to process the request(s) for model '{self.name}', message: "
                                   f"{type(exc).__name__}: {exc}") from exc
        if self._decoupled:
            if responses is not None and any(x is not None for x in responses):
                raise BackendError(f"Failed to process the request(s) for model '{self.name}', message: a "
                                   f"decoupled model's execute() must return None; it answers through "
                                   f"request.get_response_sender()")
            return [None] * len(requests)
        if not isinstance(responses, list | tuple):
            raise BackendError(f"Failed to process the request(s) for model '{self.name}', message: Expected a "
                               f"list in the execute return, found type '{type(responses)}'.")
        if len(responses) != len(requests):
            raise BackendError(f"Failed to process the request(s) for model '{self.name}', message: Number of "
                               f"InferenceResponse objects do not match the number of InferenceRequest objects. "
                               f"InferenceRequest(s) size is:{len(requests)}, and InferenceResponse(s) size "
                               f"is:{len(responses)}")
        return [self._result(r, response) for r, response in zip(requests, responses, strict=True)]

    def _result(self, request: Request, response: Any) -> RequestResult:
        if not isinstance(response, pb_utils.InferenceResponse):
            return BackendError(f"model '{self.name}': expected an 'InferenceResponse' object in the execute "
                                f"function return list, found type '{type(response)}'")
        error = response._error
        if error is not None:
            return ModelError(error.message(), int(error.code()))
        produced = {t._name: t._array for t in response._outputs}
        out: dict[str, np.ndarray] = {}
        for name in request.outputs:
            arr = produced.get(name)
            if arr is None:
                return BackendError(f"model '{self.name}' returned no output '{name}' (it returned: "
                                    f"{', '.join(produced) or 'none'})")
            want = self._dtypes.get(name)
            if want is dtypes.BYTES:
                if arr.dtype != object:
                    arr = pb_utils._bytes_object_array(arr)
            elif want is not None and arr.dtype is not want.numpy and arr.dtype != want.numpy:  # `is`: fast, usual
                cast = _as_declared(arr, want.numpy)
                if cast is None:
                    return BackendError(f"model '{self.name}' returned output '{name}' as {arr.dtype}, which does "
                                        f"not convert to its config's {want.config} without changing a value")
                arr = cast
            out[name] = arr
        return out

    def close(self) -> None:
        finalize = getattr(self.model, "finalize", None)
        if finalize is not None:
            with pb_utils._model_dir_scope(self.version_dir):
                try:
                    finalize()
                except Exception:
                    log.exception("model '%s': finalize() raised", self.name)
        if self._loop is not None:
            self._loop.close()
        sys.modules.pop(self._module_name, None)


def _as_declared(arr: np.ndarray, want: np.dtype) -> np.ndarray | None:
    """An output in its config's datatype when it only differs in width or kind within numbers (a
    model's `np.array([0])` is int64 for a TYPE_INT32 output, `np.array([0.5])` float64 for
    TYPE_FP32; Triton's examples rely on it): integers must keep their values; floats are
    rounded to the declared precision. None when it cannot be (a string for a number, an int64
    that does not fit in INT32). Triton would return the array's own type, against the model's
    metadata; fuserve answers with the type the metadata declares."""
    if not np.can_cast(arr.dtype, want, casting="same_kind") and not (arr.dtype.kind in "iub" and
                                                                        want.kind in "iu"):
        return None
    cast = arr.astype(want)
    if want.kind in "iub" and not np.array_equal(cast, arr):
        return None
    return cast


def _tensor(name: str, arr: np.ndarray) -> pb_utils.Tensor:
    """An input as pb_utils.Tensor without the constructor's checks (the service made them)."""
    t = pb_utils.Tensor.__new__(pb_utils.Tensor)
    t._name, t._array, t._dtype = name, arr, pb_utils._dtype_code(arr.dtype)
    return t


class PythonBackend:
    name = "python"
    model_filename = "model.py"
    alternative_filenames: tuple[str, ...] = ()

    def gpu_count(self) -> int:
        return 0  # a Python model picks its own device; its instances are reported as CPU

    def complete_config(self, model_path: Path, config: ModelConfig, where: str) -> ModelConfig:
        """`TritonPythonModel.auto_complete_config`, when the class has it, completes the config
        before any instance exists (on a throwaway import of the module, as Triton's stub does)."""
        module = _import(model_path, f"{config.name}_autocomplete")
        try:
            cls = _model_class(module, model_path)
            if getattr(cls, "auto_complete_config", None) is None:
                return config
            with pb_utils._model_dir_scope(model_path.parent):
                try:
                    done = _auto_complete(cls, config_to_json(config), config.name)
                except Exception as exc:
                    raise ModelLoadError(f"{model_path}: auto_complete_config() failed: {type(exc).__name__}: "
                                         f"{exc}") from exc
        finally:
            sys.modules.pop(module.__name__, None)
        completed = parse_config_json(json.dumps(done), f"{where} (as auto_complete_config left it)")
        completed.name = config.name
        refuse_unimplemented(completed, f"{where} (as auto_complete_config left it)")
        return completed

    def create_instance(self, model_path: Path, config: ModelConfig, instance: InstanceSpec) -> Instance:
        from .isolated import IsolatedInstance, wanted  # isolated.py imports this module
        return (IsolatedInstance if wanted(config) else PythonInstance)(model_path, config, instance)


FACTORY = PythonBackend()
