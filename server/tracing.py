"""Traces of sampled requests, exported to OpenTelemetry (OTLP over HTTP, opentelemetry-sdk's
exporter and batch span processor), with the spans Triton 2.51 exports for a request:

    InferRequest                the request, from its arrival to its answer
      <model name>              attributes triton.model_name, triton.model_version, triton.trace_id,
                                triton.trace_parent_id, triton.request_id (when the request has an id);
                                events REQUEST_START, QUEUE_START, REQUEST_END
        compute                 events COMPUTE_START, COMPUTE_INPUT_END, COMPUTE_OUTPUT_START,
                                COMPUTE_END

The timestamps are those the service records for the request's statistics anyway (when it
arrived, when it was queued, and its queue, input, infer and output times), so a request that is
not sampled costs one check of a flag. Spans are made only for sampled requests, after they are
answered; the exporter sends them from its own thread. What is sampled, and the settings, are
trace_settings.py's.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .trace_settings import TraceSettings

log = logging.getLogger(__name__)


class Tracer:
    """Spans for the requests `settings` samples, through an OTLP exporter to settings' url."""

    def __init__(self, settings: TraceSettings) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.settings = settings
        ex = settings.exporter
        url = ex["url"] if "://" in ex["url"] else f"http://{ex['url']}"
        attributes = dict(kv.split("=", 1) for kv in settings.resources)
        self.provider = TracerProvider(resource=Resource.create(attributes))
        self.provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=url), max_queue_size=int(ex["bsp_max_queue_size"]),
            schedule_delay_millis=int(ex["bsp_schedule_delay"]),
            max_export_batch_size=int(ex["bsp_max_export_batch_size"])))
        self.tracer = self.provider.get_tracer("triton-server")
        self.ids = 0
        # perf_counter_ns (what the service records) -> nanoseconds since the epoch (what spans carry)
        self.epoch = time.time_ns() - time.perf_counter_ns()

    def record(self, model: str, version: int, request_id: str, start: int, queued: int, queue_ns: int,
               input_ns: int, infer_ns: int, output_ns: int, end: int) -> None:
        """A sampled request's spans; times are perf_counter_ns, durations ns."""
        from opentelemetry import trace

        e = self.epoch
        self.ids += 1
        compute_start = queued + queue_ns
        root = self.tracer.start_span("InferRequest", kind=trace.SpanKind.SERVER, start_time=start + e)
        context = trace.set_span_in_context(root)
        attributes: dict[str, Any] = {"triton.model_name": model, "triton.model_version": version,
                                      "triton.trace_id": self.ids, "triton.trace_parent_id": 0}
        if request_id:
            attributes["triton.request_id"] = request_id
        span = self.tracer.start_span(model, context, trace.SpanKind.SERVER, attributes, start_time=start + e)
        span.add_event("REQUEST_START", timestamp=start + e)
        span.add_event("QUEUE_START", timestamp=queued + e)
        compute = self.tracer.start_span("compute", trace.set_span_in_context(span), trace.SpanKind.SERVER,
                                         start_time=compute_start + e)
        for name, at in (("COMPUTE_START", compute_start), ("COMPUTE_INPUT_END", compute_start + input_ns),
                         ("COMPUTE_OUTPUT_START", compute_start + input_ns + infer_ns),
                         ("COMPUTE_END", compute_start + input_ns + infer_ns + output_ns)):
            compute.add_event(name, timestamp=at + e)
        compute.end(end_time=compute_start + input_ns + infer_ns + output_ns + e)
        span.add_event("REQUEST_END", timestamp=end + e)
        span.end(end_time=end + e)
        root.end(end_time=end + e)

    def close(self) -> None:
        """Export what is left (bounded) and stop the exporter."""
        try:
            self.provider.force_flush(5000)
            self.provider.shutdown()
        except Exception as exc:  # the receiver may be gone at shutdown: the traces are lost, say so
            log.warning("trace export at shutdown failed: %s", exc)
