"""The generate extension over HTTP against a real `fuserve serve`: /generate (one JSON object)
and /generate_stream (server-sent events, each flushed as the model sends it), the request mapping,
errors before and during a stream, zero responses, a client that goes away, and a reader that
stops reading. A plain HTTP client reads the events as they arrive."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest
import python_models as pm
from conftest import model_stats, settled_count, wait_until

WORKERS = {"one process": (), "frontend workers": ("--frontend-workers", "2")}


@pytest.fixture(scope="module", params=list(WORKERS))
def server(start_server, tmp_path_factory, request):
    """Every test twice: in one process, and through frontend workers (whose link carries a
    streamed answer part by part)."""
    repo = tmp_path_factory.mktemp("generate")
    pm.write(repo, "repeat", pm.REPEAT_CONFIG, pm.REPEAT)
    pm.write(repo, "add_sub_py", pm.ADD_SUB_CONFIG.replace("max_queue_delay_microseconds: 200000", ""), pm.ADD_SUB)
    return start_server(repo, *WORKERS[request.param])


def _post(server, path: str, doc) -> http.client.HTTPResponse:
    host, port = server.http_url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    return conn.getresponse()


def _events(resp: http.client.HTTPResponse) -> list[dict]:
    out = []
    for line in resp.read().decode().split("\n\n"):
        if line:
            assert line.startswith("data: ") and "\n" not in line, line
            out.append(json.loads(line[len("data: "):]))
    return out


def test_generate_answers_one_flat_object(server):
    resp = _post(server, "/v2/models/add_sub_py/generate", {"INPUT0": [1, 2, 3, 4], "INPUT1": [1, 1, 1, 1]})
    assert resp.status == 200 and resp.getheader("Content-Type") == "application/json"
    assert json.loads(resp.read()) == {"model_name": "add_sub_py", "model_version": "1",
                                       "OUTPUT0": [2.0, 3.0, 4.0, 5.0], "OUTPUT1": [0.0, 1.0, 2.0, 3.0], "BATCH": 1}
    resp = _post(server, "/v2/models/repeat/versions/1/generate", {"IN": [5]})  # a decoupled model: one response
    assert resp.status == 200 and json.loads(resp.read()) == {"model_name": "repeat", "model_version": "1",
                                                              "OUT": 5, "IDX": 0}


@pytest.mark.parametrize("values", [[5, 6], []])
def test_generate_refuses_a_decoupled_models_zero_or_several_responses(server, values):
    resp = _post(server, "/v2/models/repeat/generate", {"IN": values})
    body = json.loads(resp.read())
    assert resp.status == 400 and "exactly one response" in body["error"] and "generate_stream" in body["error"]


def test_generate_stream_delivers_each_event_as_the_model_sends_it(server):
    resp = _post(server, "/v2/models/repeat/generate_stream", {"IN": [7, 8], "delay_ms": 400, "mode": "thread"})
    assert resp.status == 200
    assert resp.getheader("Content-Type") == "text/event-stream; charset=utf-8"
    first = resp.readline()
    t0 = time.monotonic()
    assert json.loads(first.decode()[len("data: "):]) == {"model_name": "repeat", "model_version": "1",
                                                          "OUT": 7, "IDX": 0}
    assert resp.readline() == b"\n"
    second = resp.readline()
    apart = time.monotonic() - t0
    assert json.loads(second.decode()[len("data: "):])["OUT"] == 8
    assert apart > 0.25, apart  # the model paused 0.4 s between them: the first was not held back
    assert resp.read() == b"\n"  # then the stream ends: no [DONE], no event for the final flag


def test_top_level_fields_and_parameters_become_request_parameters(server):
    resp = _post(server, "/v2/models/repeat/generate_stream",
                 {"IN": [1, 2, 3], "parameters": {"error_at": 2}})
    events = _events(resp)
    assert [e.get("OUT") for e in events[:2]] == [1, 2]
    assert events[2] == {"error": "value 3 refused"} and len(events) == 3  # an error mid-stream ends it


def test_zero_responses_give_an_empty_200(server):
    resp = _post(server, "/v2/models/repeat/generate_stream", {"IN": []})
    assert resp.status == 200 and resp.read() == b""


@pytest.mark.parametrize(("path", "doc", "status", "word"), [
    ("/v2/models/nope/generate_stream", {"IN": [1]}, 404, "nope"),
    ("/v2/models/add_sub_py/generate", {"INPUT0": [1, 2, 3, 4]}, 400, "INPUT1"),
    ("/v2/models/repeat/generate_stream", {"IN": [1], "error_at": 0}, 400, "value 1 refused"),
    ("/v2/models/repeat/generate_stream", b'{"IN": [1', 400, "JSON"),
    ("/v2/models/repeat/generate_stream", {"other": 1}, 400, "IN"),
])
def test_errors_before_any_response_are_plain_json(server, path, doc, status, word):
    resp = _post(server, path, doc)
    body = resp.read()
    assert resp.status == status and resp.getheader("Content-Type") == "application/json", body
    assert word in json.loads(body)["error"]
    ok = _post(server, "/v2/models/repeat/generate_stream", {"IN": [4]})  # then a good one
    assert [e["OUT"] for e in _events(ok)] == [4]


def test_generate_is_in_the_extension_list(server):
    status, _, body = server.request("GET", "/v2")
    assert status == 200 and "generate" in json.loads(body)["extensions"]


def test_a_client_that_goes_away_cancels_the_stream(server, tmp_path):
    mark = tmp_path / "gone"
    resp = _post(server, "/v2/models/repeat/generate_stream",
                 {"IN": list(range(5000)), "delay_ms": 10, "mode": "thread", "mark": str(mark)})
    assert resp.readline().startswith(b"data: ")
    resp.close()
    wait_until(mark.exists, 20, "the model to see is_cancelled()")
    assert int(mark.read_text()) < 5000


def test_a_reader_that_stops_reading_holds_the_models_sender_back(server, tmp_path):
    progress = tmp_path / "progress"
    body = json.dumps({"IN": list(range(200_000)), "mode": "thread", "progress": str(progress)}).encode()
    host, port = server.http_url.split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.sendall(b"POST /v2/models/repeat/generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(progress.exists, 20, "the model to start sending")
        assert settled_count(progress) < 100_000  # the sender waits: nothing piles up in the server
        assert [e["OUT"] for e in _events(_post(server, "/v2/models/repeat/generate_stream", {"IN": [3]}))] == [3]
    finally:
        sock.close()
    wait_until(lambda: model_stats(server, "repeat")["inference_stats"]["fail"]["count"] >= 1, 20,
               "the dropped stream's request to end")
