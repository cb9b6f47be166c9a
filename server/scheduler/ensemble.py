"""The ensemble scheduler: one request through a graph of steps, each through the same core.

    enqueue(work) ──> a task: for the requested outputs, the plan's schedule (only the steps they
                      need, in data-flow order) ──> each step, as soon as its inputs exist, through
                      `run_step` (the callee's checks, scheduler and statistics, as a client request)
                      ──> tensors passed on by reference ──> the requested outputs

Steps that do not depend on each other run concurrently; a step's error fails the request with the
step's own status and the message prefixed "in ensemble '<name>', ". Tensors no later step reads are
dropped as soon as they are used. A client that goes away cancels the task, which withdraws the step
that is queued. Nothing here executes a model: the steps' own schedulers do, on their own threads.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from ..errors import BackendError, ServerError, with_prefix
from ..model_config import ModelSpec
from ..stats import ModelStats
from .base import Outcome, StepRunner, Work
from .ensemble_plan import EnsemblePlan


@dataclass(frozen=True, slots=True)
class _StepPlan:
    """One step, resolved for the hot path: what it reads (and whether a tensor needs Triton's
    batch-dim reshape on the way: the `_fit` arguments, else None), what it writes, its model."""

    index: int
    model: str
    version: str  # "" for the latest
    inputs: tuple[tuple[str, str, tuple[tuple[int, ...], bool, bool] | None], ...]  # model input, tensor, fit
    outputs: tuple[tuple[str, str], ...]  # model output, ensemble tensor
    wanted: tuple[str, ...]  # the model outputs it asks for


@dataclass(frozen=True, slots=True)
class _Waves:
    waves: tuple[tuple[_StepPlan, ...], ...]
    release: dict[int, tuple[str, ...]]  # step index -> tensors nobody reads after it


@dataclass(slots=True, eq=False)
class _Run:
    future: asyncio.Future[Outcome]
    task: asyncio.Task | None = None


def _fit(arr: np.ndarray, dims: tuple[int, ...], batching: bool, from_batching: bool) -> np.ndarray:
    """Triton's reshape between a batching and a non-batching side: a batching consumer of a tensor
    without a batch dim gets one of 1; a non-batching consumer of a batch of one loses it. Views only."""
    if batching and not from_batching and arr.ndim == len(dims):
        return arr[np.newaxis]
    if not batching and from_batching and arr.ndim == len(dims) + 1 and arr.shape[0] == 1:
        return arr[0]
    return arr


class EnsembleScheduler:
    def __init__(self, spec: ModelSpec, plan: EnsemblePlan, steps: dict[int, ModelSpec], stats: ModelStats,
                 run_step: StepRunner) -> None:
        self.name = spec.name
        self.plan = plan
        self.stats = stats
        self.run_step = run_step
        self.batching = spec.max_batch_size > 0
        self.executing_requests = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # whether each ensemble tensor comes from a batching side (the ensemble's inputs: as it does);
        # where a consumer batches differently, the tensor gets Triton's reshape on the way (_fit)
        from_batching: dict[str, bool] = dict.fromkeys(plan.inputs, self.batching)
        for step in plan.steps:
            for tensor in step.outputs.values():
                from_batching[tensor] = steps[step.index].max_batch_size > 0

        def fit(dims: tuple[int, ...], batching: bool, tensor: str) -> tuple[tuple[int, ...], bool, bool] | None:
            source = from_batching.get(tensor, self.batching)
            return None if source == batching else (dims, batching, source)

        self._step_plans: dict[int, _StepPlan] = {}
        for step in plan.steps:
            callee = steps[step.index]
            batching = callee.max_batch_size > 0
            self._step_plans[step.index] = _StepPlan(
                step.index, step.model_name, "" if step.model_version < 0 else str(step.model_version),
                tuple((m, t, fit(callee.input_index[m].dims, batching, t)) for m, t in step.inputs.items()),
                tuple(step.outputs.items()), tuple(step.outputs))
        self._output_fit = {t.name: f for t in spec.outputs if (f := fit(t.dims, self.batching, t.name)) is not None}
        self._wave_cache: dict[frozenset[str], _Waves] = {}

    @property
    def queued(self) -> int:
        return 0  # an ensemble's requests wait in its steps' queues, counted there

    def enqueue(self, work: Work) -> _Run:
        loop = asyncio.get_running_loop()
        run = _Run(loop.create_future())
        run.task = loop.create_task(self._run(work, run.future))
        return run

    async def run(self, work: Work) -> Outcome:
        """The same in the caller's task: no task or future of its own (see base.Scheduler.run)."""
        self.executing_requests += 1
        self._idle.clear()
        start = time.perf_counter_ns()
        try:
            return await self._steps(work, start)
        except ServerError as exc:
            raise with_prefix(exc, f"in ensemble '{self.name}', ") from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise BackendError(f"in ensemble '{self.name}', {type(exc).__name__}: {exc}") from exc
        finally:
            self._done_one()

    def _done_one(self) -> None:
        self.executing_requests -= 1
        if self.executing_requests == 0:
            self._idle.set()

    def withdraw(self, run: _Run) -> None:
        run.future.cancel()
        if run.task is not None:
            run.task.cancel()

    async def drain(self) -> None:
        await self._idle.wait()

    async def _run(self, work: Work, future: asyncio.Future[Outcome]) -> None:
        try:
            outcome = await self.run(work)
            if not future.done():
                future.set_result(outcome)
        except asyncio.CancelledError:
            future.cancel()
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)

    def _waves(self, outputs: tuple[str, ...]) -> _Waves:
        """The steps `outputs` need, grouped into waves: each wave's steps read only what earlier
        waves (or the request) wrote, so they run together. Cached per set of outputs."""
        key = frozenset(outputs)
        hit = self._wave_cache.get(key)
        if hit is not None:
            return hit
        schedule = self.plan.schedule(outputs)
        level: dict[int, int] = {}
        for step in schedule.steps:  # topological: a producer's level is known before its readers'
            level[step.index] = 1 + max((level[self.plan.producer[t]] for t in step.consumes
                                         if t in self.plan.producer and self.plan.producer[t] in level), default=-1)
        waves: list[list[_StepPlan]] = [[] for _ in range(1 + max(level.values(), default=-1))]
        for step in schedule.steps:
            waves[level[step.index]].append(self._step_plans[step.index])
        hit = self._wave_cache[key] = _Waves(tuple(tuple(w) for w in waves),
                                             {i: t for i, t in schedule.release_after.items() if t})
        return hit

    async def _steps(self, work: Work, start: int) -> Outcome:
        plan = self._waves(work.outputs)
        tensors: dict[str, np.ndarray] = dict(work.feeds)
        run_step = self.run_step
        for wave in plan.waves:
            if len(wave) == 1:
                step = wave[0]
                results = [await run_step(step.model, step.version, _feeds(step, tensors), step.wanted, work.id,
                                          work.parameters)]
            else:
                tasks = [asyncio.ensure_future(run_step(s.model, s.version, _feeds(s, tensors), s.wanted, work.id,
                                                        work.parameters)) for s in wave]
                try:
                    results = await asyncio.gather(*tasks)
                except BaseException:
                    for t in tasks:
                        t.cancel()
                    raise
            for step, produced in zip(wave, results, strict=True):
                for model_output, tensor in step.outputs:
                    arr = produced.get(model_output)
                    if arr is not None:  # a missing output reads as an absent (optional) input
                        tensors[tensor] = arr
                for tensor in plan.release.get(step.index, ()):
                    tensors.pop(tensor, None)
        outputs: dict[str, np.ndarray] = {}
        for name in work.outputs:
            arr = tensors.get(name)
            if arr is None:
                raise BackendError(f"ensemble '{self.name}': no step produced output '{name}'")
            fit = self._output_fit.get(name)
            outputs[name] = arr if fit is None else _fit(arr, *fit)
        elapsed = time.perf_counter_ns() - start
        self.stats.record_execution(work.rows, 0, elapsed, 0)
        return Outcome(outputs, 0, 0, elapsed, 0)


def _feeds(step: _StepPlan, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A step's inputs, by the step model's input names (an absent tensor is an absent input)."""
    feeds = {}
    for model_input, tensor, fit in step.inputs:
        arr = tensors.get(tensor)
        if arr is not None:
            feeds[model_input] = arr if fit is None else _fit(arr, *fit)
    return feeds
