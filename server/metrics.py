"""Prometheus metrics with Triton's names and labels, plus latency and batch-size histograms.

Nothing here runs per request. The request path already keeps its counts and histogram buckets in
each loaded model version's `ModelStats` (plain integers on the event loop thread); a scrape walks
the loaded models and reports them, so label sets exist only for loaded models and a flood of
requests for unknown names adds nothing. Host and GPU gauges are sampled every
`--metrics-interval-ms` by `MetricsPoller`; GPU gauges need NVML (`nvidia-ml-py`) and are simply
absent, with one log line, where it cannot be used.

Exposition: prometheus-client's text renderer names every counter family `<name>_total`
(OpenMetrics style); Triton's counters have no suffix and its users' dashboards query them by
those names. So `render` writes the Prometheus text format (0.0.4) itself from prometheus-client's
metric families, with the library's own value formatting. See docs/metrics.md for every metric.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from .repository import Repository
from .stats import FAILURE_REASONS

log = logging.getLogger(__name__)

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

# ---- host and GPU sampling ---------------------------------------------------------------------


def _read_cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies since boot from /proc/stat, or None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _read_memory() -> tuple[int, int] | None:
    """(total, used) bytes from /proc/meminfo; used = MemTotal - MemAvailable."""
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        return info["MemTotal"], info["MemTotal"] - info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        return None


@dataclass
class GpuReading:
    uuid: str
    utilization: float  # 0..1
    memory_total: int
    memory_used: int
    power_usage: float  # watts
    power_limit: float  # watts
    energy: float  # joules since the driver loaded


class Nvml:
    """GPU readings through NVML (`pynvml` from nvidia-ml-py), opened once."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nv = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

    def read(self) -> list[GpuReading]:
        nv, out = self.nv, []
        for h in self.handles:
            uuid = nv.nvmlDeviceGetUUID(h)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            out.append(GpuReading(
                uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                utilization=nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0,
                memory_total=int(mem.total), memory_used=int(mem.used),
                power_usage=nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
                power_limit=nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
                energy=nv.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0,
            ))
        return out


class MetricsPoller:
    """Samples host and GPU gauges on an interval, off the event loop."""

    def __init__(self, *, cpu: bool, gpu: bool, interval_s: float) -> None:
        self.cpu, self.interval_s = cpu, interval_s
        self.cpu_utilization: float | None = None
        self.memory: tuple[int, int] | None = None
        self.gpus: list[GpuReading] = []
        self._last_cpu = _read_cpu_times() if cpu else None
        self._nvml: Nvml | None = None
        if gpu:
            try:
                self._nvml = Nvml()
                log.info("GPU metrics: NVML reports %d GPU(s)", len(self._nvml.handles))
            except Exception as exc:  # no module, no driver, no device: all mean no GPU metrics
                log.info("GPU metrics disabled: NVML is not available (%s: %s)", type(exc).__name__, exc)

    def sample(self) -> None:
        if self.cpu:
            now = _read_cpu_times()
            if now is not None and self._last_cpu is not None and now[1] > self._last_cpu[1]:
                self.cpu_utilization = (now[0] - self._last_cpu[0]) / (now[1] - self._last_cpu[1])
            self._last_cpu = now
            self.memory = _read_memory()
        if self._nvml is not None:
            try:
                self.gpus = self._nvml.read()
            except Exception as exc:
                log.warning("GPU metrics: NVML read failed, stopping GPU metrics (%s)", exc)
                self._nvml, self.gpus = None, []

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(self.interval_s)


# ---- the scrape -----------------------------------------------------------------------------------


def _counter(name: str, doc: str) -> Metric:
    return Metric(name, doc, "counter")


def _gauge(name: str, doc: str) -> Metric:
    return Metric(name, doc, "gauge")


