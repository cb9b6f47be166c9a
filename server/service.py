"""The protocol-agnostic core that both frontends call.

Frontends decode the wire format into `types.InferRequest`, call `InferenceService`, and encode
what it returns; errors are raised from `errors` and mapped to the wire by each frontend once.
Everything a request is checked against (names, datatypes, dims, max_batch_size) was resolved
into the model's `ModelSpec` when it loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn, cast

import numpy as np

from . import __version__, classification, model_files
from .errors import (
    BackendError,
    DecoupledUnary,
    InvalidArgument,
    NotFound,
    Rejected,
    ServerError,
    Unavailable,
    Unsupported,
    with_prefix,
)
from .model_config import ModelConfig, ModelSpec, TensorSpec
from .repository import ModelVersion, Repository
from .scheduler import Outcome, Work
from .scheduler.hold import held
from .scheduler.lending import Runner
from .shared_memory import Lease, SharedMemory
from .sink import ResponseSink
from .trace_settings import TraceSettings
from .tracing import Tracer
from .types import IN_REGION, InferRequest, InferResponse, Parameters, RequestedOutput, Responses, Tensor


@dataclass(slots=True)
class _Call:
    """One request between its checks and its answer."""

    work: Work
    names: Sequence[str]
    rows: int
    start: int  # perf_counter_ns
    prepared: int
    lease: Lease | None = None  # the shared memory regions the request holds
    classes: dict[str, int] | None = None  # outputs the request asked to classify: name -> k


def _release(call: _Call | None) -> None:
    if call is not None and call.lease is not None:
        call.lease.release()


# What the server metadata names: exactly the extensions served (Triton's names). Not named,
# because not served: cuda_shared_memory, model_repository(unload_dependents).
EXTENSIONS = ("classification", "binary_tensor_data", "model_configuration", "model_repository", "parameters",
              "schedule_policy", "sequence", "statistics", "trace", "logging", "system_shared_memory", "generate")


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


def _check_inputs(spec: ModelSpec, request: InferRequest) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    batch = -1
    for t in request.inputs:
        ts = spec.input_index.get(t.name)
        if ts is None:
            raise InvalidArgument(f"unexpected input '{t.name}' for model '{spec.name}' "
                                  f"(its inputs: {', '.join(spec.input_index)})")
        if t.name in feeds:
            raise InvalidArgument(f"input '{t.name}' is given more than once")
        if t.datatype != ts.dtype.v2:
            raise InvalidArgument(f"input '{t.name}' has datatype {t.datatype}, model '{spec.name}' "
                                  f"expects {ts.dtype.v2}")
        feeds[t.name], batch = _check_shape(spec, ts, t.shape, t.data, batch)
    if len(feeds) != len(spec.inputs):  # (every name in feeds is one of the model's, once)
        _check_missing(spec, feeds)
    return feeds


def _check_step_feeds(spec: ModelSpec, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`_check_inputs` for an ensemble's step: the tensors come from the ensemble's request or an
    earlier step, by name; their datatypes were matched to this model's when the ensemble loaded
    (ensemble_plan.py), so what is left to check is the shapes, as for a client's request."""
    feeds: dict[str, np.ndarray] = {}
    batch = -1
    for name, data in given.items():
        ts = spec.input_index.get(name)
        if ts is None:
            raise InvalidArgument(f"unexpected input '{name}' for model '{spec.name}' "
                                  f"(its inputs: {', '.join(spec.input_index)})")
        feeds[name], batch = _check_shape(spec, ts, data.shape, data, batch)
    if len(feeds) != len(spec.inputs):  # (every name in feeds is one of the model's, once)
        _check_missing(spec, feeds)
    return feeds


