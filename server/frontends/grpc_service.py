"""KServe V2 gRPC (Triton's `inference.GRPCInferenceService`) on grpc.aio.

Each method converts the message in, calls the service, converts out. Errors from the tree in
`server.errors` become the class's gRPC status code in `_unary` (and, on the stream, an
`error_message` on that request's reply), nowhere else. Methods fuserve does not offer (shared
memory, trace, logging) are left to the generated base class, which answers UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format

from .._proto import grpc_service_pb2 as pb
from .._proto import grpc_service_pb2_grpc as pb_grpc
from ..codecs import v2_proto
from ..errors import ServerError, as_server_error
from ..service import InferenceService

log = logging.getLogger(__name__)


def _unary(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def wrapper(self: GrpcFrontend, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except Exception as exc:
            err = as_server_error(exc)
            if type(err) is ServerError:
                log.error("internal error in %s: %s", method.__name__, err.message)
            await context.abort(err.grpc_code, err.message)

    return wrapper


class GrpcFrontend(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: InferenceService) -> None:
        self.service = service

    @_unary
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.service.live)

    @_unary
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.server_ready())

    @_unary
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.service.model_ready(request.name, request.version))

    @_unary
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        md = self.service.server_metadata()
        return pb.ServerMetadataResponse(name=md["name"], version=md["version"], extensions=md["extensions"])

    @_unary
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        md = self.service.model_metadata(request.name, request.version)
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=md.name, versions=md.versions, platform=md.platform,
            inputs=[tm(name=t.name, datatype=t.datatype, shape=t.shape) for t in md.inputs],
            outputs=[tm(name=t.name, datatype=t.datatype, shape=t.shape) for t in md.outputs],
        )

    @_unary
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.service.model_config(request.name, request.version))

    @_unary
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        response = await self.service.infer(v2_proto.decode_request(request))
        return v2_proto.encode_response(response)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: Any) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request is answered on the stream as it completes; a bad one errors only itself."""
        replies: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()

        async def answer(msg: pb.ModelInferRequest) -> None:
            try:
                response = await self.service.infer(v2_proto.decode_request(msg))
                reply = pb.ModelStreamInferResponse(infer_response=v2_proto.encode_response(response))
            except Exception as exc:
                reply = pb.ModelStreamInferResponse(
                    error_message=as_server_error(exc).message,
                    infer_response=pb.ModelInferResponse(id=msg.id, model_name=msg.model_name,
                                                         model_version=msg.model_version))
            await replies.put(reply)

        async def read_all() -> None:
            pending: set[asyncio.Task] = set()
            try:
                async for msg in request_iterator:
                    task = asyncio.ensure_future(answer(msg))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if pending:
                    await asyncio.gather(*pending)
            finally:
                await replies.put(None)

        reader = asyncio.ensure_future(read_all())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
        finally:
            reader.cancel()

    @_unary
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        stats = self.service.statistics(request.name, request.version)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    @_unary
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse.ModelIndex
        rows = self.service.repository_index(request.ready)
        return pb.RepositoryIndexResponse(models=[index(**row) for row in rows])

    @_unary
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: Any) -> pb.RepositoryModelLoadResponse:
        await self.service.load_model(request.model_name, v2_proto.parameters_from_proto(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @_unary
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: Any) -> pb.RepositoryModelUnloadResponse:
        await self.service.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()


async def start_grpc(service: InferenceService, address: str, port: int,
                     max_message: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),
    ])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(GrpcFrontend(service), server)
    bound = server.add_insecure_port(f"{address}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {address}:{port}")
    await server.start()
    return server, bound
