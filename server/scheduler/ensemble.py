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
from ..model_config import ModelSpec, TensorSpec
from ..stats import ModelStats
from .base import Outcome, StepRunner, Work
from .ensemble_plan import EnsemblePlan, Step


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
        # per step: (model input, ensemble tensor, the input's spec) and whether the step batches;
        # where each ensemble tensor comes from batches or not (the ensemble's inputs: as it does)
        self._inputs: dict[int, tuple[tuple[str, str, TensorSpec], ...]] = {}
        self._step_batching: dict[int, bool] = {}
        self._from_batching: dict[str, bool] = dict.fromkeys(plan.inputs, self.batching)
        for step in plan.steps:
            callee = steps[step.index]
            self._step_batching[step.index] = callee.max_batch_size > 0
            self._inputs[step.index] = tuple((m, e, callee.input_index[m]) for m, e in step.inputs.items())
            for ensemble_tensor in step.outputs.values():
                self._from_batching[ensemble_tensor] = callee.max_batch_size > 0
        self._outputs = {t.name: t for t in spec.outputs}

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

    async def _steps(self, work: Work, start: int) -> Outcome:
        schedule = self.plan.schedule(work.outputs)
        tensors: dict[str, np.ndarray] = dict(work.feeds)
        absent = self.plan.optional_inputs - tensors.keys()  # optional inputs not sent stay absent
        waiting = list(schedule.steps)
        while waiting:
            ready = [s for s in waiting if all(t in tensors or t in absent for t in s.consumes)]
            if not ready:  # cannot happen for a plan that loaded: every tensor read has a writer
                raise BackendError(f"ensemble '{self.name}' has steps whose inputs never arrive")
            if len(ready) == 1:
                results = [await self._step(ready[0], tensors, work)]
            else:
                tasks = [asyncio.ensure_future(self._step(s, tensors, work)) for s in ready]
                try:
                    results = await asyncio.gather(*tasks)
                except BaseException:
                    for t in tasks:
                        t.cancel()
                    raise
            for step, produced in zip(ready, results, strict=True):
                for model_output, tensor in step.outputs.items():
                    if model_output in produced:
                        tensors[tensor] = produced[model_output]
                    else:
                        absent = absent | {tensor}
                for tensor in schedule.release_after.get(step.index, ()):
                    tensors.pop(tensor, None)
            waiting = [s for s in waiting if s not in ready]
        outputs: dict[str, np.ndarray] = {}
        for name in work.outputs:
            if name not in tensors:
                raise BackendError(f"ensemble '{self.name}': no step produced output '{name}'")
            spec = self._outputs[name]
            outputs[name] = _fit(tensors[name], spec.dims, self.batching, self._from_batching.get(name, self.batching))
        elapsed = time.perf_counter_ns() - start
        self.stats.record_execution(work.rows, 0, elapsed, 0)
        return Outcome(outputs, 0, 0, elapsed, 0)

    async def _step(self, step: Step, tensors: dict[str, np.ndarray], work: Work) -> dict[str, np.ndarray]:
        batching = self._step_batching[step.index]
        feeds = {model_input: _fit(tensors[tensor], spec.dims, batching, self._from_batching.get(tensor, self.batching))
                 for model_input, tensor, spec in self._inputs[step.index] if tensor in tensors}
        version = "" if step.model_version < 0 else str(step.model_version)
        return await self.run_step(step.model_name, version, feeds, tuple(step.outputs), work.id, work.parameters)
