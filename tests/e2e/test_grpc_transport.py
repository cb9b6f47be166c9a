"""The gRPC transport (fuserve's own HTTP/2 layer) against real clients: grpcio through tritonclient for
what users do (compression, large messages, flow control, unknown methods), and the `h2` library,
frame by frame, for what well-behaved clients never do (split messages, bad prefaces, truncated
messages, pings). After each misbehaviour the server must go on answering good calls."""

from __future__ import annotations

import socket
import struct
from urllib.parse import unquote

import grpc
import h2.config
import h2.connection
import h2.events
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def add_sub_request(k: int = 0) -> tuple[service_pb2.ModelInferRequest, np.ndarray]:
    a = np.arange(16, dtype=np.int32).reshape(1, 16) + k
    b = np.full((1, 16), 2, dtype=np.int32)
    req = service_pb2.ModelInferRequest(model_name="add_sub")
    for name, arr in (("INPUT0", a), ("INPUT1", b)):
        req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        req.raw_input_contents.append(arr.tobytes())
    return req, a + b


def assert_serving(client) -> None:
    i0 = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    i1 = grpcclient.InferInput("INPUT1", [1, 16], "INT32")
    i0.set_data_from_numpy(np.ones((1, 16), np.int32))
    i1.set_data_from_numpy(np.ones((1, 16), np.int32))
    out = client.infer("add_sub", [i0, i1]).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(out, np.full((1, 16), 2, np.int32))


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(client, algorithm):
    x = np.arange(4096, dtype=np.float32).reshape(1, 4096)
    inp = grpcclient.InferInput("IN_FP32", [1, 4096], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("identity_fp32", [inp], compression_algorithm=algorithm)
    np.testing.assert_array_equal(result.as_numpy("OUT_FP32"), x)


def test_large_messages_cross_frames_and_flow_control_windows(server):
    """24 MB each way: many 16 KiB..1 MiB frames, our 4 MiB stream window refilled, and the reply held
    back by the client's windows."""
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        x = np.random.default_rng(0).standard_normal((3, 2_000_000)).astype(np.float32)
        inp = grpcclient.InferInput("IN_FP32", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(c.infer("identity_fp32", [inp]).as_numpy("OUT_FP32"), x)
    finally:
        c.close()


def test_unknown_methods_and_refused_extensions_are_unimplemented(server, client):
    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as e:
            call(b"")
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "NoSuchMethod" in e.value.details()
    with pytest.raises(InferenceServerException) as e:  # every method is served; this one is off here
        client.register_system_shared_memory("r", "/k", 64)
    assert "UNIMPLEMENTED" in str(e.value.status())
    assert "Client shared memory is disabled" in e.value.message()
    assert_serving(client)


def test_garbage_request_message_is_internal(server, client):
    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.unary_unary(INFER)
        with pytest.raises(grpc.RpcError) as e:
            call(b"\xff\xff\xff\xff not a protobuf")
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert "cannot parse the request message" in e.value.details()
    assert_serving(client)


def test_many_calls_on_one_channel(server):
    """Calls multiplexed on one HTTP/2 connection each get their own reply."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        futures = []
        for k in range(300):
            req, expected = add_sub_request(k)
            futures.append((stub.ModelInfer.future(req), expected))
        for fut, expected in futures:
            reply = fut.result(timeout=60)
            got = np.frombuffer(reply.raw_output_contents[0], np.int32).reshape(1, 16)
            np.testing.assert_array_equal(got, expected)


# ---- frame by frame with the h2 library ---------------------------------------------------------------


class RawConnection:
    """A blocking HTTP/2 client connection from the h2 library: send what we like, collect events."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def headers(self, sid: int, path: str = INFER, end_stream: bool = False) -> None:
        self.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", path),
                                     (":authority", "localhost"), ("content-type", "application/grpc"),
                                     ("te", "trailers")], end_stream=end_stream)
        self.flush()

    def data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        self.conn.send_data(sid, data, end_stream=end_stream)
        self.flush()

    def until_ended(self, sid: int) -> tuple[dict[str, str], bytes]:
        """Read until stream `sid` ends; returns its headers and trailers merged, and its body."""
        headers: dict[str, str] = {}
        body = b""
        while True:
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the connection"
            for event in self.conn.receive_data(chunk):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)) \
                        and event.stream_id == sid:
                    headers.update(dict(event.headers))
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == sid:
                    body += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == sid:
                    self.flush()
                    return headers, body
            self.flush()

    def close(self) -> None:
        self.sock.close()


