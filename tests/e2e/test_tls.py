"""TLS on the gRPC and HTTP listeners (server/tls.py): tritonserver's `--grpc-use-ssl` family and our
`--http-use-ssl` family, against real `fuserve serve` processes and the real tritonclient's own SSL
options, with certificates made here by `trustme`. Also, in-process on uvloop, that the SSL
transports honour the frontends' pause_reading/resume_reading backpressure with 24 MB bodies."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import socket
import ssl
import struct
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import model_builders as mb
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import trustme
from tritonclient.utils import InferenceServerException

from server import tls
from server.__main__ import build_parser, config_from_args

BIG = (3, 2_000_000)  # FP32: 24 MB


class Certs:
    """A CA, the server's certificate (localhost and 127.0.0.1), a client certificate from the same
    CA, and a client certificate from another CA; each as files."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        ca, other_ca = trustme.CA(), trustme.CA()
        self.ca = self._write(ca.cert_pem, "ca.pem")
        self.other_ca = self._write(other_ca.cert_pem, "other_ca.pem")
        self.server_cert, self.server_key = self._issue(ca, "server", "localhost", "127.0.0.1")
        self.client_cert, self.client_key = self._issue(ca, "client", "client.example")
        self.other_cert, self.other_key = self._issue(other_ca, "other_client", "client.example")
        self.junk = root / "junk.pem"
        self.junk.write_text("this is not PEM\n")

    def _write(self, blob: trustme.Blob, name: str) -> Path:
        path = self.root / name
        blob.write_to_path(str(path))
        return path

    def _issue(self, ca: trustme.CA, name: str, *identities: str) -> tuple[Path, Path]:
        leaf = ca.issue_cert(*identities)
        cert = self.root / f"{name}.pem"
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        return cert, self._write(leaf.private_key_pem, f"{name}.key")

    def server_flags(self, proto: str, mutual: bool = False) -> list[str]:
        flags = [f"--{proto}-use-ssl-mutual" if mutual else f"--{proto}-use-ssl", "true",
                 f"--{proto}-server-cert", str(self.server_cert), f"--{proto}-server-key", str(self.server_key)]
        return flags + ([f"--{proto}-root-cert", str(self.ca)] if mutual else [])

    def client_context(self, cert: Path | None = None, key: Path | None = None,
                       alpn: list[str] | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key))
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("tls_repo")
    mb.generated(repo, "add_sub")
    mb.identity(repo / "identity_fp32" / "1" / "model.onnx", "FP32")
    return repo


