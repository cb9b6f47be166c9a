"""KServe V2 REST: route a request, check it, decode it, call the service, encode the answer.

ROUTES is every endpoint, each with its restricted-API group (`server/access.py`); the Router
matches a path to its route and runs the group's check before any handler, for both frontends here
(RestFrontend, and ForwardingRestFrontend in a `--frontend-workers` process). Errors from the tree
in `server.errors` become `{"error": "..."}` with the class's HTTP status here, in
`_error_response`, and nowhere else.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote

import numpy as np
import orjson

from .. import access, log_settings
from ..codecs import generate, v2_json
from ..errors import DecoupledUnary, InvalidArgument, NotFound, ServerError, Unsupported, as_server_error
from ..model_config import config_to_json
from ..service import InferenceService
from ..types import InferRequest, InferResponse, Responses
from .http_messages import HttpRequest, HttpResponse

log = logging.getLogger(__name__)

_OK_EMPTY = HttpResponse(200, b"")
_NOT_READY = HttpResponse(400, b"")  # Triton answers a negative health check with 400 and no body
_BINARY = b"application/octet-stream"
_HEADER_LENGTH = "inference-header-content-length"
_EVENT_STREAM = b"text/event-stream; charset=utf-8"


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def _error_response(exc: BaseException) -> HttpResponse:
    err = as_server_error(exc)
    if type(err) is ServerError:
        log.error("internal error: %s", err.message, exc_info=exc if exc is not err else None)
    return HttpResponse(err.http_status, error_body(err.message))


def _json(obj: object) -> HttpResponse:
    return HttpResponse(200, orjson.dumps(obj))


def _path_parts(request: HttpRequest) -> list[str]:
    """The path's segments, percent-decoded one by one (a model name may hold an encoded '/')."""
    parts = request.path.strip("/").split("/")
    return [unquote(p) for p in parts] if "%" in request.path else parts


# Called with the model's name and version and the reason when an infer request cannot be decoded:
# raises NotFound for an unknown model, else counts the failure and raises the reason
# (InferenceService.refused, or in a frontend worker its call over the link).
Refused = Callable[[str, str, Exception], Awaitable[None]]


async def infer_endpoint(request: HttpRequest, name: str, version: str,
                         infer: Callable[[InferRequest], Awaitable[InferResponse]], refused: Refused) -> HttpResponse:
    """The infer endpoint: decode (JSON or binary extension), `infer`, encode. A body that does not
    decode is judged after the model in the URL (`refused`): an unknown model is a 404 whatever the
    body holds, as on Triton."""
    try:
        header_length = request.headers.get(_HEADER_LENGTH)
        hl: int | None = None
        if header_length is not None:
            if not header_length.isdigit():
                raise InvalidArgument(f"Inference-Header-Content-Length must be an integer, got '{header_length}'")
            hl = int(header_length)
        infer_request = v2_json.decode_request(request.body, hl, name, version)
    except InvalidArgument as exc:
        await refused(name, version, exc)
        raise
    try:
        infer_response = await infer(infer_request)
    except DecoupledUnary:
        raise Unsupported("HTTP end point doesn't support models with decoupled transaction policy") from None
    body, json_length = v2_json.encode_response(infer_response, infer_request)
    if json_length is None:
        return HttpResponse(200, body)
    return HttpResponse(200, body, _BINARY, [(b"inference-header-content-length", str(json_length).encode())])


# ---- the route table ---------------------------------------------------------------------------


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


def _shared_memory_routes(kind: str) -> tuple[Route, ...]:
    return tuple(Route(f"/v2/{kind}{region}/{action}", access.SHARED_MEMORY)
                 for region in ("", "/region/{region}") for action in ("status", "register", "unregister"))


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
    Route("/v2/models/{model}/trace/setting", access.TRACE),
    Route("/v2/trace/setting", access.TRACE),
    Route("/v2/logging", access.LOGGING, "GET POST", "logging"),
    *_shared_memory_routes("systemsharedmemory"),
    *_shared_memory_routes("cudasharedmemory"),
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


