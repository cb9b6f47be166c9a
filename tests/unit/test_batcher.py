"""The batcher on a small real backend written in Python that records every batch it runs."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import numpy as np
import pytest
from google.protobuf import text_format

from server.errors import ServerError, Unavailable
from server.instances import InstancePool
from server.model_config import ModelConfig, ModelIO, build_spec, instance_specs
from server.scheduler.batcher import Batcher, Work
from server.scheduler.hold import held
from server.stats import ModelStats


class RecordingInstance:
    """Doubles its input; records batch sizes; can be held busy until released; fails on -1."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.threads = []
        self.gate = threading.Event()
        self.gate.set()

    io = ModelIO((), ())
    device = "CPUExecutionProvider"
    executes_requests = False  # one concatenated batch, as onnxruntime's
    inline_ok = True

    def check_inputs(self, feeds) -> None:
        pass

    threads: list[str]
    delay = 0.0

    def execute(self, inputs, outputs):
        self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        x = inputs["x"]
        self.batches.append(x.shape[0])
        self.threads.append(threading.current_thread().name)
        if (x == -1).any():
            raise RuntimeError("poisoned row")
        return {"y": x * 2}

    def close(self) -> None:
        pass


def make(config: str, instances: int = 1):
    cfg = text_format.Parse('name: "m"\ninput [{name: "x" data_type: TYPE_FP32 dims: [-1]}]\n'
                            'output [{name: "y" data_type: TYPE_FP32 dims: [-1]}]\n' + config, ModelConfig())
    spec = build_spec(cfg, "onnxruntime", instance_specs(cfg, 0), "w")
    backends = [RecordingInstance() for _ in range(instances)]
    stats = ModelStats("m", "1")
    return Batcher(spec, InstancePool("m", backends), stats), backends, stats


# Triton's rule, everything queued up to max_batch_size (fuserve sizes batches by measured cost
# unless told not to: see test_batch_cost.py)
GREEDY = 'parameters { key: "fuserve_batch_learning" value: { string_value: "false" } }\n'


def work(value: float, rows: int = 1, width: int = 2, **kw) -> Work:
    return Work({"x": np.full((rows, width), value, dtype=np.float32)}, ("y",), rows, **kw)


def run(coro):
    return asyncio.run(coro)


def test_requests_queued_behind_a_busy_instance_form_one_batch():
    async def main():
        batcher, (inst,), stats = make("max_batch_size: 8\ndynamic_batching {}\n" + GREEDY)
        inst.gate.clear()
        first = asyncio.ensure_future(batcher.submit(work(0)))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher.submit(work(k, rows=1 + k % 2))) for k in range(1, 5)]
        await asyncio.sleep(0.05)
        assert batcher.queued == 4
        inst.gate.set()
        outs = await asyncio.gather(first, *rest)
        for k, out in enumerate(outs):
            assert (out.outputs["y"] == 2 * k).all() and out.outputs["y"].shape[0] == (1 + k % 2 if k else 1)
        assert inst.batches == [1, 6]  # rows 2+1+2+1 behind the first
        assert stats.execution_count == 2 and stats.inference_count == 0  # the service records requests

    run(main())


@pytest.mark.parametrize("hold", [False, True])
def test_work_queued_in_a_held_block_is_dispatched_together(hold):
    """A frame of a frontend worker's inferences is queued inside `held()` (server/workers.py):
    with an instance free, the first entry would otherwise execute alone and the rest after it."""
    async def main():
        batcher, (inst,), _ = make("max_batch_size: 8\ndynamic_batching {}\n" + GREEDY)
        inst.gate.clear()  # (what is dispatched waits: the test sees the queue as the block left it)
        with held() if hold else contextlib.nullcontext():
            pendings = [batcher.enqueue(work(k, rows=2)) for k in range(3)]
            assert batcher.queued == (3 if hold else 2)
        assert batcher.queued == (0 if hold else 2)
        inst.gate.set()
        outs = await asyncio.wait_for(asyncio.gather(*(p.future for p in pendings)), 10)
        assert [float(o.outputs["y"][0, 0]) for o in outs] == [0.0, 2.0, 4.0]
        assert inst.batches == ([6] if hold else [2, 4])
        with held():
            with held():  # nested: dispatched when the outermost block ends
                later = batcher.enqueue(work(7))
            assert batcher.queued == 1
        assert (await asyncio.wait_for(later.future, 10)).outputs["y"][0, 0] == 14.0

    run(main())


