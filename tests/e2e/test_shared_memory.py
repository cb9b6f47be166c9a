"""System shared memory, end to end with tritonclient's shared_memory module making the regions:
register / status / unregister over both protocols, inputs read from and outputs written to
regions for every datatype, the misuse cases, off by default, an unregister while a request holds
its region, and what is left mapped after unregister-all and at shutdown."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from conftest import wait_until
from model_builders import ONNX_TYPES
from python_models import REPEAT, REPEAT_CONFIG, write
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

WAIT = 30
DISABLED = "Client shared memory is disabled. Start the server with '--allow-client-shm=true' to enable."

# A Python model that holds its request until a file exists: OUT = IN, written once `started`
# exists (so a test knows the request is executing and holds its regions).
GATED = '''
import os
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        gate = os.environ["FUSERVE_TEST_GATE"]
        open(gate + ".started", "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array(x))]))
        return out
'''
GATED_CONFIG = '''
backend: "python"
max_batch_size: 0
input [ { name: "IN", data_type: TYPE_INT32, dims: [ 16 ] } ]
output [ { name: "OUT", data_type: TYPE_INT32, dims: [ 16 ] } ]
'''


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    return tmp_path_factory.mktemp("gate") / "open"


@pytest.fixture(scope="module")
def shm_server(start_server, test_repo, tmp_path_factory, gate):
    repo = tmp_path_factory.mktemp("shm_repo")
    write(repo, "gated", GATED_CONFIG, GATED)
    write(repo, "repeat", REPEAT_CONFIG, REPEAT)
    return start_server([test_repo, repo], "--allow-client-shm=true", env={"FUSERVE_TEST_GATE": str(gate)})


@pytest.fixture
def regions():
    """Regions the test creates, each with a fresh key; destroyed (unlinked) after the test."""
    made = []

    def make(size: int, name: str | None = None):
        name = name or f"r{uuid.uuid4().hex[:8]}"
        handle = shm.create_shared_memory_region(name, f"/ftest_shm_{uuid.uuid4().hex}", size)
        made.append(handle)
        return name, handle

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def _key(handle) -> str:
    return handle._shm_key


def _mapped(pid: int, key: str) -> bool:
    """Whether process `pid` maps the shared memory object `key`."""
    with open(f"/proc/{pid}/maps") as f:
        return f"/dev/shm/{key.lstrip('/')}" in f.read()


def _http(server):
    return httpclient.InferenceServerClient(server.http_url, network_timeout=WAIT)


def _grpc_stub(server):
    channel = grpc.insecure_channel(server.grpc_url)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


# ---- off by default ----------------------------------------------------------------------------------


def test_off_by_default_nothing_is_mapped_and_no_key_is_echoed(server, regions):
    name, handle = regions(64)
    status, _, body = server.request("POST", f"/v2/systemsharedmemory/region/{name}/register",
                                     json.dumps({"key": _key(handle), "offset": 0, "byte_size": 64}).encode())
    assert status == 501 and json.loads(body) == {"error": DISABLED}
    assert not _mapped(server.proc.pid, _key(handle))
    status, _, body = server.request("POST", "/v2/systemsharedmemory/unregister")
    assert status == 501 and json.loads(body) == {"error": DISABLED}
    assert _http(server).get_system_shared_memory_status() == []
    channel, stub = _grpc_stub(server)
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.SystemSharedMemoryRegister(service_pb2.SystemSharedMemoryRegisterRequest(
                name=name, key=_key(handle), byte_size=64), timeout=WAIT)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and err.value.details() == DISABLED
        assert _key(handle) not in err.value.details()
        assert not stub.SystemSharedMemoryStatus(service_pb2.SystemSharedMemoryStatusRequest(), timeout=WAIT).regions
    finally:
        channel.close()
    # an inference that names a region finds none
    inp = httpclient.InferInput("INPUT0", [1, 16], "INT32")
    inp.set_shared_memory(name, 64)
    other = httpclient.InferInput("INPUT1", [1, 16], "INT32")
    other.set_data_from_numpy(np.zeros((1, 16), np.int32))
    with pytest.raises(InferenceServerException, match=f"Unable to find shared memory region: '{name}'") as err:
        _http(server).infer("add_sub", [inp, other])
    assert err.value.status() == "404"


# ---- register / status / unregister ----------------------------------------------------------------


def test_register_status_unregister_over_http(shm_server, regions):
    client = _http(shm_server)
    (a, ha), (b, hb) = regions(4096, "a_region"), regions(8192, "b_region")
    client.register_system_shared_memory(b, _key(hb), 4096, offset=4096)
    client.register_system_shared_memory(a, _key(ha), 4096)
    assert client.get_system_shared_memory_status() == [
        {"name": a, "key": _key(ha), "offset": 0, "byte_size": 4096},
        {"name": b, "key": _key(hb), "offset": 4096, "byte_size": 4096}]
    assert client.get_system_shared_memory_status(b) == [{"name": b, "key": _key(hb), "offset": 4096,
                                                          "byte_size": 4096}]
    assert _mapped(shm_server.proc.pid, _key(ha))
    with pytest.raises(InferenceServerException, match="Unable to find system shared memory region: 'nope'"):
        client.get_system_shared_memory_status("nope")
    with pytest.raises(InferenceServerException, match=f"shared memory region '{a}' already in manager"):
        client.register_system_shared_memory(a, _key(hb), 64)
    client.unregister_system_shared_memory("nope")  # an unknown name is no error (Triton's answer)
    client.unregister_system_shared_memory(a)
    assert [r["name"] for r in client.get_system_shared_memory_status()] == [b]
    assert not _mapped(shm_server.proc.pid, _key(ha))
    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status() == []
    assert not _mapped(shm_server.proc.pid, _key(hb))
    # the CUDA calls a client makes first answer as a server with no CUDA region
    client.unregister_cuda_shared_memory()
    assert client.get_cuda_shared_memory_status() == []
    with pytest.raises(InferenceServerException, match="CUDA shared memory is not supported") as err:
        client.register_cuda_shared_memory("gpu", b"\0" * 64, 0, 64)
    assert err.value.status() == "501"


def test_register_status_unregister_over_grpc(shm_server, regions):
    client = grpcclient.InferenceServerClient(shm_server.grpc_url)
    (a, ha), (b, hb) = regions(64), regions(128)
    try:
        client.register_system_shared_memory(a, _key(ha), 64)
        client.register_system_shared_memory(b, _key(hb), 100, offset=28)
        status = client.get_system_shared_memory_status(as_json=True)["regions"]
        assert status == {a: {"name": a, "key": _key(ha), "byte_size": "64"},
                          b: {"name": b, "key": _key(hb), "offset": "28", "byte_size": "100"}}
        assert list(client.get_system_shared_memory_status(b, as_json=True)["regions"]) == [b]
        with pytest.raises(InferenceServerException) as err:
            client.register_system_shared_memory(a, _key(ha), 64)
        assert err.value.status() == "StatusCode.ALREADY_EXISTS"
        with pytest.raises(InferenceServerException) as err:
            client.get_system_shared_memory_status("nope")
        assert err.value.status() == "StatusCode.NOT_FOUND"
        client.unregister_system_shared_memory("nope")
        client.unregister_system_shared_memory(a)
        assert list(client.get_system_shared_memory_status(as_json=True)["regions"]) == [b]
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status(as_json=True) == {}
        client.unregister_cuda_shared_memory()
        assert client.get_cuda_shared_memory_status(as_json=True) == {}
    finally:
        client.unregister_system_shared_memory()
        client.close()


@pytest.mark.parametrize(("key", "status", "words"), [
    ("/", 400, "its key is not the name of a shared memory object"),
    ("/..", 400, "its key is not the name of a shared memory object"),
    ("/a/b", 400, "its key is not the name of a shared memory object"),
    ("/" + "k" * 256, 400, "its key is not the name of a shared memory object"),
    ("/fuserve_ring_0", 400, "reserved for the server's own regions"),
    ("/triton_python_backend_shm_region_1", 400, "reserved for the server's own regions"),
    ("/no_such_object_" + "x" * 8, 500, "Unable to open shared memory region"),  # Triton's code for it
])
def test_bad_keys_are_refused_without_echoing_them(shm_server, key, status, words):
    got, _, body = shm_server.request("POST", "/v2/systemsharedmemory/region/bad/register",
                                      json.dumps({"key": key, "byte_size": 64}).encode())
    message = json.loads(body)["error"]
    assert got == status and words in message and "'bad'" in message
    assert not key.strip("/") or key.strip("/") not in message
    assert _http(shm_server).get_system_shared_memory_status() == []


def test_a_symlink_key_is_refused(shm_server, regions, tmp_path):
    name, handle = regions(64)
    link = f"ftest_link_{uuid.uuid4().hex}"
    os.symlink(f"/dev/shm/{_key(handle).lstrip('/')}", f"/dev/shm/{link}")
    try:
        status, _, body = shm_server.request("POST", "/v2/systemsharedmemory/region/link/register",
                                             json.dumps({"key": "/" + link, "byte_size": 64}).encode())
        assert status == 500 and "Unable to open shared memory region 'link'" in json.loads(body)["error"]
    finally:
        os.unlink(f"/dev/shm/{link}")


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"key": "K", "offset": 0, "byte_size": 4097}, 400, "past the end of the object"),
    ({"key": "K", "offset": 4096, "byte_size": 1}, 400, "past the end of the object"),
    ({"key": "K", "offset": 2**64 - 1, "byte_size": 2}, 400, "past the end of the object"),
    ({"key": "K", "byte_size": 0}, 400, "byte_size must be positive"),
    ({"key": "K", "byte_size": -1}, 400, "'byte_size' must be an unsigned 64-bit integer"),
    ({"key": "K", "byte_size": "16"}, 400, "'byte_size' must be an unsigned 64-bit integer"),
    ({"key": "K", "offset": True, "byte_size": 16}, 400, "'offset' must be an unsigned 64-bit integer"),
    ({"key": 7, "byte_size": 16}, 400, "'key' must be a string"),
    ({"byte_size": 16}, 400, "Shared memory register request has no 'key' field"),
    ({"key": "K"}, 400, "Shared memory register request has no 'byte_size' field"),
])
def test_register_sizes_and_fields_are_checked(shm_server, regions, body, status, words):
    name, handle = regions(4096)
    if body.get("key") == "K":
        body = {**body, "key": _key(handle)}
    got, _, answer = shm_server.request("POST", f"/v2/systemsharedmemory/region/{name}/register",
                                        json.dumps(body).encode())
    assert got == status and words in json.loads(answer)["error"]
    assert _http(shm_server).get_system_shared_memory_status() == []
    assert not _mapped(shm_server.proc.pid, _key(handle))


def test_how_many_regions_and_how_long_a_name(shm_server, regions):
    """At most MAX_REGIONS (256) regions, names of at most 256 characters (docs/protocol.md)."""
    name, handle = regions(64)
    channel, stub = _grpc_stub(shm_server)
    try:
        def register(region: str):
            return stub.SystemSharedMemoryRegister(service_pb2.SystemSharedMemoryRegisterRequest(
                name=region, key=_key(handle), byte_size=64), timeout=WAIT)

        with pytest.raises(grpc.RpcError, match="at most 256 characters"):
            register("n" * 257)
        register("n" * 256)
        for i in range(255):
            register(f"r{i}")
        with pytest.raises(grpc.RpcError, match="256 regions are registered, the most this server holds"):
            register("one_too_many")
    finally:
        stub.SystemSharedMemoryUnregister(service_pb2.SystemSharedMemoryUnregisterRequest(), timeout=WAIT)
        channel.close()
    assert not _mapped(shm_server.proc.pid, _key(handle))


# ---- inference through regions -----------------------------------------------------------------------


def _values(v2: str) -> np.ndarray:
    """Two rows of eight values of `v2` (BF16 as its 16-bit patterns)."""
    if v2 == "BYTES":
        return np.array([[f"s{i}".encode() * (i % 3) for i in range(8)] for _ in range(2)], dtype=object)
    if v2 == "BOOL":
        return (np.arange(16) % 3 == 0).reshape(2, 8)
    if v2 == "BF16":
        return np.arange(16, dtype=np.uint16).reshape(2, 8) + 0x3F80
    dtype = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}.get(v2) or np.dtype(v2.lower())
    return (np.arange(16) * 3 + 1).astype(dtype).reshape(2, 8)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("v2", sorted(ONNX_TYPES))
def test_every_datatype_in_and_out_through_regions(shm_server, regions, protocol, v2):
    data = _values(v2)
    blob_size = len(serialize_byte_tensor(data).item()) if v2 == "BYTES" else data.nbytes
    (i_name, i_handle), (o_name, o_handle) = regions(blob_size + 100), regions(blob_size + 200)
    shm.set_shared_memory_region(i_handle, [serialize_byte_tensor(data) if v2 == "BYTES" else data], offset=100)
    lib = httpclient if protocol == "http" else grpcclient
    client = _http(shm_server) if protocol == "http" else grpcclient.InferenceServerClient(shm_server.grpc_url)
    try:
        client.register_system_shared_memory(i_name, _key(i_handle), blob_size + 100)
        client.register_system_shared_memory(o_name, _key(o_handle), blob_size + 200)
        inp = lib.InferInput(f"IN_{v2}", list(data.shape), v2)
        inp.set_shared_memory(i_name, blob_size, offset=100)
        out = lib.InferRequestedOutput(f"OUT_{v2}")
        out.set_shared_memory(o_name, blob_size + 150, offset=50)
        result = client.infer(f"identity_{v2.lower()}", [inp], outputs=[out])
        answered = result.get_output(f"OUT_{v2}")
        if protocol == "http":
            assert answered == {"name": f"OUT_{v2}", "datatype": v2, "shape": [2, 8]}  # no data, no parameters
        else:
            assert not answered.parameters and result.get_response().raw_output_contents == [b""]
        if v2 == "BYTES":
            got = shm.get_contents_as_numpy(o_handle, np.object_, [2, 8], offset=50)
        else:
            got = shm.get_contents_as_numpy(o_handle, data.dtype, [2, 8], offset=50)
        np.testing.assert_array_equal(got, data)
    finally:
        client.unregister_system_shared_memory()
        client.close()


def test_inputs_mixed_with_sent_data_and_outputs_not_in_regions(shm_server, regions):
    """add_sub with INPUT0 in a region and INPUT1 sent; OUTPUT0 in a region, OUTPUT1 sent back."""
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 5, dtype=np.int32)
    (i_name, i_handle), (o_name, o_handle) = regions(64), regions(64)
    shm.set_shared_memory_region(i_handle, [a])
    for lib, client in ((httpclient, _http(shm_server)), (grpcclient, grpcclient.InferenceServerClient(
            shm_server.grpc_url))):
        try:
            client.register_system_shared_memory(i_name, _key(i_handle), 64)
            client.register_system_shared_memory(o_name, _key(o_handle), 64)
            in0 = lib.InferInput("INPUT0", [1, 16], "INT32")
            in0.set_shared_memory(i_name, 64)
            in1 = lib.InferInput("INPUT1", [1, 16], "INT32")
            in1.set_data_from_numpy(b)
            out0 = lib.InferRequestedOutput("OUTPUT0")
            out0.set_shared_memory(o_name, 64)
            result = client.infer("add_sub", [in1, in0], outputs=[out0, lib.InferRequestedOutput("OUTPUT1")])
            np.testing.assert_array_equal(shm.get_contents_as_numpy(o_handle, np.int32, [1, 16]), a + b)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
            shm.set_shared_memory_region(o_handle, [np.zeros((1, 16), np.int32)])
        finally:
            client.unregister_system_shared_memory()
            client.close()


def _infer_body(inputs: list[dict], outputs: list[dict] | None = None) -> bytes:
    return json.dumps({"inputs": inputs, **({"outputs": outputs} if outputs else {})}).encode()


def _in(name: str, region: str, **params) -> dict:
    return {"name": name, "shape": [1, 16], "datatype": "INT32",
            "parameters": {"shared_memory_region": region, **params}}


@pytest.mark.parametrize(("inputs", "outputs", "status", "words"), [
    ([_in("INPUT0", "R", shared_memory_byte_size=64, shared_memory_offset=64),
      _in("INPUT1", "R", shared_memory_byte_size=64)], None, 400, "Invalid offset for shared memory region: 'R'"),
    ([_in("INPUT0", "R", shared_memory_byte_size=64, shared_memory_offset=2**64 - 1),
      _in("INPUT1", "R", shared_memory_byte_size=64)], None, 400, "Invalid offset for shared memory region: 'R'"),
    ([_in("INPUT0", "R", shared_memory_byte_size=2**64 - 8, shared_memory_offset=8),
      _in("INPUT1", "R", shared_memory_byte_size=64)], None, 400,
     "Invalid offset + byte size for shared memory region: 'R'"),
    ([_in("INPUT0", "R", shared_memory_byte_size=65),
      _in("INPUT1", "R", shared_memory_byte_size=64)], None, 400,
     "Invalid offset + byte size for shared memory region: 'R'"),
    ([_in("INPUT0", "R", shared_memory_byte_size=32),
      _in("INPUT1", "R", shared_memory_byte_size=64)], None, 400, "32 bytes of data do not match shape [1, 16]"),
    ([_in("INPUT0", "R", shared_memory_byte_size=64, shared_memory_offset=-1),
      _in("INPUT1", "R", shared_memory_byte_size=64)], None, 400, "Invalid offset for shared memory region: 'R'"),
    ([_in("INPUT0", "R"), _in("INPUT1", "R", shared_memory_byte_size=64)], None, 400,
     "'shared_memory_byte_size' must be specified along with 'shared_memory_region'"),
    ([_in("INPUT0", "R", shared_memory_byte_size="64"), _in("INPUT1", "R", shared_memory_byte_size=64)], None, 400,
     "invalid value type for 'shared_memory_byte_size'"),
    ([{**_in("INPUT0", "R", shared_memory_byte_size=64), "data": [0] * 16},
      _in("INPUT1", "R", shared_memory_byte_size=64)], None, 400, "must set only one of 'data'"),
    ([_in("INPUT0", "nope", shared_memory_byte_size=64), _in("INPUT1", "R", shared_memory_byte_size=64)], None, 404,
     "Unable to find shared memory region: 'nope'"),
    ([_in("INPUT0", "R", shared_memory_byte_size=64), _in("INPUT1", "R", shared_memory_byte_size=64)],
     [{"name": "OUTPUT0", "parameters": {"shared_memory_region": "R", "shared_memory_byte_size": 32}}], 400,
     "output 'OUTPUT0' (32 bytes) should be at least 64 bytes"),
    ([_in("INPUT0", "R", shared_memory_byte_size=64), _in("INPUT1", "R", shared_memory_byte_size=64)],
     [{"name": "OUTPUT0", "parameters": {"shared_memory_region": "R", "shared_memory_byte_size": 64,
                                         "binary_data": True}}], 400,
     "Output can't set both 'shared_memory_region' and 'binary_data'"),
    ([_in("INPUT0", "R", shared_memory_byte_size=64), _in("INPUT1", "R", shared_memory_byte_size=64)],
     [{"name": "OUTPUT0", "parameters": {"shared_memory_region": "R", "shared_memory_byte_size": 64,
                                         "shared_memory_offset": 32}}], 400,
     "Invalid offset + byte size for shared memory region: 'R'"),
])
def test_misuse_in_an_inference_gets_a_specific_error(shm_server, regions, inputs, outputs, status, words):
    name, handle = regions(64, "R")
    before = np.arange(16, dtype=np.int32).reshape(1, 16)
    shm.set_shared_memory_region(handle, [before])
    client = _http(shm_server)
    client.register_system_shared_memory(name, _key(handle), 64)
    try:
        got, _, body = shm_server.request("POST", "/v2/models/add_sub/infer", _infer_body(inputs, outputs))
        assert got == status and words in json.loads(body)["error"], body
        # a refused request writes nothing into the region
        np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.int32, [1, 16]), before)
    finally:
        client.unregister_system_shared_memory()
    assert not _mapped(shm_server.proc.pid, _key(handle))  # nothing kept it held


def test_bytes_input_cut_short_in_a_region(shm_server, regions):
    data = np.array([[str(i).encode() for i in range(16)]], dtype=object)
    serialized = serialize_byte_tensor(data)
    blob = serialized.item()
    name, handle = regions(len(blob))
    shm.set_shared_memory_region(handle, [serialized])
    client = _http(shm_server)
    client.register_system_shared_memory(name, _key(handle), len(blob))
    try:
        inputs = [{"name": n, "shape": [1, 16], "datatype": "BYTES",
                   "parameters": {"shared_memory_region": name, "shared_memory_byte_size": len(blob) - 1}}
                  for n in ("INPUT0", "INPUT1")]
        got, _, body = shm_server.request("POST", "/v2/models/add_sub_string/infer", _infer_body(inputs))
        assert got == 400 and "BYTES element of 2 bytes runs past the end of the data" in json.loads(body)["error"]
    finally:
        client.unregister_system_shared_memory()


def test_grpc_misuse(shm_server, regions):
    name, handle = regions(64)
    client = grpcclient.InferenceServerClient(shm_server.grpc_url)
    client.register_system_shared_memory(name, _key(handle), 64)
    try:
        in0 = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
        in0.set_shared_memory(name, 64, offset=64)
        in1 = grpcclient.InferInput("INPUT1", [1, 16], "INT32")
        in1.set_shared_memory(name, 64)
        with pytest.raises(InferenceServerException, match=f"Invalid offset for shared memory region: '{name}'") as e:
            client.infer("add_sub", [in0, in1])
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        in0.set_shared_memory(name, 64, offset=-8)
        with pytest.raises(InferenceServerException, match="Invalid offset for shared memory region"):
            client.infer("add_sub", [in0, in1])
        in0 = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
        in0.set_shared_memory(name, 72)  # 64 bytes of data, but the size runs past the region
        with pytest.raises(InferenceServerException, match="Invalid offset \\+ byte size for shared memory region"):
            client.infer("add_sub", [in0, in1])
        in0 = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
        in0.set_shared_memory("nope", 64)
        with pytest.raises(InferenceServerException, match="Unable to find shared memory region: 'nope'") as e:
            client.infer("add_sub", [in0, in1])
        assert e.value.status() == "StatusCode.NOT_FOUND"
    finally:
        client.unregister_system_shared_memory()
        client.close()


# ---- lifetimes ---------------------------------------------------------------------------------------


def test_unregister_waits_for_the_request_that_holds_the_region(shm_server, regions, gate):
    data = np.arange(16, dtype=np.int32) * 7
    (i_name, i_handle), (o_name, o_handle) = regions(64), regions(64)
    shm.set_shared_memory_region(i_handle, [data])
    client = _http(shm_server)
    client.register_system_shared_memory(i_name, _key(i_handle), 64)
    client.register_system_shared_memory(o_name, _key(o_handle), 64)
    started = gate.with_name(gate.name + ".started")
    answered: dict = {}

    def infer() -> None:
        inp = httpclient.InferInput("IN", [16], "INT32")
        inp.set_shared_memory(i_name, 64)
        out = httpclient.InferRequestedOutput("OUT")
        out.set_shared_memory(o_name, 64)
        try:
            answered["result"] = _http(shm_server).infer("gated", [inp], outputs=[out])
        except Exception as exc:  # reported below
            answered["error"] = exc

    def unregister() -> None:
        _http(shm_server).unregister_system_shared_memory()
        answered["unregistered"] = time.monotonic()

    request = threading.Thread(target=infer)
    request.start()
    try:
        _unregister_while_held(shm_server, client, gate, started, request, unregister, answered, data, i_handle,
                               o_handle)
    finally:
        gate.touch()  # whatever failed, the model is let go
        request.join(WAIT)
        started.unlink(missing_ok=True)
        gate.unlink(missing_ok=True)


def _unregister_while_held(shm_server, client, gate, started, request, unregister, answered, data, i_handle,
                           o_handle) -> None:
    wait_until(started.exists, timeout=WAIT, what="the gated model to start")
    unregistering = threading.Thread(target=unregister)
    unregistering.start()
    # the regions leave the table at once, but stay mapped while the request holds them
    wait_until(lambda: client.get_system_shared_memory_status() == [], timeout=WAIT, what="the regions to go")
    unregistering.join(0.5)
    assert unregistering.is_alive() and _mapped(shm_server.proc.pid, _key(o_handle))
    opened = time.monotonic()
    gate.touch()
    request.join(WAIT)
    unregistering.join(WAIT)
    assert not request.is_alive() and not unregistering.is_alive()
    assert "error" not in answered, answered.get("error")
    assert answered["unregistered"] >= opened
    np.testing.assert_array_equal(shm.get_contents_as_numpy(o_handle, np.int32, [16]), data)
    assert not _mapped(shm_server.proc.pid, _key(i_handle)) and not _mapped(shm_server.proc.pid, _key(o_handle))


def test_regions_are_unmapped_at_shutdown_and_nothing_is_left_in_dev_shm(start_server, test_repo, regions):
    before = set(os.listdir("/dev/shm"))
    server = start_server(test_repo, "--allow-client-shm", "true")  # the BOOL as a separate word, too
    name, handle = regions(64)
    _http(server).register_system_shared_memory(name, _key(handle), 64)
    assert _mapped(server.proc.pid, _key(handle))
    assert server.stop() == 0
    left = set(os.listdir("/dev/shm")) - before
    assert left == {_key(handle).lstrip("/")}, left  # only the test's own region, which it unlinks


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_regions_through_frontend_workers(start_server, test_repo, regions, protocol):
    """The regions are mapped in the scheduler process; the workers pass references on."""
    server = start_server(test_repo, "--allow-client-shm=true", "--frontend-workers", "2")
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    (i_name, i_handle), (o_name, o_handle) = regions(128), regions(128)
    shm.set_shared_memory_region(i_handle, [a, a * 2])
    lib = httpclient if protocol == "http" else grpcclient
    client = _http(server) if protocol == "http" else grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.register_system_shared_memory(i_name, _key(i_handle), 128)
        client.register_system_shared_memory(o_name, _key(o_handle), 128)
        for _ in range(4):  # the requests spread over both workers
            in0, in1 = lib.InferInput("INPUT0", [1, 16], "INT32"), lib.InferInput("INPUT1", [1, 16], "INT32")
            in0.set_shared_memory(i_name, 64)
            in1.set_shared_memory(i_name, 64, offset=64)
            out0, out1 = lib.InferRequestedOutput("OUTPUT0"), lib.InferRequestedOutput("OUTPUT1")
            out0.set_shared_memory(o_name, 64)
            out1.set_shared_memory(o_name, 64, offset=64)
            client.infer("add_sub", [in0, in1], outputs=[out0, out1])
            np.testing.assert_array_equal(shm.get_contents_as_numpy(o_handle, np.int32, [1, 16]), a * 3)
            np.testing.assert_array_equal(shm.get_contents_as_numpy(o_handle, np.int32, [1, 16], offset=64), -a)
        assert _mapped(server.proc.pid, _key(i_handle))
    finally:
        client.unregister_system_shared_memory()
        client.close()


def test_a_truncated_object_is_refused_and_the_server_lives_on(shm_server, regions):
    """A client that shrinks its object after registering it gets an error, not a server killed by
    SIGBUS when the mapping past the object's new end is read."""
    name, handle = regions(1 << 20)
    client = _http(shm_server)
    client.register_system_shared_memory(name, _key(handle), 1 << 20)
    try:
        os.truncate(f"/dev/shm/{_key(handle).lstrip('/')}", 4096)
        inputs = [_in("INPUT0", name, shared_memory_byte_size=64, shared_memory_offset=512 << 10),
                  _in("INPUT1", name, shared_memory_byte_size=64)]
        got, _, body = shm_server.request("POST", "/v2/models/add_sub/infer", _infer_body(inputs))
        assert got == 400 and "is no longer backed" in json.loads(body)["error"]
        assert client.is_server_live()
    finally:
        client.unregister_system_shared_memory()


