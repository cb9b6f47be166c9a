"""Triton's trace extension: the trace settings (`GET/POST /v2/trace/setting`, per model at
`/v2/models/<m>/trace/setting`, gRPC TraceSetting), which requests are sampled, and
`--trace-config` at start-up. tracing.py exports the sampled requests' spans.

Settings, with Triton 2.51's names, shapes and defaults: `trace_level` (a list: ["OFF"] or
["TIMESTAMPS"]), `trace_rate` (a string: one request in N is traced, "1000"), `trace_count` (a
string: how many more traces, "-1" unlimited; it counts down), `trace_mode` ("triton" or
"opentelemetry", start-up only), and, in opentelemetry mode, the exporter's `url`, `resource`
and batch span processor settings (start-up only); in triton mode `log_frequency` ("0") and
`trace_file` (""): reported, never settable, since fuserve writes no trace files.

The decisions (docs/protocol.md, "Trace"):
- No client can set a path or a URL (CVE-2024-0087/0100: Triton's trace file setting let a client
  write any file): `trace_file`, `url`, `resource`, `trace_mode` and the exporter settings answer
  501, as Triton 2.51 answers for trace_file.
- Traces go to OpenTelemetry only (`--trace-config mode=opentelemetry`). In triton mode there is
  nowhere to write them, so turning tracing on is refused with Triton's own words for that case
  ("trace file name is not given").
- Values are checked strictly (Triton's `stoi` takes "12abc" as 12; this refuses it), an unknown
  key is a 400 rather than ignored, a request is checked whole before any of it applies, and
  TENSORS is refused (fuserve traces timestamps).
- A model's settings override the global ones key by key; `null` (an empty list over gRPC) clears
  a key back to the global value, and on the global settings back to the command line's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidArgument, Unsupported

LEVELS = ("OFF", "TIMESTAMPS", "TENSORS")
CLIENT_KEYS = ("trace_level", "trace_rate", "trace_count")
FIXED_KEYS = ("trace_file", "trace_mode", "url", "resource", "bsp_schedule_delay", "bsp_max_export_batch_size",
              "bsp_max_queue_size")
# The exporter's settings (opentelemetry mode): Triton's defaults for its batch span processor
EXPORTER_DEFAULTS = {"url": "localhost:4318/v1/traces", "resource": "service.name=triton-inference-server",
                     "bsp_schedule_delay": "5000", "bsp_max_export_batch_size": "512", "bsp_max_queue_size": "2048"}


class TraceConfigError(ValueError):
    """A --trace-config option that cannot be used (the message says why)."""


def _level(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
        raise InvalidArgument(f"'trace_level' must be a list of trace levels ({', '.join(LEVELS[:2])}), got "
                              f"{value!r}")
    unknown = [v for v in value if v not in LEVELS]
    if unknown:
        raise InvalidArgument(f"unknown trace level(s) {', '.join(unknown)}: fuserve knows OFF and TIMESTAMPS")
    if "TENSORS" in value:
        raise InvalidArgument("trace level TENSORS is not supported by fuserve: it traces TIMESTAMPS")
    if "OFF" in value and len(value) > 1:
        raise InvalidArgument("Expect only one trace level 'OFF' is specified")
    return list(dict.fromkeys(value))


_INTEGER = re.compile(r"-?[0-9]{1,20}")


def _number(key: str, value: Any, low: int, high: int) -> str:
    if not isinstance(value, str) or not _INTEGER.fullmatch(value) or not low <= int(value) <= high:
        raise InvalidArgument(f"Unable to parse '{key}': expecting an integer from {low} to {high} as a string, got "
                              f"{value!r}")
    return str(int(value))


def check_key(key: str) -> None:
    """A key a client may set (or clear)."""
    if key in FIXED_KEYS:
        what = "trace file location" if key == "trace_file" else f"trace setting '{key}'"
        raise Unsupported(f"{what} can not be updated through network protocol")
    if key == "log_frequency":  # reported as Triton does, never acted on: it would rotate trace files
        raise Unsupported("trace setting 'log_frequency' says how often trace files are written, and fuserve "
                          "writes none (its traces go to OpenTelemetry)")
    if key not in CLIENT_KEYS:
        raise InvalidArgument(f"unknown trace setting '{key}' (the settings: {', '.join(CLIENT_KEYS)})")


def check_value(key: str, value: Any) -> Any:
    """One setting's value (a key check_key let through), checked: Triton's shapes, a list of
    levels and numbers as strings."""
    if key == "trace_level":
        return _level(value)
    if key == "trace_rate":
        return _number(key, value, 0, 2**32 - 1)
    return _number(key, value, -1, 2**31 - 1)  # trace_count


@dataclass
class TraceSettings:
    """The global settings (from the command line, then changed by clients) and each model's own."""

    mode: str = "triton"
    start: dict[str, Any] = field(default_factory=dict)  # the command line's settings
    exporter: dict[str, Any] = field(default_factory=dict)  # opentelemetry mode: url, resource, bsp_*
    current: dict[str, Any] = field(default_factory=dict)
    resources: tuple[str, ...] = ()  # opentelemetry mode: the exporter's resource attributes, "key=value"
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> the keys it overrides
    # requests seen by each set of settings: "" (the global ones) or a model with overrides
    seen: dict[str, int] = field(default_factory=dict)
    active: bool = False  # some setting traces: the one flag the request path reads

    def __post_init__(self) -> None:
        self.start = {"trace_level": ["OFF"], "trace_rate": "1000", "trace_count": "-1", "log_frequency": "0",
                      **self.start}
        self.current = dict(self.start)
        self._refresh()

    # ---- the extension ---------------------------------------------------------------------------

    def get(self, model: str = "") -> dict[str, Any]:
        """The settings as Triton reports them (a model's: the global ones with its overrides)."""
        s = {**self.current, **self.models.get(model, {})} if model else dict(self.current)
        out: dict[str, Any] = {"trace_level": list(s["trace_level"]), "trace_rate": s["trace_rate"],
                               "trace_count": s["trace_count"]}
        if self.mode == "opentelemetry":
            return {**out, "trace_mode": "opentelemetry", **self.exporter}
        return {**out, "log_frequency": s["log_frequency"], "trace_file": "", "trace_mode": "triton"}

    def update(self, changes: dict[str, Any], model: str = "") -> dict[str, Any]:
        """Check every change (None clears a key), then apply them all; returns the settings after."""
        for key in changes:
            check_key(key)
        checked = {key: None if value is None else check_value(key, value) for key, value in changes.items()}
        target = self.models.get(model, {}) if model else self.current
        after = dict(target)
        for key, value in checked.items():
            if value is not None:
                after[key] = value
            elif model:
                after.pop(key, None)
            else:
                after[key] = self.start[key]
        level = ({**self.current, **after} if model else after)["trace_level"]
        if self.mode != "opentelemetry" and level != ["OFF"]:
            raise InvalidArgument("Attempting to set invalid trace setting :trace file name is not given (fuserve "
                                  "exports traces to OpenTelemetry only: start it with --trace-config "
                                  "mode=opentelemetry)")
        if model:
            if after:
                self.models[model] = after
            else:
                self.models.pop(model, None)
            self.seen.pop(model, None)  # a new setting starts counting afresh (as in Triton)
        else:
            self.current.clear()
            self.current.update(after)
            self.seen.clear()  # the global settings: every count that follows them starts afresh
        self._refresh()
        return self.get(model)

    def _refresh(self) -> None:
        levels = [self.current["trace_level"], *(m.get("trace_level", self.current["trace_level"])
                                                 for m in self.models.values())]
        self.active = any(level != ["OFF"] for level in levels)

    # ---- sampling ------------------------------------------------------------------------------

    def sample(self, model: str) -> bool:
        """Whether this request to `model` is traced; counts it."""
        own = self.models.get(model)
        key = model if own else ""
        s = {**self.current, **own} if own else self.current
        if s["trace_level"] == ["OFF"]:
            return False
        rate, count = int(s["trace_rate"]), int(s["trace_count"])
        seen = self.seen[key] = self.seen.get(key, 0) + 1
        if rate == 0 or seen % rate or count == 0:
            return False
        if count > 0:  # the count shown afterwards is what is left
            (own if own is not None and "trace_count" in own else self.current)["trace_count"] = str(count - 1)
        return True