def test_max_batch_size_bounds_a_batch_and_keys_separate_shapes():
    async def main():
        batcher, (inst,), _ = make("max_batch_size: 4\ndynamic_batching {}\n" + GREEDY)
        inst.gate.clear()
        busy = asyncio.ensure_future(batcher.submit(work(0)))
        await asyncio.sleep(0.05)
        reqs = [batcher.submit(work(k, width=2)) for k in range(6)] + [batcher.submit(work(9, width=3))]
        tasks = [asyncio.ensure_future(r) for r in reqs]
        await asyncio.sleep(0.05)
        inst.gate.set()
        outs = await asyncio.gather(busy, *tasks)
        assert outs[-1].outputs["y"].shape == (1, 3)
        assert sorted(inst.batches) == [1, 1, 2, 4]  # 4 + 2 of width 2, 1 of width 3

    run(main())


def test_queue_delay_and_preferred_size():
    async def main():
        batcher, (inst,), _ = make("max_batch_size: 8\ndynamic_batching { preferred_batch_size: [3] "
                                   "max_queue_delay_microseconds: 100000 }")
        t0 = time.perf_counter()
        lone = await batcher.submit(work(1))
        assert 0.09 <= time.perf_counter() - t0 < 0.5 and lone.queue_ns >= 90_000_000  # waited the delay
        t0 = time.perf_counter()
        await asyncio.gather(*(batcher.submit(work(k)) for k in range(3)))
        assert time.perf_counter() - t0 < 0.09  # the preferred size dispatched without waiting
        assert inst.batches == [1, 3]

    run(main())