def test_a_decoupled_model_reads_regions_but_does_not_write_them(shm_server, regions):
    (i_name, i_handle), (o_name, o_handle) = regions(12), regions(64)
    shm.set_shared_memory_region(i_handle, [np.array([4, 5, 6], dtype=np.int32)])
    client = grpcclient.InferenceServerClient(shm_server.grpc_url)
    got: list = []
    done = threading.Event()

    def callback(result, error) -> None:
        got.append(error if error is not None else result.as_numpy("OUT"))
        if error is not None or result.get_response().parameters["triton_final_response"].bool_param:
            done.set()

    try:
        client.register_system_shared_memory(i_name, _key(i_handle), 12)
        client.register_system_shared_memory(o_name, _key(o_handle), 64)
        client.start_stream(callback=callback)
        inp = grpcclient.InferInput("IN", [3], "INT32")
        inp.set_shared_memory(i_name, 12)
        client.async_stream_infer("repeat", [inp], enable_empty_final_response=True)
        assert done.wait(WAIT)
        assert [int(g[0]) for g in got if isinstance(g, np.ndarray)] == [4, 5, 6]
        done.clear()
        got.clear()
        out = grpcclient.InferRequestedOutput("OUT")
        out.set_shared_memory(o_name, 64)
        client.async_stream_infer("repeat", [inp], outputs=[out], enable_empty_final_response=True)
        assert done.wait(WAIT)
        assert len(got) == 1 and "its outputs cannot be written to shared memory" in str(got[0])
    finally:
        client.stop_stream()
        client.unregister_system_shared_memory()
        client.close()


