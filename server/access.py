"""Restricted APIs: tritonserver's `--http-restricted-api` and `--grpc-restricted-protocol`.

    --http-restricted-api      <groups>:<header>=<value>     (repeatable)
    --grpc-restricted-protocol <groups>:<key>=<value>        (repeatable; metadata `triton-grpc-protocol-<key>`)

Every REST route (`frontends/rest.py`, ROUTES) and every gRPC method (GRPC_GROUPS below) belongs
to one of Triton's nine groups. A restricted group answers only calls that carry its header with
its value; others get 403 / PERMISSION_DENIED naming the header and the group (Triton answers gRPC
with UNAVAILABLE; PERMISSION_DENIED is what the call's status means). Each protocol checks in one
place: the REST router before any handler runs, and the gRPC transport's `authorize` hook when a
stream opens (`grpc_authorize`). Unrestricted groups cost nothing: their check is None.

Values are secrets: compared in constant time (`hmac.compare_digest` on the bytes), never
logged, never put in an error message or a repr.
"""

from __future__ import annotations

import argparse
import hmac
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._proto import grpc_service_pb2 as pb
from .context import CallContext
from .errors import PermissionDenied

HEALTH = "health"
METADATA = "metadata"
INFERENCE = "inference"
SHARED_MEMORY = "shared-memory"
MODEL_CONFIG = "model-config"
MODEL_REPOSITORY = "model-repository"
STATISTICS = "statistics"
TRACE = "trace"
LOGGING = "logging"
# Triton's names, in its order (src/restricted_features.h)
GROUPS = (HEALTH, METADATA, INFERENCE, SHARED_MEMORY, MODEL_CONFIG, MODEL_REPOSITORY, STATISTICS, TRACE, LOGGING)

# Triton prefixes the configured gRPC key (src/grpc/grpc_server.h, kRestrictedProtocolHeaderTemplate)
GRPC_KEY_PREFIX = "triton-grpc-protocol-"

_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
GRPC_SERVICE_PREFIX = f"/{_SERVICE.full_name}/"

# Every method of inference.GRPCInferenceService -> its group (Triton's src/grpc/grpc_server.cc).
GRPC_GROUPS: dict[str, str] = {
    "ServerLive": HEALTH, "ServerReady": HEALTH, "ModelReady": HEALTH,
    "ServerMetadata": METADATA, "ModelMetadata": METADATA,
    "ModelInfer": INFERENCE, "ModelStreamInfer": INFERENCE,
    "ModelConfig": MODEL_CONFIG,
    "ModelStatistics": STATISTICS,
    "RepositoryIndex": MODEL_REPOSITORY, "RepositoryModelLoad": MODEL_REPOSITORY,
    "RepositoryModelUnload": MODEL_REPOSITORY,
    "SystemSharedMemoryStatus": SHARED_MEMORY, "SystemSharedMemoryRegister": SHARED_MEMORY,
    "SystemSharedMemoryUnregister": SHARED_MEMORY, "CudaSharedMemoryStatus": SHARED_MEMORY,
    "CudaSharedMemoryRegister": SHARED_MEMORY, "CudaSharedMemoryUnregister": SHARED_MEMORY,
    "TraceSetting": TRACE,
    "LogSettings": LOGGING,
}


def _require_complete_grpc_table() -> None:
    """A method of the service without a group would be an unchecked door: refuse to import."""
    methods = {m.name for m in _SERVICE.methods}
    missing, extra = methods - GRPC_GROUPS.keys(), GRPC_GROUPS.keys() - methods
    bad = {name: group for name, group in GRPC_GROUPS.items() if group not in GROUPS}
    if missing or extra or bad:
        raise RuntimeError(f"server/access.py GRPC_GROUPS is out of date with the service: methods without a "
                           f"group {sorted(missing)}, unknown methods {sorted(extra)}, unknown groups {bad}")


_require_complete_grpc_table()

_NAME_LIKE = re.compile(r"[A-Za-z-]{0,32}")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP header name (RFC 9110 token)
_PROTOCOL_WORDS = {"http": ("api", "API"), "grpc": ("protocol", "protocol")}
Check = Callable[[Mapping[str, str]], None]


@dataclass(frozen=True, slots=True)
class Restriction:
    """One group's requirement: header `header` (lower-case) carrying the configured value."""

    group: str
    header: str
    value: bytes = field(repr=False)  # the bytes a request's header must carry


