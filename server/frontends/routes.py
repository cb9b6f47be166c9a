"""The REST route table and its router: every endpoint of Triton's HTTP API, each with its
restricted-API group (`server/access.py`), and the one place a request is matched to its handler
and checked against its group, for both REST frontends (frontends/rest.py)."""

from __future__ import annotations

import operator
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote

from .. import access
from .http_messages import HttpRequest, HttpResponse


def _path_parts(request: HttpRequest) -> list[str]:
    """The path's segments, percent-decoded one by one (a model name may hold an encoded '/')."""
    parts = request.path.strip("/").split("/")
    return [unquote(p) for p in parts] if "%" in request.path else parts


@dataclass(frozen=True, slots=True)
class Route:
    """One REST endpoint and the group (`server/access.py`) that `--http-restricted-api` names it by.

    `path` has a segment per '/', '{name}' capturing one segment (the captures go to the handler in
    order). `method` (or methods, space-separated) and `handler` say how fuserve serves it; both
    None for an endpoint Triton has and fuserve does not serve yet: its group is still checked,
    then it is answered as any unknown endpoint (404)."""

    path: str
    group: str
    method: str | None = None
    handler: str | None = None  # the name a frontend gives its handler under (Router's `handlers`)

    def __post_init__(self) -> None:
        if (self.method is None) != (self.handler is None) or self.group not in access.GROUPS:
            raise ValueError(f"bad route {self}")

    @property
    def segments(self) -> tuple[str | None, ...]:
        """The path's segments, None where it captures one."""
        return tuple(None if s.startswith("{") else s for s in self.path.strip("/").split("/"))


def _model_routes(tail: str, group: str, method: str | None = None, handler: str | None = None) -> tuple[Route, ...]:
    return (Route(f"/v2/models/{{model}}{tail}", group, method, handler),
            Route(f"/v2/models/{{model}}/versions/{{version}}{tail}", group, method, handler))


def _shared_memory_routes(kind: str, handler: str) -> tuple[Route, ...]:
    """`handler`_status (GET), _register and _unregister (POST), for all regions or one."""
    return tuple(Route(f"/v2/{kind}{region}/{action}", access.SHARED_MEMORY, method, f"{handler}_{action}")
                 for region in ("", "/region/{region}")
                 for action, method in (("status", "GET"), ("register", "POST"), ("unregister", "POST")))


# Every endpoint of Triton's HTTP API (its src/http_server.cc). A route without captures wins over
# one with ("/v2/models/stats" over "/v2/models/{model}"); among those with, the first listed.
ROUTES: tuple[Route, ...] = (
    Route("/v2", access.METADATA, "GET", "server_metadata"),
    Route("/v2/health/live", access.HEALTH, "GET", "server_live"),
    Route("/v2/health/ready", access.HEALTH, "GET", "server_ready"),
    Route("/v2/models/stats", access.STATISTICS, "GET", "statistics"),
    *_model_routes("", access.METADATA, "GET", "model_metadata"),
    *_model_routes("/ready", access.HEALTH, "GET", "model_ready"),
    *_model_routes("/config", access.MODEL_CONFIG, "GET", "model_config"),
    *_model_routes("/stats", access.STATISTICS, "GET", "model_statistics"),
    *_model_routes("/infer", access.INFERENCE, "POST", "infer"),
    *_model_routes("/generate", access.INFERENCE, "POST", "generate"),
    *_model_routes("/generate_stream", access.INFERENCE, "POST", "generate_stream"),
    Route("/v2/models/{model}/trace/setting", access.TRACE, "GET POST", "model_trace"),
    Route("/v2/trace/setting", access.TRACE, "GET POST", "trace"),
    Route("/v2/logging", access.LOGGING, "GET POST", "logging"),
    *_shared_memory_routes("systemsharedmemory", "shm"),
    *_shared_memory_routes("cudasharedmemory", "cuda_shm"),
    Route("/v2/repository/index", access.MODEL_REPOSITORY, "POST", "repository_index"),
    Route("/v2/repository/models/{model}/load", access.MODEL_REPOSITORY, "POST", "repository_load"),
    Route("/v2/repository/models/{model}/unload", access.MODEL_REPOSITORY, "POST", "repository_unload"),
    Route("/v2/repository/{repository}/index", access.MODEL_REPOSITORY),
    Route("/v2/repository/{repository}/models/{model}/load", access.MODEL_REPOSITORY),
    Route("/v2/repository/{repository}/models/{model}/unload", access.MODEL_REPOSITORY),
)

