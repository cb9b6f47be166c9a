"""Builds the server's pieces once, wires them together, and owns the process lifecycle.

    start:    load models (per --model-control-mode) -> open HTTP and gRPC -> ready
    serve:    until SIGTERM/SIGINT; in poll mode, rescan the repository on an interval
    shutdown: not ready, new requests get 503/UNAVAILABLE -> wait for requests in flight (at most
              --exit-timeout-secs) -> close listeners -> unload models -> exit 0
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket

from . import bare_layout, log_settings, tls, trace_settings
from .access import grpc_authorize
from .backends.python import pb_utils
from .config import ServerConfig
from .frontends.bls import Bridge
from .frontends.grpc_server import GrpcServer
from .frontends.grpc_service import GrpcFrontend
from .frontends.grpc_service import error_status as grpc_error_status
from .frontends.http_server import HttpLimits, HttpServer
from .frontends.metrics_http import MetricsFrontend
from .frontends.rest import RestFrontend, error_body
from .http2.connection import Limits as H2Limits
from .metrics import MetricsPoller, ServerMetrics
from .repository import Repository
from .service import InferenceService
from .shared_memory import SharedMemory
from .tracing import Tracer
from .workers import WorkerEndpoint, WorkerPool, reuseport_socket

log = logging.getLogger("fuserve")


async def _poll(repository: Repository, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await repository.poll_once()
        except Exception:
            log.exception("repository poll failed")


def _tls_settings(config: ServerConfig) -> list[tls.TlsSettings]:
    """The TLS settings of the listeners this server opens (HTTP, gRPC; never metrics)."""
    return [s for s, allowed in ((config.http_tls, config.allow_http), (config.grpc_tls, config.allow_grpc))
            if allowed]


def http_limits(config: ServerConfig) -> HttpLimits:
    """The --http-max-* and --http-*-timeout-secs flags, for every HttpServer (and the workers')."""
    return HttpLimits(max_request_line=config.http_max_request_line, max_header_line=config.http_max_header_line,
                      max_headers=config.http_max_headers, max_header_bytes=config.http_max_header_bytes,
                      header_timeout=config.http_header_timeout_secs,
                      keepalive_timeout=config.http_keepalive_timeout_secs)


def grpc_limits(config: ServerConfig) -> H2Limits:
    """The --grpc-max-* flags, for every GrpcServer (and the workers')."""
    return H2Limits(max_concurrent_streams=config.grpc_max_concurrent_streams,
                    max_held_reply_bytes=config.grpc_max_held_reply_bytes, max_idle_frames=config.grpc_max_idle_frames)


async def _start_workers(config: ServerConfig, service: InferenceService,
                         shared: dict[str, socket.socket]) -> WorkerPool:
    """Hold the ports here, start the workers listening on them, and answer their links."""
    if config.allow_http:
        shared["http"] = reuseport_socket(config.http_address, config.http_port)
    if config.allow_grpc:
        shared["grpc"] = reuseport_socket(config.grpc_address, config.grpc_port)
    rest = RestFrontend(service, config.http_restricted_api).handle
    methods = GrpcFrontend(service).methods()
    authorize = grpc_authorize(config.grpc_restricted_protocol)
    pool = WorkerPool(config.frontend_workers, shared,
                      lambda: WorkerEndpoint(service, rest, methods, grpc_error_status, authorize),
                      max_input_size=config.max_input_size, log_verbose=config.log_verbose,
                      http_limits=http_limits(config), grpc_limits=grpc_limits(config),
                      http_restricted_api=config.http_restricted_api.specs(),
                      grpc_restricted_protocol=config.grpc_restricted_protocol.specs(),
                      tls=[s.to_dict() for s in _tls_settings(config) if s.enabled])
    await pool.start()
    for name, sock in shared.items():
        host, port = sock.getsockname()[:2]
        log.info("%s listening on %s:%d, served by %d frontend worker processes",
                 f"HTTP (KServe V2 REST{config.http_tls.label()})" if name == "http"
                 else f"gRPC (KServe V2{config.grpc_tls.label()})", host, port, config.frontend_workers)
    return pool


async def serve(config: ServerConfig) -> int:
    try:  # before any model loads: a certificate that cannot be served fails the start at once
        tls_contexts = tls.server_contexts(_tls_settings(config))
    except tls.TlsError as exc:
        log.error("cannot start: %s", exc)
        return 1
    roots = bare_layout.Roots(config.model_repositories)  # a root that is one model (KServe's /mnt/models)
    for given, name in roots.named:
        log.info("serving %s as the model '%s' (a model, not a repository of them)", given, name)
    repository = Repository(tuple(roots.roots), default_max_batch_size=config.default_max_batch_size,
                            auto_complete=not config.disable_auto_complete_config,
                            histograms=config.allow_metrics)
    traces = trace_settings.from_options(list(config.trace_config))
    tracer = Tracer(traces) if traces.mode == "opentelemetry" else None
    # Client regions are mapped in this process, where the models read and write them; frontend
    # workers pass the references on untouched (docs/protocol.md, "Shared memory")
    service = InferenceService(repository, model_control_mode=config.model_control_mode,
                               server_name=config.server_name,
                               shared_memory=SharedMemory(config.allow_client_shm), traces=traces, tracer=tracer)
    # Python models' BLS calls (pb_utils.InferenceRequest.exec) are answered by this service
    pb_utils.set_bridge(Bridge(service, asyncio.get_running_loop()))

    if config.model_control_mode == "explicit":
        names = sorted(repository.scan()) if "*" in config.load_models else list(config.load_models)
    else:
        names = sorted(repository.scan())
    errors = await repository.load_many(names)
    if errors and config.exit_on_error:
        log.error("exiting: %d model(s) failed to load and --exit-on-error is set", len(errors))
        await repository.close()
        roots.close()
        return 1

    http: HttpServer | None = None
    metrics_http: HttpServer | None = None
    poller_task: asyncio.Task | None = None
    grpc_server = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pool: WorkerPool | None = None
    shared: dict[str, socket.socket] = {}
    try:
        if config.frontend_workers > 0:
            pool = await _start_workers(config, service, shared)
        if config.allow_http and pool is None:
            http = HttpServer(RestFrontend(service, config.http_restricted_api).handle,
                              max_body=config.max_input_size, error_body=error_body, limits=http_limits(config))
            port = await http.start(config.http_address, config.http_port, ssl=tls_contexts.get("http"))
            log.info("HTTP (KServe V2 REST%s) listening on %s:%d", config.http_tls.label(), config.http_address,
                     port)
        if config.allow_grpc and pool is None:
            # the transport checks --grpc-restricted-protocol when each call's stream opens
            grpc_server = GrpcServer(GrpcFrontend(service).methods(), max_message=config.max_input_size,
                                     error_status=grpc_error_status,
                                     authorize=grpc_authorize(config.grpc_restricted_protocol),
                                     limits=grpc_limits(config))
            port = await grpc_server.start(config.grpc_address, config.grpc_port, ssl=tls_contexts.get("grpc"))
            log.info("gRPC (KServe V2%s) listening on %s:%d", config.grpc_tls.label(), config.grpc_address, port)
        if config.allow_metrics:
            poller = MetricsPoller(cpu=config.allow_cpu_metrics, gpu=config.allow_gpu_metrics,
                                   interval_s=config.metrics_interval_ms / 1000)
            metrics_http = HttpServer(MetricsFrontend(ServerMetrics(repository, poller)).handle,
                                      max_body=64 * 1024, error_body=error_body, limits=http_limits(config))
            port = await metrics_http.start(config.metrics_address, config.metrics_port)
            poller_task = asyncio.create_task(poller.run())
            log.info("metrics (Prometheus) listening on %s:%d/metrics", config.metrics_address, port)
    except (OSError, asyncio.TimeoutError) as exc:
        log.error("cannot start: %s", exc or "frontend workers did not start in time")
        for server in (http, metrics_http):
            if server is not None:
                await server.stop()
        if pool is not None:
            await pool.stop()
        for sock in shared.values():
            sock.close()
        await repository.close()
        roots.close()
        return 1

    # The objects built so far live as long as the process: keep the garbage collector off them, and
    # let it run less often (the request path allocates many short-lived containers).
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    service.accepting = True
    repo_poll_task = None
    if config.model_control_mode == "poll":
        repo_poll_task = asyncio.create_task(_poll(repository, config.repository_poll_secs))
    log.info("fuserve ready: %d model version(s) loaded", len(repository.ready_models()))
    await stop.wait()

    log.info("shutting down: waiting up to %.0fs for requests in flight", config.exit_timeout_secs)
    for task in (repo_poll_task, poller_task):
        if task is not None:
            task.cancel()
    try:
        await asyncio.wait_for(service.drain(), config.exit_timeout_secs)
    except asyncio.TimeoutError:
        log.warning("exit timeout reached with requests still in flight")
    if pool is not None:
        await pool.stop()
        for sock in shared.values():
            sock.close()
    if grpc_server is not None:
        await grpc_server.stop(grace=1.0)
    for server in (http, metrics_http):
        if server is not None:
            await server.stop()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(repository.close(), 5.0)
    service.shared_memory.close()
    roots.close()
    if tracer is not None:
        await asyncio.to_thread(tracer.close)
    log.info("fuserve stopped")
    return 0


def run(config: ServerConfig) -> int:
    log_settings.configure(config.log_verbose, config.log_info, config.log_warning, config.log_error,
                           config.log_format)
    try:
        import uvloop

        return uvloop.run(serve(config))
    except ImportError:
        return asyncio.run(serve(config))
