"""`fuserve` / `python -m server`: the command line. Flag names follow tritonserver's."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__, access, tls, trace_settings
from .config import MODEL_CONTROL_MODES, ServerConfig


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuserve",
        description="fuserve: a KServe V2 inference server, wire-compatible with NVIDIA Triton.",
    )
    parser.add_argument("--version", action="version", version=f"fuserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "serve", help="serve the models of a Triton-layout model repository over HTTP and gRPC",
        description="Serve a model repository (DIR/<model>/config.pbtxt, DIR/<model>/<version>/model.onnx) "
                    "over KServe V2 HTTP/REST and gRPC.",
    )
    s.add_argument("--model-repository", "--model-store", dest="model_repository", action="append",
                   required=True, metavar="DIR",
                   help="a model repository directory; repeat the flag to serve several")
    s.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port (default 8000; 0 picks a free one)")
    s.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; 0 picks a free one)")
    s.add_argument("--metrics-port", type=int, default=8002,
                   help="Prometheus metrics port (default 8002; always plain HTTP, the TLS flags do not apply)")
    # The default address: loopback, unless FUSERVE_ADDRESS says otherwise (the container image
    # sets 0.0.0.0 there, so that any command it runs serves beyond the container)
    bind = os.environ.get("FUSERVE_ADDRESS") or "127.0.0.1"
    s.add_argument("--http-address", default=bind,
                   help=f"address HTTP binds to (default {bind}, from FUSERVE_ADDRESS or 127.0.0.1; use 0.0.0.0 to "
                        f"serve the network)")
    s.add_argument("--grpc-address", default=bind,
                   help=f"address gRPC binds to (default {bind}, from FUSERVE_ADDRESS or 127.0.0.1; use 0.0.0.0 to "
                        f"serve the network)")
    s.add_argument("--allow-http", type=_bool, default=True, metavar="BOOL", help="serve HTTP/REST (default true)")
    s.add_argument("--allow-grpc", type=_bool, default=True, metavar="BOOL", help="serve gRPC (default true)")
    s.add_argument("--metrics-address", default=bind,
                   help=f"address the metrics endpoint binds to (default {bind}, from FUSERVE_ADDRESS or 127.0.0.1)")
    s.add_argument("--allow-metrics", type=_bool, default=True, metavar="BOOL",
                   help="serve Prometheus metrics on --metrics-port at /metrics (default true)")
    s.add_argument("--allow-client-shm", type=_bool, default=False, metavar="BOOL",
                   help="let clients register system shared memory regions for inputs and outputs "
                        "(default false, as in Triton 2.69)")
    s.add_argument("--allow-cpu-metrics", type=_bool, default=True, metavar="BOOL",
                   help="export host CPU utilization and memory gauges (default true)")
    s.add_argument("--allow-gpu-metrics", type=_bool, default=True, metavar="BOOL",
                   help="export GPU gauges through NVML where it is available (default true)")
    s.add_argument("--metrics-interval-ms", type=int, default=2000, metavar="MS",
                   help="how often the CPU and GPU gauges are sampled (default 2000)")
    s.add_argument("--model-control-mode", choices=MODEL_CONTROL_MODES, default="none",
                   help="none: load every model at start-up; explicit: load only --load-model names at start, "
                        "the rest through the repository API; poll: also rescan the repository every "
                        "--repository-poll-secs and load, reload or unload what changed (default none)")
    s.add_argument("--load-model", action="append", default=[], metavar="NAME",
                   help="with --model-control-mode=explicit, a model to load at start-up; repeatable; '*' loads all")
    s.add_argument("--repository-poll-secs", type=float, default=15.0, metavar="SECS",
                   help="poll interval of --model-control-mode=poll (default 15)")
    s.add_argument("--exit-on-error", type=_bool, nargs="?", const=True, default=False, metavar="BOOL",
                   help="exit at start-up if any model fails to load (default false: serve the others and "
                        "show the failed model as unavailable in the repository index)")
    s.add_argument("--exit-timeout-secs", type=float, default=30.0, metavar="SECS",
                   help="on SIGTERM/SIGINT, how long to wait for requests in flight before exiting (default 30)")
    s.add_argument("--server-name", default="triton", metavar="NAME",
                   help="name reported by the server metadata endpoint (default 'triton', which Triton's "
                        "clients and examples expect; the version field says fuserve's version)")
    s.add_argument("--log-verbose", type=int, default=0, metavar="LEVEL", help="verbose logging when > 0")
    for level in ("info", "warning", "error"):
        s.add_argument(f"--log-{level}", type=_bool, default=True, metavar="BOOL",
                       help=f"show {level} log records (default true)")
    s.add_argument("--trace-config", action="append", default=[], metavar="[MODE,]SETTING=VALUE",
                   help="tracing, as tritonserver's: level=OFF|TIMESTAMPS, rate=N, count=N, mode=triton|"
                        "opentelemetry, opentelemetry,url=HOST:PORT/v1/traces, opentelemetry,resource=K=V, "
                        "opentelemetry,bsp_schedule_delay=MS (repeatable; traces go to OpenTelemetry only)")
    s.add_argument("--log-format", choices=("default", "ISO8601"), default="default",
                   help="log timestamps: local time (default) or ISO8601 (UTC)")
    s.add_argument("--http-max-input-size", "--max-input-size", dest="max_input_size", type=int,
                   default=64 * 1024 * 1024, metavar="BYTES",
                   help="largest HTTP request body and gRPC message accepted (default 64 MiB)")
    s.add_argument("--http-max-request-line", type=_positive, default=8 * 1024, metavar="BYTES",
                   help="longest HTTP request line (method, target, version) accepted; past it 414 and the "
                        "connection is closed (default 8 KiB)")
    s.add_argument("--http-max-header-line", type=_positive, default=8 * 1024, metavar="BYTES",
                   help="longest HTTP header field (name + value) accepted; past it 431 and close (default 8 KiB)")
    s.add_argument("--http-max-headers", type=_positive, default=100, metavar="N",
                   help="most header fields in one HTTP request; past it 431 and close (default 100)")
    s.add_argument("--http-max-header-bytes", type=_positive, default=64 * 1024, metavar="BYTES",
                   help="most bytes of header names and values in one HTTP request; past it 431 and close "
                        "(default 64 KiB)")
    s.add_argument("--http-header-timeout-secs", type=_seconds, default=60.0, metavar="SECS",
                   help="time a client has from a request's first byte to the end of its headers; past it 408 "
                        "and close (default 60, as nginx's client_header_timeout; 0: no limit)")
    s.add_argument("--http-keepalive-timeout-secs", type=_seconds, default=75.0, metavar="SECS",
                   help="close an HTTP connection idle (no request in progress or executing) this long "
                        "(default 75, as nginx's keepalive_timeout; 0: no limit)")
    s.add_argument("--grpc-max-concurrent-streams", type=_positive, default=100, metavar="N",
                   help="streams (calls) open at once on one gRPC connection; more are refused with "
                        "REFUSED_STREAM (default 100, as nginx, h2o and Apache)")
    s.add_argument("--grpc-max-held-reply-bytes", type=_positive, default=4 << 20, metavar="BYTES",
                   help="reply bytes one gRPC connection may hold while its client's flow-control windows are "
                        "shut; past it new streams are refused (default 4 MiB)")
    s.add_argument("--grpc-max-idle-frames", type=_positive, default=10_000, metavar="N",
                   help="frames in a row that ask for no work (PING, SETTINGS, PRIORITY, empty DATA, ...) before "
                        "a gRPC connection is closed with GOAWAY ENHANCE_YOUR_CALM (default 10000)")
    s.add_argument("--disable-auto-complete-config", action="store_true",
                   help="do not complete missing config.pbtxt fields from the model file")
    s.add_argument("--default-max-batch-size", type=int, default=4, metavar="N",
                   help="max_batch_size that auto-complete gives a batchable model without one (default 4)")
    s.add_argument("--frontend-workers", type=_non_negative, default=0, metavar="N",
                   help="serve HTTP and gRPC from N worker processes that share one scheduler (this process: "
                        "models, batchers, statistics); use about one per core beyond the first (default 0: "
                        "one process does everything)")
    groups = ", ".join(access.GROUPS)
    s.add_argument("--http-restricted-api", action=access.RestrictionAction, protocol="http",
                   metavar="<apis>:<key>=<value>",
                   help="answer the HTTP APIs in <apis> (a comma-separated list of: " + groups + ") only when "
                        "the request carries header <key> with <value>, others 403; repeatable, each API in "
                        "one group at most")
    s.add_argument("--grpc-restricted-protocol", action=access.RestrictionAction, protocol="grpc",
                   metavar="<protocols>:<key>=<value>",
                   help="answer the gRPC methods of <protocols> (as for --http-restricted-api) only when the "
                        "call carries metadata 'triton-grpc-protocol-<key>' with <value> (Triton's header), "
                        "others PERMISSION_DENIED; repeatable")
    _add_tls_flags(s)
    return parser


def _add_tls_flags(s: argparse.ArgumentParser) -> None:
    """--grpc-use-ssl & co. are tritonserver's; --http-use-ssl & co. are ours, of the same shape
    (Triton's HTTP has no TLS). server/tls.py builds the contexts."""
    for proto, name, alpn in (("grpc", "gRPC", "h2"), ("http", "HTTP", "http/1.1")):
        s.add_argument(f"--{proto}-use-ssl", type=_bool, default=False, metavar="BOOL",
                       help=f"serve {name} over TLS (1.2 or later, ALPN {alpn}) with --{proto}-server-cert and "
                            f"--{proto}-server-key (default false; the metrics port stays plain HTTP)")
        s.add_argument(f"--{proto}-use-ssl-mutual", type=_bool, default=False, metavar="BOOL",
                       help=f"serve {name} over mutual TLS: as --{proto}-use-ssl, which it implies, and every "
                            f"client must present a certificate signed by --{proto}-root-cert (default false)")
        s.add_argument(f"--{proto}-server-cert", metavar="FILE",
                       help=f"PEM server certificate (and chain) for {name} TLS; ignored unless --{proto}-use-ssl "
                            f"or --{proto}-use-ssl-mutual is true")
        s.add_argument(f"--{proto}-server-key", metavar="FILE",
                       help=f"PEM private key (unencrypted) of --{proto}-server-cert")
        s.add_argument(f"--{proto}-root-cert", metavar="FILE",
                       help=f"PEM root (CA) certificate(s) that client certificates are verified against; "
                            f"required by --{proto}-use-ssl-mutual")


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text}")
    return value


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        model_repositories=tuple(Path(p) for p in args.model_repository),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        http_address=args.http_address,
        grpc_address=args.grpc_address,
        allow_http=args.allow_http,
        allow_grpc=args.allow_grpc,
        allow_metrics=args.allow_metrics,
        allow_cpu_metrics=args.allow_cpu_metrics,
        allow_gpu_metrics=args.allow_gpu_metrics,
        allow_client_shm=args.allow_client_shm,
        metrics_address=args.metrics_address,
        metrics_interval_ms=args.metrics_interval_ms,
        model_control_mode=args.model_control_mode,
        load_models=tuple(args.load_model),
        repository_poll_secs=args.repository_poll_secs,
        exit_on_error=args.exit_on_error,
        exit_timeout_secs=args.exit_timeout_secs,
        log_verbose=args.log_verbose,
        log_info=args.log_info,
        log_warning=args.log_warning,
        log_error=args.log_error,
        log_format=args.log_format,
        trace_config=tuple(args.trace_config),
        server_name=args.server_name,
        max_input_size=args.max_input_size,
        http_max_request_line=args.http_max_request_line,
        http_max_header_line=args.http_max_header_line,
        http_max_headers=args.http_max_headers,
        http_max_header_bytes=args.http_max_header_bytes,
        http_header_timeout_secs=args.http_header_timeout_secs,
        http_keepalive_timeout_secs=args.http_keepalive_timeout_secs,
        grpc_max_concurrent_streams=args.grpc_max_concurrent_streams,
        grpc_max_held_reply_bytes=args.grpc_max_held_reply_bytes,
        grpc_max_idle_frames=args.grpc_max_idle_frames,
        default_max_batch_size=args.default_max_batch_size,
        disable_auto_complete_config=args.disable_auto_complete_config,
        frontend_workers=args.frontend_workers,
        http_restricted_api=args.http_restricted_api,
        grpc_restricted_protocol=args.grpc_restricted_protocol,
        grpc_tls=tls.settings_from_args(args, "grpc"),
        http_tls=tls.settings_from_args(args, "http"),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = [p for p in args.model_repository if not Path(p).is_dir()]
    if missing:
        print(f"fuserve: model repository not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        trace_settings.from_options(args.trace_config)
    except trace_settings.TraceConfigError as exc:
        print(f"fuserve: {exc}", file=sys.stderr)
        return 2
    from .app import run

    return run(config_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
