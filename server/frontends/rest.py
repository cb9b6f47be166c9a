"""KServe V2 REST: route a request, decode it, call the service, encode the answer.

Errors from the tree in `server.errors` become `{"error": "..."}` with the class's HTTP status
here, in `_error_response`, and nowhere else.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from urllib.parse import unquote

import orjson

from ..codecs import v2_json
from ..errors import InvalidArgument, NotFound, ServerError, as_server_error
from ..model_config import config_to_json
from ..service import InferenceService
from ..types import InferRequest, InferResponse
from .http_server import HttpRequest, HttpResponse

log = logging.getLogger(__name__)

_OK_EMPTY = HttpResponse(200, b"")
_NOT_READY = HttpResponse(400, b"")  # Triton answers a negative health check with 400 and no body
_BINARY = b"application/octet-stream"
_HEADER_LENGTH = "inference-header-content-length"


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


def infer_target(request: HttpRequest) -> tuple[str, str] | None:
    """(model, version) when `request` is `POST /v2/models/<m>[/versions/<v>]/infer`, else None."""
    if request.method != "POST":
        return None
    parts = _path_parts(request)
    if len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] == "infer":
        return parts[2], ""
    if len(parts) == 6 and parts[:2] == ["v2", "models"] and parts[3] == "versions" and parts[5] == "infer":
        return parts[2], parts[4]
    return None


async def infer_endpoint(request: HttpRequest, name: str, version: str,
                         infer: Callable[[InferRequest], Awaitable[InferResponse]]) -> HttpResponse:
    """The infer endpoint: decode (JSON or binary extension), `infer`, encode."""
    header_length = request.headers.get(_HEADER_LENGTH)
    hl: int | None = None
    if header_length is not None:
        if not header_length.isdigit():
            raise InvalidArgument(f"Inference-Header-Content-Length must be an integer, got '{header_length}'")
        hl = int(header_length)
    infer_request = v2_json.decode_request(request.body, hl, name, version)
    infer_response = await infer(infer_request)
    body, json_length = v2_json.encode_response(infer_response, infer_request)
    if json_length is None:
        return HttpResponse(200, body)
    return HttpResponse(200, body, _BINARY, [(b"inference-header-content-length", str(json_length).encode())])


class RestFrontend:
    def __init__(self, service: InferenceService) -> None:
        self.service = service
        # infer URL -> (model, version), so the hot path skips routing; bounded, whatever clients send
        self._infer_paths: dict[str, tuple[str, str]] = {}

    async def handle(self, request: HttpRequest) -> HttpResponse:
        if request.error:
            return HttpResponse(400, error_body(request.error))
        try:
            return await self._route(request)
        except Exception as exc:
            return _error_response(exc)

    async def _route(self, request: HttpRequest) -> HttpResponse:
        if request.method == "POST":
            target = self._infer_paths.get(request.path)
            if target is not None:
                return await self._infer(request, *target)
        parts = _path_parts(request)
        method = request.method
        if not parts or parts[0] != "v2":
            raise NotFound(f"no such endpoint: {method} {request.path}")
        rest = parts[1:]
        n = len(rest)
        if n == 0 and method == "GET":
            return _json(self.service.server_metadata())
        if rest[0] == "health" and n == 2 and method == "GET":
            if rest[1] == "live":
                return _OK_EMPTY if self.service.live else _NOT_READY
            if rest[1] == "ready":
                return _OK_EMPTY if self.service.server_ready() else _NOT_READY
        if rest[0] == "models" and n == 2 and rest[1] == "stats" and method == "GET":
            return _json(self.service.statistics())
        if rest[0] == "models" and n >= 2:
            name, version, tail = rest[1], "", rest[2:]
            if len(tail) >= 2 and tail[0] == "versions":
                version, tail = tail[1], tail[2:]
            action = tail[0] if len(tail) == 1 else "" if not tail else None
            handler = self._model_routes.get((method, action)) if action is not None else None
            if handler is RestFrontend._infer and len(self._infer_paths) < 1024:
                self._infer_paths[request.path] = (name, version)
            if handler is not None:
                return await handler(self, request, name, version)
        if rest[0] == "repository" and method == "POST":
            if n == 2 and rest[1] == "index":
                return self._index(request)
            if n == 4 and rest[1] == "models" and rest[3] in ("load", "unload"):
                if rest[3] == "load":
                    await self.service.load_model(rest[2], self._load_parameters(request))
                else:
                    await self.service.unload_model(rest[2])
                return _OK_EMPTY
        raise NotFound(f"no such endpoint: {method} {request.path}")

    # ---- model endpoints ---------------------------------------------------------------------

    async def _infer(self, request: HttpRequest, name: str, version: str) -> HttpResponse:
        return await infer_endpoint(request, name, version, self.service.infer)

    async def _metadata(self, request: HttpRequest, name: str, version: str) -> HttpResponse:
        md = self.service.model_metadata(name, version)
        return _json({
            "name": md.name,
            "versions": list(md.versions),
            "platform": md.platform,
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in md.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in md.outputs],
        })

    async def _ready(self, request: HttpRequest, name: str, version: str) -> HttpResponse:
        return _OK_EMPTY if self.service.model_ready(name, version) else _NOT_READY

    async def _config(self, request: HttpRequest, name: str, version: str) -> HttpResponse:
        return _json(config_to_json(self.service.model_config(name, version)))

    async def _stats(self, request: HttpRequest, name: str, version: str) -> HttpResponse:
        return _json(self.service.statistics(name, version))

    _ModelRoute = Callable[["RestFrontend", HttpRequest, str, str], Awaitable[HttpResponse]]
    _model_routes: dict[tuple[str, str], _ModelRoute] = {
        ("POST", "infer"): _infer,
        ("GET", ""): _metadata,
        ("GET", "ready"): _ready,
        ("GET", "config"): _config,
        ("GET", "stats"): _stats,
    }

    # ---- repository extension -------------------------------------------------------------------

    @staticmethod
    def _load_parameters(request: HttpRequest) -> dict:
        if not request.body.strip():
            return {}
        body = v2_json.loads(request.body, "load request")
        params = body.get("parameters", {}) if isinstance(body, dict) else None
        if not isinstance(params, dict):
            raise InvalidArgument("the load request must be a JSON object with an optional 'parameters' object")
        return params

    def _index(self, request: HttpRequest) -> HttpResponse:
        ready_only = False
        if request.body.strip():
            body = v2_json.loads(request.body)
            if not isinstance(body, dict):
                raise InvalidArgument("the repository index request must be a JSON object")
            ready_only = bool(body.get("ready", False))
        return _json(self.service.repository_index(ready_only))


class ForwardingRestFrontend:
    """REST in a frontend worker process: inference is decoded and encoded here and `infer` runs it
    in the scheduler process; any other request goes to the scheduler's RestFrontend whole."""

    def __init__(self, infer: Callable[[InferRequest], Awaitable[InferResponse]],
                 forward: Callable[[HttpRequest], Awaitable[HttpResponse]]) -> None:
        self.infer = infer
        self.forward = forward
        self._infer_paths: dict[str, tuple[str, str]] = {}

    async def handle(self, request: HttpRequest) -> HttpResponse:
        if request.error:
            return HttpResponse(400, error_body(request.error))
        try:
            target = self._infer_paths.get(request.path) if request.method == "POST" else None
            if target is None:
                target = infer_target(request)
                if target is None:
                    return await self.forward(request)
                if len(self._infer_paths) < 1024:
                    self._infer_paths[request.path] = target
            return await infer_endpoint(request, target[0], target[1], self.infer)
        except Exception as exc:
            return _error_response(exc)