def https_get(port: int, path: str, ctx: ssl.SSLContext, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready_https(server, ctx: ssl.SSLContext, timeout: float = 90.0):
    """conftest's wait_ready, over HTTPS (with the client certificate `ctx` carries, if any)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"fuserve exited with {server.proc.returncode}:\n{server.log()}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if https_get(server.http_port, "/v2/health/ready", ctx, timeout=5)[0] == 200:
                return server
        time.sleep(0.05)
    raise TimeoutError(f"fuserve not ready over HTTPS after {timeout}s:\n{server.log()}")


@pytest.fixture(scope="module")
def tls_server(start_server, repo, certs):
    """TLS (not mutual) on gRPC and on HTTP."""
    p = start_server(repo, *certs.server_flags("grpc"), *certs.server_flags("http"), wait=False)
    return wait_ready_https(p, certs.client_context())


@pytest.fixture(scope="module")
def mutual_server(start_server, repo, certs):
    """Mutual TLS on gRPC and on HTTP: client certificates signed by the CA required."""
    p = start_server(repo, *certs.server_flags("grpc", mutual=True), *certs.server_flags("http", mutual=True),
                     wait=False)
    return wait_ready_https(p, certs.client_context(certs.client_cert, certs.client_key))


# ---- clients --------------------------------------------------------------------------------------


def grpc_client(server, certs: Certs, with_cert: str | None = None) -> grpcclient.InferenceServerClient:
    """tritonclient.grpc over TLS; `with_cert` "ours" (signed by the CA) or "other" (another CA)."""
    cert, key = {None: (None, None), "ours": (certs.client_cert, certs.client_key),
                 "other": (certs.other_cert, certs.other_key)}[with_cert]
    return grpcclient.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(certs.ca),
                                            private_key=str(key) if key else None,
                                            certificate_chain=str(cert) if cert else None)


def http_client(server, certs: Certs, with_cert: str | None = None) -> httpclient.InferenceServerClient:
    options = {"ca_certs": str(certs.ca)}
    if with_cert is not None:
        cert, key = (certs.client_cert, certs.client_key) if with_cert == "ours" else (certs.other_cert,
                                                                                       certs.other_key)
        options.update(certfile=str(cert), keyfile=str(key))
    return httpclient.InferenceServerClient(server.http_url, ssl=True, ssl_options=options,
                                            connection_timeout=10, network_timeout=60)


def add_sub(mod, client, k: int = 0) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16) + k
    b = np.full((1, 16), 3, dtype=np.int32)
    inputs = [mod.InferInput("INPUT0", [1, 16], "INT32"), mod.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("add_sub", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def big_round_trip(mod, client) -> None:
    x = np.random.default_rng(1).standard_normal(BIG).astype(np.float32)
    inp = mod.InferInput("IN_FP32", list(x.shape), "FP32")
    if mod is httpclient:
        inp.set_data_from_numpy(x, binary_data=True)
        result = client.infer("identity_fp32", [inp], outputs=[mod.InferRequestedOutput("OUT_FP32", binary_data=True)])
    else:
        inp.set_data_from_numpy(x)
        result = client.infer("identity_fp32", [inp])
    np.testing.assert_array_equal(result.as_numpy("OUT_FP32"), x)


def handshake(port: int, ctx: ssl.SSLContext) -> tuple[str | None, str | None]:
    """(ALPN protocol, TLS version) of a handshake from the Python ssl module."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        return s.selected_alpn_protocol(), s.version()


def no_tracebacks(server) -> None:
    assert "Traceback" not in server.log(), server.log()


# ---- the command line -----------------------------------------------------------------------------


def _settings(*argv: str) -> tuple[tls.TlsSettings, tls.TlsSettings]:
    config = config_from_args(build_parser().parse_args(["serve", "--model-repository", "m", *argv]))
    return config.grpc_tls, config.http_tls


def test_flags_parse_like_the_other_bool_flags():
    g, h = _settings("--grpc-use-ssl", "true", "--grpc-server-cert", "c.pem", "--grpc-server-key=k.pem",
                     "--http-use-ssl=1")
    assert (g.enabled, g.mutual, g.server_cert, g.server_key, g.root_cert) == (True, False, "c.pem", "k.pem", None)
    assert h.enabled and not h.mutual
    g, h = _settings("--grpc-use-ssl=false", "--http-use-ssl", "off")
    assert not g.enabled and not h.enabled
    assert _settings() == (tls.TlsSettings("grpc"), tls.TlsSettings("http"))  # off by default
    # as in tritonserver, mutual implies use-ssl
    g, _ = _settings("--grpc-use-ssl-mutual=true", "--grpc-root-cert", "ca.pem")
    assert g.enabled and g.mutual and g.label() == ", mutual TLS"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model-repository", "m", "--grpc-use-ssl", "maybe"])
    # certificate flags while TLS is off: ignored, and said to be
    assert tls.TlsSettings("http", server_cert="c.pem").ignored() == ["--http-server-cert"]


def test_the_help_says_metrics_stay_plain(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    assert "--grpc-use-ssl-mutual" in text and "--http-root-cert" in text
    assert "plain HTTP" in text


def test_the_context_is_tls12_or_later_with_alpn(certs):
    ctx = tls.server_context(tls.TlsSettings("grpc", use_ssl=True, server_cert=str(certs.server_cert),
                                             server_key=str(certs.server_key)))
    assert ctx is not None and ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE
    mutual = tls.server_context(tls.TlsSettings("http", mutual=True, server_cert=str(certs.server_cert),
                                                server_key=str(certs.server_key), root_cert=str(certs.ca)))
    assert mutual is not None and mutual.verify_mode == ssl.CERT_REQUIRED
    assert tls.server_context(tls.TlsSettings("grpc")) is None


# ---- gRPC over TLS ----------------------------------------------------------------------------------


# protocol -> (tritonclient module, client factory, port attribute, the ALPN protocol it must negotiate)
PROTOCOLS = {"grpc": (grpcclient, grpc_client, "grpc_port", "h2"),
             "http": (httpclient, http_client, "http_port", "http/1.1")}


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_tls_infer(tls_server, certs, protocol):
    module, make_client, _, _ = PROTOCOLS[protocol]
    client = make_client(tls_server, certs)
    try:
        assert client.is_server_ready()
        for k in range(3):
            add_sub(module, client, k)
    finally:
        client.close()


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_tls_negotiates_its_protocol_with_alpn(tls_server, certs, protocol):
    _, _, port, expected = PROTOCOLS[protocol]
    proto, version = handshake(getattr(tls_server, port), certs.client_context(alpn=["h2", "http/1.1"]))
    assert proto == expected
    assert version in ("TLSv1.2", "TLSv1.3")


def test_grpc_tls_refuses_tls_below_1_2(tls_server, certs):
    ctx = certs.client_context()
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(OSError):  # ssl.SSLError: refused by one side or the other, never served
        handshake(tls_server.grpc_port, ctx)


def test_grpc_plaintext_client_fails(tls_server, certs):
    with grpc.insecure_channel(tls_server.grpc_url) as channel:
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        with pytest.raises(grpc.RpcError) as e:
            live(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    client = grpc_client(tls_server, certs)  # and the server goes on serving TLS clients
    try:
        add_sub(grpcclient, client)
    finally:
        client.close()


def test_grpc_tls_large_messages_both_ways(tls_server, certs):
    client = grpc_client(tls_server, certs)
    try:
        big_round_trip(grpcclient, client)
    finally:
        client.close()


# ---- gRPC over mutual TLS -------------------------------------------------------------------------


def test_grpc_mutual_tls_with_a_client_certificate_from_the_ca(mutual_server, certs):
    client = grpc_client(mutual_server, certs, with_cert="ours")
    try:
        add_sub(grpcclient, client)
        big_round_trip(grpcclient, client)
    finally:
        client.close()
    alpn, _ = handshake(mutual_server.grpc_port, certs.client_context(certs.client_cert, certs.client_key,
                                                                      alpn=["h2"]))
    assert alpn == "h2"


@pytest.mark.parametrize("with_cert", [None, "other"], ids=["no_client_cert", "cert_from_another_ca"])
def test_grpc_mutual_tls_refuses_other_clients(mutual_server, certs, with_cert):
    client = grpc_client(mutual_server, certs, with_cert=with_cert)
    try:
        with pytest.raises(InferenceServerException) as e:
            client.is_server_live(client_timeout=10)
        assert "UNAVAILABLE" in str(e.value.status())
    finally:
        client.close()
    # the Python ssl module sees the handshake itself fail (TLS 1.3: on the first read after it)
    cert, key = (None, None) if with_cert is None else (certs.other_cert, certs.other_key)
    ctx = certs.client_context(cert, key, alpn=["h2"])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", mutual_server.grpc_port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        if not s.recv(1):
            raise ConnectionResetError("closed")
    no_tracebacks(mutual_server)


# ---- HTTPS ----------------------------------------------------------------------------------------


def test_http_plaintext_client_fails(tls_server, certs):
    with pytest.raises((OSError, http.client.HTTPException)):
        tls_server.request("GET", "/v2/health/ready")  # conftest's plain HTTP
    assert https_get(tls_server.http_port, "/v2/health/ready", certs.client_context())[0] == 200


def test_https_large_bodies_both_ways(tls_server, certs):
    client = http_client(tls_server, certs)
    try:
        big_round_trip(httpclient, client)
    finally:
        client.close()


def test_metrics_stay_plain_http(tls_server):
    assert "nv_inference_request_success" in tls_server.metrics()


def test_https_mutual_tls_with_a_client_certificate_from_the_ca(mutual_server, certs):
    client = http_client(mutual_server, certs, with_cert="ours")
    try:
        add_sub(httpclient, client)
        big_round_trip(httpclient, client)
    finally:
        client.close()


@pytest.mark.parametrize("with_cert", [None, "other"], ids=["no_client_cert", "cert_from_another_ca"])
def test_https_mutual_tls_refuses_other_clients(mutual_server, certs, with_cert):
    client = http_client(mutual_server, certs, with_cert=with_cert)
    try:
        # refused in the handshake (TLS 1.3: the alert arrives as the client reads its reply), so an
        # ssl.SSLError, a reset, or the connection closed with no reply
        with pytest.raises((OSError, http.client.HTTPException)):
            client.is_server_live()
    finally:
        client.close()
    cert, key = (None, None) if with_cert is None else (certs.other_cert, certs.other_key)
    with pytest.raises((OSError, http.client.HTTPException)):
        https_get(mutual_server.http_port, "/v2/health/live", certs.client_context(cert, key))
    no_tracebacks(mutual_server)


# ---- --frontend-workers ---------------------------------------------------------------------------


def test_frontend_workers_serve_tls_on_both(start_server, repo, certs):
    """The worker processes build the same contexts from the paths the scheduler passes them:
    mutual TLS on gRPC, TLS on HTTP."""
    p = start_server(repo, "--frontend-workers", "1", *certs.server_flags("grpc", mutual=True),
                     *certs.server_flags("http"), wait=False)
    wait_ready_https(p, certs.client_context())
    assert "gRPC (KServe V2, mutual TLS)" in p.log() and "HTTP (KServe V2 REST, TLS)" in p.log()
    g = grpc_client(p, certs, with_cert="ours")
    h = http_client(p, certs)
    try:
        add_sub(grpcclient, g)
        add_sub(httpclient, h)
        big_round_trip(grpcclient, g)
    finally:
        g.close()
        h.close()
    refused = grpc_client(p, certs)  # no client certificate: the worker's context is mutual too
    try:
        with pytest.raises(InferenceServerException):
            refused.is_server_live(client_timeout=10)
    finally:
        refused.close()
    assert p.stop() == 0


# ---- start-up errors ------------------------------------------------------------------------------


BAD = {
    "missing_cert_file": (lambda c: ["--grpc-use-ssl", "true", "--grpc-server-cert", str(c.root / "nope.pem"),
                                     "--grpc-server-key", str(c.server_key)],
                          ["--grpc-server-cert", "nope.pem", "No such file"]),
    "missing_key_file": (lambda c: ["--http-use-ssl=true", "--http-server-cert", str(c.server_cert),
                                    "--http-server-key", str(c.root / "gone.key")],
                         ["--http-server-key", "gone.key"]),
    "key_does_not_match": (lambda c: ["--http-use-ssl", "1", "--http-server-cert", str(c.server_cert),
                                      "--http-server-key", str(c.other_key)],
                           ["--http-server-key", "other_client.key", "does not match"]),
    "not_a_certificate": (lambda c: ["--grpc-use-ssl", "true", "--grpc-server-cert", str(c.junk),
                                     "--grpc-server-key", str(c.server_key)],
                          ["--grpc-server-cert", "junk.pem", "no PEM certificate"]),
    "no_key_flag": (lambda c: ["--grpc-use-ssl", "true", "--grpc-server-cert", str(c.server_cert)],
                    ["--grpc-use-ssl needs --grpc-server-key"]),
    "mutual_without_root_cert": (lambda c: ["--grpc-use-ssl-mutual", "true", "--grpc-server-cert",
                                            str(c.server_cert), "--grpc-server-key", str(c.server_key)],
                                 ["--grpc-use-ssl-mutual needs --grpc-root-cert"]),
    "bad_root_cert": (lambda c: ["--http-use-ssl-mutual=true", "--http-server-cert", str(c.server_cert),
                                 "--http-server-key", str(c.server_key), "--http-root-cert", str(c.junk)],
                      ["--http-root-cert", "junk.pem"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_certificate_settings_exit_naming_the_flag(start_server, repo, certs, case):
    flags, expected = BAD[case]
    p = start_server(repo, *flags(certs), wait=False)
    code = p.proc.wait(timeout=60)
    log = p.log()
    assert code == 1, log
    assert "cannot start" in log and "Traceback" not in log, log
    for text in expected:
        assert text in log, log


def test_certificate_flags_without_tls_are_ignored_with_a_warning(start_server, repo, certs):
    p = start_server(repo, "--grpc-server-cert", str(certs.junk))  # plain HTTP: conftest's wait works
    assert "--grpc-server-cert is ignored" in p.log()
    client = grpcclient.InferenceServerClient(p.grpc_url)
    try:
        add_sub(grpcclient, client)
    finally:
        client.close()


# ---- uvloop's SSL transports under the frontends' backpressure, in-process -------------------------


@contextlib.contextmanager
def serving_in_thread(start) -> Iterator[int]:
    """Run `await start()` (returns (server, port)) on a uvloop loop in a thread; yield the port."""
    uvloop = pytest.importorskip("uvloop")
    loop = uvloop.new_event_loop()
    ready: dict = {}
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            ready["server"], ready["port"] = loop.run_until_complete(start())
        except BaseException as exc:  # noqa: BLE001 (reported to the test thread)
            ready["error"] = exc
        started.set()
        if "error" not in ready:
            loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30), "the in-process server did not start"
    if "error" in ready:
        raise ready["error"]
    try:
        yield ready["port"]
    finally:
        async def stop() -> None:
            await ready["server"].stop()
        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


class Counter:
    """Wraps a method of a class to count its calls."""

    def __init__(self, monkeypatch, cls, name: str) -> None:
        self.calls = 0
        original = getattr(cls, name)

        def counted(obj, *args, **kwargs):
            self.calls += 1
            return original(obj, *args, **kwargs)

        monkeypatch.setattr(cls, name, counted)


class _Raw(bytes):
    def SerializeToString(self) -> bytes:  # noqa: N802 (protobuf's name)
        return bytes(self)


def _grpc_message(payload: bytes) -> bytes:
    return struct.pack(">BL", 0, len(payload)) + payload


class TlsH2Client:
    """A blocking HTTP/2 client (the h2 library) over TLS with ALPN h2 and windows as large as HTTP/2
    allows, so that only TCP and TLS hold the server's replies back."""

    def __init__(self, port: int, certs: Certs) -> None:
        ctx = certs.client_context(alpn=["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        self.conn.increment_flow_control_window(2**31 - 1 - 65535)
        self.flush()
        self.bodies: dict[int, bytearray] = {}
        self.trailers: dict[int, dict[str, str]] = {}
        self.ended: set[int] = set()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def start(self, sid: int, path: str) -> None:
        self.conn.send_headers(sid, [(":method", "POST"), (":scheme", "https"), (":path", path),
                                     (":authority", "localhost"), ("content-type", "application/grpc"),
                                     ("te", "trailers")])
        self.bodies[sid] = bytearray()
        self.trailers[sid] = {}

    def send(self, sid: int, message: bytes) -> None:
        """The whole message within the server's flow-control windows, then end the stream."""
        view = memoryview(message)
        while view:
            n = min(len(view), self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if n == 0:
                self.flush()
                self.read_once()
                continue
            self.conn.send_data(sid, view[:n].tobytes())
            view = view[n:]
            self.flush()
        self.conn.end_stream(sid)
        self.flush()

    def send_tiny_frames(self, sid: int, data: bytes, size: int) -> None:
        """`data` as DATA frames of `size` bytes, all in one write (within the stream's window)."""
        for i in range(0, len(data), size):
            self.conn.send_data(sid, data[i:i + size])
        self.flush()

    def read_once(self) -> None:
        chunk = self.sock.recv(1 << 20)
        assert chunk, "the server closed the connection"
        for event in self.conn.receive_data(chunk):
            if isinstance(event, h2.events.DataReceived):
                self.bodies[event.stream_id] += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                self.trailers[event.stream_id].update(dict(event.headers))
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
        self.flush()

    def until_ended(self, sids: list[int], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not set(sids) <= self.ended:
            assert time.monotonic() < deadline, "the replies did not all come"
            self.read_once()

    def reply(self, sid: int) -> bytes:
        assert self.trailers[sid].get("grpc-status") == "0", self.trailers[sid]
        body = bytes(self.bodies[sid])
        flag, length = struct.unpack(">BL", body[:5])
        assert flag == 0 and length == len(body) - 5
        return body[5:]

    def close(self) -> None:
        self.sock.close()


def test_uvloop_grpc_tls_backpressure_and_24mb_both_ways(monkeypatch, certs):
    """Replies far larger than the socket buffers while the client does not read: the transport's
    pause_writing pauses reading on the SSL transport and resume_writing resumes it; a 24 MB upload
    goes over the HTTP/2 core's per-turn frame budget (pause_reading, then resume on the next turn)
    and comes back whole. The connection serves a call afterwards."""
    from server.frontends.grpc_server import GrpcProtocol, GrpcServer, Method

    paused = Counter(monkeypatch, GrpcProtocol, "pause_writing")
    resumed = Counter(monkeypatch, GrpcProtocol, "resume_writing")
    parse_more = Counter(monkeypatch, GrpcProtocol, "_parse_more")
    reply_8mb = _Raw(np.random.default_rng(2).bytes(8 << 20))

    # The replies complete at different times, so they leave in separate writes: uvloop's SSL
    # transport encrypts one write whole into the socket's transport and pauses its writer only when
    # a later write finds that transport full.
    delays = iter([0.0, 0.1, 0.2, 0.3])

    async def big(request: bytes, ctx) -> _Raw:
        await asyncio.sleep(next(delays, 0.0))
        return reply_8mb

    async def echo(request: bytes, ctx) -> _Raw:
        return _Raw(request)

    async def start():
        server = GrpcServer({"/t.T/Big": Method(bytes, big), "/t.T/Echo": Method(bytes, echo)},
                            max_message=64 << 20, error_status=lambda exc: (13, str(exc)))
        ctx = tls.server_context(tls.TlsSettings("grpc", use_ssl=True, server_cert=str(certs.server_cert),
                                                 server_key=str(certs.server_key)))
        return server, await server.start("127.0.0.1", 0, ssl=ctx)

    with serving_in_thread(start) as port:
        client = TlsH2Client(port, certs)
        try:
            sids = [1, 3, 5, 7]
            for sid in sids:  # tiny requests, 32 MB of replies
                client.start(sid, "/t.T/Big")
                client.send(sid, _grpc_message(b"x"))
            time.sleep(1.0)  # not reading: the server's socket and TLS buffers fill
            client.until_ended(sids)
            for sid in sids:
                assert client.reply(sid) == reply_8mb
            assert paused.calls >= 1 and resumed.calls >= 1, (paused.calls, resumed.calls)

            upload = np.random.default_rng(3).bytes(24 << 20)
            message = _grpc_message(upload)
            client.start(9, "/t.T/Echo")
            # 1-byte frames: a TLS record (16 KiB, what one data_received gets at least) holds 1,600
            # of them, over the 1,000 the HTTP/2 core parses per turn
            client.send_tiny_frames(9, message[:16_000], size=1)
            client.send(9, message[16_000:])
            client.until_ended([9])
            assert client.reply(9) == upload
            assert parse_more.calls >= 1

            client.start(11, "/t.T/Echo")
            client.send(11, _grpc_message(b"still serving"))
            client.until_ended([11])
            assert client.reply(11) == b"still serving"
        finally:
            client.close()


def _read_response(f) -> tuple[int, bytes]:
    status = int(f.readline().split()[1])
    length = 0
    while True:
        line = f.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, f.read(length)


def test_uvloop_https_pipelining_backpressure_and_24mb_both_ways(monkeypatch, certs):
    """200 requests pipelined in one write (past the 64 the HTTP server queues before it pauses
    reading) with 128 KiB replies the client reads late, in order; then a 24 MB body each way."""
    from server.frontends import http_server as hs

    most_queued = {"n": 0}
    original = hs.HttpProtocol._enqueue

    def enqueue(self, request, keep_alive):
        original(self, request, keep_alive)
        most_queued["n"] = max(most_queued["n"], len(self.queue))

    monkeypatch.setattr(hs.HttpProtocol, "_enqueue", enqueue)

    async def handle(request: hs.HttpRequest) -> hs.HttpResponse:
        if request.method == "POST":
            return hs.HttpResponse(200, request.body, b"application/octet-stream")
        n = int(request.path.rsplit("/", 1)[1])
        return hs.HttpResponse(200, n.to_bytes(4, "big") * (32 << 10), b"application/octet-stream")

    async def start():
        server = hs.HttpServer(handle, max_body=64 << 20, error_body=lambda m: json.dumps({"error": m}).encode())
        ctx = tls.server_context(tls.TlsSettings("http", use_ssl=True, server_cert=str(certs.server_cert),
                                                 server_key=str(certs.server_key)))
        return server, await server.start("127.0.0.1", 0, ssl=ctx)

    with serving_in_thread(start) as port:
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        with certs.client_context(alpn=["http/1.1"]).wrap_socket(raw, server_hostname="localhost") as s:
            assert s.selected_alpn_protocol() == "http/1.1"
            s.sendall(b"".join(b"GET /n/%d HTTP/1.1\r\nhost: localhost\r\n\r\n" % i for i in range(200)))
            time.sleep(0.5)
            f = s.makefile("rb")
            for i in range(200):
                status, body = _read_response(f)
                assert status == 200 and body == i.to_bytes(4, "big") * (32 << 10), i
            assert most_queued["n"] > hs._MAX_PIPELINED  # reading was paused, and resumed
            upload = np.random.default_rng(4).bytes(24 << 20)
            s.sendall(b"POST /echo HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/octet-stream\r\n"
                      b"content-length: %d\r\n\r\n" % len(upload) + upload)
            status, body = _read_response(f)
            assert status == 200 and body == upload
            f.close()


def test_parser_namespace_round_trip():
    """TlsSettings travel to the frontend workers as JSON."""
    s = tls.settings_from_args(argparse.Namespace(grpc_use_ssl=True, grpc_use_ssl_mutual=False,
                                                  grpc_server_cert="c", grpc_server_key="k", grpc_root_cert=None),
                               "grpc")
    assert tls.TlsSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