def grpc_message(payload: bytes) -> bytes:
    return struct.pack(">BL", 0, len(payload)) + payload


def test_a_message_split_across_one_byte_frames(server, client):
    req, expected = add_sub_request(7)
    message = grpc_message(req.SerializeToString())
    raw = RawConnection(server.grpc_port)
    try:
        raw.headers(1)
        for i in range(len(message)):
            raw.data(1, message[i:i + 1])
        raw.data(1, b"", end_stream=True)
        headers, body = raw.until_ended(1)
    finally:
        raw.close()
    assert headers[":status"] == "200" and headers["grpc-status"] == "0"
    assert headers["content-type"] == "application/grpc"
    flag, length = struct.unpack(">BL", body[:5])
    assert flag == 0 and length == len(body) - 5
    reply = service_pb2.ModelInferResponse.FromString(body[5:])
    np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.int32).reshape(1, 16), expected)


def test_a_reply_larger_than_the_clients_windows_waits_for_window_updates(server):
    """h2's windows are HTTP/2's default 64 KiB: a 4 MB reply must go out as the client grants room."""
    x = np.arange(1_000_000, dtype=np.float32).reshape(1, -1)
    req = service_pb2.ModelInferRequest(model_name="identity_fp32")
    req.inputs.add(name="IN_FP32", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    raw = RawConnection(server.grpc_port)
    try:
        raw.headers(1)
        message = grpc_message(req.SerializeToString())
        while message:  # within the server's windows and frame size, reading its WINDOW_UPDATEs
            n = min(len(message), raw.conn.local_flow_control_window(1), raw.conn.max_outbound_frame_size)
            if n == 0:
                raw.conn.receive_data(raw.sock.recv(65536))
                continue
            raw.data(1, message[:n])
            message = message[n:]
        raw.data(1, b"", end_stream=True)
        headers, body = raw.until_ended(1)
    finally:
        raw.close()
    assert headers["grpc-status"] == "0"
    reply = service_pb2.ModelInferResponse.FromString(body[5:])
    np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(x.shape), x)


def test_errors_are_trailers_only_with_a_percent_encoded_message(server):
    req, _ = add_sub_request()
    req.model_name = "no_such_model_ü"
    raw = RawConnection(server.grpc_port)
    try:
        raw.headers(1)
        raw.data(1, grpc_message(req.SerializeToString()), end_stream=True)
        headers, body = raw.until_ended(1)
    finally:
        raw.close()
    assert body == b""
    assert headers[":status"] == "200" and headers["grpc-status"] == str(grpc.StatusCode.NOT_FOUND.value[0])
    assert "%" in headers["grpc-message"]  # non-ASCII is percent-encoded...
    assert "no_such_model_ü" in unquote(headers["grpc-message"])  # ...and decodes back


@pytest.mark.parametrize("case", ["ends_inside_a_message", "no_message", "two_messages", "over_the_limit"])
def test_malformed_message_framing(server, client, case):
    req, _ = add_sub_request()
    message = grpc_message(req.SerializeToString())
    raw = RawConnection(server.grpc_port)
    try:
        raw.headers(1)
        if case == "ends_inside_a_message":
            raw.data(1, message[:-3], end_stream=True)
        elif case == "no_message":
            raw.data(1, b"", end_stream=True)
        elif case == "two_messages":
            raw.data(1, message + message, end_stream=True)
        else:  # a header announcing 1 GiB: refused at once, nothing allocated for it
            raw.data(1, struct.pack(">BL", 0, 1 << 30) + b"x" * 100)
        headers, _ = raw.until_ended(1)
    finally:
        raw.close()
    expected = grpc.StatusCode.RESOURCE_EXHAUSTED if case == "over_the_limit" else grpc.StatusCode.INTERNAL
    assert headers["grpc-status"] == str(expected.value[0]), headers
    assert headers.get("grpc-message")
    assert_serving(client)


