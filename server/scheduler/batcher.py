"""The per-model-version scheduler: queue -> batch -> instance -> split, with Triton's semantics.

    submit(work) ──> priority queues ──(an instance is free)──> form a batch ──> worker thread:
                     (max_queue_size,                            (same non-batch     concatenate,
                      timeouts REJECT/DELAY)                      dims, <= max rows,  execute, split
                                                                  preferred sizes,
                                                                  max_queue_delay)
    the request's future <── its rows of the outputs <────────────────────────────────┘

Without `dynamic_batching` every batch is one request (Triton's default scheduler). The scheduler
is event-driven: it runs when a request arrives, when an execution finishes, and at the one timer
it keeps for the earliest queue-delay or timeout expiry; there is no polling loop. Everything here
runs on the event loop thread except what `execute.py` runs on the instance's worker thread (or,
for a cheap model on one CPU instance whose backend allows it, inline: see `_inline`). A backend that
executes requests (a Python model) gets the batched requests themselves, not one concatenated batch.
BLS requests may borrow an instance whose holder waits on a BLS call (lending.py).

A request whose caller goes away (HTTP disconnect, gRPC cancel) while queued is dropped before
execution. When a batch fails, each of its requests is executed alone, so only the requests that
fail on their own get the error (Triton fails the whole batch).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..backends.base import Instance, Request
from ..errors import BackendError, Rejected, ServerError
from ..instances import InstancePool
from ..model_config import ModelSpec, QueuePolicy
from ..stats import ModelStats
from .base import Outcome, Work
from .batch_cost import CostCurve
from .execute import execute_batch, execute_requests
from .hold import dispatch, releasing

# A model whose batches take less than this (moving average) runs inline on the event loop thread.
INLINE_BELOW_NS = 1_000_000
# ... and a batch formed from a frontend worker's frame (hold.py), below this.
INLINE_HELD_BELOW_NS = 200_000
# Latency-target mode: a batch's predicted time is scaled by this for the target's checks (the
# prediction is a mean; the target is a p99).
HEADROOM = 1.25


@dataclass(slots=True, eq=False)
class _Pending:
    work: Work
    future: asyncio.Future[Outcome]
    key: tuple  # requests batch together only when their keys are equal
    arrival: int
    deadline: int  # perf_counter_ns; 0: none
    level: int  # queue index: priority level - 1
    delay_on_timeout: bool
    taken: bool = False


@dataclass(slots=True)
class _Done:
    batch: list[_Pending]
    parts: list[dict[str, np.ndarray] | Exception] | None  # per request: outputs, or why it failed alone
    error: ServerError | None
    started: int
    timings: tuple[int, int, int] = (0, 0, 0)
    rows: int = 0


class Batcher:
    def __init__(self, spec: ModelSpec, pool: InstancePool, stats: ModelStats) -> None:
        b = spec.dynamic_batching
        self.name = spec.name
        self.pool = pool
        self.stats = stats
        self.max_rows = spec.max_batch_size if b is not None else 0  # 0: one request per batch
        self.preferred = b.preferred_batch_sizes if b is not None else ()
        self.delay_ns = b.max_queue_delay_us * 1000 if b is not None else 0
        self.preserve_ordering = b.preserve_ordering if b is not None else False
        self.policies: tuple[QueuePolicy, ...] = b.policies if b is not None else (QueuePolicy(),)
        self.default_level = b.default_priority_level - 1 if b is not None else 0
        self._bounded = any(p.max_queue_size for p in self.policies)  # a queue that counts requests
        # Batch sizes by measured cost (batch_cost.py); the curve is learned and shown even where
        # preferred_batch_size or fuserve_batch_learning "false" decides the size (Triton's greedy rule).
        self.curve = CostCurve(self.max_rows, b.learn_cost and not self.preferred) if b is not None else None
        if self.curve is not None:
            stats.cost_view = self.curve.view
        self.target_ns = int(b.latency_target_ms * 1e6) if b is not None else 0  # 0: no latency target
        self._queued_rows = 0
        self._timeouts = any(p.default_timeout_us or p.allow_timeout_override for p in self.policies) \
            or self.target_ns > 0
        self._next_expiry = 0  # the earliest queue deadline not yet handled (perf_counter_ns; 0: none)
        self._queues: list[deque[_Pending]] = [deque() for _ in self.policies]
        self._delayed: deque[_Pending] = deque()  # timed out under DELAY: served after everything else
        self._counts = [0] * len(self.policies)  # queued requests per level (the deques hold stale entries)
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executing = 0  # batches
        self.executing_requests = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Inline execution: at low load (batches of one), a cheap model on one CPU instance runs on
        # the event loop thread itself, saving the hand-off to its worker thread and back (~40 us of
        # latency; more than add_sub's whole execution). Decided from the measured execution time and
        # batch size, batch by batch (see _on_executed); under load the worker thread forms larger
        # batches, which is faster there.
        mode = spec.parameters.get("fuserve_inline_execution", "auto").lower()
        if mode not in ("auto", "never"):
            mode = "auto"
        self._inline_allowed = (mode == "auto" and len(pool.devices) == 1 and "cpu" in pool.devices[0].lower()
                                and pool.inline_ok)
        self._requests = pool.executes_requests  # the backend takes the requests, not one concatenated batch
        self._inline = False
        self._exec_ewma_ns = float(INLINE_BELOW_NS)  # starts on the worker thread, until measured
        self._batch_ewma = 1.0
        # BLS (lending.py): instance -> how many of its holders wait on a BLS call, how many lends run
        self._blocked: dict[Instance, int] = {}
        self._lent: dict[Instance, int] = {}
        # preserve_ordering: batches are answered in dispatch order
        self._next_seq = 0
        self._answer_seq = 0
        self._finished: dict[int, _Done] = {}

    @property
    def queued(self) -> int:
        """Requests waiting (not yet executing)."""
        return sum(p.work.requests for p in self._live())

    def group_rows(self, rows: int = 0) -> int:
        """The most rows of several requests that may be queued as one Work (a frontend worker's
        group of `rows` rows together, ipc.py), 0 for none: only where batches are concatenated
        (not a Python model's requests), the queue policies count no requests (max_queue_size), and
        no more than the size formed now, so that a group never makes a batch larger than the
        learned size. And no more than the curve's grain, so that its probes can still form the
        sizes they measure (with preferred_batch_size: no more than the smallest), unless the
        group is sure to head the next batch and fit in it (`_heads_next`): that batch then takes
        it all however it is cut."""
        if not self.max_rows or self._requests or self._bounded:
            return 0
        limit = self._limit(0)
        if self.preferred:  # whole entries still make the preferred sizes
            return min(limit, self.preferred[0])
        if self.curve is None or (0 < rows <= limit and self._heads_next()):
            return limit
        return min(limit, self.curve.grain())

    def _heads_next(self) -> bool:
        """Whether work queued now heads the next batch, formed with the size chosen now: nothing
        is queued, nothing executes (no completion can change the size before that batch is
        formed), there is one priority level (none can pass it in the queue), and no latency target
        (whose limit shrinks as the head waits)."""
        return (not self._queued_rows and self._executing == 0 and len(self._queues) == 1
                and not self.target_ns)

    # ---- admission ------------------------------------------------------------------------------

    async def submit(self, work: Work) -> Outcome:
        pending = self.enqueue(work)
        try:
            return await pending.future
        except asyncio.CancelledError:
            self.withdraw(pending)
            raise

    def enqueue(self, work: Work) -> _Pending:
        """Queue `work`; its future is answered with the Outcome (or the batch's error)."""
        level = self.default_level if work.priority <= 0 else min(work.priority, len(self._queues)) - 1
        policy = self.policies[level]
        if policy.max_queue_size and self._counts[level] >= policy.max_queue_size:
            raise Rejected(f"inference request for model '{self.name}' rejected: the queue is full "
                              f"(max_queue_size {policy.max_queue_size})")
        timeout_us = policy.default_timeout_us
        if work.timeout_us > 0 and policy.allow_timeout_override and (timeout_us == 0 or work.timeout_us < timeout_us):
            timeout_us = work.timeout_us  # a client may only shorten the timeout
        now = time.perf_counter_ns()
        loop = self._loop
        if loop is None:  # asyncio.get_running_loop() costs a getpid() syscall: look it up once
            loop = self._loop = asyncio.get_running_loop()
        deadline = now + timeout_us * 1000 if timeout_us else 0
        delay_on_timeout = policy.delay_on_timeout
        if self.target_ns:
            self._admit(work.rows)
            if not deadline or now + self.target_ns < deadline:  # past the target it can no longer meet it
                deadline, delay_on_timeout = now + self.target_ns, False
        # dtypes are the model's (validated), so names and non-batch dims decide what batches together
        key = tuple([(n, a.shape[1:]) for n, a in work.feeds.items()]) if self.max_rows else ()
        pending = _Pending(work, loop.create_future(), key, now, deadline, level, delay_on_timeout)
        if deadline and (not self._next_expiry or deadline < self._next_expiry):
            self._next_expiry = deadline
        self._queues[level].append(pending)
        self._counts[level] += 1
        self._queued_rows += work.rows
        self._idle.clear()
        dispatch(self._schedule)  # now, or when a held block ends (hold.py)
        return pending

    def _admit(self, rows: int) -> None:
        """Latency-target mode: refuse a request that would complete past the target, predicted from
        the queue ahead of it and the learned cost (nothing is refused before anything is learned)."""
        assert self.curve is not None
        instances = len(self.pool.instances)
        busy = self._executing >= instances
        size = self._limit(0)  # the batches it will form, cut to what the target affords
        predicted = self.curve.drain_ns(self._queued_rows + rows, instances, size) * HEADROOM
        if busy:  # what runs now is, on average, half done
            predicted += self.curve.predict(size) / 2
        if predicted > self.target_ns:
            raise Rejected(f"inference request for model '{self.name}' rejected: its predicted completion "
                           f"({predicted / 1e6:.1f} ms) exceeds its latency target {self.target_ns / 1e6:g} ms")

    def withdraw(self, pending: _Pending) -> None:
        """The client went away: a request still queued is dropped and never executes."""
        pending.future.cancel()
        if not pending.taken:
            pending.taken = True
            if pending.level >= 0:
                self._counts[pending.level] -= 1
            self._queued_rows -= pending.work.rows
            self.stats.cancelled += pending.work.requests
            self._check_idle()

    # ---- scheduling ---------------------------------------------------------------------------

    def _live(self) -> Iterator[_Pending]:
        """Queued requests in priority order, then the delayed ones (level -1).

        Deques keep stale entries (dispatched, cancelled, moved to the delayed queue) until they
        reach the head; `level` tells whether an entry still belongs to the deque it sits in.
        """
        for level, q in enumerate((*self._queues, self._delayed)):
            level = -1 if level == len(self._queues) else level
            while q and (q[0].taken or q[0].future.done() or q[0].level != level):
                q.popleft()
            for p in q:
                if not p.taken and not p.future.done() and p.level == level:
                    yield p

    def _expire(self, now: int) -> int:
        """Handle requests past their queue timeout; return the next deadline (0: none). A pass
        over the queue only once the earliest deadline has come (new ones lower it in `enqueue`)."""
        if not self._next_expiry or now < self._next_expiry:
            return self._next_expiry
        next_deadline = 0
        for p in list(self._live()):
            if not p.deadline:
                continue
            if p.deadline > now:
                next_deadline = p.deadline if not next_deadline else min(next_deadline, p.deadline)
                continue
            if p.level >= 0:
                self._counts[p.level] -= 1
            if p.delay_on_timeout and p.level >= 0:  # DELAY: behind every request that has not timed out
                p.level, p.delay_on_timeout = -1, False
                # a latency target still holds there (it is later than the timeout, or this was no DELAY)
                p.deadline = p.arrival + self.target_ns if self.target_ns else 0
                self._delayed.append(p)
                if p.deadline:
                    next_deadline = p.deadline if not next_deadline else min(next_deadline, p.deadline)
            else:
                p.taken = True
                self._queued_rows -= p.work.rows
                waited = (now - p.arrival) // 1000
                target = f", past its latency target {self.target_ns / 1e6:g} ms" if self.target_ns else ""
                p.future.set_exception(Rejected(
                    f"inference request for model '{self.name}' timed out in the queue after {waited} us{target}"))
        self._next_expiry = next_deadline
        return next_deadline

    def _form(self, now: int) -> tuple[list[_Pending] | None, int, bool]:
        """The batch to dispatch now, or (None, when to look again); and whether the size limit is
        what ended the batch (rather than the queue)."""
        first = next(self._live(), None)
        if first is None:
            return None, 0, False
        if not self.max_rows:
            return [first], 0, True
        limit = self._limit(now - first.arrival)
        batch: list[_Pending] = []
        rows, full = 0, False
        for p in self._live():
            if p.key != first.key:
                continue
            if batch and rows + p.work.rows > limit:
                full = True
                break
            batch.append(p)
            rows += p.work.rows
            if rows >= limit:
                full = True
                break
        if self.preferred and rows >= self.preferred[-1]:
            return self._cut_to_preferred(batch), 0, True
        hold_until = first.arrival + self.delay_ns
        if self.target_ns and self.curve is not None:  # hold only while the target can still be met
            hold_until = min(hold_until, first.arrival + self.target_ns - int(HEADROOM * self.curve.predict(limit)))
        if full or self.delay_ns == 0 or now >= hold_until:
            return batch, 0, full
        return None, hold_until, False

    def _limit(self, waited: int) -> int:
        """The most rows to form: the learned size (the largest where learning is off), in
        latency-target mode no more than the oldest request, `waited` ns in, can still afford."""
        curve = self.curve
        if curve is None:
            return self.max_rows
        limit = curve.size()
        if self.target_ns:
            while limit > 1 and waited + HEADROOM * curve.predict(limit) > self.target_ns:
                limit //= 2
        return limit

    def _cut_to_preferred(self, batch: list[_Pending]) -> list[_Pending]:
        """The longest prefix whose rows make a preferred size (else the largest up to the biggest one)."""
        best, rows, fallback = 0, 0, 1
        for i, p in enumerate(batch, 1):
            rows += p.work.rows
            if rows in self.preferred:
                best = i
            if rows <= self.preferred[-1]:
                fallback = i
        return batch[:best or fallback]

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        wake_at = 0
        while True:
            now = time.perf_counter_ns()
            if self._timeouts:
                wake_at = self._expire(now)
            instance = self.pool.try_acquire()
            if instance is None:
                if self._blocked:
                    self._lend()
                break
            batch, when, bound = self._form(now)
            if batch is None:
                self.pool.release(instance)
                if when:
                    wake_at = min(wake_at, when) if wake_at else when
                break
            self._dispatch(batch, instance, tag=self.curve.formed(bound) if self.curve is not None else -1)
        if wake_at:
            loop = self._loop or asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + max(0, wake_at - time.perf_counter_ns()) / 1e9, self._schedule)
        self._check_idle()

    # ---- lending to BLS calls (lending.py) ------------------------------------------------------

    def block(self, instance: Instance) -> None:
        """The thread executing on `instance` waits on a BLS call: the instance may be lent."""
        self._blocked[instance] = self._blocked.get(instance, 0) + 1
        self._schedule()

    def unblock(self, instance: Instance) -> None:
        left = self._blocked.get(instance, 0) - 1
        if left > 0:
            self._blocked[instance] = left
        else:
            self._blocked.pop(instance, None)

    def _lend(self) -> None:
        """No instance is free: give BLS requests the instances whose holders wait on BLS calls."""
        for instance, waiting in list(self._blocked.items()):
            while waiting > self._lent.get(instance, 0):
                p = next((p for p in self._live() if p.work.runner is not None), None)
                if p is None:
                    return
                self._lent[instance] = self._lent.get(instance, 0) + 1
                self._dispatch([p], instance, lent=True)

    def _dispatch(self, batch: list[_Pending], instance: Instance, lent: bool = False, tag: int = -1) -> None:
        """Execute `batch` on `instance`; `tag`: the curve's, for what it was formed as (-1: none)."""
        outputs: dict[str, None] = {}
        for p in batch:
            p.taken = True
            if p.level >= 0:
                self._counts[p.level] -= 1
            self._queued_rows -= p.work.rows
            outputs.update(dict.fromkeys(p.work.outputs))
        self._executing += 1
        self.executing_requests += sum(p.work.requests for p in batch)
        seq = self._next_seq
        self._next_seq += 1
        started = time.perf_counter_ns()
        rows = [p.work.rows for p in batch]
        loop = self._loop or asyncio.get_running_loop()
        done = functools.partial(self._on_executed, batch, instance, seq, started, sum(rows), lent, tag)
        # inline only at low load (lone requests): under load, batches on the thread grow larger; but
        # a batch formed from a worker frame's work (hold.py) inline where its execution is cheaper
        # than the hand-off to the thread and back would be worth
        if self._inline and (len(batch) == 1 and batch[0].work.requests == 1 and self._batch_ewma < 1.5
                             or releasing() and self._exec_ewma_ns < INLINE_HELD_BELOW_NS):
            fut: asyncio.Future = loop.create_future()
            try:
                fut.set_result(execute_batch(instance, [p.work.feeds for p in batch], list(outputs), rows))
            except Exception as exc:
                fut.set_exception(exc)
            loop.call_soon(done, fut)  # not now: _schedule is what called us
            return
        if self._requests:
            requests = [Request(p.work.feeds, p.work.outputs, p.work.id, p.work.parameters,
                                p.work.is_cancelled or p.future.cancelled, p.work.respond) for p in batch]
            runner = batch[0].work.runner if lent else None
            if runner is not None:  # on the BLS caller's thread, which waits for exactly this
                fut = runner(execute_requests, self, instance, requests)
            else:
                fut = self.pool.run(loop, execute_requests, self, instance, requests)
        else:
            fut = self.pool.run(loop, execute_batch, instance, [p.work.feeds for p in batch], list(outputs), rows)
        fut.add_done_callback(done)

    # ---- completion -----------------------------------------------------------------------------

    def _on_executed(self, batch: list[_Pending], instance: Instance, seq: int, started: int, rows: int,
                     lent: bool, tag: int, fut: asyncio.Future) -> None:
        if lent:  # its holder still has it
            left = self._lent.get(instance, 0) - 1
            if left > 0:
                self._lent[instance] = left
            else:
                self._lent.pop(instance, None)
        else:
            self.pool.release(instance)
        self._executing -= 1
        requests = sum(p.work.requests for p in batch)
        self.executing_requests -= requests
        try:
            parts, timings = fut.result()
            done = _Done(batch, parts, None, started, timings, rows)
            if self._inline_allowed:
                self._batch_ewma = 0.8 * self._batch_ewma + 0.2 * requests
                self._exec_ewma_ns = 0.8 * self._exec_ewma_ns + 0.2 * sum(timings)
                # hysteresis: a model near the threshold does not flip on every batch
                self._inline = self._exec_ewma_ns < (INLINE_BELOW_NS if self._inline else INLINE_BELOW_NS / 2)
        except Exception as exc:
            done = _Done(batch, None, self._as_error(exc), started, rows=rows)
        # outside the try: learning never fails a good batch. A batch with a request that failed was
        # (for a concatenated one) executed again request by request: its time is not the batch's.
        if self.curve is not None:
            if done.parts is not None and not any(isinstance(part, Exception) for part in done.parts):
                self.curve.observe(rows, sum(done.timings), tag)
            else:
                self.curve.unmeasured(tag)
        if self.preserve_ordering:
            self._finished[seq] = done
            while self._answer_seq in self._finished:
                self._answer(self._finished.pop(self._answer_seq))
                self._answer_seq += 1
        else:
            self._answer(done)
        self._schedule()

    def _answer(self, done: _Done) -> None:
        if done.parts is None:  # the execution failed: so do its requests
            for p in done.batch:
                if not p.future.done():
                    p.future.set_exception(done.error or BackendError("the execution produced no outputs"))
            return
        input_ns, infer_ns, output_ns = done.timings
        self.stats.record_execution(done.rows, input_ns, infer_ns, output_ns)
        for p, part in zip(done.batch, done.parts, strict=True):
            if part is None:  # a decoupled model's: its responses go through Work.respond
                if not p.future.done():
                    p.future.set_result(Outcome({}, done.started - p.arrival, input_ns, infer_ns, output_ns))
                continue
            if isinstance(part, Exception):
                if not p.future.done():
                    p.future.set_exception(self._as_error(part))
                continue
            if not p.future.done():
                # a request that wants every output the batch computed takes the dict as it is
                outputs = part if len(p.work.outputs) == len(part) else {n: part[n] for n in p.work.outputs}
                p.future.set_result(Outcome(outputs, done.started - p.arrival, input_ns, infer_ns, output_ns))

    def _as_error(self, exc: Exception) -> ServerError:
        if isinstance(exc, ServerError):  # raised knowingly (a bad output shape, text that is not UTF-8)
            return exc
        return BackendError(f"model '{self.name}' failed to execute: {exc}")

    def _check_idle(self) -> None:
        if self._executing == 0 and not self._finished and next(self._live(), None) is None:
            self._idle.set()

    async def drain(self) -> None:
        """Wait until nothing is queued or executing (used before an unloaded model is closed)."""
        await self._idle.wait()
        if self._timer is not None:
            self._timer.cancel()
