"""The scheduler contract: what the service hands a loaded model version, and what comes back.

    pending = scheduler.enqueue(work)     # checked by the service first; raises Rejected when full
    outcome = await pending.future        # the request's outputs and where its time went
    scheduler.withdraw(pending)           # the client went away: queued work is dropped
    await scheduler.drain()               # before an unloaded version is closed

`scheduler_for` (in `__init__.py`) picks the scheduler from the model's config, as
backends/registry.py picks a backend. The service never knows which one it talks to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..types import Parameters
from .lending import Runner


@dataclass(slots=True, eq=False)
class Work:
    """One request as the model sees it: validated inputs, the outputs it wants, its row count."""

    feeds: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    rows: int
    requests: int = 1  # clients' requests it carries: more for a frontend worker's group (ipc.py)
    priority: int = 0  # 0: the model's default priority level; 1 is the highest
    timeout_us: int = 0  # 0: the queue policy's default
    # What a backend that executes requests (not one concatenated batch) also sees of the request,
    # and what an ensemble passes on to its steps: the client's id and its own parameters.
    id: str = ""
    parameters: Parameters = field(default_factory=dict)
    # Set for a BLS request made from a model's thread: how an instance lent to it runs on that
    # (waiting) thread; see lending.py.
    runner: Runner | None = None
    # Set for a request to a decoupled model (InferenceService.stream): where its responses go, from
    # the model's thread, and whether its caller has gone away. Its future then only says that the
    # execution is over; the request itself ends with the response flagged final.
    respond: Callable[[Any, bool], None] | None = None
    is_cancelled: Callable[[], bool] | None = None
    # The request parameters sequence_id, sequence_start and sequence_end, for the sequence batcher
    # (0 / "": none)
    sequence_id: int | str = 0
    sequence_start: bool = False
    sequence_end: bool = False


@dataclass(slots=True)
class Outcome:
    outputs: dict[str, np.ndarray]
    queue_ns: int
    input_ns: int
    infer_ns: int
    output_ns: int


class Pending(Protocol):
    @property
    def future(self) -> asyncio.Future[Outcome]: ...


class Scheduler(Protocol):
    @property
    def queued(self) -> int:
        """Requests waiting (not yet executing), for the statistics extension."""
        ...

    @property
    def executing_requests(self) -> int: ...

    def enqueue(self, work: Work) -> Any:
        """Queue `work`; the returned Pending's future is answered with its Outcome or its error."""
        ...

    def withdraw(self, pending: Any) -> None:
        """The caller went away: drop what is still queued; nothing more is answered."""
        ...

    async def drain(self) -> None:
        """Wait until nothing is queued or executing."""
        ...


class DirectScheduler(Scheduler, Protocol):
    """A scheduler that executes nothing itself (an ensemble) may also run a request in the
    caller's own task: `await run(work)`, the same as enqueue + await, without a task and a future
    of its own. The service uses it when it has a task to give (`InferenceService.infer`)."""

    async def run(self, work: Work) -> Outcome: ...


class GroupingScheduler(Scheduler, Protocol):
    """A scheduler that may take several requests' rows as one Work (the frontend workers' groups,
    ipc.py): `group_rows(rows)` is the most rows it takes so now, for a group of `rows`, 0 where it
    takes none (each request must then be queued alone: it counts requests, or runs them as
    requests)."""

    def group_rows(self, rows: int = 0) -> int: ...


# How an ensemble runs one step through the same core as a client request (the callee's checks,
# scheduler and statistics): model name, version ("" for the latest), input tensors, the outputs it
# wants, and the parent request's id and parameters -> the step's outputs. The service provides it.
StepRunner = Callable[[str, str, dict[str, np.ndarray], tuple[str, ...], str, Parameters],
                      Awaitable[dict[str, np.ndarray]]]
