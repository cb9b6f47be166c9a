"""fuserve's `triton_python_backend_utils`: what Triton Python models import as `pb_utils`.

Models written for Triton 2.51 (python_backend r24.10) must run unchanged, so names, constructor
keywords and defaults, return types and error messages follow Triton's pybind11 bindings
(`src/pb_stub.cc`) and its pure-python utils. Unlike Triton's stub process this runs in the server's
process: tensors are numpy arrays held without copying, and BLS calls go through a bridge the server
installs (`set_bridge`). The server imports this as `server.backends.python.pb_utils` and aliases
it in `sys.modules` as `triton_python_backend_utils` (it uses a relative import: do not load it by path).

Where fuserve differs, by choice:
- Tensors are always CPU numpy arrays: `is_cpu()` is True, `PreferredMemory` is accepted and ignored,
  `from_dlpack` of a CUDA tensor raises `TritonModelException`.
- BF16: `as_numpy()` returns the `ml_dtypes.bfloat16` array (Triton raises); `to_dlpack` /
  `from_dlpack` of BF16 raise, numpy has no bfloat16 DLPack.
- `to_dlpack()` of a read-only array returns a versioned ("dltensor_versioned") capsule, numpy's only
  zero-copy export of read-only memory; writable arrays give Triton's legacy "dltensor" capsule.
- Decoupled: a decoupled model's requests have `get_response_sender()` (response_sender.py); other
  models' raise `TritonModelException`. `exec(decoupled=True)` / `async_exec(decoupled=True)` give
  an iterator over the callee's responses, gathered until its final.
- Custom metrics (`MetricFamily(...)`) and model control (`load_model`, `unload_model`,
  `is_model_ready`) raise `TritonModelException`; `MetricFamily.COUNTER/GAUGE/HISTOGRAM` exist.
- `set_release_flags` is only recorded (`request._release_flags`); rescheduling is the server's call.
- `InferenceRequest(parameters=...)` also takes a JSON object string (Triton: dict only);
  `InferenceResponse(parameters=...)` (Triton r25.02+) is accepted.
- `serialize_byte_tensor` of an empty array returns b"" (Triton: an empty tuple), and numpy.bytes_
  elements of an object array are written as bytes (Triton writes their str()).
- Like pybind11's std::string, names and messages also take UTF-8 bytes (a name read from a BYTES input).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Protocol

import numpy as np

from .pb_model_config import _NUMPY_TO_CODE
from .pb_model_config import TRITON_STRING_TO_NUMPY as TRITON_STRING_TO_NUMPY
from .pb_model_config import ModelConfig as ModelConfig
from .pb_model_config import deserialize_bytes_tensor as deserialize_bytes_tensor
from .pb_model_config import get_input_config_by_name as get_input_config_by_name
from .pb_model_config import get_output_config_by_name as get_output_config_by_name
from .pb_model_config import numpy_to_triton_type as numpy_to_triton_type
from .pb_model_config import serialize_byte_tensor as serialize_byte_tensor
from .pb_model_config import triton_string_to_numpy as triton_string_to_numpy
from .pb_model_config import triton_to_numpy_type as triton_to_numpy_type
from .pb_model_config import using_decoupled_model_transaction_policy as using_decoupled_model_transaction_policy

TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2


class TritonModelException(Exception):
    """Raised for misuse of this API; a model raises it to fail a call (Triton's name)."""


_BYTES = 13
_BF16 = 14


def _dtype_code(dtype: np.dtype) -> int:
    code = _NUMPY_TO_CODE.get(dtype.type)
    if code is not None:
        return code
    if dtype.name == "bfloat16":  # ml_dtypes.bfloat16, what fuserve decodes BF16 inputs into
        return _BF16
    raise TritonModelException(
        f"NumPy dtype is not supported. (got {dtype}; BYTES tensors need dtype=object or numpy.bytes_)"
    )


def _text(value: Any, what: str) -> str:
    """A std::string argument as pybind11 takes it: str, or bytes as UTF-8 (so the bytes a BYTES
    tensor yields, e.g. a model name read from an input, work as they do on Triton)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise TypeError(f"{what} must be a str or UTF-8 bytes, got {value!r}") from None
    raise TypeError(f"{what} must be a str, got {type(value)}")


# ---- errors ----


class _ErrorCode(enum.IntEnum):
    """TRITONSERVER_Error_Code values."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7


class _Unset(enum.Enum):
    UNSET = 0


class TritonError:
    """An error a model attaches to an `InferenceResponse` (not an exception, as in Triton).

    Triton 2.51 treats "no code" exactly like INTERNAL (HTTP 500); `_code_explicit` still records
    whether the model chose the code, for the server's logs or a future distinction.
    """

    __slots__ = ("_message", "_code", "_code_explicit")
    UNKNOWN: ClassVar[_ErrorCode] = _ErrorCode.UNKNOWN
    INTERNAL: ClassVar[_ErrorCode] = _ErrorCode.INTERNAL
    NOT_FOUND: ClassVar[_ErrorCode] = _ErrorCode.NOT_FOUND
    INVALID_ARG: ClassVar[_ErrorCode] = _ErrorCode.INVALID_ARG
    UNAVAILABLE: ClassVar[_ErrorCode] = _ErrorCode.UNAVAILABLE
    UNSUPPORTED: ClassVar[_ErrorCode] = _ErrorCode.UNSUPPORTED
    ALREADY_EXISTS: ClassVar[_ErrorCode] = _ErrorCode.ALREADY_EXISTS
    CANCELLED: ClassVar[_ErrorCode] = _ErrorCode.CANCELLED

    def __init__(self, message: str, code: int | _Unset = _Unset.UNSET) -> None:
        self._message = _text(message, "TritonError message")
        self._code_explicit = code is not _Unset.UNSET
        if isinstance(code, _Unset):
            self._code = _ErrorCode.INTERNAL
        elif isinstance(code, int) and not isinstance(code, bool):
            try:
                self._code = _ErrorCode(code)
            except ValueError:
                raise ValueError(f"unknown TritonError code {code}; use one of the TritonError constants") from None
        else:
            raise TypeError(f"TritonError code must be one of the TritonError constants, got {type(code)}")

    def message(self) -> str:
        return self._message

    def code(self) -> _ErrorCode:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, TritonError.{self._code.name})"


