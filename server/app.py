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

from .config import ServerConfig
from .frontends.grpc_service import GrpcFrontend, start_grpc
from .frontends.grpc_service import error_status as grpc_error_status
from .frontends.http_server import HttpServer
from .frontends.metrics_http import MetricsFrontend
from .frontends.rest import RestFrontend, error_body
from .metrics import MetricsPoller, ServerMetrics
from .repository import Repository
from .service import InferenceService
from .workers import WorkerEndpoint, WorkerPool, reuseport_socket

log = logging.getLogger("fuserve")


async def _poll(repository: Repository, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await repository.poll_once()
        except Exception:
            log.exception("repository poll failed")


async def _start_workers(config: ServerConfig, service: InferenceService,
                         shared: dict[str, socket.socket]) -> WorkerPool:
    """Hold the ports here, start the workers listening on them, and answer their links."""
    if config.allow_http:
        shared["http"] = reuseport_socket(config.http_address, config.http_port)
    if config.allow_grpc:
        shared["grpc"] = reuseport_socket(config.grpc_address, config.grpc_port)
    rest = RestFrontend(service).handle
    methods = GrpcFrontend(service).methods()
    pool = WorkerPool(config.frontend_workers, shared,
                      lambda: WorkerEndpoint(service, rest, methods, grpc_error_status),
                      max_input_size=config.max_input_size, log_verbose=config.log_verbose)
    await pool.start()
    for name, sock in shared.items():
        host, port = sock.getsockname()[:2]
        log.info("%s listening on %s:%d, served by %d frontend worker processes",
                 "HTTP (KServe V2 REST)" if name == "http" else "gRPC (KServe V2)", host, port,
                 config.frontend_workers)
    return pool


async def serve(config: ServerConfig) -> int:
    repository = Repository(config.model_repositories, default_max_batch_size=config.default_max_batch_size,
                            auto_complete=not config.disable_auto_complete_config,
                            histograms=config.allow_metrics)
    service = InferenceService(repository, model_control_mode=config.model_control_mode,
                               server_name=config.server_name)

    if config.model_control_mode == "explicit":
        names = sorted(repository.scan()) if "*" in config.load_models else list(config.load_models)
    else:
        names = sorted(repository.scan())
    errors = await repository.load_many(names)
    if errors and config.exit_on_error:
        log.error("exiting: %d model(s) failed to load and --exit-on-error is set", len(errors))
        await repository.close()
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
            http = HttpServer(RestFrontend(service).handle, max_body=config.max_input_size, error_body=error_body)
            port = await http.start(config.http_address, config.http_port)
            log.info("HTTP (KServe V2 REST) listening on %s:%d", config.http_address, port)
        if config.allow_grpc and pool is None:
            grpc_server, port = await start_grpc(service, config.grpc_address, config.grpc_port,
                                                 config.max_input_size)
            log.info("gRPC (KServe V2) listening on %s:%d", config.grpc_address, port)
        if config.allow_metrics:
            poller = MetricsPoller(cpu=config.allow_cpu_metrics, gpu=config.allow_gpu_metrics,
                                   interval_s=config.metrics_interval_ms / 1000)
            metrics_http = HttpServer(MetricsFrontend(ServerMetrics(repository, poller)).handle,
                                      max_body=64 * 1024, error_body=error_body)
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
    log.info("fuserve stopped")
    return 0


def run(config: ServerConfig) -> int:
    logging.basicConfig(
        level=logging.DEBUG if config.log_verbose > 0 else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
    )
    try:
        import uvloop

        return uvloop.run(serve(config))
    except ImportError:
        return asyncio.run(serve(config))
