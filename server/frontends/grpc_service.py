"""KServe V2 gRPC: Triton's `inference.GRPCInferenceService`, served by `frontends/grpc_server.py`.

Each method converts the message in, calls the service, converts out. Errors from the tree in
`server.errors` become the class's gRPC status code in `error_status` (and, on the stream, an
`error_message` on that request's reply), nowhere else. Restricted groups
(--grpc-restricted-protocol, `server/access.py`) are checked before any of this, by the transport's
`authorize` hook when the call opens (`access.grpc_authorize`, passed to GrpcServer in app.py and
frontend_worker.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

from google.protobuf import json_format

from .. import access, log_settings
from .._proto import grpc_service_pb2 as pb
from ..codecs import v2_proto
from ..context import CallContext
from ..errors import DecoupledUnary, InvalidArgument, ServerError, Unsupported, as_server_error
from ..service import InferenceService
from ..types import InferRequest, InferResponse, Responses
from .grpc_server import Method, Reply

log = logging.getLogger(__name__)

SERVICE = access.GRPC_SERVICE_PREFIX  # "/inference.GRPCInferenceService/"


def error_status(exc: BaseException) -> tuple[int, str]:
    err = as_server_error(exc)
    if type(err) is ServerError:
        log.error("internal error in a gRPC call: %s", err.message)
    return err.grpc_code.value[0], err.message


Infer = Callable[[InferRequest], Awaitable[InferResponse]]
# InferenceService.submit: queue now, answer by callback, return the cancel function
Submit = Callable[[InferRequest, Callable[[InferResponse | None, BaseException | None], None]], Callable[[], None]]
# InferenceService.stream: a request's responses as they come, each with whether it is the last
Stream = Callable[[InferRequest], AsyncIterator[Responses]]


class GrpcInfer:
    """ModelInfer and ModelStreamInfer around an `infer` call: the service's own, or (in a frontend
    worker process) the link to the scheduler process. Given the service's `submit` too, ModelInfer
    runs without a task or coroutine (Method.start): ~2 us of a lone call's ~5 us in the transport."""

    def __init__(self, infer: Infer, submit: Submit | None = None, stream: Stream | None = None,
                 decoupled: Callable[[str, str], bool] | None = None,
                 forward_stream: Callable[[bytes, CallContext], AsyncIterator[Any]] | None = None,
                 refused: Callable[[str, str, Exception], Awaitable[None]] | None = None,
                 refused_now: Callable[[str, str, Exception], None] | None = None) -> None:
        self.infer = infer
        # A request that does not decode is judged after its model (rest.Refused): `refused_now`
        # in this process (the service's, also for `submit`), `refused` over a frontend worker's link.
        self.refused = refused
        self.refused_now = refused_now
        self.submit = submit
        self.stream = stream  # InferenceService.stream; None in a frontend worker
        self.decoupled = decoupled
        # In a frontend worker: where a decoupled model's stream request goes whole (the scheduler
        # process answers it; its serialized replies come back one by one)
        self.forward_stream = forward_stream

    def methods(self) -> dict[str, Method]:
        start = self.start_model_infer if self.submit is not None else None
        return {SERVICE + "ModelInfer": Method(pb.ModelInferRequest.FromString, self.model_infer, start=start),
                SERVICE + "ModelStreamInfer": Method(pb.ModelInferRequest.FromString, self.stream_infer,
                                                     streaming=True, replies=True)}

    async def model_infer(self, request: pb.ModelInferRequest, ctx: CallContext) -> pb.ModelInferResponse:
        try:
            response = await self.infer(await self._decoded(request))
        except DecoupledUnary:
            raise Unsupported(_UNARY_DECOUPLED) from None
        return v2_proto.encode_response(response)

    def start_model_infer(self, request: pb.ModelInferRequest, ctx: CallContext, reply: Reply) -> Callable[[], None]:
        """ModelInfer through `submit`: what `model_infer` does, with the answer by callback."""
        def answered(response: InferResponse | None, exc: BaseException | None) -> None:
            if exc is not None:
                return reply(None, exc)
            try:
                message = v2_proto.encode_response(cast(InferResponse, response))
            except Exception as err:
                return reply(None, err)
            reply(message, None)

        try:
            decoded = v2_proto.decode_request(request)
        except InvalidArgument as exc:
            if self.refused_now is not None:
                self.refused_now(request.model_name, request.model_version, exc)
            raise
        try:
            return cast(Submit, self.submit)(decoded, answered)
        except DecoupledUnary:
            raise Unsupported(_UNARY_DECOUPLED) from None

    async def _decoded(self, request: pb.ModelInferRequest) -> InferRequest:
        try:
            return v2_proto.decode_request(request)
        except InvalidArgument as exc:
            if self.refused_now is not None:
                self.refused_now(request.model_name, request.model_version, exc)
            elif self.refused is not None:
                await self.refused(request.model_name, request.model_version, exc)
            raise

    async def stream_infer(self, request: pb.ModelInferRequest,
                           ctx: CallContext) -> AsyncIterator[Any]:
        """One request on ModelStreamInfer: its replies (a message, or a list of those that leave
        together), as Triton 2.51 sends them. A decoupled model's data responses carry
        `triton_final_response: false`; its flag-only final is an empty response with
        `triton_final_response: true`, sent only when the request asked for it
        (`triton_enable_empty_final_response`). A failure becomes a reply's error_message, which
        ends that request (nothing follows it), and the stream goes on."""
        try:
            infer_request = await self._decoded(request)
            empty_final = bool(infer_request.parameters.pop(_EMPTY_FINAL, False))
            decoupled = self.stream is not None and self.decoupled is not None and \
                self.decoupled(infer_request.model_name, infer_request.model_version)
            if not decoupled:
                try:
                    response = await self.infer(infer_request)
                except DecoupledUnary:
                    if self.forward_stream is None:
                        raise
                    replies = self.forward_stream(request.SerializeToString(), ctx)
                    try:
                        async for reply in replies:
                            yield reply
                    finally:
                        await replies.aclose()  # type: ignore[attr-defined]
                    return
                yield pb.ModelStreamInferResponse(infer_response=v2_proto.encode_response(response))
                return
            encoder: v2_proto.StreamReplies | None = None
            async for batch in cast(Stream, self.stream)(infer_request):
                together: list[Any] = []
                for one, final in batch.items:
                    if type(one) is dict:  # a decoupled model's arrays: straight to wire form
                        if encoder is None:
                            encoder = v2_proto.StreamReplies(batch.model_name, batch.model_version, batch.id,
                                                             batch.outputs)
                        together.append(encoder.encode(one, final))
                    elif one is None:
                        if empty_final:
                            together.append(_flag_only_final(infer_request))
                    else:
                        response = cast(InferResponse, one)
                        response.parameters["triton_final_response"] = final
                        together.append(_stream_reply(v2_proto.encode_response(response)))
                if together:
                    yield together  # they leave in one write (grpc_server.Method.replies)
        except Exception as exc:
            yield pb.ModelStreamInferResponse(
                error_message=as_server_error(exc).message,
                infer_response=pb.ModelInferResponse(id=request.id, model_name=request.model_name,
                                                     model_version=request.model_version))


