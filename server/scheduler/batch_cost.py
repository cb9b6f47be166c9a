"""What a batch of each size costs, learned online per model version, and the size to form.

A model is not always cheaper per row in larger batches: MiniLM on one onnxruntime thread does
31 rows/s at batch 4 and 25 at batch 64, so a batcher that takes everything queued (Triton's)
loses a fifth of the throughput exactly when the queue is deep. `CostCurve` measures instead.

    buckets    1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, ... up to max_batch_size (and
               max_batch_size itself): a batch of r rows counts in the largest bucket <= r. Per
               bucket, moving averages of the batch's execution time (on the instance's thread:
               the inputs' concatenation, the model, the outputs' split) and of its rows. The
               hand-offs to the thread and back are left out: where the event loop is what limits
               throughput (add_sub), they grow with the load rather than the batch, and counting
               them made add_sub's curve flat and its batches smaller (mean 20 rows, not 27).
    size       the most rows to form: up to the top of the bucket with the most rows per second
               (bucket 4 forms 4 or 5 rows), so that a batch is what its bucket measured; but
               only where the bucket above it was measured and did no better. Otherwise
               everything queued (up to max_batch_size), as Triton forms it.
    learning   a probe measures a bucket against the best, their batches alternating (5 of each),
               so that a machine whose speed drifts moves both alike. Climbing from 1, each bucket
               up is probed while it stays within 10% of the best so far; then every PROBE_EVERY
               batches, the neighbour above or below the best (in turn). The probe wins
               when it does 2% more rows per second, larger or smaller; within 2% the choice
               stays, so noise alone does not walk it (a 5% margin up and none down walked
               MiniLM's curve down to 1, where 2-3 do 2-5% better, docs/perf.md; at a deep
               queue a tie costs no latency either way); the interval doubles, up to 256, while
               probes come out 10% worse. A probe the queue never fills is given up. Batches are filed
               by the probe and side that formed them (a tag from `formed`), not by when or where
               they complete, and a side is judged by its own batches' rows per second: requests
               of several rows each may not form every bucket. Measured sizes only: no shape of
               the curve is assumed. The constants come from simulating the
               curves measured in docs/perf.md with 5-20% noise per batch and the machine's
               speed drifting by up to 35% over 10-40 s (tests/unit/test_batch_cost.py drives
               the same simulation).

Every call here is O(1) or O(buckets) per batch (12 for max_batch_size 64) on the event loop
thread; nothing runs per request except `predict`, in latency-target mode.
"""

from __future__ import annotations

import bisect

ALPHA = 0.2  # weight of a new sample in a bucket's moving averages
PROBE_EVERY = 16  # batches at the chosen size between two probes of a neighbour
MAX_PROBE_EVERY = 256  # ... at most, after probes that came out clearly worse
MIN_SAMPLES = 5  # batches of each of the two sizes a probe compares
MARGIN = 1.02  # a probed size must do this much better than the best to replace it, larger or smaller
DIP = 0.9  # the first climb goes on past a size at least this good relative to the best so far


