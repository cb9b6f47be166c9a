"""The command line: tritonserver's flag names, safe defaults, and --help."""

import subprocess
import sys

from server.__main__ import build_parser, config_from_args


def test_defaults_follow_tritonserver_but_bind_loopback(tmp_path):
    cfg = config_from_args(build_parser().parse_args(["serve", "--model-repository", str(tmp_path)]))
    assert (cfg.http_port, cfg.grpc_port, cfg.metrics_port) == (8000, 8001, 8002)
    assert cfg.http_address == cfg.grpc_address == cfg.metrics_address == "127.0.0.1"
    assert cfg.model_control_mode == "none" and cfg.exit_on_error is False
    assert cfg.max_input_size == 64 * 1024 * 1024


def test_fuserve_address_sets_the_default_address_and_flags_still_win(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSERVE_ADDRESS", "0.0.0.0")  # what the container image sets
    cfg = config_from_args(build_parser().parse_args(["serve", "--model-repository", str(tmp_path)]))
    assert cfg.http_address == cfg.grpc_address == cfg.metrics_address == "0.0.0.0"
    cfg = config_from_args(build_parser().parse_args(["serve", "--model-repository", str(tmp_path),
                                                      "--grpc-address", "127.0.0.1"]))
    assert (cfg.http_address, cfg.grpc_address) == ("0.0.0.0", "127.0.0.1")
    monkeypatch.setenv("FUSERVE_ADDRESS", "")
    cfg = config_from_args(build_parser().parse_args(["serve", "--model-repository", str(tmp_path)]))
    assert cfg.http_address == "127.0.0.1"


def test_flags(tmp_path):
    args = build_parser().parse_args([
        "serve", "--model-repository", str(tmp_path), "--model-repository", "/other", "--http-port", "9000",
        "--model-control-mode", "explicit", "--load-model", "a", "--load-model", "b", "--exit-on-error",
        "--exit-timeout-secs", "5", "--log-verbose", "1", "--http-address", "0.0.0.0"])
    cfg = config_from_args(args)
    assert len(cfg.model_repositories) == 2 and cfg.http_port == 9000 and cfg.load_models == ("a", "b")
    assert cfg.exit_on_error is True and cfg.exit_timeout_secs == 5 and cfg.http_address == "0.0.0.0"
    assert config_from_args(build_parser().parse_args(
        ["serve", "--model-repository", "x", "--exit-on-error=false"])).exit_on_error is False


def test_help_explains_each_flag():
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--model-repository", "--http-port", "--grpc-port", "--metrics-port", "--http-address",
                 "--grpc-address", "--model-control-mode", "--load-model", "--log-verbose", "--exit-timeout-secs",
                 "--exit-on-error"):
        assert flag in out


def test_missing_repository_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "server", "serve", "--model-repository", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not found" in r.stderr
