#!/usr/bin/env python3
"""The floor a transport sets: a server that answers every request with a canned reply.

    python loadtests/transport_floors.py ours PORT       # fuserve's HTTP/1.1 server, fixed 200 JSON
    python loadtests/transport_floors.py uvicorn PORT    # uvicorn + httptools + uvloop, bare ASGI app
    python loadtests/transport_floors.py grpc-aio PORT   # grpcio's grpc.aio, canned ModelInferResponse
    python loadtests/transport_floors.py h2 PORT         # pure-Python `h2` library, same reply
    python loadtests/transport_floors.py ours-grpc PORT  # fuserve's gRPC transport, same reply

Pin it (`taskset -c 1`) and drive it from the other core: wrk with wrk_v2.lua for HTTP, h2load for
gRPC (see docs/perf.md, "Choosing the transports"). uvicorn and h2 are not fuserve dependencies:
`pip install uvicorn h2` to measure them.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from typing import Any

REPLY_JSON = b'{"model_name":"add_sub","outputs":[]}'


def ours(port: int) -> None:
    import uvloop

    from server.frontends.http_server import HttpResponse, HttpServer

    async def handler(request: object) -> HttpResponse:
        return HttpResponse(200, REPLY_JSON)

    async def main() -> None:
        await HttpServer(handler, max_body=1 << 26, error_body=str.encode).start("127.0.0.1", port)
        _gc_as_served()
        await asyncio.Event().wait()

    uvloop.run(main())


def uvicorn(port: int) -> None:
    import uvicorn as uv

    async def app(scope: dict, receive: object, send: object) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)  # type: ignore[operator]
        await send({"type": "http.response.start", "status": 200,  # type: ignore[operator]
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": REPLY_JSON})  # type: ignore[operator]

    uv.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="error", access_log=False)


def _canned_grpc() -> bytes:
    from server._proto import grpc_service_pb2 as pb

    return pb.ModelInferResponse(model_name="add_sub", model_version="1").SerializeToString()


def grpc_aio(port: int) -> None:
    import grpc

    from server._proto import grpc_service_pb2 as pb
    from server._proto import grpc_service_pb2_grpc as pbg

    reply = pb.ModelInferResponse.FromString(_canned_grpc())

    class Canned(pbg.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request: object, context: object) -> object:
            return reply

    async def main() -> None:
        server = grpc.aio.server()
        pbg.add_GRPCInferenceServiceServicer_to_server(Canned(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def h2(port: int) -> None:
    import uvloop
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import DataReceived, RequestReceived, StreamEnded

    from server._proto import grpc_service_pb2 as pb

    raw = _canned_grpc()
    frame = struct.pack(">BI", 0, len(raw)) + raw

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
            self.conn.initiate_connection()
            transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]
            self.bodies: dict[int, list[bytes]] = {}

        def data_received(self, data: bytes) -> None:
            for event in self.conn.receive_data(data):
                if isinstance(event, RequestReceived):
                    self.bodies[event.stream_id] = []
                elif isinstance(event, DataReceived):
                    self.bodies[event.stream_id].append(event.data)
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, StreamEnded):
                    pb.ModelInferRequest.FromString(b"".join(self.bodies.pop(event.stream_id))[5:])
                    self.conn.send_headers(event.stream_id, [(":status", "200"), ("content-type", "application/grpc")])
                    self.conn.send_data(event.stream_id, frame)
                    self.conn.send_headers(event.stream_id, [("grpc-status", "0")], end_stream=True)
            self.transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]

    async def main() -> None:
        await asyncio.get_running_loop().create_server(Protocol, "127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(main())


def _gc_as_served() -> None:
    """The collector settings `fuserve serve` runs with (server/app.py): long-lived objects frozen,
    collections less often."""
    import gc

    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def ours_grpc(port: int) -> None:
    import uvloop

    from server._proto import grpc_service_pb2 as pb
    from server.frontends.grpc_server import GrpcServer, Method

    reply = pb.ModelInferResponse.FromString(_canned_grpc())

    async def infer(request: object, ctx: object) -> object:
        return reply

    def start(request: object, ctx: object, answer: Any) -> Any:
        # ModelInfer's path since Method.start (no task): the canned reply one loop turn later, as
        # InferenceService.submit answers a request executed inline
        asyncio.get_running_loop().call_soon(answer, reply, None)
        return lambda: None

    async def main() -> None:
        # a tree from before Method.start serves the same reply through a task
        extra = {"start": start} if "start" in getattr(Method, "__dataclass_fields__", {}) else {}
        methods = {"/inference.GRPCInferenceService/ModelInfer": Method(pb.ModelInferRequest.FromString, infer,
                                                                        **extra)}
        server = GrpcServer(methods, max_message=1 << 26, error_status=lambda exc: (13, str(exc)))
        await server.start("127.0.0.1", port)
        _gc_as_served()
        await asyncio.Event().wait()

    uvloop.run(main())


if __name__ == "__main__":
    servers = {"ours": ours, "ours-grpc": ours_grpc, "uvicorn": uvicorn, "grpc-aio": grpc_aio, "h2": h2}
    servers[sys.argv[1]](int(sys.argv[2]))
