"""--http-restricted-api / --grpc-restricted-protocol against real `fuserve serve` processes.

The whole REST route table (server/frontends/rest.py ROUTES) and every RPC of
inference.GRPCInferenceService are enumerated, with every group restricted: without its header each
answers 403 / PERMISSION_DENIED naming its group, with a wrong value too, and with the right header
it gets past the check (whatever it then answers). Once in one process and once through
`--frontend-workers 1`, where workers check and forward. The configured values never show up in a
response or in the server's log.
"""

from __future__ import annotations

import http.client
import json
import queue
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from server import access
from server._proto import grpc_service_pb2 as pb
from server.frontends.routes import ROUTES, Route

ALL_GROUPS = access.GROUPS

# Three groups of groups, each with its own header and value; values are distinctive so that a leak
# anywhere is found by a plain substring search.
HTTP_SPECS = {"health,metadata": ("X-Open-Key", "http-open-7Qx1v"),
              "inference": ("X-Infer-Key", "http-infer-Vb82w"),
              "shared-memory,model-config,model-repository,statistics,trace,logging": ("x-admin-key",
                                                                                       "http-admin-Kp03z")}
GRPC_SPECS = {"health,metadata": ("open-key", "grpc-open-3Jd9q"),
              "inference": ("infer-key", "grpc-infer-Lw55e"),
              "shared-memory,model-config,model-repository,statistics,trace,logging": ("admin-key",
                                                                                       "grpc-admin-Yt71m")}
SECRETS = [v for _, v in HTTP_SPECS.values()] + [v for _, v in GRPC_SPECS.values()]


def by_group(specs: dict[str, tuple[str, str]], prefix: str = "") -> dict[str, tuple[str, str]]:
    """group -> (lower-case header the server expects, value)"""
    return {g: (prefix + k.lower(), v) for groups, (k, v) in specs.items() for g in groups.split(",")}


HTTP = by_group(HTTP_SPECS)
GRPC = by_group(GRPC_SPECS, access.GRPC_KEY_PREFIX)
assert set(HTTP) == set(GRPC) == set(ALL_GROUPS)

FLAGS = [arg for groups, (k, v) in HTTP_SPECS.items() for arg in ("--http-restricted-api", f"{groups}:{k}={v}")] + \
        [arg for groups, (k, v) in GRPC_SPECS.items() for arg in ("--grpc-restricted-protocol", f"{groups}:{k}={v}")]

EXAMPLE = {"{model}": "add_sub", "{version}": "1", "{region}": "r0", "{repository}": "repo"}
METHODS = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods


def example_path(route: Route) -> str:
    return "/".join(EXAMPLE.get(segment, segment) for segment in route.path.split("/"))


def wait_ready(server, headers: dict[str, str], timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"fuserve exited with {server.proc.returncode}:\n{server.log()}")
        try:
            if server.request("GET", "/v2/health/ready", headers=headers)[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"fuserve not ready after {timeout}s:\n{server.log()}")


def start_locked(start_server, test_repo, *extra: str):
    server = start_server(test_repo, *FLAGS, "--log-verbose", "1", *extra, wait=False)
    return wait_ready(server, {HTTP["health"][0]: HTTP["health"][1]})


@pytest.fixture(scope="module")
def one_process(start_server, test_repo):
    return start_locked(start_server, test_repo)


@pytest.fixture(scope="module")
def frontend_workers(start_server, test_repo):
    return start_locked(start_server, test_repo, "--frontend-workers", "1")


@pytest.fixture(params=["one_process", "frontend_workers"])
def locked(request):
    server = request.getfixturevalue(request.param)
    yield server
    log = server.log()
    assert all(secret not in log for secret in SECRETS), "a restricted value reached the server log"


def http_message(group: str) -> str:
    return f"This API is restricted, expecting header '{HTTP[group][0]}' (the '{group}' API group)"


def grpc_message(group: str) -> str:
    return f"This protocol is restricted, expecting header '{GRPC[group][0]}' (the '{group}' protocol group)"


# ---- REST -----------------------------------------------------------------------------------------


def test_every_rest_route_is_checked(locked):
    seen: list[bytes] = []
    for route in ROUTES:
        path = example_path(route)
        method = (route.method or "POST").split()[0]
        body = b"{}" if method == "POST" else None
        header, value = HTTP[route.group]
        others = {h: v for g, (h, v) in HTTP.items() if h != header}  # every other group's right header

        for headers in ({}, others, {header: value + "x"}, {header: value[:-1]}, {header: ""}):
            status, reply_headers, reply = locked.request(method, path, body, headers)
            assert status == 403, (route.path, headers, status, reply)
            assert json.loads(reply) == {"error": http_message(route.group)}
            seen += [reply, json.dumps(reply_headers).encode()]

        status, reply_headers, reply = locked.request(method, path, body, {**others, header.upper(): value})
        assert status != 403, (route.path, reply)
        seen += [reply, json.dumps(reply_headers).encode()]
        if route.method is None:  # not served yet: answered as before restrictions existed
            assert status == 404 and json.loads(reply) == {"error": f"no such endpoint: POST {path}"}
        elif method == "GET" and "{region}" in route.path:  # no such region: the route was still served
            assert status == 404 and b"shared memory region: 'r0'" in reply, (route.path, reply)
        elif method == "GET":
            assert status == 200, (route.path, reply)
    assert all(secret.encode() not in b for b in seen for secret in SECRETS)


