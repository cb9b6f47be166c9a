"""Per-model-version inference statistics in the shape of Triton's statistics extension.

Durations are (count, total nanoseconds) pairs, as Triton reports them:
  success / fail   whole requests, from arrival at the service to the response being ready
  queue            waiting for an instance
  compute_input    checking the request and preparing the model's inputs
  compute_infer    running the model
  compute_output   collecting the model's outputs into the response
Per-batch-size figures count executions. Everything is updated on the event loop thread only.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client.utils import floatToGoString

# Histogram bucket upper bounds (the +Inf bucket is implied).
LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RESPONSE_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)



class Histogram:
    """Bucket counts and a sum, updated with one bisect per observation."""

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.total += value * times
        self.count += times

    def cumulative(self) -> list[tuple[str, float]]:
        """(upper bound, observations at or below it) per bucket, as Prometheus histograms count."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((floatToGoString(bound), running))
        return out

# Why a request to a loaded model failed (the `reason` label of nv_inference_request_failure).
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStats:
    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0  # rows (batch entries) inferred
    execution_count: int = 0  # model executions
    cancelled: int = 0  # requests dropped from the queue because their caller went away
    grouped: int = 0  # requests a frontend worker sent in a group, queued as one with others (ipc.py)
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    by_batch_size: dict[int, BatchStats] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_REASONS, 0))
    # Observed only when metrics are enabled (`histograms` is None otherwise).
    histograms: dict[str, Histogram] | None = None
    # The dynamic batcher's learned cost per batch size (scheduler/batch_cost.py), where it has one.
    cost_view: Callable[[], dict] | None = None

    def enable_histograms(self) -> None:
        self.histograms = {"request": Histogram(LATENCY_BUCKETS_MS), "queue": Histogram(LATENCY_BUCKETS_MS),
                           "compute": Histogram(LATENCY_BUCKETS_MS), "batch": Histogram(BATCH_BUCKETS),
                           "first_response": Histogram(LATENCY_BUCKETS_MS), "responses": Histogram(RESPONSE_BUCKETS)}

    def record_stream(self, first_ns: int, responses: int) -> None:
        """A decoupled model's request, done: how long until its first response (or its final, when
        it sent none) and how many responses it sent."""
        if self.histograms is not None:
            self.histograms["first_response"].observe(first_ns / 1e6)
            self.histograms["responses"].observe(responses)

    def record_execution(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One model execution of `batch_size` rows."""
        self.execution_count += 1
        b = self.by_batch_size.get(batch_size)
        if b is None:
            b = self.by_batch_size[batch_size] = BatchStats()
        b.compute_input.add(input_ns)
        b.compute_infer.add(infer_ns)
        b.compute_output.add(output_ns)
        if self.histograms is not None:
            self.histograms["batch"].observe(batch_size)

    def record_success(self, rows: int, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int,
                       output_ns: int, requests: int = 1) -> None:
        """One request answered (`requests` of them, `rows` together, each with these times: a
        frontend worker's group); its share of the execution's compute times."""
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.inference_count += rows
        n = requests
        self.success.add(total_ns * n, n)
        self.queue.add(queue_ns * n, n)
        self.compute_input.add(input_ns * n, n)
        self.compute_infer.add(infer_ns * n, n)
        self.compute_output.add(output_ns * n, n)
        if self.histograms is not None:
            h = self.histograms
            h["request"].observe(total_ns / 1e6, n)
            h["queue"].observe(queue_ns / 1e6, n)
            h["compute"].observe(infer_ns / 1e6, n)

    def record_failure(self, total_ns: int, reason: str) -> None:
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.fail.add(total_ns)
        self.failures[reason] += 1

    def as_dict(self, pending: int, executing: int) -> dict:
        """Triton's JSON form (the gRPC ModelStatistics message has the same field names), plus
        fuserve's own fields (the gRPC frontend drops them): requests queued and executing now,
        requests cancelled while queued so far, and the dynamic batcher's learned cost per batch size."""
        zero = {"count": 0, "ns": 0}
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_dict(),
                "fail": self.fail.as_dict(),
                "queue": self.queue.as_dict(),
                "compute_input": self.compute_input.as_dict(),
                "compute_infer": self.compute_infer.as_dict(),
                "compute_output": self.compute_output.as_dict(),
                "cache_hit": dict(zero),
                "cache_miss": dict(zero),
            },
            "batch_stats": [
                {"batch_size": size, "compute_input": b.compute_input.as_dict(),
                 "compute_infer": b.compute_infer.as_dict(), "compute_output": b.compute_output.as_dict()}
                for size, b in sorted(self.by_batch_size.items())
            ],
            "memory_usage": [],
            "fuserve_pending": pending,
            "fuserve_executing": executing,
            "fuserve_cancelled": self.cancelled,
            "fuserve_grouped": self.grouped,
            **({"fuserve_batch_cost": self.cost_view()} if self.cost_view is not None else {}),
        }
