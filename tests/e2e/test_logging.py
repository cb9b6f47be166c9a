"""The logging extension: GET/POST /v2/logging and gRPC LogSettings read and change the running
server's logging (what its log shows), and no client can set a log file (CVE-2024-0087)."""

from __future__ import annotations

import json
import re

import grpc
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import wait_until
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

DEFAULTS = {"log_file": "", "log_info": True, "log_warning": True, "log_error": True, "log_verbose_level": 0,
            "log_format": "default"}


@pytest.fixture
def logged(start_server, test_repo):
    """A server of its own: these tests change its logging."""
    return start_server(test_repo, "--model-control-mode", "explicit", "--load-model", "add_sub")


def _post(server, body: bytes) -> tuple[int, dict]:
    status, _, got = server.request("POST", "/v2/logging", body)
    return status, json.loads(got)


def test_settings_read_changed_and_shown_in_the_log(logged):
    status, _, body = logged.request("GET", "/v2/logging")
    assert status == 200 and json.loads(body) == DEFAULTS
    client = httpclient.InferenceServerClient(logged.http_url)
    assert client.get_log_settings() == DEFAULTS

    # log_info off: the next load's info line does not appear; warnings still would
    assert _post(logged, b'{"log_info": false}') == (200, {**DEFAULTS, "log_info": False})
    before = len(logged.log())
    client.load_model("add_sub_string")
    client.unload_model("add_sub_string")
    assert not client.is_model_ready("add_sub_string")
    assert "add_sub_string" not in logged.log()[before:]

    # back on, in ISO 8601: the lines come back, stamped in UTC
    settings = client.update_log_settings({"log_info": True, "log_format": "ISO8601"})
    assert settings == {**DEFAULTS, "log_format": "ISO8601"}
    before = len(logged.log())
    client.load_model("add_sub_string")
    wait_until(lambda: "loaded model 'add_sub_string'" in logged.log()[before:], timeout=30, what="the load line")
    line = next(x for x in logged.log()[before:].splitlines() if "loaded model 'add_sub_string'" in x)
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", line), line

    # verbose: the level is kept and reported back (what debug records show is not checked here)
    assert _post(logged, b'{"log_verbose_level": 1}')[1]["log_verbose_level"] == 1
    assert client.get_log_settings()["log_verbose_level"] == 1


@pytest.mark.parametrize(("body", "status", "words"), [
    (b'{"log_file": "/tmp/owned"}', 501, ["log file"]),
    (b'{"log_file": ""}', 501, ["log file"]),
    (b'{"log_info": "yes"}', 400, ["log_info", "boolean"]),
    (b'{"log_verbose_level": -1}', 400, ["log_verbose_level"]),
    (b'{"log_verbose_level": true}', 400, ["log_verbose_level"]),
    (b'{"log_format": "bogus"}', 400, ["bogus"]),
    (b'{"nope": 1}', 400, ["nope"]),
    (b"garbage", 400, ["JSON"]),
    (b"[1]", 400, ["object"]),
])
def test_bad_settings_are_refused_and_change_nothing(logged, body, status, words):
    got_status, got = _post(logged, body)
    assert got_status == status, got
    for w in words:
        assert w in got["error"], got
    status, _, now = logged.request("GET", "/v2/logging")
    assert json.loads(now) == DEFAULTS  # nothing applied, not even the valid part of a mixed request
    assert _post(logged, b'{"log_warning": false, "log_file": "x"}')[0] == 501
    assert json.loads(logged.request("GET", "/v2/logging")[2]) == DEFAULTS


def test_grpc_log_settings(logged):
    client = grpcclient.InferenceServerClient(logged.grpc_url)
    got = client.get_log_settings(as_json=True)["settings"]
    assert got["log_info"] == {"bool_param": True} and got["log_verbose_level"] == {"uint32_param": 0}
    assert got["log_format"] == {"string_param": "default"} and got["log_file"] == {"string_param": ""}
    after = client.update_log_settings({"log_warning": False, "log_verbose_level": 2}, as_json=True)["settings"]
    assert after["log_warning"] == {"bool_param": False} and after["log_verbose_level"] == {"uint32_param": 2}
    assert json.loads(logged.request("GET", "/v2/logging")[2])["log_warning"] is False
    with pytest.raises(InferenceServerException) as e:
        client.update_log_settings({"log_file": "/tmp/owned"})
    assert "log file" in e.value.message()
    with grpc.insecure_channel(logged.grpc_url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        request = service_pb2.LogSettingsRequest()
        request.settings["log_info"].string_param = "x"
        with pytest.raises(grpc.RpcError) as err:
            stub.LogSettings(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "log_info" in err.value.details()
        request = service_pb2.LogSettingsRequest()
        request.settings["log_file"].string_param = "/tmp/owned"
        with pytest.raises(grpc.RpcError) as err:
            stub.LogSettings(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