# ---- tensors ----


class _Capsule:
    """Gives a bare DLPack capsule the `__dlpack__` protocol that `np.from_dlpack` wants."""

    __slots__ = ("capsule",)

    def __init__(self, capsule: Any) -> None:
        self.capsule = capsule

    def __dlpack__(self, **_: Any) -> Any:
        return self.capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # if the capsule is not on the CPU, numpy reports it


class Tensor:
    """A named numpy array: the array is held, not copied (a non-C-contiguous one is made contiguous,
    as Triton does). BYTES tensors are object arrays (elements bytes, or anything `str()`-able) or
    numpy.bytes_ arrays, kept as given; the server encodes them with `serialize_byte_tensor`.
    The server reads `_name`, `_array` and `_dtype` (a TRITONSERVER_DataType code) directly."""

    __slots__ = ("_name", "_array", "_dtype")

    def __init__(self, name: str, numpy_array: Any) -> None:
        if type(name) is not str:
            name = _text(name, "Tensor name")
        if not name:
            raise TritonModelException("Tensor name cannot be an empty string.")
        array = numpy_array if isinstance(numpy_array, np.ndarray) else np.asarray(numpy_array)
        code = _NUMPY_TO_CODE.get(array.dtype.type)  # _dtype_code's usual case, without its call
        self._dtype = code if code is not None else _dtype_code(array.dtype)
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        self._name = name
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def triton_dtype(self) -> int:
        return self._dtype

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True

    def _check_dlpack(self) -> None:
        if self._dtype == _BYTES:
            raise TritonModelException("DLPack does not have support for string tensors.")
        if self._dtype == _BF16:
            raise TritonModelException(
                "BF16 tensors cannot be exported to DLPack in fuserve (numpy has no bfloat16 DLPack); "
                "use as_numpy(), an ml_dtypes.bfloat16 array"
            )

    def to_dlpack(self) -> Any:
        """A DLPack capsule sharing this tensor's memory (see the module docstring for read-only arrays)."""
        self._check_dlpack()
        try:
            return self._array.__dlpack__()
        except BufferError:
            if self._array.flags.writeable:
                raise
            return self._array.__dlpack__(max_version=(1, 0))

    def __dlpack__(self, **kwargs: Any) -> Any:
        self._check_dlpack()
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU, device 0

    @staticmethod
    def from_dlpack(name: str, tensor: Any) -> Tensor:
        """A Tensor over a DLPack capsule or an object with `__dlpack__`/`__dlpack_device__`, zero-copy."""
        if not name:
            raise TritonModelException("Tensor name cannot be an empty string.")
        if type(tensor).__name__ == "PyCapsule":
            source: Any = _Capsule(tensor)
        elif hasattr(tensor, "__dlpack__") and hasattr(tensor, "__dlpack_device__"):
            device_type = int(tensor.__dlpack_device__()[0])
            if device_type == 2:  # kDLCUDA
                raise TritonModelException(
                    "DLPack capsule passed pointer to memory allocated on GPU device, when GPU is not "
                    "available (fuserve's Python backend keeps tensors on the CPU; move it there first)"
                )
            if device_type not in (1, 3):  # kDLCPU, kDLCUDAHost
                raise TritonModelException(f"DLDevice type {device_type} is not support by Python backend.")
            source = tensor
        else:
            raise TritonModelException(
                "Provided tensor is not supported. Tensor must be a DLPack capsule or have "
                "`__dlpack__` and `__dlpack_device__` attributes"
            )
        try:
            array = np.from_dlpack(source)
        except (BufferError, RuntimeError, TypeError, ValueError) as exc:
            raise TritonModelException(f"cannot import DLPack tensor '{name}' into numpy: {exc}") from exc
        if not array.flags.c_contiguous:
            raise TritonModelException(
                "DLPack tensor is not contiguous. Only contiguous DLPack tensors that are stored in "
                "C-Order are supported."
            )
        return Tensor(name, array)

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, dtype={self._array.dtype}, shape={self._array.shape})"