def test_a_request_that_goes_away_releases_its_region(shm_server, regions, gate):
    """The client gives up while the model runs: the request lets its regions go (an unregister does
    not wait for it), and the mapping lives on under the model's input until the model is done."""
    (i_name, i_handle), (o_name, o_handle) = regions(64), regions(64)
    client = _http(shm_server)
    client.register_system_shared_memory(i_name, _key(i_handle), 64)
    client.register_system_shared_memory(o_name, _key(o_handle), 64)
    started = gate.with_name(gate.name + ".started")
    inp = httpclient.InferInput("IN", [16], "INT32")
    inp.set_shared_memory(i_name, 64)
    out = httpclient.InferRequestedOutput("OUT")
    out.set_shared_memory(o_name, 64)
    impatient = httpclient.InferenceServerClient(shm_server.http_url, network_timeout=1.0)
    try:
        with pytest.raises(OSError):  # the client's own timeout (socket.timeout)
            impatient.infer("gated", [inp], outputs=[out])
        wait_until(started.exists, timeout=WAIT, what="the gated model to start")
        t = time.monotonic()
        client.unregister_system_shared_memory()  # nothing holds the regions: answered at once
        assert time.monotonic() - t < 10 and client.get_system_shared_memory_status() == []
        assert _mapped(shm_server.proc.pid, _key(i_handle))  # the model still reads its input
        gate.touch()
        wait_until(lambda: not _mapped(shm_server.proc.pid, _key(i_handle)), timeout=WAIT,
                   what="the mapping to go with the model's input")
        assert not _mapped(shm_server.proc.pid, _key(o_handle))
        assert np.all(shm.get_contents_as_numpy(o_handle, np.int32, [16]) == 0)  # nothing was written
    finally:
        impatient.close()
        gate.unlink(missing_ok=True)
        started.unlink(missing_ok=True)


def test_a_refused_request_through_frontend_workers_releases_its_region(start_server, test_repo, regions):
    server = start_server(test_repo, "--allow-client-shm=true", "--frontend-workers", "2")
    name, handle = regions(128)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.register_system_shared_memory(name, _key(handle), 128)
        for _ in range(4):
            in0, in1 = grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16],
                                                                                                   "INT32")
            in0.set_shared_memory(name, 64)
            in1.set_shared_memory(name, 64, offset=64)
            out0 = grpcclient.InferRequestedOutput("OUTPUT0")
            out0.set_shared_memory(name, 32)  # too small: refused after the model ran
            with pytest.raises(InferenceServerException, match="should be at least 64 bytes"):
                client.infer("add_sub", [in0, in1], outputs=[out0])
        t = time.monotonic()
        client.unregister_system_shared_memory()
        assert time.monotonic() - t < 10 and not _mapped(server.proc.pid, _key(handle))
    finally:
        client.close()
