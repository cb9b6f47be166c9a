"""ServerConfig: every setting of one `fuserve serve` process, frozen once the CLI is parsed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    metrics_address: str = "127.0.0.1"
    metrics_interval_ms: int = 2000
    model_control_mode: str = "none"
    load_models: tuple[str, ...] = ()
    repository_poll_secs: float = 15.0
    exit_on_error: bool = False
    exit_timeout_secs: float = 30.0
    log_verbose: int = 0
    # Reported in server metadata. "triton" by default: Triton's clients and examples check it.
    server_name: str = "triton"
    # Largest request body (HTTP) or message (gRPC) accepted, in bytes.
    max_input_size: int = 64 * 1024 * 1024
    # Triton's auto-complete gives batchable models without a config this max_batch_size.
    default_max_batch_size: int = 4
    disable_auto_complete_config: bool = False
    # 0: this process serves HTTP and gRPC itself. N > 0: N frontend worker processes serve them and
    # hand inference to this one, which keeps the models and batchers (docs/architecture.md).
    frontend_workers: int = 0
