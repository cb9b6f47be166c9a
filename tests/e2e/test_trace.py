"""The trace extension: settings over HTTP and gRPC (Triton 2.51's shapes), sampling by rate and
count, no client-settable path or URL, and spans reaching an OTLP receiver the test runs."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import ROOT, free_port, wait_until
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from tritonclient.utils import InferenceServerException

DEFAULTS = {"trace_level": ["OFF"], "trace_rate": "1000", "trace_count": "-1", "log_frequency": "0",
            "trace_file": "", "trace_mode": "triton"}


class Receiver:
    """An OTLP/HTTP trace receiver: the spans of every export, by name."""

    def __init__(self) -> None:
        self.spans: list = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    for rs in request.resource_spans:
                        service = {a.key: a.value.string_value for a in rs.resource.attributes}["service.name"]
                        for ss in rs.scope_spans:
                            receiver.spans.extend((service, span) for span in ss.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def named(self, name: str) -> list:
        with self.lock:
            return [span for _, span in self.spans if span.name == name]


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def traced(start_server, test_repo, receiver):
    return start_server(test_repo, "--trace-config", "mode=opentelemetry",
                        "--trace-config", f"opentelemetry,url=127.0.0.1:{receiver.port}/v1/traces",
                        "--trace-config", "opentelemetry,resource=service.name=fuserve-test",
                        "--trace-config", "opentelemetry,bsp_schedule_delay=50")


def _infer(server, n: int = 1, request_id: str = "") -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    for _ in range(n):
        inputs = [httpclient.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
        for i in inputs:
            i.set_data_from_numpy(np.ones((1, 16), np.int32))
        client.infer("add_sub", inputs, request_id=request_id)


def test_defaults_and_tracing_needs_an_exporter(server):
    client = httpclient.InferenceServerClient(server.http_url)
    assert client.get_trace_settings() == DEFAULTS
    assert client.get_trace_settings("add_sub") == DEFAULTS
    with pytest.raises(InferenceServerException, match="trace file name is not given") as err:
        client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
    assert err.value.status() == "400"
    assert client.get_trace_settings() == DEFAULTS  # nothing changed


def test_spans_reach_the_receiver_with_triton_s_names(traced, receiver):
    client = httpclient.InferenceServerClient(traced.http_url)
    settings = client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
    assert settings["trace_level"] == ["TIMESTAMPS"] and settings["trace_rate"] == "1"
    assert settings["trace_mode"] == "opentelemetry" and settings["url"] == f"127.0.0.1:{receiver.port}/v1/traces"
    _infer(traced, 3, request_id="req-7")
    wait_until(lambda: len(receiver.named("compute")) >= 3, timeout=30, what="3 traces at the receiver")
    client.update_trace_settings(settings={"trace_level": ["OFF"]})
    roots, models, computes = receiver.named("InferRequest"), receiver.named("add_sub"), receiver.named("compute")
    assert len(roots) == len(models) == len(computes) == 3
    by_id = {s.span_id: s for s in roots + models}
    for model, compute in zip(models, computes, strict=True):
        root = by_id[model.parent_span_id]
        assert root.name == "InferRequest" and by_id[compute.parent_span_id] is model
        assert root.trace_id == model.trace_id == compute.trace_id
        attributes = {a.key: a.value for a in model.attributes}
        assert attributes["triton.model_name"].string_value == "add_sub"
        assert attributes["triton.model_version"].int_value == 1
        assert attributes["triton.request_id"].string_value == "req-7"
        assert [e.name for e in model.events] == ["REQUEST_START", "QUEUE_START", "REQUEST_END"]
        assert [e.name for e in compute.events] == ["COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START",
                                                    "COMPUTE_END"]
        times = [e.time_unix_nano for e in model.events[:2]] + [e.time_unix_nano for e in compute.events] + [
            model.events[2].time_unix_nano]
        assert times == sorted(times) and root.start_time_unix_nano <= times[0] <= times[-1] <= root.end_time_unix_nano
    assert {service for service, _ in receiver.spans} == {"fuserve-test"}


def test_rate_count_and_model_settings(traced, receiver):
    client = httpclient.InferenceServerClient(traced.http_url)
    before = len(receiver.named("compute"))
    # every 2nd request, 2 traces at most: 10 requests give 2, and the count left is shown
    client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "2", "trace_count": "2"})
    _infer(traced, 10)
    wait_until(lambda: len(receiver.named("compute")) >= before + 2, timeout=30, what="2 traces")
    assert client.get_trace_settings()["trace_count"] == "0"
    # a model's own setting overrides the global one; null clears it back
    client.update_trace_settings(settings={"trace_level": ["OFF"], "trace_count": "-1"})
    model = client.update_trace_settings("add_sub", {"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
    assert model["trace_level"] == ["TIMESTAMPS"] and client.get_trace_settings()["trace_level"] == ["OFF"]
    _infer(traced, 2)
    wait_until(lambda: len(receiver.named("compute")) >= before + 4, timeout=30, what="2 more traces")
    cleared = client.update_trace_settings("add_sub", {"trace_level": None, "trace_rate": None})
    assert cleared["trace_level"] == ["OFF"] and cleared["trace_rate"] == "2"  # the global ones again
    _infer(traced, 3)
    assert client.get_trace_settings()["trace_level"] == ["OFF"]
    assert len(receiver.named("compute")) == before + 4  # (exports flush every 50 ms: nothing more came)


def test_grpc_trace_setting(traced):
    client = grpcclient.InferenceServerClient(traced.grpc_url)
    try:
        got = client.update_trace_settings("add_sub", {"trace_rate": "7"}, as_json=True)["settings"]
        assert got["trace_rate"] == {"value": ["7"]} and got["trace_level"] == {"value": ["OFF"]}
        got = client.update_trace_settings("add_sub", {"trace_rate": None}, as_json=True)["settings"]
        assert got["trace_rate"]["value"] == client.get_trace_settings(as_json=True)["settings"]["trace_rate"]["value"]
        assert got["trace_rate"] != {"value": ["7"]}
        with pytest.raises(InferenceServerException, match="can not be updated through network protocol") as err:
            client.update_trace_settings(settings={"trace_file": "/tmp/x"})
        assert err.value.status() == "StatusCode.UNIMPLEMENTED"
        with pytest.raises(InferenceServerException, match="Request for unknown model : nope") as err:
            client.get_trace_settings("nope")
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        client.close()


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"trace_file": "/etc/cron.d/x"}, 501, "trace file location can not be updated through network protocol"),
    ({"url": "evil.example:4318/v1/traces"}, 501, "trace setting 'url' can not be updated"),
    ({"resource": "a=b"}, 501, "trace setting 'resource' can not be updated"),
    ({"trace_mode": "triton"}, 501, "trace setting 'trace_mode' can not be updated"),
    ({"log_frequency": "10"}, 501, "fuserve writes none"),
    ({"trace_rate": "12abc"}, 400, "Unable to parse 'trace_rate'"),
    ({"trace_rate": "--5"}, 400, "Unable to parse 'trace_rate'"),
    ({"trace_count": "\u00b2"}, 400, "Unable to parse 'trace_count'"),
    ({"trace_file": None}, 501, "trace file location can not be updated through network protocol"),
    ({"nonsense": None}, 400, "unknown trace setting 'nonsense'"),
    ({"trace_rate": 5}, 400, "Unable to parse 'trace_rate'"),
    ({"trace_count": "-2"}, 400, "Unable to parse 'trace_count'"),
    ({"trace_level": ["OFF", "TIMESTAMPS"]}, 400, "Expect only one trace level 'OFF' is specified"),
    ({"trace_level": ["TENSORS"]}, 400, "TENSORS is not supported"),
    ({"trace_level": "TIMESTAMPS"}, 400, "'trace_level' must be a list"),
    ({"trace_level": ["TIMESTAMPS"], "nonsense": "1"}, 400, "unknown trace setting 'nonsense'"),
])
def test_bad_settings_change_nothing(traced, body, status, words):
    before = httpclient.InferenceServerClient(traced.http_url).get_trace_settings()
    got, _, reply = traced.request("POST", "/v2/trace/setting", json.dumps(body).encode())
    assert got == status and words in json.loads(reply)["error"], reply
    assert httpclient.InferenceServerClient(traced.http_url).get_trace_settings() == before


@pytest.mark.parametrize(("option", "words"), [
    ("triton,file=/tmp/trace.json", "fuserve writes no trace files"),
    ("level=TIMESTAMPS", "tracing needs --trace-config mode=opentelemetry"),
    ("rate=often", "Unable to parse 'trace_rate'"),
    ("rate=--1", "Unable to parse 'trace_rate'"),
    ("opentelemetry,bsp_schedule_delay=soon", "bsp_schedule_delay is a positive integer"),
    ("opentelemetry,colour=blue", "opentelemetry settings are url, resource"),
    ("nonsense", "expected [mode,]setting=value"),
])
def test_bad_trace_config_stops_the_start(test_repo, option, words):
    done = subprocess.run([sys.executable, "-m", "server", "serve", "--model-repository", str(test_repo),
                           "--trace-config", option], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and words in done.stderr, done.stderr
