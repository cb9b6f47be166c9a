"""KServe V2 REST: route a request, check it, decode it, call the service, encode the answer.

ROUTES is every endpoint, each with its restricted-API group (`server/access.py`); the Router
matches a path to its route and runs the group's check before any handler, for both frontends here
(RestFrontend, and ForwardingRestFrontend in a `--frontend-workers` process). Errors from the tree
in `server.errors` become `{"error": "..."}` with the class's HTTP status here, in
`_error_response`, and nowhere else.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

import numpy as np
import orjson

from .. import access, log_settings
from ..codecs import generate, v2_json
from ..errors import DecoupledUnary, InvalidArgument, NotFound, ServerError, Unsupported, as_server_error
from ..model_config import config_to_json
from ..service import InferenceService
from ..types import InferRequest, InferResponse, Responses
from .http_messages import HttpRequest, HttpResponse
from .routes import Router

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


def _json_object(request: HttpRequest, what: str) -> dict:
    """A request body that must be a JSON object ({} for an empty body)."""
    if not request.body.strip():
        return {}
    body = v2_json.loads(request.body, what)
    if type(body) is not dict:
        raise InvalidArgument(f"the {what} must be a JSON object")
    return body


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
            "trace": self._trace,
            "model_trace": self._trace,
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
            "shm_status": self._shm_status,
            "shm_register": self._shm_register,
            "shm_unregister": self._shm_unregister,
            "cuda_shm_status": self._cuda_shm_status,
            "cuda_shm_register": self._cuda_shm_register,
            "cuda_shm_unregister": self._cuda_shm_unregister,
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
        return _json(log_settings.update(_json_object(request, "log settings request")))

    async def _trace(self, request: HttpRequest, model: str = "") -> HttpResponse:
        """GET: the trace settings (global, or a model's); POST: change those named, then them."""
        changes = _json_object(request, "trace settings request") if request.method == "POST" else None
        return _json(self.service.trace_setting(model, changes))

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

    # ---- shared memory extensions (server/shared_memory.py) ---------------------------------------

    async def _shm_status(self, request: HttpRequest, region: str = "") -> HttpResponse:
        return _json(self.service.shared_memory.status(region))

    async def _shm_register(self, request: HttpRequest, region: str = "") -> HttpResponse:
        shm = self.service.shared_memory
        shm.check_allowed()  # refused before the body is read: nothing is mapped, nothing echoed
        body = _json_object(request, "shared memory register request")
        for field in ("key", "byte_size"):
            if field not in body:
                raise InvalidArgument(f"Shared memory register request has no '{field}' field")
        shm.register(region, body["key"], body.get("offset", 0), body["byte_size"])
        return _OK_EMPTY

    async def _shm_unregister(self, request: HttpRequest, region: str = "") -> HttpResponse:
        await self.service.shared_memory.unregister(region)
        return _OK_EMPTY

    async def _cuda_shm_status(self, request: HttpRequest, region: str = "") -> HttpResponse:
        return _json(self.service.shared_memory.cuda_status(region))

    async def _cuda_shm_register(self, request: HttpRequest, region: str = "") -> HttpResponse:
        self.service.shared_memory.cuda_register(region)
        return _OK_EMPTY

    async def _cuda_shm_unregister(self, request: HttpRequest, region: str = "") -> HttpResponse:
        self.service.shared_memory.cuda_unregister(region)
        return _OK_EMPTY

    # ---- repository extension -------------------------------------------------------------------

    async def _load(self, request: HttpRequest, name: str) -> HttpResponse:
        await self.service.load_model(name, self._load_parameters(request))
        return _OK_EMPTY

    async def _unload(self, request: HttpRequest, name: str) -> HttpResponse:
        await self.service.unload_model(name)
        return _OK_EMPTY

    @staticmethod
    def _load_parameters(request: HttpRequest) -> dict:
        params = _json_object(request, "load request").get("parameters", {})
        if not isinstance(params, dict):
            raise InvalidArgument("the load request must be a JSON object with an optional 'parameters' object")
        return params

    async def _index(self, request: HttpRequest) -> HttpResponse:
        ready_only = bool(_json_object(request, "repository index request").get("ready", False))
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
