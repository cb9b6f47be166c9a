"""GET /metrics on the metrics port: the Prometheus text that `ServerMetrics` renders."""

from __future__ import annotations

from ..metrics import CONTENT_TYPE, ServerMetrics
from .http_messages import HttpRequest, HttpResponse
from .rest import error_body


class MetricsFrontend:
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    async def handle(self, request: HttpRequest) -> HttpResponse:
        if request.path.rstrip("/") == "/metrics" and request.method in ("GET", "HEAD"):
            return HttpResponse(200, self.metrics.render(), CONTENT_TYPE)
        return HttpResponse(404, error_body(f"no such endpoint: {request.method} {request.path} (try GET /metrics)"))