def _bytes_object_array(array: np.ndarray) -> np.ndarray:
    """For the server: a BYTES array as the receiving side of Triton sees it, an object array of
    plain bytes of the same shape (Triton serialises BYTES at every model boundary, so a callee or a
    client never sees numpy.bytes_ arrays or str elements)."""
    items = [bytes(x) if isinstance(x, bytes) else str(x).encode("utf-8") for x in array.flat]
    out = np.empty(array.shape, dtype=np.object_)
    out.flat[:] = items
    return out


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    """The request's input called `name`, or None."""
    for tensor in inference_request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    """The response's output called `name`, or None."""
    for tensor in inference_response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


# ---- requests and responses ----


class MemoryType(enum.IntEnum):
    """PreferredMemory's memory types (Triton's values; they are not TRITONSERVER_MemoryType's)."""

    TRITONSERVER_MEMORY_GPU = 0
    TRITONSERVER_MEMORY_CPU = 1


TRITONSERVER_MEMORY_GPU = MemoryType.TRITONSERVER_MEMORY_GPU
TRITONSERVER_MEMORY_CPU = MemoryType.TRITONSERVER_MEMORY_CPU
_MEMORY_DEFAULT = 2


class PreferredMemory:
    """Where a BLS caller wants the outputs. Accepted for compatibility; fuserve's are always CPU."""

    __slots__ = ("_memory_type", "_device_id")

    def __init__(self, preferred_memory_type: int, preferred_device_id: int = 0) -> None:
        self._memory_type = int(preferred_memory_type)
        self._device_id = int(preferred_device_id)


class InferenceTrace:
    """A request's trace; fuserve does not trace Python models, so its context is None."""

    __slots__ = ("_context",)

    def __init__(self, context: str | None = None) -> None:
        self._context = context or None

    def get_context(self) -> str | None:
        return self._context


_DEFAULT_MEMORY = PreferredMemory(_MEMORY_DEFAULT, 0)
_NO_TRACE = InferenceTrace()
_REQUIRED: Any = object()


def _params_json(parameters: Any) -> str:
    """Validate BLS request/response parameters as Triton does and encode them like its json.dumps."""
    if parameters is None:
        return "{}"
    if isinstance(parameters, str):
        text = parameters
        try:
            parameters = json.loads(text)
        except ValueError as exc:
            raise TritonModelException(f"Expect parameters to be a JSON object: {exc}") from None
        if not isinstance(parameters, dict):
            raise TritonModelException("Expect parameters to be a JSON object")
    elif isinstance(parameters, dict):
        text = ""
    else:
        raise TritonModelException(f"Expect dict, got {type(parameters)}")
    for key, value in parameters.items():
        if not isinstance(key, str):
            raise TritonModelException(f"Expect parameters keys to have type str, found type {type(key)}")
        if not isinstance(value, (bool, int, str)):
            raise TritonModelException(
                f"Expect parameters values to have type bool/int/str, found type {type(value)}"
            )
    return text or json.dumps(parameters)


def _unsigned(what: str, value: Any) -> int:
    if isinstance(value, int) and value >= 0:
        return int(value)
    raise TypeError(f"{what} must be a non-negative int, got {value!r}")