def test_ping_is_answered_and_calls_go_on_after_it(server):
    raw = RawConnection(server.grpc_port)
    try:
        raw.conn.ping(b"fuserve!")
        raw.flush()
        acked = False
        while not acked:
            chunk = raw.sock.recv(65536)
            assert chunk
            acked = any(isinstance(e, h2.events.PingAckReceived) and e.ping_data == b"fuserve!"
                        for e in raw.conn.receive_data(chunk))
        req, expected = add_sub_request(3)
        raw.headers(1)
        raw.data(1, grpc_message(req.SerializeToString()), end_stream=True)
        headers, body = raw.until_ended(1)
    finally:
        raw.close()
    assert headers["grpc-status"] == "0"
    reply = service_pb2.ModelInferResponse.FromString(body[5:])
    np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.int32).reshape(1, 16), expected)


@pytest.mark.parametrize("garbage", [b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
                                     b"\x00" * 64])
def test_a_bad_connection_preface_closes_only_that_connection(server, client, garbage):
    sock = socket.create_connection(("127.0.0.1", server.grpc_port), timeout=10)
    try:
        sock.sendall(garbage)
        received = b""
        while chunk := sock.recv(65536):  # the server answers (SETTINGS, GOAWAY) and closes
            received += chunk
    finally:
        sock.close()
    # the last frame is a GOAWAY (type 7) with PROTOCOL_ERROR (1)
    assert b"\x07\x00\x00\x00\x00\x00" in received and b"\x00\x00\x00\x01" in received
    assert_serving(client)


def test_a_stream_that_opens_without_a_grpc_content_type_is_refused(server, client):
    raw = RawConnection(server.grpc_port)
    try:
        raw.conn.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", INFER),
                                  (":authority", "localhost"), ("content-type", "application/json")],
                              end_stream=True)
        raw.flush()
        headers, _ = raw.until_ended(1)
    finally:
        raw.close()
    assert headers["grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0])
    assert "application/grpc" in unquote(headers["grpc-message"])
    assert_serving(client)


def test_partial_messages_cannot_make_a_connection_hold_unbounded_memory(start_server, test_repo):
    """Ten streams each start a 900 kB message and never finish it: with a 1 MB message limit the
    connection's window is 4 MB. Once partial messages fill it, no stream could finish, so the
    server ends the call holding the most (RESOURCE_EXHAUSTED) and drops its bytes rather than
    returning window for more: what it holds stays near the window. Other connections are served."""
    server = start_server(test_repo, "--http-max-input-size", "1000000")
    rss_before = server.rss()
    raw = RawConnection(server.grpc_port)
    sent = dict.fromkeys(range(1, 21, 2), 0)
    exhausted = set()
    try:
        raw.sock.settimeout(2.0)
        for sid in sent:
            raw.headers(sid)
            raw.data(sid, struct.pack(">BL", 0, 900_000))
        while True:
            progressed = False
            for sid in sent:
                n = min(raw.conn.local_flow_control_window(sid), raw.conn.max_outbound_frame_size,
                        899_000 - sent[sid])
                if n > 0:
                    raw.data(sid, bytes(n))
                    sent[sid] += n
                    progressed = True
            if progressed:
                continue
            try:
                chunk = raw.sock.recv(65536)
            except TimeoutError:
                break  # no window came back: the client is held off
            assert chunk, "the server closed the connection"
            for event in raw.conn.receive_data(chunk):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)) and \
                        ("grpc-status", "8") in event.headers:
                    exhausted.add(event.stream_id)
                    sent.pop(event.stream_id, None)  # ended: the client stops sending on it
            raw.flush()
        assert exhausted, "no call was ended although the partial messages filled the window"
        assert server.rss() - rss_before < 32 << 20
        other = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            assert_serving(other)
        finally:
            other.close()
    finally:
        raw.close()