def _check_shape(spec: ModelSpec, ts: TensorSpec, shape: tuple[int, ...], data: np.ndarray,
                 batch: int) -> tuple[np.ndarray, int]:
    """One input's shape against the model's (batch dim first when it batches; -1 matches any dim):
    the input as the model takes it (reshaped where the config says so), and the batch size."""
    dims = shape
    if spec.max_batch_size > 0:
        if len(shape) != len(ts.dims) + 1:
            raise InvalidArgument(f"input '{ts.name}' has shape {list(shape)}; model '{spec.name}' "
                                  f"expects {[-1, *ts.dims]} (batch dim first)")
        if shape[0] < 1 or shape[0] > spec.max_batch_size:
            raise InvalidArgument(f"input '{ts.name}' has batch size {shape[0]}; model '{spec.name}' accepts "
                                  f"1 to {spec.max_batch_size} (max_batch_size)")
        if batch == -1:
            batch = shape[0]
        elif shape[0] != batch:
            raise InvalidArgument(f"input '{ts.name}' has batch size {shape[0]}, other inputs have {batch}")
        dims = shape[1:]
    if dims != ts.dims and (len(dims) != len(ts.dims) or not ts.variable or
                            any(w != -1 and g != w for g, w in zip(dims, ts.dims, strict=True))):
        expected = [-1, *ts.dims] if spec.max_batch_size > 0 else list(ts.dims)
        raise InvalidArgument(f"input '{ts.name}' has shape {list(shape)}; model '{spec.name}' expects "
                              f"{expected}")
    if ts.reshape is not None:
        data = data.reshape((shape[0], *ts.reshape) if spec.max_batch_size > 0 else ts.reshape)
    return data, batch


def _check_missing(spec: ModelSpec, feeds: dict[str, np.ndarray]) -> None:
    missing = [ts.name for ts in spec.inputs if ts.name not in feeds and not ts.optional]
    if missing:
        raise InvalidArgument(f"model '{spec.name}' expects input(s) {', '.join(missing)}, "
                              f"which the request does not have")


def _response(mv: ModelVersion, request: InferRequest, names: Sequence[str],
              outputs: dict[str, np.ndarray], lease: Lease | None) -> InferResponse:
    index = mv.spec.output_index
    tensors = [Tensor(name, index[name].datatype, (arr := outputs[name]).shape, arr) for name in names]
    if lease is not None and lease.outputs:
        for t in tensors:
            ref = lease.write(t)
            if ref is not None:  # written into the client's region: only its name, datatype and shape go back
                t.data, t.region = IN_REGION, ref
    return InferResponse(model_name=mv.spec.name, model_version=str(mv.version), outputs=tensors, id=request.id)


def _classes(mv: ModelVersion, output: RequestedOutput, classes: dict[str, int] | None) -> dict[str, int] | None:
    """The classification a requested output asks for (the extension), checked: `classes` with it."""
    k = classification.count(output.name, output.parameters)
    if not k:
        return classes  # 0: no classification (Triton's answer)
    if mv.spec.output_index[output.name].datatype == "BYTES":
        raise InvalidArgument(f"class result not available for output '{output.name}' due to unsupported type "
                              f"'BYTES'")
    if mv.decoupled:
        raise InvalidArgument(f"model '{mv.spec.name}' is decoupled: the classification extension is served for "
                              f"models that answer a request with one response")
    return {**(classes or {}), output.name: k}


def _classify(mv: ModelVersion, response: InferResponse, classes: dict[str, int]) -> None:
    index = mv.spec.output_index
    batched = mv.spec.max_batch_size > 0
    for t in response.outputs:
        k = classes.get(t.name)
        if k is not None:
            t.data = classification.classify(t.data, k, index[t.name].labels, batched)
            t.datatype, t.shape = "BYTES", t.data.shape


def _unary(mv: ModelVersion) -> ModelVersion:
    if mv.decoupled:
        raise DecoupledUnary(f"model '{mv.spec.name}' is decoupled (one request, many responses): it is served "
                             f"on streaming endpoints only")
    return mv


def _failed(mv: ModelVersion, start: int, exc: BaseException) -> None:
    """A failed request in its model's statistics (nv_inference_request_failure's `reason`)."""
    mv.stats.record_failure(time.perf_counter_ns() - start, _failure_reason(exc))