_UNARY_DECOUPLED = "ModelInfer RPC doesn't support models with decoupled transaction policy"
_EMPTY_FINAL = "triton_enable_empty_final_response"  # what tritonclient's enable_empty_final_response sends


def _stream_reply(response: pb.ModelInferResponse) -> v2_proto.Serialized:
    """ModelStreamInferResponse{infer_response: response}, serialized without copying the response
    into a wrapper message: field 2, length-delimited."""
    inner = response.SerializeToString()
    return v2_proto.Serialized(b"\x12" + v2_proto.varint(len(inner)) + inner)


def _flag_only_final(request: InferRequest) -> pb.ModelStreamInferResponse:
    message = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                    id=request.id)
    message.parameters["triton_final_response"].bool_param = True
    return pb.ModelStreamInferResponse(infer_response=message)


class GrpcFrontend:
    def __init__(self, service: InferenceService) -> None:
        self.service = service

    def methods(self) -> dict[str, Method]:
        handlers: dict[str, tuple[Any, Callable[[Any, CallContext], Awaitable[Any]]]] = {
            "ServerLive": (pb.ServerLiveRequest, self.server_live),
            "ServerReady": (pb.ServerReadyRequest, self.server_ready),
            "ModelReady": (pb.ModelReadyRequest, self.model_ready),
            "ServerMetadata": (pb.ServerMetadataRequest, self.server_metadata),
            "ModelMetadata": (pb.ModelMetadataRequest, self.model_metadata),
            "ModelConfig": (pb.ModelConfigRequest, self.model_config),
            "ModelStatistics": (pb.ModelStatisticsRequest, self.model_statistics),
            "RepositoryIndex": (pb.RepositoryIndexRequest, self.repository_index),
            "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, self.repository_model_load),
            "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest, self.repository_model_unload),
            "LogSettings": (pb.LogSettingsRequest, self.log_settings),
            "TraceSetting": (pb.TraceSettingRequest, self.trace_setting),
            "SystemSharedMemoryStatus": (pb.SystemSharedMemoryStatusRequest, self.shm_status),
            "SystemSharedMemoryRegister": (pb.SystemSharedMemoryRegisterRequest, self.shm_register),
            "SystemSharedMemoryUnregister": (pb.SystemSharedMemoryUnregisterRequest, self.shm_unregister),
            "CudaSharedMemoryStatus": (pb.CudaSharedMemoryStatusRequest, self.cuda_shm_status),
            "CudaSharedMemoryRegister": (pb.CudaSharedMemoryRegisterRequest, self.cuda_shm_register),
            "CudaSharedMemoryUnregister": (pb.CudaSharedMemoryUnregisterRequest, self.cuda_shm_unregister),
        }
        methods = {SERVICE + name: Method(cls.FromString, call) for name, (cls, call) in handlers.items()}
        methods.update(GrpcInfer(self.service.infer, self.service.submit, self.service.stream,
                                 self.service.is_decoupled, refused_now=self.service.refused).methods())
        return methods

    async def server_live(self, request: pb.ServerLiveRequest, ctx: CallContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.service.live)

    async def server_ready(self, request: pb.ServerReadyRequest, ctx: CallContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.server_ready())

    async def model_ready(self, request: pb.ModelReadyRequest, ctx: CallContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.service.model_ready(request.name, request.version))

    async def server_metadata(self, request: pb.ServerMetadataRequest, ctx: CallContext) -> pb.ServerMetadataResponse:
        md = self.service.server_metadata()
        return pb.ServerMetadataResponse(name=md["name"], version=md["version"], extensions=md["extensions"])

    async def model_metadata(self, request: pb.ModelMetadataRequest, ctx: CallContext) -> pb.ModelMetadataResponse:
        md = self.service.model_metadata(request.name, request.version)
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=md.name, versions=md.versions, platform=md.platform,
            inputs=[tm(name=t.name, datatype=t.datatype, shape=t.shape) for t in md.inputs],
            outputs=[tm(name=t.name, datatype=t.datatype, shape=t.shape) for t in md.outputs],
        )

    async def model_config(self, request: pb.ModelConfigRequest, ctx: CallContext) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.service.model_config(request.name, request.version))

    async def model_statistics(self, request: pb.ModelStatisticsRequest,
            ctx: CallContext) -> pb.ModelStatisticsResponse:
        stats = self.service.statistics(request.name, request.version)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def repository_index(self, request: pb.RepositoryIndexRequest,
            ctx: CallContext) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse.ModelIndex
        rows = self.service.repository_index(request.ready)
        return pb.RepositoryIndexResponse(models=[index(**row) for row in rows])

    async def trace_setting(self, request: pb.TraceSettingRequest, ctx: CallContext) -> pb.TraceSettingResponse:
        """The trace settings (trace_settings.py): each value a list of strings, an empty list clears."""
        changes: dict[str, Any] = {}
        for key, value in request.settings.items():
            values = list(value.value)
            if key == "trace_level" or not values:
                changes[key] = values or None
            elif len(values) > 1:
                raise InvalidArgument(f"expect only 1 value for '{key}'")
            else:
                changes[key] = values[0]
        reply = pb.TraceSettingResponse()
        for key, now in self.service.trace_setting(request.model_name, changes).items():
            reply.settings[key].value.extend(now if isinstance(now, list) else [now])
        return reply

    async def log_settings(self, request: pb.LogSettingsRequest, ctx: CallContext) -> pb.LogSettingsResponse:
        """The log settings (server/log_settings.py): those the request names are changed first."""
        changes = {}
        for key, value in request.settings.items():
            choice = value.WhichOneof("parameter_choice")
            changes[key] = None if choice is None else getattr(value, choice)
        reply = pb.LogSettingsResponse()
        for key, now in log_settings.update(changes).items():
            if type(now) is bool:
                reply.settings[key].bool_param = now
            elif type(now) is int:
                reply.settings[key].uint32_param = now
            else:
                reply.settings[key].string_param = now
        return reply

    # ---- shared memory (server/shared_memory.py) ----------------------------------------------

    async def shm_status(self, request: pb.SystemSharedMemoryStatusRequest,
                         ctx: CallContext) -> pb.SystemSharedMemoryStatusResponse:
        reply = pb.SystemSharedMemoryStatusResponse()
        for region in self.service.shared_memory.status(request.name):
            reply.regions[region["name"]].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(**region))
        return reply

    async def shm_register(self, request: pb.SystemSharedMemoryRegisterRequest,
                           ctx: CallContext) -> pb.SystemSharedMemoryRegisterResponse:
        self.service.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def shm_unregister(self, request: pb.SystemSharedMemoryUnregisterRequest,
                             ctx: CallContext) -> pb.SystemSharedMemoryUnregisterResponse:
        await self.service.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def cuda_shm_status(self, request: pb.CudaSharedMemoryStatusRequest,
                              ctx: CallContext) -> pb.CudaSharedMemoryStatusResponse:
        self.service.shared_memory.cuda_status(request.name)  # none is ever registered
        return pb.CudaSharedMemoryStatusResponse()

    async def cuda_shm_register(self, request: pb.CudaSharedMemoryRegisterRequest,
                                ctx: CallContext) -> pb.CudaSharedMemoryRegisterResponse:
        self.service.shared_memory.cuda_register(request.name)
        return pb.CudaSharedMemoryRegisterResponse()

    async def cuda_shm_unregister(self, request: pb.CudaSharedMemoryUnregisterRequest,
                                  ctx: CallContext) -> pb.CudaSharedMemoryUnregisterResponse:
        self.service.shared_memory.cuda_unregister(request.name)
        return pb.CudaSharedMemoryUnregisterResponse()

    async def repository_model_load(self, request: pb.RepositoryModelLoadRequest,
            ctx: CallContext) -> pb.RepositoryModelLoadResponse:
        await self.service.load_model(request.model_name, v2_proto.parameters_from_proto(request.parameters))
        return pb.RepositoryModelLoadResponse()

    async def repository_model_unload(self,
                                      request: pb.RepositoryModelUnloadRequest,
                                      ctx: CallContext) -> pb.RepositoryModelUnloadResponse:
        await self.service.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()
