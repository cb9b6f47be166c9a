"""Why a BLS call can never deadlock the server: an instance whose holder waits is lent out.

A Python model's `execute` may call other models (BLS) and wait for them while it holds its own
instance. Waiting is safe as long as the callee's instances all eventually come free. They do not
when they are all held by callers that are themselves waiting, directly or around a cycle: a model
that calls itself (one instance, held by the caller), or A calling B while B calls A. Triton hangs
there. fuserve's rule, in the scheduler:

    a BLS request that finds no free instance may borrow an instance whose holder is blocked in a
    BLS call, and runs on its own (otherwise idle) waiting thread.

So a BLS request only ever waits while some instance of its callee executes without waiting, and an
execution that does not wait finishes (or starts waiting, and its instance becomes lendable). No
cycle of waits can form. A borrowed instance runs one borrower at a time per waiting holder; the
borrower runs the model on the holder's instance while the holder is parked inside `execute`, so a
recursive model sees the re-entrant call it asked for.

This module is the mechanism both sides share: the thread-local "which instance am I running on"
that the scheduler sets around an execution, and the `Waiter` with which the BLS caller waits for its
answer while running what is lent to it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from ..instances import settle

# runner(fn, *args), called on the event loop: runs fn(*args) on the BLS caller's thread and
# returns a future (of the event loop) for its result
Runner = Callable[..., "asyncio.Future[Any]"]


class Lender(Protocol):
    """A scheduler that can lend out an instance while its holder waits on a BLS call."""

    def block(self, instance: Any) -> None: ...

    def unblock(self, instance: Any) -> None: ...


_local = threading.local()


def held() -> tuple[Lender, Any] | None:
    """The (scheduler, instance) the current thread is executing on, if any."""
    return getattr(_local, "slot", None)


@contextlib.contextmanager
def holding(lender: Lender, instance: Any) -> Iterator[None]:
    previous = held()
    _local.slot = (lender, instance)
    try:
        yield
    finally:
        _local.slot = previous


class Waiter:
    """A BLS caller on a model's worker thread: waits for its answer, running lent work meanwhile."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]] | None] = \
            queue.SimpleQueue()

    def runner(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self.loop.create_future()
        self._jobs.put((fn, args, future))
        return future

    def wait(self, answer: concurrent.futures.Future[Any], timeout: float | None) -> Any:
        """The answer's result (raising what it raised); TimeoutError past `timeout` seconds."""
        answer.add_done_callback(lambda _: self._jobs.put(None))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                job = self._jobs.get(timeout=left)
            except queue.Empty:
                raise TimeoutError from None
            if job is None:
                return answer.result()
            fn, args, future = job
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # the scheduler's own done-callback reports it
                result, error = None, exc
            self.loop.call_soon_threadsafe(settle, future, result, error)


class AsyncWaiter:
    """A BLS caller in an `async def execute`, on its instance's own event loop: lent work runs on
    that loop's thread, between the coroutine's steps."""

    def __init__(self, loop: asyncio.AbstractEventLoop, model_loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.model_loop = model_loop

    def runner(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self.loop.create_future()

        def run() -> None:
            try:
                result, error = fn(*args), None
            except BaseException as exc:
                result, error = None, exc
            self.loop.call_soon_threadsafe(settle, future, result, error)

        self.model_loop.call_soon_threadsafe(run)
        return future
