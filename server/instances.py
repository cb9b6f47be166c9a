"""A model version's instances and the worker threads that run them.

Each instance executes one batch at a time on a thread of this pool, so a slow model never blocks
the event loop and `instance_group { count: N }` gives N executions in flight. The batcher takes a
free instance, runs work on it, and gives it back; nothing here queues requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .backends.base import Instance

T = TypeVar("T")


class InstancePool:
    def __init__(self, name: str, instances: Sequence[Instance]) -> None:
        self._instances = list(instances)
        self._free = list(reversed(instances))
        self._executor = ThreadPoolExecutor(max_workers=len(instances), thread_name_prefix=f"model-{name}")
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

    def release(self, instance: Instance) -> None:
        self._free.append(instance)
        if len(self._free) == len(self._instances):
            self._all_free.set()

    def run(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run `fn(*args)` on a worker thread; the caller holds the instance it uses."""
        return loop.run_in_executor(self._executor, fn, *args)

    async def close(self) -> None:
        """Wait for executions in flight, then release the instances."""
        await self._all_free.wait()
        self._executor.shutdown(wait=True)
        for instance in self._instances:
            instance.close()