class ServerMetrics:
    def __init__(self, repository: Repository, poller: MetricsPoller) -> None:
        self.repository = repository
        self.poller = poller

    def collect(self) -> Iterator[Metric]:
        versions = sorted(self.repository.ready_models(), key=lambda m: (m.name, m.version))
        success = _counter("nv_inference_request_success",
                           "Number of successful inference requests, all batch sizes")
        failure = _counter("nv_inference_request_failure", "Number of failed inference requests, all batch sizes")
        count = _counter("nv_inference_count", "Number of inferences performed (does not include cached requests)")
        execs = _counter("nv_inference_exec_count",
                         "Number of model executions performed (does not include cached requests)")
        pending = _gauge("nv_inference_pending_request_count",
                         "Instantaneous number of pending requests awaiting execution per-model.")
        durations = {
            "success": _counter("nv_inference_request_duration_us",
                                "Cumulative inference request duration in microseconds"),
            "queue": _counter("nv_inference_queue_duration_us",
                              "Cumulative inference queuing duration in microseconds"),
            "compute_input": _counter("nv_inference_compute_input_duration_us",
                                      "Cumulative compute input duration in microseconds"),
            "compute_infer": _counter("nv_inference_compute_infer_duration_us",
                                      "Cumulative compute inference duration in microseconds"),
            "compute_output": _counter("nv_inference_compute_output_duration_us",
                                       "Cumulative inference compute output duration in microseconds"),
        }
        load = _gauge("nv_model_load_duration_secs", "Model load time in seconds")
        hists = {
            "request": HistogramMetricFamily("fuserve_request_duration_ms",
                                             "Successful request duration (arrival to response ready), ms",
                                             labels=["model", "version"]),
            "queue": HistogramMetricFamily("fuserve_queue_duration_ms", "Time a request waited in the queue, ms",
                                           labels=["model", "version"]),
            "compute": HistogramMetricFamily("fuserve_compute_infer_duration_ms",
                                             "Model execution time of the batch a request ran in, ms",
                                             labels=["model", "version"]),
            "batch": HistogramMetricFamily("fuserve_batch_size", "Rows per model execution",
                                           labels=["model", "version"]),
        }
        streams = {
            "first_response": HistogramMetricFamily("nv_inference_first_response_histogram_ms",
                                                    "Duration from request to first response in milliseconds",
                                                    labels=["model", "version"]),
            "responses": HistogramMetricFamily("fuserve_responses_per_request",
                                               "Responses a decoupled model sent per request",
                                               labels=["model", "version"]),
        }
        cost = _gauge("fuserve_batch_cost_us",
                      "Learned mean execution time of a batch, per batch-size bucket, microseconds")
        target = _gauge("fuserve_batch_size_target", "Rows the dynamic batcher forms when enough are queued")
        for mv in versions:
            labels = {"model": mv.name, "version": str(mv.version)}
            if mv.stats.cost_view is not None:
                view = mv.stats.cost_view()
                target.add_sample(target.name, labels, view["batch_size"])
                for bucket in view["buckets"]:
                    cost.add_sample(cost.name, {**labels, "batch_size": str(bucket["batch_size"])}, bucket["mean_us"])
            if mv.decoupled and mv.stats.histograms is not None:
                for key, family in streams.items():
                    h = mv.stats.histograms[key]
                    family.add_metric([mv.name, str(mv.version)], buckets=h.cumulative(), sum_value=h.total)
            s = mv.stats
            success.add_sample(success.name, labels, s.success.count)
            for reason in FAILURE_REASONS:
                failure.add_sample(failure.name, {**labels, "reason": reason}, s.failures[reason])
            count.add_sample(count.name, labels, s.inference_count)
            execs.add_sample(execs.name, labels, s.execution_count)
            pending.add_sample(pending.name, labels, mv.scheduler.queued)
            for key, fam in durations.items():
                fam.add_sample(fam.name, labels, getattr(s, key).ns // 1000)
            load.add_sample(load.name, labels, mv.load_seconds)
            for key, fam in hists.items():
                if s.histograms is not None:
                    h = s.histograms[key]
                    fam.add_metric([mv.name, str(mv.version)], buckets=h.cumulative(), sum_value=h.total)
        yield from (success, failure, count, execs, pending, *durations.values(), load, *hists.values(),
                    *streams.values(), cost, target)
        yield from self._host_and_gpu()

    def _host_and_gpu(self) -> Iterator[Metric]:
        p = self.poller
        if p.cpu_utilization is not None:
            m = _gauge("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]")
            m.add_sample(m.name, {}, p.cpu_utilization)
            yield m
        if p.memory is not None:
            total = _gauge("nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes")
            used = _gauge("nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes")
            total.add_sample(total.name, {}, p.memory[0])
            used.add_sample(used.name, {}, p.memory[1])
            yield from (total, used)
        if not p.gpus:
            return
        gauges = [
            ("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", "utilization", "gauge"),
            ("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", "memory_total", "gauge"),
            ("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", "memory_used", "gauge"),
            ("nv_gpu_power_usage", "GPU power usage in watts", "power_usage", "gauge"),
            ("nv_gpu_power_limit", "GPU power management limit in watts", "power_limit", "gauge"),
            ("nv_energy_consumption", "GPU energy consumption in joules since the Triton Server started",
             "energy", "counter"),
        ]
        for name, doc, attr, kind in gauges:
            m = Metric(name, doc, kind)
            for g in p.gpus:
                m.add_sample(name, {"gpu_uuid": g.uuid}, getattr(g, attr))
            yield m

    def render(self) -> bytes:
        return render(self.collect())


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def render(families: Iterable[Metric]) -> bytes:
    """The Prometheus text format (0.0.4), family names exactly as given."""
    out: list[str] = []
    for fam in families:
        out.append(f"# HELP {fam.name} {fam.documentation}\n# TYPE {fam.name} {fam.type}\n")
        for s in fam.samples:
            labels = ",".join(f'{k}="{_escape(str(v))}"' for k, v in s.labels.items())
            out.append(f"{s.name}{{{labels}}} {floatToGoString(s.value)}\n" if labels
                       else f"{s.name} {floatToGoString(s.value)}\n")
    return "".join(out).encode()