class InferenceRequest:
    """An inference request: what `execute` receives, and what a model builds for a BLS call.

    The keyword names, defaults and checks of the constructor are Triton's; `inputs`,
    `requested_output_names` and `model_name` are required. The server builds incoming requests
    with `_incoming`, which skips validation and JSON work. The bridge reads `_model_name`,
    `_model_version`, `_inputs`, `_requested` (a sequence), `_timeout`, `_flags`, `_request_id`,
    `_correlation_id` and `parameters()` (a JSON object string).
    """

    __slots__ = (
        "_inputs", "_requested", "_request_id", "_correlation_id", "_parameters", "_flags", "_timeout",
        "_model_name", "_model_version", "_preferred_memory", "_trace", "_is_cancelled", "_release_flags",
        "_sender",
    )

    def __init__(
        self,
        request_id: str = "",
        correlation_id: int | str = 0,
        inputs: Sequence[Tensor] = _REQUIRED,
        requested_output_names: Sequence[str] = _REQUIRED,
        model_name: str = _REQUIRED,
        model_version: int = -1,
        flags: int = 0,
        timeout: int = 0,
        preferred_memory: PreferredMemory | None = None,
        trace: InferenceTrace | None = None,
        parameters: dict[str, bool | int | str] | str | None = None,
    ) -> None:
        required = {"inputs": inputs, "requested_output_names": requested_output_names, "model_name": model_name}
        missing = [key for key, value in required.items() if value is _REQUIRED]
        if missing:
            raise TypeError(f"InferenceRequest() missing required argument(s): {', '.join(missing)}")
        request_id = _text(request_id, "request_id")
        model_name = _text(model_name, "model_name")
        where = f"for request with id '{request_id}' and model name '{model_name}'"
        for tensor in inputs:
            if tensor is None:
                raise TritonModelException(f"Input tensor {where} should not be empty.")
            if not isinstance(tensor, Tensor):
                raise TypeError(f"InferenceRequest inputs must be pb_utils.Tensor objects, got {type(tensor)}")
        names: dict[str, None] = {}
        for output_name in requested_output_names:
            output_name = _text(output_name, "requested output name")
            if not output_name:
                raise TritonModelException(f"Requested output name {where} should not be empty.")
            names[output_name] = None
        if not isinstance(correlation_id, (int, str)):
            raise TritonModelException("Correlation ID must be integer or string")
        if isinstance(correlation_id, int):
            if not 0 <= correlation_id < 1 << 64:
                raise TritonModelException(f"Correlation ID {correlation_id} is not an unsigned 64-bit integer")
            correlation_id = int(correlation_id)  # True -> 1, as Triton's uint64 cast does
        if not isinstance(model_version, int):
            raise TypeError(f"model_version must be an int, got {model_version!r}")
        self._inputs = list(inputs)
        self._requested: Sequence[str] = tuple(names)
        self._request_id = request_id
        self._correlation_id: int | str = correlation_id
        self._parameters = _params_json(parameters)
        self._flags = _unsigned("flags", flags)
        self._timeout = _unsigned("timeout", timeout)
        self._model_name = model_name
        self._model_version = model_version
        self._preferred_memory = preferred_memory or _DEFAULT_MEMORY
        self._trace = trace or _NO_TRACE
        self._is_cancelled: Callable[[], bool] | None = None
        self._release_flags = TRITONSERVER_REQUEST_RELEASE_ALL
        self._sender: Any = None

    @classmethod
    def _incoming(
        cls,
        inputs: list[Tensor],
        requested_output_names: Sequence[str],
        request_id: str,
        correlation_id: int | str,
        parameters_json: str,
        flags: int = 0,
        is_cancelled: Callable[[], bool] | None = None,
        *,
        timeout: int = 0,
        model_name: str = "",
        model_version: int = -1,
    ) -> InferenceRequest:
        """For the server: a request as `execute` receives it. Nothing is validated or copied;
        `parameters_json` is returned by `parameters()` as is (Triton gives compact JSON, "{}" when empty)."""
        self = cls.__new__(cls)
        self._inputs = inputs
        self._requested = requested_output_names
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._parameters = parameters_json
        self._flags = flags
        self._timeout = timeout
        self._model_name = model_name
        self._model_version = model_version
        self._preferred_memory = _DEFAULT_MEMORY
        self._trace = _NO_TRACE
        self._is_cancelled = is_cancelled
        self._release_flags = TRITONSERVER_REQUEST_RELEASE_ALL
        self._sender = None
        return self

    def inputs(self) -> list[Tensor]:
        """The input tensors (the request's own list)."""
        return self._inputs

    def requested_output_names(self) -> set[str]:
        """A set, as in Triton (it keeps them in a std::set)."""
        return set(self._requested)

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def set_flags(self, flags: int) -> None:
        self._flags = _unsigned("flags", flags)

    def timeout(self) -> int:
        """Timeout in microseconds; 0 is none."""
        return self._timeout

    def parameters(self) -> str:
        """The request parameters as a JSON object string (parse it with json.loads)."""
        return self._parameters

    def trace(self) -> InferenceTrace:
        return self._trace

    def is_cancelled(self) -> bool:
        return self._is_cancelled is not None and bool(self._is_cancelled())

    def set_release_flags(self, flags: int) -> None:
        self._release_flags = _unsigned("flags", flags)

    def get_response_sender(self) -> Any:
        """A decoupled model's way to answer this request (response_sender.py)."""
        if self._sender is None:
            raise TritonModelException(
                "InferenceRequest.get_response_sender(): only decoupled models (model_transaction_policy "
                "{ decoupled: true }) have a response sender in fuserve; return one InferenceResponse per "
                "request from execute()")
        return self._sender

    def exec(self, decoupled: bool = False) -> Any:
        """Run this request on another model (BLS) and wait. Failures come back as an error response;
        only what Triton itself raises for (e.g. BLS outside execute) raises TritonModelException.
        With `decoupled=True`: an iterator over the callee's responses (its flag-only final as an
        empty response; an error as the last one), once the callee has sent its final."""
        bridge = _bridge
        try:
            if bridge is None:
                return _one_or_many(decoupled, _no_bridge_response())
            return bridge.exec(self, bool(decoupled))
        except TritonModelException:
            raise
        except Exception as exc:
            return _one_or_many(decoupled, _bls_error_response(exc))

    def async_exec(self, decoupled: bool = False) -> asyncio.Task[Any]:
        """Start a BLS request on the running event loop; await the result. Like Triton's future, it
        is in flight from this call on, and needs a running loop (i.e. an `async def execute`)."""
        return asyncio.get_running_loop().create_task(self._async_exec(bool(decoupled)))

    async def _async_exec(self, decoupled: bool) -> Any:
        bridge = _bridge
        try:
            if bridge is None:
                return _one_or_many(decoupled, _no_bridge_response())
            return await bridge.async_exec(self, decoupled)
        except TritonModelException:
            raise
        except Exception as exc:
            return _one_or_many(decoupled, _bls_error_response(exc))

    def __repr__(self) -> str:
        names = [t.name() for t in self._inputs]
        return f"InferenceRequest(id={self._request_id!r}, model={self._model_name!r}, inputs={names})"