def _failure_reason(exc: BaseException) -> str:
    """The `reason` label of nv_inference_request_failure for a request to a loaded model."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELED"  # the client went away (a stream closed early: GeneratorExit)
    if isinstance(exc, Rejected):
        return "REJECTED"
    if isinstance(exc, BackendError):
        return "BACKEND"
    return "OTHER"  # the request failed validation (Triton does not count these; we do)


# Request parameters the protocol itself defines: a model sees only the client's own (Triton's rule).
RESERVED_PARAMETERS = frozenset(("priority", "timeout", "sequence_id", "sequence_start", "sequence_end",
                                 "binary_data_output"))


def _own_parameters(parameters: Parameters) -> Parameters:
    """The client's own request parameters, as a model sees them; `triton_*` keys are Triton's."""
    own = {}
    for key, value in parameters.items():
        if key.startswith("triton_"):
            raise InvalidArgument("parameter keys starting with 'triton_' are reserved for Triton usage and should "
                                  "not be specified.")
        if key not in RESERVED_PARAMETERS:
            own[key] = value
    return own


def _int_parameter(request: InferRequest, key: str) -> int:
    value = request.parameters.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"request parameter '{key}' must be a non-negative integer, got {value!r}")
    return value


def _sequence_parameters(work: Work, parameters: Parameters) -> None:
    """sequence_id (an unsigned 64-bit integer or a string), sequence_start and sequence_end (bools)."""
    sid = parameters["sequence_id"]
    if isinstance(sid, bool) or not isinstance(sid, int | str) or (isinstance(sid, int) and not 0 <= sid < 1 << 64):
        raise InvalidArgument(f"request parameter 'sequence_id' must be an unsigned 64-bit integer or a string, "
                              f"got {sid!r}")
    work.sequence_id = sid
    for key in ("sequence_start", "sequence_end"):
        flag = parameters.get(key, False)
        if not isinstance(flag, bool):
            raise InvalidArgument(f"request parameter '{key}' must be a boolean, got {flag!r}")
    work.sequence_start = parameters.get("sequence_start", False)
    work.sequence_end = parameters.get("sequence_end", False)


class InferenceService:
    def __init__(self, repository: Repository, *, model_control_mode: str = "none",
                 server_name: str = "triton", shared_memory: SharedMemory | None = None,
                 traces: TraceSettings | None = None, tracer: Tracer | None = None) -> None:
        self.repository = repository
        self.traces = traces or TraceSettings()  # the trace extension's settings and sampling
        self.tracer = tracer  # where sampled requests' spans go (opentelemetry mode)
        self.shared_memory = shared_memory or SharedMemory(allowed=False)
        self.server_name = server_name
        self.model_control_mode = model_control_mode
        self.live = True
        self.accepting = False  # True once start-up loading is done; False again on shutdown
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        repository.run_step = self.run_step  # how the repository's ensembles reach their steps

    # ---- health and metadata -------------------------------------------------------------------

    def server_ready(self) -> bool:
        return self.accepting

    def server_metadata(self) -> dict:
        return {"name": self.server_name, "version": f"{__version__}+fuserve", "extensions": list(EXTENSIONS)}

    def refused(self, name: str, version: str, exc: Exception) -> NoReturn:
        """A request to model `name` that could not be decoded (`exc`, its reason). The model is
        judged first, as Triton does: NotFound (Triton's text) when there is no such model or
        version; otherwise the request counts as the model's failed one (nv_inference_request_failure,
        reason OTHER, like the other checks that refuse a request) and `exc` is raised."""
        mv = self.repository.get(name, version)
        _failed(mv, time.perf_counter_ns(), exc)
        raise exc

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.repository.get(name, version)
        except Exception:
            return False
        return self.accepting

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        mv = self.repository.get(name, version)
        spec = mv.spec
        batch = (-1,) if spec.max_batch_size > 0 else ()
        versions = tuple(str(m.version) for m in self.repository.ready_models() if m.name == name)
        return ModelMetadata(
            name=spec.name,
            versions=versions,
            platform=spec.platform,
            inputs=tuple(TensorMetadata(t.name, t.dtype.v2, batch + t.dims) for t in spec.inputs),
            outputs=tuple(TensorMetadata(t.name, t.dtype.v2, batch + t.dims) for t in spec.outputs),
        )

    def is_decoupled(self, name: str, version: str = "") -> bool:
        """Whether the model answers a request with any number of responses (`stream` serves it);
        False for a model that is not ready (its request fails on its own)."""
        try:
            return self.repository.get(name, version).decoupled
        except Exception:
            return False

    def model_config(self, name: str, version: str = "") -> ModelConfig:
        """The completed config of a loaded model (auto-complete applied)."""
        return self.repository.get(name, version).spec.config

    # ---- inference -----------------------------------------------------------------------------

    async def infer(self, request: InferRequest, *, internal: bool = False,
                    runner: Runner | None = None) -> InferResponse:
        """Answer one request. `internal`: a call made by a model being served (an ensemble's step,
        a BLS request), which is answered while the server drains, since its caller was accepted.
        `runner`: a BLS caller's, through which an instance lent to this request runs on its thread."""
        mv = _unary(self.repository.get(request.model_name, request.model_version) if internal
                    else self._admit(request))
        start = time.perf_counter_ns()
        self._in_flight += 1
        self._idle.clear()
        call = None
        try:
            call = self._prepare(mv, request, start)
            call.work.runner = runner
            return self._complete(mv, request, call, await self._scheduled(mv, call.work))
        except BaseException as exc:
            _failed(mv, start, exc)
            raise
        finally:
            _release(call)
            self._leave()

    async def run_step(self, model: str, version: str, feeds: dict[str, np.ndarray], outputs: tuple[str, ...],
                       request_id: str, parameters: Parameters) -> dict[str, np.ndarray]:
        """An ensemble's step through the same core as a client request: the callee's checks (of
        the tensors as they are: no request object is built for a step), scheduler and statistics.
        The step's inputs and outputs pass by reference; no response is built. A step is not
        counted in flight on its own: its ensemble's request is, until every step is done."""
        mv = self.repository.get(model, version)
        start = time.perf_counter_ns()
        try:
            spec = mv.spec
            checked = _check_step_feeds(spec, feeds)
            if mv.check_inputs is not None:
                mv.check_inputs(checked)
            rows = next(iter(checked.values())).shape[0] if spec.max_batch_size > 0 and checked else 1
            call = _Call(Work(checked, outputs, rows, id=request_id, parameters=parameters), outputs, rows, start,
                         time.perf_counter_ns())
            outcome = await self._scheduled(mv, call.work)
            self._record(mv, call, outcome, time.perf_counter_ns())
            return outcome.outputs
        except BaseException as exc:
            _failed(mv, start, exc)
            raise

    @staticmethod
    async def _scheduled(mv: ModelVersion, work: Work) -> Outcome:
        """The model's scheduler answers `work`; an ensemble runs its steps from this task."""
        if mv.direct is not None:
            return await mv.direct(work)
        pending = mv.scheduler.enqueue(work)
        try:
            return await pending.future
        except asyncio.CancelledError:
            mv.scheduler.withdraw(pending)
            raise

    async def stream(self, request: InferRequest, *, internal: bool = False, runner: Runner | None = None
                     ) -> AsyncGenerator[Responses, None]:
        """A request's responses as they come, in batches (types.Responses): each is every response
        sent since the last batch was taken, each with whether it is the last, so that one write
        can carry them all. Any number from a decoupled model (a flag-only final is (None, True)),
        exactly one from any other. An error raises, after the batch of responses sent before it.
        Closing the iterator early (the client went away) cancels the request: queued work is
        dropped, the model's `is_cancelled()` turns true and what it sends after is dropped.
        `internal` and `runner` as for `infer` (a BLS call)."""
        mv = self.repository.get(request.model_name, request.model_version) if internal else self._admit(request)
        if not mv.decoupled:
            one = await self.infer(request, internal=internal, runner=runner)
            yield Responses(one.model_name, one.model_version, one.id, (), [(one, True)])
            return
        start = time.perf_counter_ns()
        self._in_flight += 1
        self._idle.clear()
        sink = ResponseSink(asyncio.get_running_loop())
        pending = None
        call = None
        try:
            call = self._prepare(mv, request, start)
            call.work.respond, call.work.is_cancelled = sink.respond, sink.cancelled
            call.work.runner = runner
            pending = mv.scheduler.enqueue(call.work)
            pending.future.add_done_callback(lambda f: None if f.cancelled() or f.exception() is None
                                             else sink.fail(cast(BaseException, f.exception())))
            first, sent, final = 0, 0, False
            index = mv.spec.output_index
            outputs = tuple((n, index[n].datatype) for n in call.names)
            name, version = mv.spec.name, str(mv.version)
            while not final:
                items = await sink.take()
                if not first:
                    first = time.perf_counter_ns() - start
                last, final = items[-1]  # only the last can end the request (sink.take)
                failure = last if isinstance(last, BaseException) else None
                if failure is not None:
                    items.pop()
                sent += len(items) - (last is None)
                if items:
                    yield Responses(name, version, request.id, outputs, items)
                if failure is not None:
                    raise failure
            done = pending.future.done() and not pending.future.cancelled()
            outcome = pending.future.result() if done else None
            self._record(mv, call, outcome or Outcome({}, 0, 0, 0, 0), time.perf_counter_ns())
            mv.stats.record_stream(first, sent)
        except BaseException as exc:
            _failed(mv, start, exc)
            raise
        finally:
            sink.close()
            if pending is not None and not pending.future.done():
                mv.scheduler.withdraw(pending)
            _release(call)
            self._leave()

    def submit(self, request: InferRequest,
               reply: Callable[[InferResponse | None, BaseException | None], None],
               accepted: bool = False) -> Callable[[], None]:
        """`infer` without a coroutine or task (for the frontend workers' link, where a task per
        request is a large part of the cost): checks and queues the request now, raising what
        `infer` would raise before queueing; calls `reply(response, None)` or `reply(None, error)`
        from the event loop when it is answered. Returns the function that cancels it.
        `accepted`: a member of a group that was accepted and failed to execute as one, submitted
        alone; it is answered while the server drains."""
        mv = _unary(self.repository.get(request.model_name, request.model_version) if accepted
                    else self._admit(request))
        start = time.perf_counter_ns()
        call = None
        try:
            call = self._prepare(mv, request, start)
            pending = mv.scheduler.enqueue(call.work)
        except Exception as exc:
            _release(call)
            _failed(mv, start, exc)
            raise
        self._in_flight += 1
        self._idle.clear()

        lease = call.lease

        def done(future: asyncio.Future) -> None:
            self._leave()
            try:
                if future.cancelled():
                    mv.stats.record_failure(time.perf_counter_ns() - start, "CANCELED")
                    return
                exc = future.exception()
                if exc is None:
                    try:
                        reply(self._complete(mv, request, call, future.result()), None)
                        return
                    except Exception as err:
                        exc = err
                _failed(mv, start, cast(BaseException, exc))
                reply(None, exc)
            finally:
                if lease is not None:
                    lease.release()

        pending.future.add_done_callback(done)
        return lambda: mv.scheduler.withdraw(pending)

    @staticmethod
    def held() -> contextlib.AbstractContextManager[None]:
        """`with service.held():` the requests submitted in the block are dispatched when it ends,
        so that what arrives together (a frontend worker's frame) is batched together."""
        return held()

    def group_rows(self, request: InferRequest) -> int:
        """The most rows of several requests for `request`'s model that `submit_group` takes as one
        (0: each must be submitted alone), where `request` holds all of their rows: only a batching
        scheduler's, and none while requests are traced (a trace is one request's)."""
        mv = self._admit(request)
        rows = getattr(mv.scheduler, "group_rows", None)
        if rows is None or mv.decoupled or (self.traces.active and self.tracer is not None):
            return 0
        return cast(int, rows(request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 0))

    def submit_group(self, request: InferRequest, rows: Sequence[int],
                     reply: Callable[[InferResponse | None, BaseException | None], None]) -> Callable[[], None]:
        """Several requests of one model as one (a frontend worker's group, ipc.py): `request` holds
        their inputs' rows concatenated, `rows` each one's, in order, and at most `group_rows`
        together. Checked once, queued as one Work, so executed in one batch; answered with
        `reply(response, None)`, one response with every member's rows, each member counted in the
        statistics as a request of its own. `reply(None, error)`: the group failed for a reason each
        member would meet alone (a queue timeout), counted for each. `reply(None, None)`: the
        execution failed, counted for none; the caller submits each member alone, so that only the
        ones that fail alone get an error (the batcher's rule for a batch). Raises, counting
        nothing, where the group cannot be queued as one (a check, the queue's admission): the
        caller then submits each member alone, and each gets its own answer. Returns the function
        that withdraws it (when every member's client has gone)."""
        mv = _unary(self._admit(request))
        start = time.perf_counter_ns()
        call = self._prepare(mv, request, start)
        call.work.requests = len(rows)
        pending = mv.scheduler.enqueue(call.work)
        self._in_flight += 1
        self._idle.clear()

        def answer(future: asyncio.Future) -> None:
            if future.cancelled():
                for _ in rows:
                    mv.stats.record_failure(time.perf_counter_ns() - start, "CANCELED")
                return
            exc = future.exception()
            if exc is not None:
                if isinstance(exc, BackendError):
                    reply(None, None)
                    return
                for _ in rows:
                    _failed(mv, start, exc)
                reply(None, exc)
                return
            outcome: Outcome = future.result()
            collected = time.perf_counter_ns()
            if any(a.ndim == 0 or a.shape[0] != call.rows for a in outcome.outputs.values()):
                reply(None, None)  # not one row per input row: alone, each gets the batcher's answer
                return
            response = _response(mv, request, call.names, outcome.outputs, None)
            end = time.perf_counter_ns()
            mv.stats.record_success(call.rows, end - start, outcome.queue_ns, call.prepared - start + outcome.input_ns,
                                    outcome.infer_ns, outcome.output_ns + end - collected, len(rows))
            mv.stats.grouped += len(rows)
            reply(response, None)

        def done(future: asyncio.Future) -> None:
            try:
                answer(future)
            except Exception as exc:  # never leave the members unanswered
                for _ in rows:
                    _failed(mv, start, exc)
                reply(None, exc)
            finally:
                self._leave()  # after the members' fallback is queued: a drain waits for it

        pending.future.add_done_callback(done)
        return lambda: mv.scheduler.withdraw(pending)

    def _admit(self, request: InferRequest) -> ModelVersion:
        if not self.accepting:
            raise Unavailable("the server is not accepting requests (starting up or shutting down)")
        return self.repository.get(request.model_name, request.model_version)

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    def _prepare(self, mv: ModelVersion, request: InferRequest, start: int, lease: Lease | None = None) -> _Call:
        """The request checked against its model, as the Work its scheduler takes. A request that
        names shared memory regions holds them from here (the call's lease) until it is answered."""
        if request.shared_memory and lease is None:
            lease = self.shared_memory.lease(request)
            try:
                return self._prepare(mv, request, start, lease)
            except BaseException:
                lease.release()
                raise
        spec = mv.spec
        feeds = _check_inputs(spec, request)
        if mv.check_inputs is not None:
            mv.check_inputs(feeds)
        classes = None
        if request.outputs:
            names = []
            for o in request.outputs:
                if o.name not in spec.output_index:
                    raise InvalidArgument(f"unexpected output '{o.name}' for model '{spec.name}' "
                                          f"(its outputs: {', '.join(spec.output_index)})")
                if o.parameters and "classification" in o.parameters:
                    classes = _classes(mv, o, classes)
                if o.region is not None and mv.decoupled:
                    raise InvalidArgument(f"model '{spec.name}' is decoupled: its outputs cannot be written to "
                                          f"shared memory, since each of its responses would overwrite the last")
                names.append(o.name)
        else:
            names = list(spec.output_index)
        rows = request.inputs[0].shape[0] if spec.max_batch_size > 0 and request.inputs else 1
        work = Work(feeds, tuple(names), rows, id=request.id)
        if request.parameters:
            work.priority = _int_parameter(request, "priority")
            work.timeout_us = _int_parameter(request, "timeout")
            work.parameters = _own_parameters(request.parameters)
            if "sequence_id" in request.parameters:
                _sequence_parameters(work, request.parameters)
        return _Call(work, names, rows, start, time.perf_counter_ns(), lease, classes)

    def _complete(self, mv: ModelVersion, request: InferRequest, call: _Call, outcome: Outcome) -> InferResponse:
        collected = time.perf_counter_ns()
        response = _response(mv, request, call.names, outcome.outputs, call.lease)
        if call.classes is not None:
            _classify(mv, response, call.classes)
        self._record(mv, call, outcome, collected)
        return response

    def _record(self, mv: ModelVersion, call: _Call, outcome: Outcome, collected: int) -> None:
        """A success in the model's statistics; `collected`: when the outcome was taken up."""
        end = time.perf_counter_ns()
        # Triton's split: compute_input covers our checks and the batch's concatenation, and so on.
        mv.stats.record_success(call.rows, end - call.start, outcome.queue_ns,
                                call.prepared - call.start + outcome.input_ns, outcome.infer_ns,
                                outcome.output_ns + end - collected)
        if self.traces.active and self.tracer is not None and self.traces.sample(mv.name):
            self.tracer.record(mv.name, mv.version, call.work.id, call.start, call.prepared, outcome.queue_ns,
                               outcome.input_ns, outcome.infer_ns, outcome.output_ns, end)

    def statistics(self, name: str = "", version: str = "") -> dict:
        """The statistics extension: every ready version, one model, or one version of it."""
        if not name:
            versions = self.repository.ready_models()
        elif version:
            versions = [self.repository.get(name, version)]
        else:
            self.repository.get(name)  # NotFound for an unknown model
            versions = [mv for mv in self.repository.ready_models() if mv.name == name]
        ordered = sorted(versions, key=lambda m: (m.name, m.version))
        return {"model_stats": [mv.stats.as_dict(mv.scheduler.queued, mv.scheduler.executing_requests)
                                for mv in ordered]}

    async def drain(self) -> None:
        """Stop accepting requests and wait for those in flight."""
        self.accepting = False
        await self._idle.wait()

    # ---- trace extension (trace_settings.py, tracing.py) ---------------------------------------

    def trace_setting(self, model: str = "", changes: dict | None = None) -> dict:
        """The trace settings (a model's, or the global ones), after applying `changes` if any."""
        if model:
            try:
                self.repository.get(model)
            except NotFound:
                raise InvalidArgument(f"Request for unknown model : {model}") from None
        return self.traces.update(changes, model) if changes else self.traces.get(model)

    # ---- model repository extension ---------------------------------------------------------------

    def repository_index(self, ready_only: bool = False) -> list[dict]:
        return self.repository.index(ready_only)

    def _check_explicit(self, action: str) -> None:
        if self.model_control_mode != "explicit":
            raise Unsupported(f"explicit model {action} is not allowed: the server runs with "
                              f"--model-control-mode={self.model_control_mode}; use explicit mode")

    async def load_model(self, name: str, parameters: dict | None = None) -> None:
        """Load or reload a model. Parameters: `config` (a ModelConfig in JSON replacing
        config.pbtxt) and `file:<relative path>` entries (the model's files, bytes or base64; with
        them `config` is required and the files, in a private directory of their own, are the
        model's directory: server/model_files.py)."""
        self._check_explicit("load")
        parameters = parameters or {}
        files = model_files.file_parameters(parameters)
        unknown = {key for key in parameters if key != "config" and not key.startswith(model_files.PREFIX)}
        if unknown:
            raise Unsupported(f"unsupported load parameter(s): {', '.join(sorted(unknown))} "
                              f"(fuserve supports 'config' and 'file:<path>')")
        override = parameters.get("config")
        if override is not None and not isinstance(override, str):
            raise InvalidArgument("the load parameter 'config' must be a JSON string")
        if files and override is None:
            raise InvalidArgument(f"failed to load '{name}': a load request with 'file:' parameters must also "
                                  f"give the model's 'config'")
        if not files:
            await self.repository.load(name, override)
            return
        writing = asyncio.ensure_future(asyncio.to_thread(model_files.write, files))
        try:
            folder = await asyncio.shield(writing)
        except ServerError as exc:
            raise with_prefix(exc, f"failed to load '{name}': ") from None
        except asyncio.CancelledError:  # the thread writes on: what it writes is removed when it is done
            writing.add_done_callback(lambda w: None if w.cancelled() or w.exception() is not None
                                      else model_files.remove(w.result()))
            raise
        await self.repository.load(name, override, folder)

    async def unload_model(self, name: str) -> None:
        self._check_explicit("unload")
        await self.repository.unload(name)
