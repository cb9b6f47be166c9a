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

import time
from dataclasses import dataclass, field


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
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    by_batch_size: dict[int, BatchStats] = field(default_factory=dict)

    def record_execution(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One model execution of `batch_size` rows."""
        self.execution_count += 1
        b = self.by_batch_size.get(batch_size)
        if b is None:
            b = self.by_batch_size[batch_size] = BatchStats()
        b.compute_input.add(input_ns)
        b.compute_infer.add(infer_ns)
        b.compute_output.add(output_ns)

    def record_success(self, rows: int, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int,
                       output_ns: int) -> None:
        """One request answered; its share of the execution's compute times."""
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.inference_count += rows
        self.success.add(total_ns)
        self.queue.add(queue_ns)
        self.compute_input.add(input_ns)
        self.compute_infer.add(infer_ns)
        self.compute_output.add(output_ns)

    def record_failure(self, total_ns: int) -> None:
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.fail.add(total_ns)

    def as_dict(self) -> dict:
        """Triton's JSON form (the gRPC ModelStatistics message has the same field names)."""
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
        }

    def as_dict_with_queue(self, pending: int, executing: int) -> dict:
        """`as_dict` plus fuserve's own fields (HTTP only): requests queued and executing now, and
        requests cancelled while queued so far."""
        d = self.as_dict()
        d["fuserve_pending"] = pending
        d["fuserve_executing"] = executing
        d["fuserve_cancelled"] = self.cancelled
        return d