def _one_or_many(decoupled: bool, response: InferenceResponse) -> Any:
    return iter([response]) if decoupled else response


class InferenceResponse:
    """The response a model returns for one request: output tensors, or an error (outputs ignored).
    The server reads `_outputs`, `_error` and `_params` (the parameters dict, or None)."""

    __slots__ = ("_outputs", "_error", "_params")

    def __init__(
        self,
        output_tensors: Sequence[Tensor] | None = None,
        error: TritonError | None = None,
        parameters: dict[str, bool | int | str] | None = None,
    ) -> None:
        outputs = list(output_tensors) if output_tensors is not None else []
        for tensor in outputs:
            if type(tensor) is Tensor:
                continue
            if tensor is None:
                raise TritonModelException("Output tensor for inference response should not be empty.")
            if not isinstance(tensor, Tensor):
                raise TypeError(f"InferenceResponse output_tensors must be pb_utils.Tensor objects, got {type(tensor)}")
        if error is not None and not isinstance(error, TritonError):
            raise TypeError(f"InferenceResponse error must be a pb_utils.TritonError, got {type(error)}")
        if parameters is not None:
            _params_json(parameters)  # validates
            parameters = dict(parameters)
        self._outputs = outputs
        self._error = error
        self._params = parameters

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return json.dumps(self._params) if self._params else "{}"

    def __repr__(self) -> str:
        if self._error is not None:
            return f"InferenceResponse(error={self._error!r})"
        return f"InferenceResponse(output_tensors={self._outputs!r})"


# ---- the BLS bridge ----


class Bridge(Protocol):
    """What the server installs with `set_bridge`. Return error responses for failures; raise
    TritonModelException only where Triton raises (BLS outside `execute`)."""

    def exec(self, request: InferenceRequest, decoupled: bool) -> InferenceResponse: ...

    async def async_exec(self, request: InferenceRequest, decoupled: bool) -> InferenceResponse: ...


