"""BLS: Python models calling other models, through the same core as a client request.

`pb_utils.InferenceRequest(model_name=..., inputs=..., requested_output_names=...).exec()` (or
`await ....async_exec()`) reaches `Bridge`, which app.py installs with `pb_utils.set_bridge`. The
request goes to `InferenceService.infer` on the server's event loop: the callee's checks, its
scheduler (so BLS requests batch with the callee's other requests), its statistics and its errors.
Tensors pass by reference both ways; nothing is serialised.

Errors come back as the response's error, never raised (Triton's contract). The callee's own
TritonError keeps its message as is; anything the core refused gets Triton's wording, "Model M -
Error when running inference: ...". Unlike Triton 2.51, which reports every BLS error as INTERNAL,
the error's code is kept (a callee's INVALID_ARG stays INVALID_ARG).

Deadlocks: `exec()` on the server's event loop thread would wait for the loop it blocks, so it is
answered with an error at once. Every other wait is made safe by lending (scheduler/lending.py):
the calling thread marks its own instance as waiting, and while it waits it runs whatever the
scheduler lends it, so a model calling itself or a cycle of models always progresses.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import numpy as np

from .. import dtypes
from ..backends.python import pb_utils
from ..errors import BackendError, InvalidArgument, ModelError, NotFound, ServerError, Unavailable, Unsupported
from ..scheduler.lending import AsyncWaiter, Waiter, held
from ..service import InferenceService
from ..types import InferRequest, InferResponse, RequestedOutput, Tensor

_NUMPY_TO_V2 = {d.numpy: d.v2 for d in dtypes.BY_V2.values() if d.v2 != "BYTES"}
# the error's class -> TritonError's code (pb_utils.TritonError.*)
_CODES = ((NotFound, 2), (InvalidArgument, 3), (Unavailable, 4), (Unsupported, 5))


def _error_response(model: str, exc: BaseException) -> pb_utils.InferenceResponse:
    if isinstance(exc, ModelError):  # the callee's own error: its message and code as it gave them
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(exc.message, exc.code))
    if isinstance(exc, BackendError):  # the callee's execution failed: its message says so
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(exc.message, 1))
    message = exc.message if isinstance(exc, ServerError) else f"{type(exc).__name__}: {exc}"
    code = next((c for cls, c in _CODES if isinstance(exc, cls)), 1)
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(f"Model {model} - Error when running inference: {message}", code))


def _core_request(request: pb_utils.InferenceRequest) -> InferRequest:
    tensors = []
    for t in request._inputs:
        arr = t._array
        if arr.dtype == object or arr.dtype.kind in "SU":
            arr, datatype = pb_utils._bytes_object_array(arr), "BYTES"
        else:
            datatype = _NUMPY_TO_V2.get(arr.dtype, str(arr.dtype))
        tensors.append(Tensor(t._name, datatype, arr.shape, arr))
    version = "" if request._model_version < 0 else str(request._model_version)
    parameters = request.parameters()
    core = InferRequest(request._model_name, version, tensors, [RequestedOutput(n) for n in request._requested],
                        request._request_id, json.loads(parameters) if parameters != "{}" else {})
    if request._timeout:
        core.parameters["timeout"] = request._timeout  # microseconds, as the protocol's own parameter
    return core


def _response(response: InferResponse) -> pb_utils.InferenceResponse:
    out = []
    for t in response.outputs:
        tensor = pb_utils.Tensor.__new__(pb_utils.Tensor)
        tensor._name, tensor._array = t.name, np.asarray(t.data)
        tensor._dtype = pb_utils._dtype_code(tensor._array.dtype)
        out.append(tensor)
    return pb_utils.InferenceResponse(output_tensors=out)


def _timed_out(request: pb_utils.InferenceRequest) -> Unavailable:
    return Unavailable(f"the BLS request timed out after {request._timeout} us (its timeout)")


class Bridge:
    """pb_utils' BLS calls, answered by `service` on `loop` (the server's event loop)."""

    def __init__(self, service: InferenceService, loop: asyncio.AbstractEventLoop) -> None:
        self.service = service
        self.loop = loop
        self._loop_thread = threading.get_ident()  # built on the loop's thread (app.py)

    def _begin(self, request: pb_utils.InferenceRequest) -> InferRequest | pb_utils.InferenceResponse:
        """The core request for `request`, or the error response that answers it at once."""
        try:
            return _core_request(request)
        except Exception as exc:
            return _error_response(request._model_name, InvalidArgument(f"cannot build the request: {exc}"))

    def _call(self, core: InferRequest, runner: Any, decoupled: bool) -> Any:
        """The coroutine that answers `core` on the loop: one response, or (decoupled) all of them."""
        if decoupled:
            return self._collect(core, runner)
        return self.service.infer(core, internal=True, runner=runner)

    async def _collect(self, core: InferRequest, runner: Any) -> list[pb_utils.InferenceResponse]:
        """`exec(decoupled=True)`: every response of the callee until its final, as Triton's iterator
        gives them (a flag-only final as an empty response); an error is the last response."""
        out: list[pb_utils.InferenceResponse] = []
        try:
            async for batch in self.service.stream(core, internal=True, runner=runner):
                out.extend(pb_utils.InferenceResponse() if one is None else _response(one)
                           for one, _ in batch.responses())
        except Exception as exc:
            out.append(_error_response(core.model_name, exc))
        return out

    def _submit(self, call: Any) -> tuple[Any, Any]:
        """Mark our instance as lendable while we wait (lending.py), then hand the call to the loop."""
        slot = held()
        if slot is not None:
            self.loop.call_soon_threadsafe(slot[0].block, slot[1])
        return slot, asyncio.run_coroutine_threadsafe(call, self.loop)

    def _end(self, slot: Any) -> None:
        if slot is not None:
            self.loop.call_soon_threadsafe(slot[0].unblock, slot[1])

    def exec(self, request: pb_utils.InferenceRequest, decoupled: bool) -> Any:
        """One response; with `decoupled`, an iterator over the callee's responses."""
        if threading.get_ident() == self._loop_thread:
            return _answer(decoupled, _error_response(request._model_name, Unavailable(
                "BLS exec() was called on the server's event loop thread, where waiting for the answer would "
                "block the loop that computes it; call it from execute(), or use await async_exec()")))
        core = self._begin(request)
        if isinstance(core, pb_utils.InferenceResponse):
            return _answer(decoupled, core)
        waiter = Waiter(self.loop)
        slot, answer = self._submit(self._call(core, waiter.runner, decoupled))
        try:
            got = waiter.wait(answer, request._timeout / 1e6 if request._timeout else None)
            return iter(got) if decoupled else _response(got)
        except TimeoutError:
            answer.cancel()
            return _answer(decoupled, _error_response(core.model_name, _timed_out(request)))
        except BaseException as exc:
            return _answer(decoupled, _error_response(core.model_name, exc))
        finally:
            self._end(slot)

    async def async_exec(self, request: pb_utils.InferenceRequest, decoupled: bool) -> Any:
        core = self._begin(request)
        if isinstance(core, pb_utils.InferenceResponse):
            return _answer(decoupled, core)
        model_loop = asyncio.get_running_loop()
        if model_loop is self.loop:  # awaited on the server's loop itself: nothing to lend, nothing blocks
            try:
                got = await self._call(core, None, decoupled)
                return iter(got) if decoupled else _response(got)
            except Exception as exc:
                return _answer(decoupled, _error_response(core.model_name, exc))
        slot, answer = self._submit(self._call(core, AsyncWaiter(self.loop, model_loop).runner, decoupled))
        try:
            timeout = request._timeout / 1e6 if request._timeout else None
            got = await asyncio.wait_for(asyncio.wrap_future(answer), timeout)
            return iter(got) if decoupled else _response(got)
        except TimeoutError:
            answer.cancel()
            return _answer(decoupled, _error_response(core.model_name, _timed_out(request)))
        except Exception as exc:
            return _answer(decoupled, _error_response(core.model_name, exc))
        finally:
            self._end(slot)


def _answer(decoupled: bool, response: pb_utils.InferenceResponse) -> Any:
    """What exec() returns for one response: it, or (decoupled) an iterator over it alone."""
    return iter([response]) if decoupled else response
