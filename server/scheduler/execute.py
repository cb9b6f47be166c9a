"""What runs on an instance's worker thread: one execution, and how its outputs are split.

`execute_batch` concatenates the batched requests' rows for a backend that takes one batch, executes
it and splits the outputs (views, no copies); when the batch fails, each request is executed alone so
only the requests that fail on their own get the error. `execute_requests` hands a backend that takes
the requests themselves (a Python model) the list, under `lending.holding` so that a BLS call made
from the model can lend the instance out while it waits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import cast

import numpy as np

from ..backends.base import Instance, Request, RequestResult
from ..errors import BackendError
from .lending import Lender, holding


def execute_batch(instance: Instance, feeds_list: list[dict[str, np.ndarray]], outputs: Sequence[str],
                   rows: list[int]) -> tuple[list[dict[str, np.ndarray] | Exception], tuple[int, int, int]]:
    """On the worker thread: execute the batch; if it fails, execute each of its requests alone, so
    that one request the model cannot take (a token id out of range, text that is not a number)
    fails by itself and its batch-mates are answered. Per request: its outputs or its exception."""
    try:
        parts, timings = _execute_once(instance, feeds_list, outputs, rows)
        return cast(list[dict[str, np.ndarray] | Exception], parts), timings
    except Exception:
        if len(feeds_list) == 1:
            raise
    t0 = time.perf_counter_ns()
    alone: list[dict[str, np.ndarray] | Exception] = []
    for feeds, n in zip(feeds_list, rows, strict=True):
        try:
            alone.append(_execute_once(instance, [feeds], outputs, [n])[0][0])
        except Exception as exc:
            alone.append(exc)
    return alone, (0, time.perf_counter_ns() - t0, 0)


def execute_requests(lender: Lender, instance: Instance, requests: list[Request]
                      ) -> tuple[list[RequestResult | None], tuple[int, int, int]]:
    """On the worker thread (or a BLS caller's, when lent), for a backend that takes the requests
    themselves: one result per request. Nothing is retried: running a model's `execute` twice could
    repeat its side effects, so an exception fails every request of the call (as in Triton), and an
    error for one request is that request's result. The thread records which instance it runs on, so
    a BLS call made from it can lend that instance out while it waits (lending.py)."""
    t0 = time.perf_counter_ns()
    with holding(lender, instance):
        results = instance.execute_requests(requests)
    if len(results) != len(requests):
        raise BackendError(f"the backend answered {len(results)} of {len(requests)} requests")
    return results, (0, time.perf_counter_ns() - t0, 0)


def _execute_once(instance: Instance, feeds_list: list[dict[str, np.ndarray]], outputs: Sequence[str],
                  rows: list[int]) -> tuple[list[dict[str, np.ndarray]], tuple[int, int, int]]:
    """Concatenate the requests' rows, execute once, split the outputs."""
    t0 = time.perf_counter_ns()
    if len(feeds_list) == 1:
        feeds = feeds_list[0]
    else:
        feeds = {name: np.concatenate([f[name] for f in feeds_list]) for name in feeds_list[0]}  # [sum(rows), ...]
    t1 = time.perf_counter_ns()
    results = instance.execute(feeds, outputs)
    t2 = time.perf_counter_ns()
    if len(feeds_list) == 1:
        parts = [results]
    else:
        total = sum(rows)
        for name, arr in results.items():
            if arr.ndim == 0 or arr.shape[0] != total:
                raise BackendError(f"output '{name}' has shape {list(arr.shape)}: its first dim should be the "
                                  f"batch size {total}")
        parts, start = [], 0
        for n in rows:
            parts.append({name: arr[start:start + n] for name, arr in results.items()})  # views, no copy
            start += n
    return parts, (t1 - t0, t2 - t1, time.perf_counter_ns() - t2)