def test_full_queue_rejects_immediately():
    async def main():
        batcher, (inst,), _ = make("max_batch_size: 1\ndynamic_batching { default_queue_policy "
                                   "{ max_queue_size: 2 } }")
        inst.gate.clear()
        tasks = [asyncio.ensure_future(batcher.submit(work(k))) for k in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(Unavailable, match="queue is full"):
            await batcher.submit(work(9))
        inst.gate.set()
        assert len(await asyncio.gather(*tasks)) == 3

    run(main())


def test_timeout_reject_and_client_override():
    async def main():
        batcher, (inst,), _ = make("max_batch_size: 1\ndynamic_batching { default_queue_policy "
                                   "{ default_timeout_microseconds: 20000 allow_timeout_override: true } }")
        inst.gate.clear()
        busy = asyncio.ensure_future(batcher.submit(work(0)))
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        with pytest.raises(Unavailable, match="timed out"):
            await batcher.submit(work(1))
        assert time.perf_counter() - t0 < 0.2  # rejected at its deadline, not when the instance frees
        longer = asyncio.ensure_future(batcher.submit(work(2, timeout_us=10_000_000)))  # can't lengthen
        shorter = asyncio.ensure_future(batcher.submit(work(3, timeout_us=1000)))
        for fut in (longer, shorter):
            with pytest.raises(Unavailable):
                await fut
        inst.gate.set()
        await busy

    run(main())


def test_priority_levels():
    async def main():
        batcher, (inst,), _ = make("max_batch_size: 1\ndynamic_batching { priority_levels: 3 "
                                   "default_priority_level: 3 }")
        inst.gate.clear()
        order = []

        async def one(value, priority):
            out = await batcher.submit(work(value, priority=priority))
            order.append(int(out.outputs["y"][0, 0] / 2))

        busy = asyncio.ensure_future(one(0, 0))
        await asyncio.sleep(0.02)
        tasks = [asyncio.ensure_future(one(v, p)) for v, p in ((1, 0), (2, 2), (3, 1), (4, 9))]
        await asyncio.sleep(0.02)
        inst.gate.set()
        await asyncio.gather(busy, *tasks)
        assert order == [0, 3, 2, 1, 4]  # 9 is clamped to the lowest level

    run(main())


def test_cancelled_request_is_dropped_before_execution():
    async def main():
        batcher, (inst,), stats = make("max_batch_size: 4\ndynamic_batching {}")
        inst.gate.clear()
        busy = asyncio.ensure_future(batcher.submit(work(0)))
        await asyncio.sleep(0.02)
        doomed = asyncio.ensure_future(batcher.submit(work(5)))
        kept = asyncio.ensure_future(batcher.submit(work(6)))
        await asyncio.sleep(0.02)
        doomed.cancel()
        await asyncio.sleep(0.01)
        inst.gate.set()
        await asyncio.gather(busy, kept)
        assert inst.batches == [1, 1] and stats.cancelled == 1

    run(main())


def test_failure_fails_only_its_batch():
    async def main():
        batcher, (inst,), _ = make("max_batch_size: 1\ndynamic_batching {}")
        with pytest.raises(ServerError, match="failed to execute: poisoned row"):
            await batcher.submit(work(-1))
        assert (await batcher.submit(work(4))).outputs["y"][0, 0] == 8

    run(main())


def test_a_request_that_fails_its_batch_fails_alone():
    """The poisoned request's batch fails; each of its requests is then run alone, so only the
    poisoned one gets the error and its batch-mates their own rows."""
    async def main():
        batcher, (inst,), stats = make("max_batch_size: 8\ndynamic_batching {}\n" + GREEDY)
        inst.gate.clear()
        first = asyncio.ensure_future(batcher.submit(work(1)))  # holds the instance
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher.submit(work(v))) for v in (2, -1, 3)]
        await asyncio.sleep(0.05)
        inst.gate.set()
        assert (await first).outputs["y"][0, 0] == 2
        results = await asyncio.gather(*rest, return_exceptions=True)
        assert results[0].outputs["y"][0, 0] == 4 and results[2].outputs["y"][0, 0] == 6
        assert isinstance(results[1], ServerError) and "poisoned row" in results[1].message
        assert inst.batches == [1, 3, 1, 1, 1]  # the batch of 3 failed, then each alone

    run(main())


def test_preserve_ordering_across_instances():
    async def main():
        batcher, (a, b), _ = make("max_batch_size: 1\ndynamic_batching { preserve_ordering: true }", instances=2)
        a.gate.clear()  # the pool hands out instance a first: its request finishes last
        done = []

        async def one(v):
            await batcher.submit(work(v))
            done.append(v)

        tasks = [asyncio.ensure_future(one(v)) for v in (1, 2)]
        await asyncio.sleep(0.1)
        assert b.batches == [1] and done == []  # 2 ran on b but waits for 1
        a.gate.set()
        await asyncio.gather(*tasks)
        assert done == [1, 2]

    run(main())


def test_drain_waits_for_queued_and_executing():
    async def main():
        batcher, (inst,), _ = make("max_batch_size: 1\ndynamic_batching {}")
        inst.gate.clear()
        tasks = [asyncio.ensure_future(batcher.submit(work(k))) for k in range(3)]
        await asyncio.sleep(0.02)
        drained = asyncio.ensure_future(batcher.drain())
        await asyncio.sleep(0.02)
        assert not drained.done()
        inst.gate.set()
        await drained
        assert all(t.done() for t in tasks)

    run(main())


def test_lone_requests_to_a_cheap_model_run_inline_and_failures_stay_their_own():
    """After a few measured executions, a cheap single-instance CPU model at low load runs on the
    event loop thread (no hand-off); a failing request there still fails alone."""
    async def main():
        batcher, (inst,), _ = make("max_batch_size: 4\ndynamic_batching {}")
        for v in range(12):
            assert (await batcher.submit(work(v))).outputs["y"][0, 0] == 2 * v
        assert inst.threads[0].startswith("model-") and inst.threads[-1] == threading.current_thread().name
        with pytest.raises(ServerError, match="poisoned row"):
            await batcher.submit(work(-1))
        assert (await batcher.submit(work(5))).outputs["y"][0, 0] == 10

    run(main())