class CostCurve:
    __slots__ = ("sizes", "_ns", "_rows", "_samples", "best", "_probe", "_probe_turn", "_probe_sum", "_probe_n",
                 "_control_sum", "_control_n", "_probe_age", "_every", "_climbing", "_since", "_up_next", "_capped",
                 "_gen", "enabled")

    def __init__(self, max_rows: int, enabled: bool = True) -> None:
        sizes = [1, 2, 3]  # then steps of 1.5x and 1.33x in turn: 4, 6, 8, 12, 16, 24, 32, 48, 64, ...
        while sizes[-1] < max_rows:
            sizes.append(sizes[-2] * 2)
        sizes = [s for s in sizes if s < max_rows] + [max_rows]
        self.sizes = tuple(sizes)
        self._ns = [0.0] * len(sizes)  # moving average of a batch's wall time, per bucket
        self._rows = [0.0] * len(sizes)  # moving average of its rows
        self._samples = [0] * len(sizes)
        self.enabled = enabled  # False: learn and report, but `size` is always the largest
        self.best = 0  # index into sizes
        self._probe = -1  # the bucket being measured (-1: none), paired with batches at the best:
        self._probe_turn = False  # whether the next batch is the probe's
        self._probe_sum, self._control_sum = [0.0, 0.0], [0.0, 0.0]  # (ns, rows) of the probe's, the best's
        self._probe_n = self._control_n = self._probe_age = 0
        self._gen = 0  # counts probes begun and ended: a batch's tag says which one formed it
        self._climbing = True
        self._since = 0
        self._every = PROBE_EVERY  # doubles (to MAX_PROBE_EVERY) while probes come out clearly worse
        self._up_next = True
        # whether batches are cut to the best: not after a probe of the size above was given up (a
        # queue that never fills it is no reason to leave requests waiting); again once a probe
        # completes. The climb starts cut, at 1.
        self._capped = True

    # ---- what to form ---------------------------------------------------------------------------

    def size(self) -> int:
        """The most rows to take: while a bucket is probed, the top of it and of the best in turn
        (so that what is formed is what the bucket measured); else the top of the best bucket
        where the one above it measured no better, and everything queued where it did not."""
        if not self.enabled:
            return self.sizes[-1]
        if self._probe >= 0:
            i = (self._probe if self._probe_turn else self.best) + 1
        elif self._capped:
            i = self.best + 1
        else:
            return self.sizes[-1]
        return self.sizes[i] - 1 if i < len(self.sizes) else self.sizes[-1]

    def grain(self) -> int:
        """The most rows several requests may bring as one queue entry (a frontend worker's group,
        ipc.py): the width of the best bucket (8 for bucket 16, which holds 16-23 rows). Greedy
        filling from entries no larger than that still forms a batch within the best bucket and
        one within the bucket above, so a probe measures what it asks for; entries as large as
        the size itself would make every probe above a copy of the best."""
        if not self.enabled:
            return self.sizes[-1]
        i = self.best
        if i + 1 < len(self.sizes):
            return self.sizes[i + 1] - self.sizes[i]
        return self.sizes[i] - self.sizes[i - 1] if i else 1

    def throughput(self, i: int) -> float:
        """Rows per second of bucket `i` (0 while unmeasured)."""
        return self._rows[i] * 1e9 / self._ns[i] if self._ns[i] > 0 else 0.0

    def predict(self, rows: int) -> float:
        """Nanoseconds a batch of `rows` is expected to take (0: nothing measured yet): the nearest
        measured bucket's time per row, times `rows`."""
        i = bisect.bisect_right(self.sizes, rows) - 1
        for d in range(len(self.sizes)):
            for j in (i - d, i + d):
                if 0 <= j < len(self.sizes) and self._samples[j]:
                    return self._ns[j] * rows / self._rows[j]
        return 0.0

    def drain_ns(self, rows: int, instances: int, size: int = 0) -> float:
        """Predicted time to execute `rows` queued rows, in batches of `size` (0: `size()`), on
        `instances`."""
        size = size or self.size()
        full, rest = divmod(rows, size)
        return (full * self.predict(size) + (self.predict(rest) if rest else 0.0)) / instances

    # ---- learning ------------------------------------------------------------------------------

    def formed(self, bound: bool) -> int:
        """A batch of `size()` rows at most is being dispatched; `bound`: the size is what ended it
        (it reached the size, or the next request would not fit), not the queue running out.
        Returns the tag `observe` takes back: which probe and which side of it formed the batch, so
        that a batch is filed by what it was formed for, whenever and on whichever instance it
        completes. While probing, the turn passes to the other side."""
        turn = self._probe >= 0 and self._probe_turn
        if self._probe >= 0:
            self._probe_turn = not self._probe_turn
        return (self._gen << 2) | (turn << 1) | bound

    def observe(self, rows: int, ns: int, tag: int = -1) -> None:
        """A batch of `rows` rows took `ns` to execute; `tag`: what `formed` returned for it (-1: a
        batch formed outside the learned size, such as a BLS request on a lent instance)."""
        i = bisect.bisect_right(self.sizes, rows) - 1
        if self._samples[i]:
            self._ns[i] += ALPHA * (ns - self._ns[i])
            self._rows[i] += ALPHA * (rows - self._rows[i])
        else:
            self._ns[i], self._rows[i] = float(ns), float(rows)
        self._samples[i] += 1
        if tag < 0 or tag >> 2 != self._gen:  # formed before the probe now running began or ended
            return
        if self._probe >= 0:
            self._observe_probe(i, rows, ns, bool(tag & 2), bool(tag & 1))
            return
        self._since += 1
        if self._climbing and self._since >= MIN_SAMPLES:  # the start: climb from 1
            if len(self.sizes) > 1:
                self._start_probe(self.best + 1)
            else:
                self._climbing = False
        elif self._since >= self._every:
            self._next_probe()

    def unmeasured(self, tag: int) -> None:
        """A batch formed with `tag` failed (its time is not a measure): a probe whose batches keep
        failing is given up like one the queue never fills."""
        if self._probe >= 0 and tag >= 0 and tag >> 2 == self._gen:
            self._age_probe()

    def _age_probe(self) -> None:
        self._probe_age += 1
        if self._probe_age > 2 * PROBE_EVERY:  # it never fills the probe: give up for now
            if self._probe > self.best:
                self._capped = False
            self._end_probe()
            self._climbing = False

    def _observe_probe(self, i: int, rows: int, ns: int, probe_side: bool, bound: bool) -> None:
        """While a bucket is probed, batches alternate between it and the best (see `size`), so
        that both are measured over the same seconds: a machine whose speed drifts (a shared one
        does, by 20% and more) moves both alike, and the comparison stays fair. A batch counts for
        its side where it reached that side's bucket, or went past it: one request larger than the
        size (two-row requests under a size of 1) is what that size forms. A batch below the
        bucket is not counted (counting those, batches of one request each of 1-3 rows made every
        comparison a draw of their mix, and the climb stopped at 1 one time in three). Where the
        size ended it below the bucket while climbing, the requests' rows cannot form the probed
        size (two-row requests never make 3): the climb moves on to the next size up. Where the
        queue ran out, the probe ages, and one the queue never fills is given up."""
        side = self._probe if probe_side else self.best
        if i < side:  # the batch asked for was not formed
            if bound and probe_side and self._climbing and self._probe + 1 < len(self.sizes):
                self._start_probe(self._probe + 1)
            else:
                self._age_probe()
            return
        sums = self._probe_sum if probe_side else self._control_sum
        sums[0] += ns
        sums[1] += rows
        if probe_side:
            self._probe_n += 1
        else:
            self._control_n += 1
        if self._probe_n >= MIN_SAMPLES and self._control_n >= MIN_SAMPLES:
            self._decide()

    def _start_probe(self, j: int) -> None:
        self._gen += 1
        self._probe, self._probe_n, self._control_n, self._probe_age = j, 0, 0, 0
        self._probe_sum, self._control_sum = [0.0, 0.0], [0.0, 0.0]
        self._probe_turn = True

    def _end_probe(self) -> None:
        self._gen += 1
        self._probe = -1
        self._since = 0

    def _decide(self) -> None:
        """The probed size and the best have their paired samples: move to the probe or stay. The
        two are compared by what their batches did (rows per second of execution), not by the
        buckets' moving averages: a side's batches may lie in a bucket above its own."""
        probe = self._probe
        ours = self._probe_sum[1] / max(self._probe_sum[0], 1.0)  # (a clock that read 0 ns)
        theirs = self._control_sum[1] / max(self._control_sum[0], 1.0)
        gain = ours / max(theirs, 1e-18)
        self._end_probe()
        if gain > MARGIN:
            self.best = probe
            self._every = PROBE_EVERY
        elif gain < DIP:
            self._every = min(MAX_PROBE_EVERY, self._every * 2)
        self._capped = True  # the best is measured, and so is the size above or the probes go on
        # climbing goes on through a dip (mlp is slower per row at 8 than at 4, faster at 16), and
        # stops where a size is clearly worse than the best so far, or at the top
        if self._climbing and probe + 1 < len(self.sizes) and gain >= DIP:
            self._start_probe(probe + 1)
            return
        self._climbing = False

    def _next_probe(self) -> None:
        """Every PROBE_EVERY batches at the best size: measure a neighbour again, above and below in
        turn, so the choice follows a model whose costs change (a busier machine, longer inputs)."""
        self._since = 0
        up, down = self.best + 1, self.best - 1
        order = (up, down) if self._up_next else (down, up)
        self._up_next = not self._up_next
        for j in order:
            if 0 <= j < len(self.sizes):
                self._start_probe(j)
                return

    # ---- what a user sees -----------------------------------------------------------------------

    def view(self) -> dict:
        """The learned curve, for the statistics extension and the metrics."""
        return {
            "learning": self.enabled,
            "batch_size": self.size(),
            "buckets": [{"batch_size": s, "samples": self._samples[i], "mean_us": round(self._ns[i] / 1e3, 1),
                         "mean_rows": round(self._rows[i], 2), "rows_per_second": round(self.throughput(i), 1)}
                        for i, s in enumerate(self.sizes) if self._samples[i]],
        }