def test_the_check_comes_before_the_method_and_covers_the_infer_fast_path(locked):
    infer = "/v2/models/add_sub/infer"
    header, value = HTTP["inference"]
    assert locked.request("GET", infer)[0] == 403  # restricted whatever the method, as Triton does
    assert locked.request("GET", infer, headers={header: value})[0] == 404
    body = json.dumps({"inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
        {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16}]}).encode()
    for _ in range(3):  # after the first, the URL is served from the router's cache: still checked
        status, _, reply = locked.request("POST", infer, body, {header: value})
        assert status == 200 and json.loads(reply)["outputs"][0]["data"] == [i + 1 for i in range(16)]
        status, _, reply = locked.request("POST", infer, body, {header: "nope"})
        assert status == 403 and json.loads(reply) == {"error": http_message("inference")}
    conn = http.client.HTTPConnection("127.0.0.1", locked.http_port, timeout=30)
    try:  # one keep-alive connection: a refused request leaves it usable
        for headers, want in (({}, 403), ({header: value}, 200), ({}, 403), ({header: value}, 200)):
            conn.request("POST", infer, body=body, headers=headers)
            response = conn.getresponse()
            assert response.status == want
            response.read()
    finally:
        conn.close()


def test_tritonclient_http_sends_the_headers(locked):
    client = httpclient.InferenceServerClient(locked.http_url)
    try:
        with pytest.raises(InferenceServerException, match="expecting header 'x-open-key'"):
            client.get_server_metadata()
        open_ = {HTTP["metadata"][0]: HTTP["metadata"][1]}
        assert client.is_server_live(headers=open_) and client.is_model_ready("add_sub", headers=open_)
        assert client.get_model_metadata("add_sub", headers=open_)["name"] == "add_sub"
        admin = {HTTP["model-config"][0]: HTTP["model-config"][1]}
        assert client.get_model_config("add_sub", headers=admin)["name"] == "add_sub"
        assert client.get_model_repository_index(headers=admin)
        inputs = [httpclient.InferInput("INPUT0", [1, 16], "INT32"), httpclient.InferInput("INPUT1", [1, 16], "INT32")]
        for i in inputs:
            i.set_data_from_numpy(np.ones((1, 16), np.int32), binary_data=True)
        with pytest.raises(InferenceServerException, match="expecting header 'x-infer-key'"):
            client.infer("add_sub", inputs, headers=admin)
        result = client.infer("add_sub", inputs, headers={HTTP["inference"][0]: HTTP["inference"][1]})
        assert (result.as_numpy("OUTPUT0") == 2).all()
    finally:
        client.close()


# ---- gRPC -------------------------------------------------------------------------------------------


def add_sub_request() -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="add_sub", id="r1")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        request.raw_input_contents.append(np.ones((1, 16), np.int32).tobytes())
    return request


REQUESTS = {
    "ModelReady": service_pb2.ModelReadyRequest(name="add_sub"),
    "ModelMetadata": service_pb2.ModelMetadataRequest(name="add_sub"),
    "ModelConfig": service_pb2.ModelConfigRequest(name="add_sub"),
    "ModelStatistics": service_pb2.ModelStatisticsRequest(name="add_sub"),
    "ModelInfer": add_sub_request(),
    "ModelStreamInfer": add_sub_request(),
    "RepositoryModelLoad": service_pb2.RepositoryModelLoadRequest(model_name="no_such_model"),
    "RepositoryModelUnload": service_pb2.RepositoryModelUnloadRequest(model_name="no_such_model"),
}


def call(channel: grpc.Channel, method, metadata: list[tuple[str, str]]) -> tuple[grpc.StatusCode, str, list]:
    """One call of `method` (a descriptor) with `metadata`: (status, details, replies)."""
    request_type = getattr(service_pb2, method.input_type.name)
    reply_type = getattr(service_pb2, method.output_type.name)
    request = REQUESTS.get(method.name, request_type())
    path = access.GRPC_SERVICE_PREFIX + method.name
    try:
        if method.client_streaming:
            stub = channel.stream_stream(path, request_serializer=request_type.SerializeToString,
                                         response_deserializer=reply_type.FromString)
            replies = list(stub(iter([request]), metadata=metadata, timeout=30))
        else:
            stub = channel.unary_unary(path, request_serializer=request_type.SerializeToString,
                                       response_deserializer=reply_type.FromString)
            replies = [stub(request, metadata=metadata, timeout=30)]
        return grpc.StatusCode.OK, "", replies
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", []


