"""Holding dispatch while several requests are queued at once.

A batcher dispatches as soon as a request arrives and an instance is free, which is right for one
request at a time. But the scheduler process of `--frontend-workers` gets a whole frame of queued
work at once (one worker's event-loop turn: several groups, or a group cut into runs, ipc.py):
dispatching on its first entry executes that alone and leaves the rest for the next batch, so
batches alternate small and large and each costs its thread hand-off twice as often. While a
`held()` block runs, a batcher that would dispatch notes that it should; when the outermost block
ends, each such batcher forms its batches from everything queued.

Everything here runs on the event loop thread, as the batchers do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)


class _Hold:
    __slots__ = ("depth", "waiting", "releasing")

    def __init__(self) -> None:
        self.depth = 0
        self.releasing = False  # the batchers held are dispatching (see `releasing`)
        self.waiting: dict[Callable[[], None], None] = {}  # each held batcher's schedule, once, in order

    def __enter__(self) -> None:
        self.depth += 1

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.depth -= 1
        if self.depth or not self.waiting:
            return
        waiting, self.waiting = self.waiting, {}
        self.releasing = True
        try:
            for schedule in waiting:
                try:
                    schedule()
                except Exception:  # one model's scheduling never keeps another's from running
                    log.exception("scheduling after a held dispatch failed")
        finally:
            self.releasing = False


HOLD = _Hold()


def held() -> _Hold:
    """`with held():` batchers that get work inside the block dispatch when it ends."""
    return HOLD


def releasing() -> bool:
    """Whether the batches dispatched now were formed from a held block's work: a frame the
    scheduler process read whole, with nothing else for its loop to do until the next one (so a
    cheap batch may execute on the loop itself: batcher.py's `_inline`)."""
    return HOLD.releasing


def dispatch(schedule: Callable[[], None]) -> None:
    """Run `schedule` now, or, inside a held block, once when it ends."""
    if HOLD.depth:
        HOLD.waiting[schedule] = None
    else:
        schedule()
