"""The sequence batcher: stateful models, whose requests come in sequences sharing a correlation ID.

    enqueue(work) ── batch size 1, an id, START first ──> its sequence's queue
        a new sequence takes a free slot (an instance and a slot on it) and keeps it until its
        END has executed or it sits idle past max_sequence_idle_microseconds; with no slot free
        it waits in the backlog (bounded), whole, for the next slot to free
    an instance is free ──> a batch from its slots' sequences: the next request of each, at most
        one per sequence (direct: in slot order; oldest: oldest first, preferred sizes, queue
        delay), with the control tensors (START, END, READY, CORRID) and each sequence's implicit
        state added ──> the instance's worker thread (execute.py, as the other schedulers)
    its outputs ──> each request's future; the state outputs become the sequence's next state

A sequence's requests execute one at a time, in arrival order, always on the same instance, so a
model (or its implicit state) sees them in order. The slots bound how many sequences are live; the
backlog bounds how many wait (parameter `fuserve_sequence_backlog`, default 4096: past it a new
sequence is rejected, 503 / UNAVAILABLE). Triton fills a direct batch's empty slots with "null"
requests (READY false); fuserve forms batches of the ready requests only, so every row a model sees
is real and READY is always true.

The checks on the ids are Triton 2.51's, with its messages: a request without START for an id that
has no live sequence fails (400 / INVALID_ARGUMENT); START on a live id restarts it (its queued
requests run first, then the state starts over). END forgets the id as soon as it is queued.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backends.base import Instance, Request
from ..errors import BackendError, InvalidArgument, Rejected, ServerError
from ..instances import InstancePool
from ..model_config import ModelSpec
from ..sequence_config import CORRID, END, READY, START, SequenceSpec
from ..stats import ModelStats
from .base import Outcome, Work
from .execute import execute_batch, execute_requests

START_FLAG, END_FLAG = 1, 2  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_START / _END


@dataclass(slots=True, eq=False)
class _Lane:
    """One instance and its sequence slots."""

    instance: Instance
    slots: list[_Sequence | None]
    free: int
    busy: bool = False


@dataclass(slots=True, eq=False)
class _Sequence:
    id: int | str
    queue: deque[_Pending] = field(default_factory=deque)
    lane: _Lane | None = None  # None: waiting in the backlog
    slot: int = -1
    executing: bool = False
    ended: bool = False  # its END is queued: no request joins it any more
    state: dict[str, np.ndarray] | None = None  # implicit state, by input name; None: the initial value
    corrid: dict[str, np.ndarray] = field(default_factory=dict)  # its CORRID control tensor, made once
    idle_since: int = 0  # perf_counter_ns when it last ran out of work; 0: it has work


@dataclass(slots=True, eq=False)
class _Pending:
    work: Work
    future: asyncio.Future[Outcome]
    sequence: _Sequence
    arrival: int
    taken: bool = False


class SequenceBatcher:
    def __init__(self, spec: ModelSpec, pool: InstancePool, stats: ModelStats) -> None:
        assert spec.sequence is not None
        self.name = spec.name
        self.seq: SequenceSpec = spec.sequence
        self.pool = pool
        self.stats = stats
        self.max_rows = max(1, spec.max_batch_size)
        self._lanes = [_Lane(i, [None] * self.seq.slots, self.seq.slots) for i in pool.instances]
        self._requests = pool.executes_requests  # a Python model gets the requests themselves
        self._delay_ns = self.seq.max_queue_delay_us * 1000
        self._idle_ns = self.seq.idle_us * 1000
        self._state_outputs = tuple(s.output_name for s in self.seq.states)
        self._corrid = any(c.kind == CORRID for c in self.seq.controls)
        self._open: dict[int | str, _Sequence] = {}  # id -> the live sequence a request joins
        self._backlog: deque[_Sequence] = deque()
        self._idle_sequences: dict[_Sequence, None] = {}  # in the order they went idle (= expiry order)
        self._idle_timer: asyncio.TimerHandle | None = None
        self._delay_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queued = 0
        self._executing = 0  # batches
        self.executing_requests = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def queued(self) -> int:
        return self._queued

    # ---- admission ------------------------------------------------------------------------------

    def enqueue(self, work: Work) -> _Pending:
        if work.rows > 1:
            raise InvalidArgument(f"inference request to model '{self.name}' must specify batch-size 1 due to "
                                  f"requirements of sequence batcher")
        sid = work.sequence_id
        if sid == 0 or sid == "":
            raise InvalidArgument(f"inference request to model '{self.name}' must specify a non-zero or non-empty "
                                  f"correlation ID")
        sequence = self._open.get(sid)
        if sequence is None:
            if not work.sequence_start:
                raise InvalidArgument(f"inference request for sequence {sid} to model '{self.name}' must specify the "
                                      f"START flag on the first request of the sequence")
            try:
                corrid = self.seq.corrid(sid) if self._corrid else {}
            except ValueError as exc:
                raise InvalidArgument(f"inference request to model '{self.name}' has {exc}") from None
            sequence = self._start(sid)
            sequence.corrid = corrid
        if work.sequence_end:
            sequence.ended = True
            del self._open[sid]
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        pending = _Pending(work, loop.create_future(), sequence, time.perf_counter_ns())
        sequence.queue.append(pending)
        self._queued += 1
        if sequence.idle_since:
            sequence.idle_since = 0
            self._idle_sequences.pop(sequence, None)
        self._idle.clear()
        if sequence.lane is not None:
            self._schedule(sequence.lane)
        return pending

    def _start(self, sid: int | str) -> _Sequence:
        """A new sequence: the freest instance's first free slot, else the backlog."""
        sequence = _Sequence(sid)
        lane = max(self._lanes, key=lambda la: la.free)
        if lane.free:
            self._seat(sequence, lane, lane.slots.index(None))
        elif len(self._backlog) >= self.seq.backlog:
            raise Rejected(f"inference request for sequence {sid} to model '{self.name}' rejected: every sequence "
                           f"slot is taken and {len(self._backlog)} sequences wait for one "
                           f"(fuserve_sequence_backlog)")
        else:
            self._backlog.append(sequence)
        self._open[sid] = sequence
        return sequence

    def _seat(self, sequence: _Sequence, lane: _Lane, slot: int) -> None:
        lane.slots[slot] = sequence
        lane.free -= 1
        sequence.lane, sequence.slot = lane, slot

    def withdraw(self, pending: _Pending) -> None:
        """The client went away: a request still queued is dropped and never executes."""
        pending.future.cancel()
        if pending.taken:
            return
        pending.taken = True
        pending.sequence.queue.remove(pending)
        self._queued -= 1
        self.stats.cancelled += 1
        self._settle(pending.sequence)
        self._check_idle()

    # ---- the life of a sequence -----------------------------------------------------------------

    def _settle(self, sequence: _Sequence) -> None:
        """After a sequence's request left it: free it when it has ended, else note when it went idle."""
        if sequence.queue or sequence.executing:
            return
        if sequence.ended:
            self._release(sequence)
            return
        if not sequence.idle_since:
            sequence.idle_since = time.perf_counter_ns()
            self._idle_sequences[sequence] = None
            if self._idle_timer is None:
                self._arm_idle(sequence.idle_since)

    def _release(self, sequence: _Sequence) -> None:
        """The sequence is over (ended, or idle too long): its slot goes to the backlog's first."""
        if self._open.get(sequence.id) is sequence:
            del self._open[sequence.id]
        self._idle_sequences.pop(sequence, None)
        sequence.idle_since = 0
        sequence.state = None
        lane = sequence.lane
        if lane is None:
            if sequence in self._backlog:
                self._backlog.remove(sequence)
            return
        lane.slots[sequence.slot] = None
        lane.free += 1
        slot, sequence.lane = sequence.slot, None
        if self._backlog:
            self._seat(self._backlog.popleft(), lane, slot)
            self._schedule(lane)

    def _arm_idle(self, since: int) -> None:
        loop = self._loop or asyncio.get_running_loop()
        wait = max(0, since + self._idle_ns - time.perf_counter_ns()) / 1e9
        self._idle_timer = loop.call_at(loop.time() + wait, self._reap)

    def _reap(self) -> None:
        """Free the sequences idle past max_sequence_idle_microseconds (their next request without
        START then fails)."""
        self._idle_timer = None
        now = time.perf_counter_ns()
        while self._idle_sequences:
            sequence = next(iter(self._idle_sequences))
            if sequence.idle_since + self._idle_ns > now:
                self._arm_idle(sequence.idle_since)
                return
            self._release(sequence)

    # ---- batches --------------------------------------------------------------------------------

    def _schedule(self, lane: _Lane) -> None:
        if lane.busy:
            return
        ready = [s for s in lane.slots if s is not None and s.queue and not s.executing]
        if not ready:
            return
        if self.seq.strategy == "oldest":
            ready.sort(key=lambda s: s.queue[0].arrival)
        batch, feeds = [], []
        for s in ready[:self.max_rows]:
            p = s.queue[0]
            try:
                feeds.append(self._feeds(p))
            except Exception as exc:  # (never expected) fail that request alone, not the lane
                self._drop(p, BackendError(f"model '{self.name}': cannot form the sequence inputs: {exc}"))
                continue
            batch.append(p)
        if not batch:
            return
        if not self._requests and len(batch) > 1:  # one concatenated batch: same shapes only
            key = _key(feeds[0])
            chosen = [i for i, f in enumerate(feeds) if _key(f) == key]
            batch, feeds = [batch[i] for i in chosen], [feeds[i] for i in chosen]
        if self._delay_ns and len(batch) < self.max_rows and not self._full(lane, batch):
            first = min(p.arrival for p in batch)
            now = time.perf_counter_ns()
            if now < first + self._delay_ns:
                if self._delay_timer is None:
                    loop = self._loop or asyncio.get_running_loop()
                    self._delay_timer = loop.call_at(loop.time() + (first + self._delay_ns - now) / 1e9,
                                                     self._delay_over)
                return
        if self.seq.preferred_batch_sizes and len(batch) > 1:
            fits = [n for n in self.seq.preferred_batch_sizes if n <= len(batch)]
            if fits:
                batch, feeds = batch[:fits[-1]], feeds[:fits[-1]]
        self._dispatch(lane, batch, feeds)

    def _drop(self, p: _Pending, error: ServerError) -> None:
        p.taken = True
        p.sequence.queue.remove(p)
        self._queued -= 1
        if not p.future.done():
            p.future.set_exception(error)
        self._settle(p.sequence)

    def _full(self, lane: _Lane, batch: list[_Pending]) -> bool:
        """Whether a delayed batch may go now: direct, when every live slot has its request (or the
        configured share of slots does); oldest, at its largest preferred size."""
        if self.seq.strategy == "oldest":
            preferred = self.seq.preferred_batch_sizes
            return bool(preferred) and len(batch) >= preferred[-1]
        live = len(lane.slots) - lane.free
        share = self.seq.minimum_slot_utilization
        return len(batch) >= live or (share > 0 and len(batch) >= share * len(lane.slots))

    def _delay_over(self) -> None:
        self._delay_timer = None
        saved, self._delay_ns = self._delay_ns, 0
        try:
            for lane in self._lanes:
                self._schedule(lane)
        finally:
            self._delay_ns = saved

    def _feeds(self, p: _Pending) -> dict[str, np.ndarray]:
        """The request's inputs plus its control tensors and its sequence's state."""
        work, sequence = p.work, p.sequence
        feeds = dict(work.feeds)
        for c in self.seq.controls:
            if c.kind == START:
                feeds[c.name] = c.true if work.sequence_start else c.false  # type: ignore[assignment]
            elif c.kind == END:
                feeds[c.name] = c.true if work.sequence_end else c.false  # type: ignore[assignment]
            elif c.kind == READY:
                feeds[c.name] = c.true  # type: ignore[assignment]
        if sequence.corrid:
            feeds.update(sequence.corrid)
        restart = work.sequence_start or sequence.state is None
        for st in self.seq.states:
            # the initial value copied: a model may update its state input in place (torch shares it)
            feeds[st.input_name] = st.initial.copy() if restart else sequence.state[st.input_name]  # type: ignore[index]
        return feeds

    def _dispatch(self, lane: _Lane, batch: list[_Pending], feeds: list[dict[str, np.ndarray]]) -> None:
        taken = self.pool.acquire(lane.instance)
        assert taken, "a sequence lane's instance is taken by no one else"
        lane.busy = True
        outputs: dict[str, None] = {}
        for p in batch:
            p.taken = True
            p.sequence.queue.popleft()
            p.sequence.executing = True
            if p.work.sequence_start:  # a (re)start: should it fail, what follows starts from the initial state
                p.sequence.state = None
            outputs.update(dict.fromkeys(p.work.outputs))
        outputs.update(dict.fromkeys(self._state_outputs))
        self._queued -= len(batch)
        self._executing += 1
        self.executing_requests += len(batch)
        loop = self._loop or asyncio.get_running_loop()
        started = time.perf_counter_ns()
        fut: asyncio.Future[Any]
        if self._requests:
            requests = [Request(f, p.work.outputs, p.work.id, p.work.parameters,
                                p.work.is_cancelled or p.future.cancelled, p.work.respond, p.sequence.id,
                                (START_FLAG if p.work.sequence_start else 0) | (END_FLAG if p.work.sequence_end else 0))
                        for p, f in zip(batch, feeds, strict=True)]
            fut = self.pool.run(loop, execute_requests, self, lane.instance, requests)
        else:
            fut = self.pool.run(loop, execute_batch, lane.instance, feeds, list(outputs), [1] * len(batch))
        fut.add_done_callback(functools.partial(self._on_executed, lane, batch, started))

    def _on_executed(self, lane: _Lane, batch: list[_Pending], started: int, fut: asyncio.Future) -> None:
        self.pool.release(lane.instance)
        lane.busy = False
        self._executing -= 1
        self.executing_requests -= len(batch)
        parts: list | None = None
        timings = (0, 0, 0)
        error: ServerError | None = None
        try:
            parts, timings = fut.result()
            self.stats.record_execution(len(batch), *timings)
        except Exception as exc:
            error = self._as_error(exc)
        for p in batch:  # all of the batch first: a slot freed below may start a batch at once
            p.sequence.executing = False
        for i, p in enumerate(batch):
            part = error if parts is None else parts[i]
            try:
                outcome = None if isinstance(part, Exception) else self._outcome(p, part, started, timings)
            except ServerError as exc:
                part = exc
            if not p.future.done():
                if isinstance(part, Exception):
                    p.future.set_exception(self._as_error(part))
                else:
                    p.future.set_result(outcome)  # type: ignore[arg-type]
        for p in batch:
            self._settle(p.sequence)
        self._schedule(lane)
        self._check_idle()

    def _outcome(self, p: _Pending, part: dict[str, np.ndarray] | None, started: int,
                 timings: tuple[int, int, int]) -> Outcome:
        """A request's outcome; its state outputs become its sequence's state (copied: they are views
        of the batch's outputs)."""
        if part is None:  # a decoupled model's: its responses went through Work.respond
            return Outcome({}, started - p.arrival, *timings)
        if self.seq.states:
            missing = [n for n in self._state_outputs if n not in part]
            if missing:
                raise BackendError(f"model '{self.name}' returned no state output {', '.join(missing)}")
            p.sequence.state = {st.input_name: np.array(part[st.output_name]) for st in self.seq.states}
        return Outcome({n: part[n] for n in p.work.outputs}, started - p.arrival, *timings)

    def _as_error(self, exc: Exception) -> ServerError:
        if isinstance(exc, ServerError):
            return exc
        return BackendError(f"model '{self.name}' failed to execute: {exc}")

    # ---- BLS lending (lending.py): a sequence model's instance is never lent --------------------

    def block(self, instance: Instance) -> None:
        """A sequence keeps its instance, so a waiting holder's instance is not lent out: a sequence
        model that calls itself through BLS waits (as in Triton)."""

    def unblock(self, instance: Instance) -> None:
        pass

    def _check_idle(self) -> None:
        if self._queued == 0 and self._executing == 0:
            self._idle.set()

    async def drain(self) -> None:
        await self._idle.wait()
        for timer in (self._idle_timer, self._delay_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._delay_timer = None


def _key(feeds: dict[str, np.ndarray]) -> tuple:
    return tuple([(n, a.shape[1:]) for n, a in feeds.items()])
