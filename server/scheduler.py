"""Runs executions of one model version on its instances, off the event loop.

Each instance executes one request at a time on a worker thread of its own pool, so a slow model
never blocks the event loop and `instance_group { count: N }` gives N executions in flight. This is
the direct (unbatched) scheduler; the dynamic batcher sits in front of the same pool.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .backends.base import Instance


class InstancePool:
    def __init__(self, name: str, instances: Sequence[Instance]) -> None:
        self._instances = list(instances)
        self._free = list(instances)
        self._slots = asyncio.Semaphore(len(instances))
        self._executor = ThreadPoolExecutor(max_workers=len(instances), thread_name_prefix=f"model-{name}")

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(i.device for i in self._instances)

    async def execute(self, inputs: Mapping[str, np.ndarray],
                      outputs: Sequence[str]) -> tuple[dict[str, np.ndarray], int, int]:
        """Run on the next free instance; return (outputs, ns waiting for it, ns executing)."""
        arrived = time.perf_counter_ns()
        async with self._slots:
            instance = self._free.pop()
            started = time.perf_counter_ns()
            try:
                loop = asyncio.get_running_loop()
                results = await loop.run_in_executor(self._executor, instance.execute, inputs, outputs)
            finally:
                self._free.append(instance)
            return results, started - arrived, time.perf_counter_ns() - started

    async def close(self) -> None:
        """Wait for executions in flight, then release the instances."""
        for _ in self._instances:
            await self._slots.acquire()
        self._executor.shutdown(wait=True)
        for instance in self._instances:
            instance.close()
