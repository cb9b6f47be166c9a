"""ServerConfig: every setting of one `fuserve serve` process, frozen once the CLI is parsed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .access import Policy
from .tls import TlsSettings

MODEL_CONTROL_MODES = ("none", "poll", "explicit")


@dataclass(frozen=True)
class ServerConfig:
    model_repositories: tuple[Path, ...]
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    http_address: str = "127.0.0.1"
    grpc_address: str = "127.0.0.1"
    allow_http: bool = True
    allow_grpc: bool = True
    allow_metrics: bool = True
    allow_cpu_metrics: bool = True
    allow_gpu_metrics: bool = True
    allow_client_shm: bool = False  # clients may register shared memory regions (server/shared_memory.py)
    metrics_address: str = "127.0.0.1"
    metrics_interval_ms: int = 2000
    model_control_mode: str = "none"
    load_models: tuple[str, ...] = ()
    repository_poll_secs: float = 15.0
    exit_on_error: bool = False
    exit_timeout_secs: float = 30.0
    log_verbose: int = 0
    log_info: bool = True
    log_warning: bool = True
    log_error: bool = True
    log_format: str = "default"  # or "ISO8601" (server/log_settings.py)
    trace_config: tuple[str, ...] = ()  # --trace-config options (server/trace_settings.py)
    # Reported in server metadata. "triton" by default: Triton's clients and examples check it.
    server_name: str = "triton"
    # Largest request body (HTTP) or message (gRPC) accepted, in bytes.
    max_input_size: int = 64 * 1024 * 1024
    # What one HTTP client may cost (frontends/http_server.HttpLimits): request line, one header
    # field's name + value, header fields, all names + values (bytes); header-read timeout (408) and
    # keep-alive idle timeout (seconds, 0: none)
    http_max_request_line: int = 8 * 1024
    http_max_header_line: int = 8 * 1024
    http_max_headers: int = 100
    http_max_header_bytes: int = 64 * 1024
    http_header_timeout_secs: float = 60.0
    http_keepalive_timeout_secs: float = 75.0
    # HTTP/2 limits of the gRPC listener (server/http2/connection.py, docs/security.md)
    grpc_max_concurrent_streams: int = 100
    grpc_max_held_reply_bytes: int = 4 << 20
    grpc_max_idle_frames: int = 10_000
    # Triton's auto-complete gives batchable models without a config this max_batch_size.
    default_max_batch_size: int = 4
    disable_auto_complete_config: bool = False
    # 0: this process serves HTTP and gRPC itself. N > 0: N frontend worker processes serve them and
    # hand inference to this one, which keeps the models and batchers (docs/architecture.md).
    frontend_workers: int = 0
    # --http-restricted-api / --grpc-restricted-protocol: group -> required header (server/access.py);
    # a Policy's repr shows groups and header names, never a value
    http_restricted_api: Policy = field(default_factory=lambda: Policy("http"))
    grpc_restricted_protocol: Policy = field(default_factory=lambda: Policy("grpc"))
    # --grpc-use-ssl & co. (Triton's) and --http-use-ssl & co. (ours): server/tls.py
    grpc_tls: TlsSettings = field(default_factory=lambda: TlsSettings("grpc"))
    http_tls: TlsSettings = field(default_factory=lambda: TlsSettings("http"))