class Policy:
    """The restrictions of one protocol ("http" or "grpc"): group -> Restriction. Immutable; built
    from the flag's specs (`Policy("http", ["inference:x-key=secret"])`), raising ValueError with a
    message that never contains a value."""

    __slots__ = ("protocol", "_rules", "_specs")

    def __init__(self, protocol: str = "http", specs: Iterable[str] = ()) -> None:
        if protocol not in _PROTOCOL_WORDS:
            raise ValueError(f"protocol must be 'http' or 'grpc', not {protocol!r}")
        self.protocol = protocol
        self._rules: dict[str, Restriction] = {}
        self._specs: tuple[str, ...] = ()
        for spec in specs:
            self._add(spec)

    def with_spec(self, spec: str) -> Policy:
        """This policy plus one more `<groups>:<key>=<value>`."""
        return Policy(self.protocol, (*self._specs, spec))

    def _add(self, spec: str) -> None:
        word = _PROTOCOL_WORDS[self.protocol][0]
        groups, key, value = _split(spec, word)
        header = (GRPC_KEY_PREFIX if self.protocol == "grpc" else "") + key.lower()
        raw = os.fsencode(value)  # the command line's own bytes
        for group in groups.split(","):
            if group not in GROUPS:
                # quoted only when it looks like a name: a spec missing its '<groups>:' would show a value
                name = f"'{group}'" if _NAME_LIKE.fullmatch(group) else \
                    f"(not shown: not a name; is '<{word}s>:' missing?)"
                raise ValueError(f"unknown restricted {word} {name} (known: {', '.join(GROUPS)})")
            if group in self._rules:
                raise ValueError(f"restricted {word} '{group}' can not be specified in multiple config groups")
            self._rules[group] = Restriction(group, header, raw)
        self._specs += (spec,)

    def __bool__(self) -> bool:
        return bool(self._rules)

    def __repr__(self) -> str:  # groups and header names only: never a value
        rules = ", ".join(f"{g}: {r.header!r}" for g, r in self._rules.items())
        return f"Policy({self.protocol!r}, {{{rules}}})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and (self.protocol, self._rules) == (other.protocol, other._rules)

    __hash__ = None  # type: ignore[assignment]

    def restriction(self, group: str) -> Restriction | None:
        return self._rules.get(group)

    def specs(self) -> tuple[str, ...]:
        """The specs as given, values included: for handing to the frontend workers, nothing else."""
        return self._specs

    def checker(self, group: str) -> Check | None:
        """The check for `group`'s calls (None when the group is open): `check(headers)` raises
        PermissionDenied unless `headers` (lower-case names) carries the group's header and value."""
        if group not in GROUPS:
            raise KeyError(f"no such group {group!r}")
        rule = self._rules.get(group)
        if rule is None:
            return None
        noun = _PROTOCOL_WORDS[self.protocol][1]
        # Triton's words, and the group too (Triton names only the header)
        message = f"This {noun} is restricted, expecting header '{rule.header}' (the '{group}' {noun} group)"
        header, expected = rule.header, rule.value
        # What the transport decoded the header's bytes with: HTTP/1.1 as latin-1, HPACK as UTF-8.
        encoding = "latin-1" if self.protocol == "http" else "utf-8"

        def check(headers: Mapping[str, str]) -> None:
            got = headers.get(header)
            if got is None or not _matches(got, encoding, expected):
                raise PermissionDenied(message)
        return check

    def check(self, group: str, headers: Mapping[str, str]) -> None:
        """Raise PermissionDenied unless `headers` may call `group` (a convenience: hot paths keep
        the `checker(group)` closure)."""
        check = self.checker(group)
        if check is not None:
            check(headers)


def _matches(got: str, encoding: str, expected: bytes) -> bool:
    try:
        raw = got.encode(encoding)
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(raw, expected)  # time independent of where they differ


def _split(spec: str, word: str) -> tuple[str, str, str]:
    """`<groups>:<key>=<value>` as Triton splits it: the first ':' ends the groups, the first '='
    after it ends the key, the value is the rest (it may hold ':' and '='). Errors never quote the
    spec: it holds the value."""
    form = f"the format is '<{word}s>:<key>=<value>' (<{word}s>: a comma-separated list of {', '.join(GROUPS)})"
    groups, colon, rest = spec.partition(":")
    key, equals, value = rest.partition("=")
    if not colon:
        raise ValueError(f"{form}; this one has no ':'")
    if not groups:
        raise ValueError(f"{form}; this one has no {word}s before the ':'")
    if not equals:
        raise ValueError(f"{form}; this one has no '=' after the key")
    if not key:
        raise ValueError(f"{form}; this one has an empty key")
    if not _TOKEN.fullmatch(key):
        raise ValueError(f"{form}; the key is not a valid header name (letters, digits and !#$%&'*+-.^_`|~)")
    if not value:
        raise ValueError(f"{form}; this one has an empty value")
    if value != value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{form}; the value has surrounding whitespace or control characters, which a header "
                         "cannot carry")
    return groups, key, value


class RestrictionAction(argparse.Action):
    """argparse action for the two flags: each use adds one spec to the namespace's Policy, and a bad
    spec or a group given twice is an argparse error."""

    def __init__(self, option_strings: Sequence[str], dest: str, protocol: str = "http", **kwargs: Any) -> None:
        if kwargs.get("default") is None:  # argparse passes default=None when none was given
            kwargs["default"] = Policy(protocol)
        super().__init__(option_strings, dest, **kwargs)
        self.protocol = protocol

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, None)
        if not isinstance(current, Policy):
            current = Policy(self.protocol)
        try:
            setattr(namespace, self.dest, current.with_spec(str(values)))
        except ValueError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None


Authorize = Callable[[str, CallContext], None]


def grpc_authorize(policy: Policy | None) -> Authorize | None:
    """The gRPC transport's `authorize(path, ctx)` hook for `policy` (None when nothing is
    restricted). A method path outside the service is left alone: the transport answers it
    UNIMPLEMENTED."""
    if not policy:
        return None
    checks: dict[str, Check] = {}
    for name, group in GRPC_GROUPS.items():
        check = policy.checker(group)
        if check is not None:
            checks[GRPC_SERVICE_PREFIX + name] = check

    def authorize(path: str, ctx: CallContext) -> None:
        check = checks.get(path)
        if check is not None:
            check(ctx.headers)
    return authorize