_bridge: Bridge | None = None


def set_bridge(bridge: Bridge | None) -> None:
    """For the server: route `exec`/`async_exec` through `bridge` (None removes it)."""
    global _bridge
    _bridge = bridge


def _no_bridge_response() -> InferenceResponse:
    return InferenceResponse(error=TritonError("BLS is not available: no fuserve server is running this model"))


def _bls_error_response(exc: Exception) -> InferenceResponse:
    return InferenceResponse(error=TritonError(str(exc) or type(exc).__name__))


# ---- model directory ----

_model_dir: contextvars.ContextVar[str | None] = contextvars.ContextVar("pb_utils_model_dir", default=None)


def get_model_dir() -> str:
    """The directory of the running model's model.py (its version directory, e.g. `.../add_sub/1`)."""
    model_dir = _model_dir.get()
    if model_dir is None:
        raise TritonModelException(
            "get_model_dir() is only available inside a Python model's auto_complete_config, "
            "initialize, execute or finalize (threads the model starts do not inherit it)"
        )
    return model_dir


@contextlib.contextmanager
def _model_dir_scope(model_dir: str | os.PathLike[str]) -> Iterator[None]:
    """For the server: wrap each call into a model so that `get_model_dir()` answers for it."""
    token = _model_dir.set(os.fspath(model_dir))
    try:
        yield
    finally:
        _model_dir.reset(token)


# ---- logging ----

_LOG = logging.getLogger("fuserve.model")
_LOGGING_LEVELS = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.DEBUG}


class Logger:
    """Triton's model logger on Python logging (logger `fuserve.model`; VERBOSE is DEBUG). Records
    carry the model's file and line, as Triton's log lines do."""

    class LogLevel(enum.IntEnum):
        INFO = 0
        WARNING = 1
        ERROR = 2
        VERBOSE = 3

    INFO = LogLevel.INFO
    WARNING = LogLevel.WARNING
    ERROR = LogLevel.ERROR
    VERBOSE = LogLevel.VERBOSE

    @staticmethod
    def _emit(message: str, level: int) -> None:
        if level not in _LOGGING_LEVELS:
            raise TypeError(f"log level must be a pb_utils.Logger.LogLevel, got {level!r}")
        _LOG.log(_LOGGING_LEVELS[level], _text(message, "log message"), stacklevel=3)  # 3: the model's frame

    @staticmethod
    def log(message: str, level: int = LogLevel.INFO) -> None:
        Logger._emit(message, level)

    @staticmethod
    def log_info(message: str) -> None:
        Logger._emit(message, Logger.LogLevel.INFO)

    @staticmethod
    def log_warn(message: str) -> None:
        Logger._emit(message, Logger.LogLevel.WARNING)

    @staticmethod
    def log_error(message: str) -> None:
        Logger._emit(message, Logger.LogLevel.ERROR)

    @staticmethod
    def log_verbose(message: str) -> None:
        Logger._emit(message, Logger.LogLevel.VERBOSE)


# ---- what does not exist in-process ----


class MetricKind(enum.IntEnum):
    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2


class MetricFamily:
    """Custom metrics need the server's metrics registry, which Python models cannot reach yet."""

    COUNTER: ClassVar[MetricKind] = MetricKind.COUNTER
    GAUGE: ClassVar[MetricKind] = MetricKind.GAUGE
    HISTOGRAM: ClassVar[MetricKind] = MetricKind.HISTOGRAM

    def __init__(self, name: str, description: str, kind: int) -> None:
        raise TritonModelException(
            f"pb_utils.MetricFamily('{name}'): custom metrics are not supported by fuserve's Python backend yet"
        )


def _model_control_unsupported(call: str) -> TritonModelException:
    return TritonModelException(
        f"pb_utils.{call}: the model loading API is not supported by fuserve's Python backend; "
        "load models with the repository API (POST /v2/repository/models/<name>/load)"
    )


def load_model(model_name: str, config: str = "", files: dict[str, bytes] | None = None) -> None:
    raise _model_control_unsupported(f"load_model('{model_name}')")


def unload_model(model_name: str, unload_dependents: bool = False) -> None:
    raise _model_control_unsupported(f"unload_model('{model_name}')")


def is_model_ready(model_name: str, model_version: str = "") -> bool:
    raise _model_control_unsupported(f"is_model_ready('{model_name}')")