def from_options(options: list[str]) -> TraceSettings:
    """`--trace-config` options ("[mode,]setting=value", repeatable) -> the start-up settings."""
    start: dict[str, Any] = {}
    exporter: dict[str, Any] = {}
    mode = "triton"
    levels: list[str] = []
    resources: list[str] = []
    for option in options:
        section, _, rest = option.partition(",") if "," in option.split("=", 1)[0] else ("", "", option)
        key, sep, value = rest.partition("=")
        if not sep or not key:
            raise TraceConfigError(f"--trace-config {option!r}: expected [mode,]setting=value")
        if section == "opentelemetry":
            if key not in EXPORTER_DEFAULTS:
                raise TraceConfigError(f"--trace-config {option!r}: opentelemetry settings are "
                                       f"{', '.join(EXPORTER_DEFAULTS)}")
            if key == "resource":
                if "=" not in value:
                    raise TraceConfigError(f"--trace-config {option!r}: a resource is key=value")
                resources.append(value)
                value = ",".join(resources)
            elif key == "url" and not value:
                raise TraceConfigError(f"--trace-config {option!r}: the url is empty")
            elif key.startswith("bsp_") and not (value.isascii() and value.isdigit() and int(value) > 0):
                raise TraceConfigError(f"--trace-config {option!r}: {key} is a positive integer")
            exporter[key] = value
        elif section == "triton":
            raise TraceConfigError(f"--trace-config {option!r}: fuserve writes no trace files; export to "
                                   f"OpenTelemetry with --trace-config mode=opentelemetry")
        elif section:
            raise TraceConfigError(f"--trace-config {option!r}: unknown mode '{section}'")
        elif key == "mode":
            if value not in ("triton", "opentelemetry"):
                raise TraceConfigError(f"--trace-config {option!r}: mode is triton or opentelemetry")
            mode = value
        elif key == "level":
            levels.append(value.upper())
        elif key in ("rate", "count"):
            try:
                start[f"trace_{key}"] = check_value(f"trace_{key}", value)
            except InvalidArgument as exc:
                raise TraceConfigError(f"--trace-config {option!r}: {exc.message}") from None
        else:
            raise TraceConfigError(f"--trace-config {option!r}: unknown setting '{key}' (level, rate, count, mode, "
                                   f"opentelemetry,<setting>)")
    if levels:
        try:
            start["trace_level"] = _level(levels)
        except InvalidArgument as exc:
            raise TraceConfigError(f"--trace-config level: {exc.message}") from None
    if exporter and mode != "opentelemetry":
        raise TraceConfigError("--trace-config opentelemetry,...: also give --trace-config mode=opentelemetry")
    if mode != "opentelemetry" and start.get("trace_level", ["OFF"]) != ["OFF"]:
        raise TraceConfigError("--trace-config level: tracing needs --trace-config mode=opentelemetry (fuserve "
                               "writes no trace files)")
    if mode != "opentelemetry":
        return TraceSettings(mode, start)
    return TraceSettings(mode, start, {**EXPORTER_DEFAULTS, **exporter},
                         resources=tuple(resources) or (EXPORTER_DEFAULTS["resource"],))
