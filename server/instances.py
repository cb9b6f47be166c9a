"""A model version's instances and the worker threads that run them.

Each instance executes one batch at a time on a thread of this pool, so a slow model never blocks
the event loop and `instance_group { count: N }` gives N executions in flight. The batcher takes a
free instance, runs work on it, and gives it back; nothing here queues requests.

The threads are N plain threads reading one `queue.SimpleQueue`, answering with one
`call_soon_threadsafe`: a round trip from the event loop to a thread and back costs ~17 us here
against ~40 us through `loop.run_in_executor` and a ThreadPoolExecutor (its work item, its
concurrent Future, and the chaining of that future to an asyncio one).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .backends.base import Instance

T = TypeVar("T")


def _run_job(loop: asyncio.AbstractEventLoop, future: asyncio.Future, fn: Callable[..., Any], args: tuple) -> None:
    try:
        result, error = fn(*args), None
    except BaseException as exc:
        result, error = None, exc
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for the answer
        loop.call_soon_threadsafe(settle, future, result, error)


class InstancePool:
    def __init__(self, name: str, instances: Sequence[Instance]) -> None:
        self._instances = list(instances)
        self._free = list(reversed(instances))
        self._jobs: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future, Callable[..., Any],
                                            tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"model-{name}_{i}", daemon=True)
                         for i in range(len(instances))]
        for thread in self._threads:
            thread.start()
        self._all_free = asyncio.Event()
        self._all_free.set()

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(i.device for i in self._instances)

    @property
    def executes_requests(self) -> bool:
        """The backend takes the batched requests themselves (see backends/base.py)."""
        return any(i.executes_requests for i in self._instances)

    @property
    def inline_ok(self) -> bool:
        return all(i.inline_ok for i in self._instances)

    def try_acquire(self) -> Instance | None:
        """A free instance, or None when all are executing."""
        if not self._free:
            return None
        instance = self._free.pop()
        self._all_free.clear()
        return instance

    @property
    def instances(self) -> tuple[Instance, ...]:
        return tuple(self._instances)

    def acquire(self, instance: Instance) -> bool:
        """Take this instance if it is free (a scheduler that keeps work on one instance)."""
        if instance not in self._free:
            return False
        self._free.remove(instance)
        self._all_free.clear()
        return True

    def release(self, instance: Instance) -> None:
        self._free.append(instance)
        if len(self._free) == len(self._instances):
            self._all_free.set()

    def run(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run `fn(*args)` on a worker thread; the caller holds the instance it uses."""
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            _run_job(*job)
            del job  # the job's inputs (a client's shared memory, perhaps) are not kept while waiting for the next

    async def close(self) -> None:
        """Wait for executions in flight, then release the instances."""
        await self._all_free.wait()
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        for instance in self._instances:  # off the loop: a Python model's finalize() may block
            await asyncio.to_thread(instance.close)


def settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """Answer `future` (on its loop's thread) unless it was cancelled meanwhile."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
