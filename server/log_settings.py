"""The server's logging and Triton's logging extension (`GET/POST /v2/logging`, gRPC LogSettings).

Settings, as Triton names them: `log_verbose_level` (an unsigned int: > 0 shows fuserve's debug
records), `log_info`, `log_warning`, `log_error` (bools: show records of that level; error
covers critical) and `log_format` (`default`, or `ISO8601`: UTC timestamps in ISO 8601). They
start from the command line (`--log-verbose`, `--log-info`, `--log-warning`, `--log-error`,
`--log-format`) and a client may change them while the server runs.

`log_file` is reported (always "": fuserve logs to stderr) and can never be set by a client:
Triton's log file setting let a client append to any file the server could write
(CVE-2024-0087). Setting it fails, as Triton 2.51 refuses it ("log file location can not be
updated through network protocol", 501). Unlike Triton, a key that is not a setting is refused
(400 naming it) rather than ignored, and a value of the wrong type is a 400, not Triton's 500.

The settings live in this process: with `--frontend-workers`, /v2/logging and LogSettings are
answered by the scheduler process (where models run), and the workers keep their start-up ones.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .errors import InvalidArgument, Unsupported

FORMATS = {
    "default": ("%(asctime)s %(levelname).1s %(name)s: %(message)s", None),
    "ISO8601": ("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%SZ"),
}
_BOOLS = ("log_info", "log_warning", "log_error")


class _Levels(logging.Filter):
    """Shows a record only while its level is on (debug records: while verbose)."""

    def filter(self, record: logging.LogRecord) -> bool:
        s = _settings
        if record.levelno >= logging.ERROR:
            return bool(s["log_error"])
        if record.levelno >= logging.WARNING:
            return bool(s["log_warning"])
        if record.levelno >= logging.INFO:
            return bool(s["log_info"])
        return int(s["log_verbose_level"]) > 0


_settings: dict[str, Any] = {"log_file": "", "log_info": True, "log_warning": True, "log_error": True,
                             "log_verbose_level": 0, "log_format": "default"}
_handler: logging.Handler | None = None


def configure(verbose: int = 0, info: bool = True, warning: bool = True, error: bool = True,
              log_format: str = "default") -> None:
    """At start-up: one stderr handler on the root logger, with these settings."""
    global _handler
    if _handler is None:
        _handler = logging.StreamHandler()
        _handler.addFilter(_Levels())
        root = logging.getLogger()
        root.addHandler(_handler)
        # at DEBUG, hpack logs every header it decodes, restricted-API values (server/access.py) included
        logging.getLogger("hpack").setLevel(logging.INFO)
    update({"log_verbose_level": verbose, "log_info": info, "log_warning": warning, "log_error": error,
            "log_format": log_format})


def current() -> dict[str, Any]:
    return dict(_settings)


def update(changes: dict[str, Any]) -> dict[str, Any]:
    """Check every change first, then apply them all; returns the settings after."""
    checked: dict[str, Any] = {}
    for key, value in changes.items():
        if key == "log_file":
            raise Unsupported("log file location can not be updated through network protocol")
        if key in _BOOLS:
            if type(value) is not bool:
                raise InvalidArgument(f"expect boolean for '{key}'")
        elif key == "log_verbose_level":
            if type(value) is not int or value < 0:
                raise InvalidArgument(f"expect an unsigned integer for '{key}'")
        elif key == "log_format":
            if value not in FORMATS:
                raise InvalidArgument(f"invalid argument for log_format, got: {value} (one of: {', '.join(FORMATS)})")
        else:
            raise InvalidArgument(f"unknown log setting '{key}' (the settings: {', '.join(sorted(_settings))})")
        checked[key] = value
    _settings.update(checked)
    logging.getLogger().setLevel(logging.DEBUG if _settings["log_verbose_level"] > 0 else logging.INFO)
    if _handler is not None:
        fmt, datefmt = FORMATS[_settings["log_format"]]
        formatter = logging.Formatter(fmt, datefmt)
        if datefmt is not None:
            formatter.converter = time.gmtime
        _handler.setFormatter(formatter)
    return current()