async def _events(first: Responses, rest: AsyncGenerator[Responses, None]) -> AsyncGenerator[bytes, None]:
    """One `data:` event per response; a batch's events leave together, as one chunk."""
    try:
        batch = first
        while True:
            events = b"".join([generate.event(_generated(batch, r)) for r, _ in batch.items if r is not None])
            if events:
                yield events
            if batch.final:
                break
            following = await anext(rest, None)
            if following is None:
                break
            batch = following
    except Exception as exc:
        yield generate.event(orjson.dumps({"error": as_server_error(exc).message}))
    finally:
        await rest.aclose()


def _generated(batch: Responses, response: dict[str, np.ndarray] | InferResponse) -> bytes:
    if isinstance(response, dict):  # a decoupled model's arrays
        return generate.encode_arrays(batch.model_name, batch.model_version, batch.outputs, response)
    return generate.encode_response(response)


async def _not_found(request: HttpRequest, *captures: str) -> HttpResponse:
    raise NotFound(f"no such endpoint: {request.method} {request.path}")


# ---- the frontends -------------------------------------------------------------------------------


class RestFrontend:
    def __init__(self, service: InferenceService, policy: access.Policy | None = None) -> None:
        self.service = service
        self.router = Router({
            "server_metadata": self._server_metadata,
            "server_live": self._server_live,
            "server_ready": self._server_ready,
            "statistics": self._statistics,
            "logging": self._logging,
            "model_metadata": self._metadata,
            "model_ready": self._ready,
            "model_config": self._config,
            "model_statistics": self._stats,
            "infer": self._infer,
            "generate": self._generate,
            "generate_stream": self._generate_stream,
            "repository_index": self._index,
            "repository_load": self._load,
            "repository_unload": self._unload,
        }, _not_found, policy)

    async def handle(self, request: HttpRequest) -> HttpResponse:
        try:
            handler, captures = self.router.resolve(request)
            return await handler(request, *captures)
        except Exception as exc:
            return _error_response(exc)

    # ---- server endpoints --------------------------------------------------------------------

    async def _server_metadata(self, request: HttpRequest) -> HttpResponse:
        return _json(self.service.server_metadata())

    async def _server_live(self, request: HttpRequest) -> HttpResponse:
        return _OK_EMPTY if self.service.live else _NOT_READY

    async def _server_ready(self, request: HttpRequest) -> HttpResponse:
        return _OK_EMPTY if self.service.server_ready() else _NOT_READY

    async def _logging(self, request: HttpRequest) -> HttpResponse:
        """GET: the log settings; POST: change those the JSON object names, then the settings."""
        if request.method == "GET":
            return _json(log_settings.current())
        changes = v2_json.loads(request.body, "log settings request") if request.body.strip() else {}
        if type(changes) is not dict:
            raise InvalidArgument("the log settings request must be a JSON object")
        return _json(log_settings.update(changes))

    async def _statistics(self, request: HttpRequest) -> HttpResponse:
        return _json(self.service.statistics())

    # ---- model endpoints ---------------------------------------------------------------------

    async def _infer(self, request: HttpRequest, name: str, version: str = "") -> HttpResponse:
        return await infer_endpoint(request, name, version, self.service.infer, self._refused)

    async def _refused(self, name: str, version: str, exc: Exception) -> None:
        self.service.refused(name, version, exc)

    # ---- the generate extension (codecs/generate.py) ---------------------------------------------

    def _generate_request(self, request: HttpRequest, name: str, version: str) -> InferRequest:
        md = self.service.model_metadata(name, version)
        batching = self.service.model_config(name, version).max_batch_size > 0
        return generate.decode_request(request.body, name, version, {t.name: t.datatype for t in md.inputs},
                                       batching)

    async def _generate(self, request: HttpRequest, name: str, version: str = "") -> HttpResponse:
        """Exactly one response, as one JSON object."""
        responses = self.service.stream(self._generate_request(request, name, version))
        try:
            got: list[InferResponse] = []
            async for batch in responses:
                got.extend(response for response, _ in batch.responses() if response is not None)
                if len(got) > 1:
                    break
        finally:
            await responses.aclose()
        if len(got) != 1:
            raise InvalidArgument(f"generate expects model '{name}' to produce exactly one response, it produced "
                                  f"{'none' if not got else 'more than one'}; use generate_stream for models that "
                                  f"send zero or many responses")
        return HttpResponse(200, generate.encode_response(got[0]))

    async def _generate_stream(self, request: HttpRequest, name: str, version: str = "") -> HttpResponse:
        """Server-sent events, one `data:` per response as the model sends it. What fails before the
        first response is a plain JSON error with its status; what fails after it, an event
        `data: {"error": ...}` that ends the stream."""
        responses = self.service.stream(self._generate_request(request, name, version))
        try:
            first = await anext(responses)
        except BaseException:
            await responses.aclose()
            raise
        if first.final and all(response is None for response, _ in first.items):  # zero responses
            await responses.aclose()
            return HttpResponse(200, b"", _EVENT_STREAM)
        return HttpResponse(200, b"", _EVENT_STREAM, stream=_events(first, responses))

    async def _metadata(self, request: HttpRequest, name: str, version: str = "") -> HttpResponse:
        md = self.service.model_metadata(name, version)
        return _json({
            "name": md.name,
            "versions": list(md.versions),
            "platform": md.platform,
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in md.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in md.outputs],
        })

    async def _ready(self, request: HttpRequest, name: str, version: str = "") -> HttpResponse:
        return _OK_EMPTY if self.service.model_ready(name, version) else _NOT_READY

    async def _config(self, request: HttpRequest, name: str, version: str = "") -> HttpResponse:
        return _json(config_to_json(self.service.model_config(name, version)))

    async def _stats(self, request: HttpRequest, name: str, version: str = "") -> HttpResponse:
        return _json(self.service.statistics(name, version))

    # ---- repository extension -------------------------------------------------------------------

    async def _load(self, request: HttpRequest, name: str) -> HttpResponse:
        await self.service.load_model(name, self._load_parameters(request))
        return _OK_EMPTY

    async def _unload(self, request: HttpRequest, name: str) -> HttpResponse:
        await self.service.unload_model(name)
        return _OK_EMPTY

    @staticmethod
    def _load_parameters(request: HttpRequest) -> dict:
        if not request.body.strip():
            return {}
        body = v2_json.loads(request.body, "load request")
        params = body.get("parameters", {}) if isinstance(body, dict) else None
        if not isinstance(params, dict):
            raise InvalidArgument("the load request must be a JSON object with an optional 'parameters' object")
        return params

    async def _index(self, request: HttpRequest) -> HttpResponse:
        ready_only = False
        if request.body.strip():
            body = v2_json.loads(request.body)
            if not isinstance(body, dict):
                raise InvalidArgument("the repository index request must be a JSON object")
            ready_only = bool(body.get("ready", False))
        return _json(self.service.repository_index(ready_only))


class ForwardingRestFrontend:
    """REST in a frontend worker process: inference is decoded and encoded here and `infer` runs it
    in the scheduler process; any other request goes to the scheduler's RestFrontend whole. Both are
    checked here first (the scheduler checks forwarded requests again: their headers go along)."""

    def __init__(self, infer: Callable[[InferRequest], Awaitable[InferResponse]],
                 forward: Callable[[HttpRequest], Awaitable[HttpResponse]], refused: Refused,
                 policy: access.Policy | None = None) -> None:
        self.infer = infer
        self.forward = forward
        self.refused = refused
        self.router = Router({"infer": self._infer}, self._forward, policy, default=self._forward)

    async def handle(self, request: HttpRequest) -> HttpResponse:
        try:
            handler, captures = self.router.resolve(request)
            return await handler(request, *captures)
        except Exception as exc:
            return _error_response(exc)

    async def _infer(self, request: HttpRequest, name: str, version: str = "") -> HttpResponse:
        return await infer_endpoint(request, name, version, self.infer, self.refused)

    async def _forward(self, request: HttpRequest, *captures: str) -> HttpResponse:
        return await self.forward(request)