def test_every_rpc_is_checked(locked):
    seen: list[str] = []
    with grpc.insecure_channel(locked.grpc_url) as channel:
        for method in METHODS:
            group = access.GRPC_GROUPS[method.name]
            header, value = GRPC[group]
            bare = header[len(access.GRPC_KEY_PREFIX):]
            others = [(h, v) for g, (h, v) in GRPC.items() if h != header]
            for metadata in ([], others, [(header, value + "x")], [(bare, value)], [(header, HTTP[group][1])]):
                code, details, _ = call(channel, method, metadata)
                assert code == grpc.StatusCode.PERMISSION_DENIED, (method.name, metadata, code, details)
                assert details == grpc_message(group)
                seen.append(details)
            code, details, replies = call(channel, method, [*others, (header, value)])
            assert code != grpc.StatusCode.PERMISSION_DENIED, (method.name, details)
            seen += [details, *(str(r) for r in replies)]
            if method.name in ("ModelInfer", "ModelStreamInfer", "ServerLive", "ModelConfig", "LogSettings",
                               "TraceSetting"):
                assert code == grpc.StatusCode.OK and replies, (method.name, details)
            if group == "shared-memory":  # served; registering is off, as by default
                off = method.name.endswith("Register") or method.name.endswith("Unregister")
                assert code == (grpc.StatusCode.UNIMPLEMENTED if off else grpc.StatusCode.OK), (method.name, details)
        unknown = channel.unary_unary("/inference.GRPCInferenceService/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as info:  # a path outside the service stays the transport's
            unknown(b"", timeout=30)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert all(secret not in text for text in seen for secret in SECRETS)


def test_model_stream_infer_through_tritonclient(locked):
    client = grpcclient.InferenceServerClient(locked.grpc_url)
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
    for i in inputs:
        i.set_data_from_numpy(np.full((1, 16), 3, np.int32))
    try:
        for headers, ok in (({}, False), ({GRPC["inference"][0]: "nope"}, False),
                            ({GRPC["inference"][0]: GRPC["inference"][1]}, True)):
            results: queue.Queue = queue.Queue()
            client.start_stream(callback=lambda result, error, q=results: q.put((result, error)), headers=headers)
            try:
                client.async_stream_infer("add_sub", inputs, request_id="s1")
            except InferenceServerException:
                assert not ok  # the stream may already be closed by the refusal
            result, error = results.get(timeout=30)
            client.stop_stream()
            if ok:
                assert error is None and (result.as_numpy("OUTPUT0") == 6).all()
            else:
                assert result is None and error.status() == "StatusCode.PERMISSION_DENIED"
                assert grpc_message("inference") in error.message()
        with pytest.raises(InferenceServerException, match="the 'health' protocol group"):
            client.is_server_live()
        assert client.is_server_live(headers={GRPC["health"][0]: GRPC["health"][1]})
    finally:
        client.close()


# ---- restricting one group ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[(), ("--frontend-workers", "1")], ids=["one_process", "frontend_workers"])
def inference_only(request, start_server, test_repo):
    return start_server(test_repo, "--http-restricted-api", "inference:x-key=only-infer-P4s9",
                        "--grpc-restricted-protocol", "inference:key=only-infer-P4s9", *request.param)


def test_restricting_inference_leaves_health_and_metadata_open(inference_only):
    server = inference_only
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/add_sub", "/v2/models/add_sub/ready",
                 "/v2/models/add_sub/config", "/v2/models/stats"):
        assert server.request("GET", path)[0] == 200, path
    assert server.request("POST", "/v2/repository/index")[0] == 200
    status, _, body = server.request("POST", "/v2/models/add_sub/infer", b"{}")
    assert status == 403 and b"only-infer" not in body
    assert json.loads(body) == {"error": "This API is restricted, expecting header 'x-key' (the 'inference' API group)"}

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert client.is_server_live() and client.is_model_ready("add_sub")
        assert client.get_model_metadata("add_sub").name == "add_sub"
        inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
        for i in inputs:
            i.set_data_from_numpy(np.full((1, 16), 5, np.int32))
        with pytest.raises(InferenceServerException) as info:
            client.infer("add_sub", inputs)
        assert info.value.status() == "StatusCode.PERMISSION_DENIED"
        result = client.infer("add_sub", inputs, headers={"triton-grpc-protocol-key": "only-infer-P4s9"})
        assert (result.as_numpy("OUTPUT1") == 0).all()
    finally:
        client.close()
    assert "only-infer-P4s9" not in server.log()