# handler(request, *captures)
Handler = Callable[..., Awaitable[HttpResponse]]
_HOT = "infer"  # the handler whose URLs the router remembers, so the hot path skips matching
_MAX_HOT = 1024  # bounded, whatever clients send


class _Bound:
    """A route as one frontend serves it: its group's check (None: open), its handler, and how to
    read it off a path's segments."""

    __slots__ = ("route", "check", "methods", "handler", "literals", "pick_literals", "pick_captures")

    def __init__(self, route: Route, check: access.Check | None, handler: Handler | None) -> None:
        self.route = route
        self.check = check
        self.methods = tuple(route.method.split()) if route.method else ()
        self.handler = handler
        segments = route.segments
        fixed = [i for i, s in enumerate(segments) if s is not None]  # at least the first two
        self.literals = tuple(segments[i] for i in fixed)
        self.pick_literals = operator.itemgetter(*fixed)
        self.pick_captures = _picker([i for i, s in enumerate(segments) if s is None])


def _picker(indexes: list[int]) -> Callable[[list[str]], tuple[str, ...]]:
    """parts -> the parts at `indexes`, always a tuple (itemgetter of one index gives a scalar)."""
    if len(indexes) > 1:
        return operator.itemgetter(*indexes)
    if indexes:
        i = indexes[0]
        return lambda parts: (parts[i],)
    return lambda parts: ()


def _table_key(parts: list[str] | tuple[str | None, ...]) -> tuple[int, str | None, str | None]:
    return len(parts), parts[0], parts[1] if len(parts) > 1 else ""


class Router:
    """Path -> route -> its group's access check -> handler: the one place a REST request is checked,
    before anything answers it. `handlers` maps a route's handler name to what serves it (`default`
    for names it lacks); `fallback(request)` answers an unknown path or a method the route is not
    served with (a 404, or the scheduler in a frontend worker).

    A path matches a route without captures by one dict lookup; else the routes with captures of
    its length and first two segments are tried in table order."""

    def __init__(self, handlers: dict[str, Handler], fallback: Handler, policy: access.Policy | None = None,
                 default: Handler | None = None) -> None:
        self.fallback = fallback
        self._exact: dict[tuple[str | None, ...], _Bound] = {}
        self._table: dict[tuple[int, str | None, str | None], list[_Bound]] = {}
        for route in ROUTES:
            handler = None
            if route.handler is not None:
                handler = handlers.get(route.handler, default)
                if handler is None:
                    raise ValueError(f"no handler '{route.handler}' for {route.method} {route.path}")
            segments = route.segments
            key = _table_key(segments)
            if None in key[1:]:
                raise ValueError(f"{route.path}: the first two segments of a route are literal")
            bound = _Bound(route, policy.checker(route.group) if policy else None, handler)
            if None in segments:
                self._table.setdefault(key, []).append(bound)
            else:
                self._exact[segments] = bound
        self._hot: dict[str, tuple[_Bound, tuple[str, ...]]] = {}  # infer URL -> its route and captures

    def resolve(self, request: HttpRequest) -> tuple[Handler, tuple[str, ...]]:
        """The handler for `request` and the path's captures; raises PermissionDenied when the
        route's group is restricted and the request lacks its header."""
        hit = self._hot.get(request.path) if request.method == "POST" else None
        if hit is None:
            hit = self.match(request)
            if hit is None:
                return self.fallback, ()
        bound, captures = hit
        if bound.check is not None:
            bound.check(request.headers)
        if request.method not in bound.methods:
            return self.fallback, ()
        return bound.handler, captures  # type: ignore[return-value]  # a served method has a handler

    def match(self, request: HttpRequest) -> tuple[_Bound, tuple[str, ...]] | None:
        """The route `request`'s path names, with its captures (None: no route)."""
        parts = _path_parts(request)
        bound = self._exact.get(tuple(parts))
        if bound is not None:
            return bound, ()
        for bound in self._table.get(_table_key(parts), ()):
            if bound.pick_literals(parts) == bound.literals:
                hit = (bound, bound.pick_captures(parts))
                if bound.route.handler == _HOT and request.method == "POST" and len(self._hot) < _MAX_HOT:
                    self._hot[request.path] = hit
                return hit
        return None