NEVER_INLINE = 'parameters { key: "fuserve_inline_execution" value: { string_value: "never" } }\n'


@pytest.mark.parametrize("delay, never, inline", [(0.0, False, True), (0.00025, False, False), (0.0, True, False)])
def test_a_cheap_batch_of_a_held_frame_runs_inline(delay, never, inline):
    """A batch of several requests runs on the loop thread only when it was formed from a held
    block's work (a frontend worker's frame, whose scheduler loop has nothing else to do) and its
    executions take less than INLINE_HELD_BELOW_NS (0.2 ms; a 0.25 ms model stays on its thread);
    `fuserve_inline_execution: "never"` keeps it on its thread too."""
    async def main():
        config = "max_batch_size: 8\ndynamic_batching {}\n" + GREEDY + (NEVER_INLINE if never else "")
        batcher, (inst,), _ = make(config)
        inst.delay = delay
        for v in range(30):  # measured: cheap enough for lone requests inline (below 0.5 ms)
            await asyncio.wait_for(batcher.submit(work(v)), 10)
        here = threading.current_thread().name
        assert (inst.threads[-1] == here) != never
        for hold in (False, True):
            inst.threads.clear()
            with held() if hold else contextlib.nullcontext():
                queued = [batcher.enqueue(work(k)) for k in range(3)]
            outs = await asyncio.wait_for(asyncio.gather(*(p.future for p in queued)), 10)
            assert [float(o.outputs["y"][0, 0]) for o in outs] == [0.0, 2.0, 4.0]
            if hold:  # one batch of 3, formed when the block ended
                assert inst.batches[-1] == 3 and (inst.threads == [here]) == inline, inst.threads
            else:  # the first alone (inline: a lone request), then the two behind it, on the thread
                assert inst.batches[-2:] == [1, 2] and (inst.threads[0] == here) != never
                assert inst.threads[1].startswith("model-"), inst.threads

    run(main())


def test_a_group_of_requests_is_not_a_lone_request():
    """One queue entry that carries several requests' rows (a frontend worker's group) is no lone
    request: outside a held frame, a 0.3 ms model runs it on its thread, though it runs a lone
    request inline (below INLINE_BELOW_NS, 1 ms)."""
    async def main():
        batcher, (inst,), _ = make("max_batch_size: 8\ndynamic_batching {}\n" + GREEDY)
        inst.delay = 0.0003
        here = threading.current_thread().name
        for v in range(30):
            await asyncio.wait_for(batcher.submit(work(v)), 10)
        assert inst.threads[-1] == here  # lone requests: inline
        for _ in range(3):
            inst.threads.clear()
            grouped = work(1.0, rows=5)
            grouped.requests = 5
            out = await asyncio.wait_for(batcher.submit(grouped), 10)
            assert out.outputs["y"].shape[0] == 5
            assert inst.threads and inst.threads[0].startswith("model-"), inst.threads

    run(main())


@pytest.mark.parametrize("config,instances,delay", [
    ('max_batch_size: 4\ndynamic_batching {}\nparameters { key: "fuserve_inline_execution" '
     'value: { string_value: "never" } }', 1, 0.0),
    ("max_batch_size: 4\ndynamic_batching {}", 2, 0.0),  # two instances run side by side on threads
    ("max_batch_size: 4\ndynamic_batching {}", 1, 0.003),  # 3 ms an execution: too slow to block the loop
])
def test_models_that_must_not_block_the_loop_stay_on_their_threads(config, instances, delay):
    async def main():
        batcher, backends, _ = make(config, instances=instances)
        for b in backends:
            b.delay = delay
        for v in range(12):
            await batcher.submit(work(v))
        assert all(t.startswith("model-") for b in backends for t in b.threads)

    run(main())
