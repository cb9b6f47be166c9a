"""A frontend worker process (`fuserve serve --frontend-workers N` starts N of them).

It accepts HTTP and gRPC connections on the server's ports (SO_REUSEPORT, beside the other workers),
does the per-request protocol work (framing, V2 decode and encode), and hands each inference to the
scheduler process over its link (`server/ipc.py`), where the one batcher per model forms batches
from every worker's requests. Any other request (health, metadata, statistics, model control) is
passed to the scheduler whole and answered there, so state lives in one place.

Started by `server/workers.py` as `python -m server.frontend_worker '<json arguments>'`; not a
command for users.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from . import access, ipc, tls
from ._proto import grpc_service_pb2 as pb
from .codecs.v2_proto import Serialized
from .context import CallContext
from .errors import Unavailable
from .frontends.grpc_server import CallError, GrpcServer, Method
from .frontends.grpc_service import SERVICE, GrpcInfer, error_status
from .frontends.http_server import HttpLimits, HttpRequest, HttpResponse, HttpServer
from .frontends.rest import ForwardingRestFrontend, error_body
from .http2.connection import Limits as H2Limits
from .types import InferRequest, InferResponse
from .workers import reuseport_socket

log = logging.getLogger("fuserve.worker")


class SchedulerClient:
    """The worker's end of the link: each call waits for its own answer."""

    def __init__(self) -> None:
        self.link: ipc.Link | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.streams: dict[int, asyncio.Queue] = {}  # streamed answers: their parts as they arrive
        self._ids = itertools.count(1)
        # kept: under uvloop, asyncio.get_running_loop() costs a getpid() system call
        self.loop = asyncio.get_running_loop()
        # inferences of this loop turn, by ipc.group_key: sent as groups once the turn's handlers ran
        self._grouping: dict[tuple, list[tuple[int, InferRequest]]] = {}

    def on_messages(self, messages: list[ipc.Message]) -> None:
        for kind, rid, payload in messages:
            if kind == "gok":  # a group's answer, one response per member
                response, members = payload
                for member, answer in ipc.split_group(ipc.unpack_response(response), members):
                    fut = self.pending.pop(member, None)
                    if fut is not None and not fut.done():
                        fut.set_result(answer)
                continue
            parts = self.streams.get(rid)
            if parts is not None:
                parts.put_nowait((kind, payload))
                continue
            fut = self.pending.pop(rid, None)
            if fut is None or fut.done():
                continue
            if kind == "ok":
                fut.set_result(ipc.unpack_response(payload))
            elif kind == "err":
                fut.set_exception(ipc.unpack_error(payload))
            elif kind == "shttp":  # the head of a streamed answer: its parts follow
                fut.set_result((payload, LinkStream(self, rid, bytes)))
            else:
                fut.set_result(payload)

    def on_lost(self) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(Unavailable("the scheduler process is gone"))
        self.pending.clear()
        for parts in self.streams.values():
            parts.put_nowait(("lost", None))

    async def _call(self, kind: str, payload: Any) -> Any:
        if self.link is None or self.link.transport is None:
            raise Unavailable("the scheduler process is gone")
        rid = next(self._ids)
        fut = self.pending[rid] = self.loop.create_future()
        self.link.send((kind, rid, payload))
        return await self._answer(rid, fut)

    async def _answer(self, rid: int, fut: asyncio.Future) -> Any:
        assert self.link is not None
        try:
            return await fut
        except asyncio.CancelledError:
            # the client went away: drop the queued work (or the streamed answer whose head just came)
            waiting = self.pending.pop(rid, None) is not None
            streamed = self.streams.pop(rid, None) is not None
            if (waiting or streamed) and self.link.transport is not None:
                self.link.send(("cancel", rid, None))
            raise

    async def infer(self, request: InferRequest) -> InferResponse:
        key = ipc.group_key(request)
        if key is None:
            result: InferResponse = await self._call("infer", ipc.pack_request(request))
            return result
        if self.link is None or self.link.transport is None:
            raise Unavailable("the scheduler process is gone")
        rid = next(self._ids)
        fut = self.pending[rid] = self.loop.create_future()
        if not self._grouping:
            self.loop.call_soon(self._send_groups)
        self._grouping.setdefault(key, []).append((rid, request))
        grouped: InferResponse = await self._answer(rid, fut)
        return grouped

    def _send_groups(self) -> None:
        """The turn's inferences: one alone as itself, several with one key as a group. A member
        whose client left meanwhile (no longer pending) is left out."""
        groups, self._grouping = self._grouping, {}
        link = self.link
        if link is None or link.transport is None:
            return  # on_lost answered them
        for members in groups.values():
            members = [m for m in members if m[0] in self.pending]
            try:
                if len(members) == 1:
                    link.send(("infer", members[0][0], ipc.pack_request(members[0][1])))
                elif members:
                    link.send(("group", members[0][0], ipc.pack_group(members)))
            except Exception as exc:  # every member is answered, whatever went wrong
                log.exception("could not send a group of %d requests", len(members))
                for rid, _ in members:
                    fut = self.pending.pop(rid, None)
                    if fut is not None and not fut.done():
                        fut.set_exception(exc)

    async def refused(self, name: str, version: str, exc: Exception) -> None:
        """A request that did not decode here: the scheduler judges its model (InferenceService.refused)
        and answers with the error to give, NotFound or this one (counted there)."""
        await self._call("refused", (name, version, type(exc).__name__, str(exc)))

    async def http(self, request: HttpRequest) -> HttpResponse:
        answer = await self._call("http", (request.method, request.path, request.headers, request.body))
        if isinstance(answer, tuple) and len(answer) == 2:  # ("shttp" head, its parts)
            (status, body, content_type, headers), parts = answer
            response = HttpResponse(status, body, content_type, headers)
            response.stream = parts
            return response
        status, body, content_type, headers = answer
        return HttpResponse(status, body, content_type, headers)

    def grpc_stream_forwarder(self, path: str) -> Any:
        """A streaming method (ModelStreamInfer) answered in the scheduler process: each message's
        replies, serialized there, arrive here as parts."""
        def call(message: bytes, ctx: CallContext) -> LinkStream:
            if self.link is None or self.link.transport is None:
                raise Unavailable("the scheduler process is gone")
            rid = next(self._ids)
            stream = LinkStream(self, rid, Serialized)
            self.link.send(("gstream", rid, (path, message, dict(ctx.headers), ctx.peer)))
            return stream
        return call

    def grpc_forwarder(self, path: str) -> Any:
        async def call(message: bytes, ctx: CallContext) -> Serialized:
            code, text, reply = await self._call("grpc", (path, message, dict(ctx.headers), ctx.peer))
            if code:
                raise CallError(code, text)  # the scheduler's answer, passed on as it is
            return Serialized(reply)
        return call


class LinkStream:
    """A streamed answer's parts as they arrive on the link (an async iterator). Every few parts
    passed on return credit to the scheduler; closing it early (the client went away) cancels the
    request there."""

    def __init__(self, client: SchedulerClient, rid: int, wrap: Callable[[bytes], Any]) -> None:
        self.client, self.rid, self.wrap = client, rid, wrap
        self.parts: asyncio.Queue = asyncio.Queue()  # bounded by the scheduler's credit window
        client.streams[rid] = self.parts
        self.taken = 0
        self.done = False

    def __aiter__(self) -> LinkStream:
        return self

    async def __anext__(self) -> Any:
        if self.done:
            raise StopAsyncIteration
        kind, payload = await self.parts.get()
        if kind == "part":
            self.taken += 1
            if self.taken == ipc.CREDIT_BATCH:
                self._send(("credit", self.rid, self.taken))
                self.taken = 0
            return [self.wrap(p) for p in payload] if type(payload) is list else self.wrap(payload)
        self._finish()
        if kind == "end":
            raise StopAsyncIteration
        if kind == "gerr":
            raise CallError(*payload)
        raise Unavailable("the scheduler process is gone")

    async def aclose(self) -> None:
        if not self.done:
            self._finish()
            self._send(("cancel", self.rid, None))

    def _finish(self) -> None:
        self.done = True
        self.client.streams.pop(self.rid, None)

    def _send(self, message: ipc.Message) -> None:
        link = self.client.link
        if link is not None and link.transport is not None:
            link.send(message)


def _listening(host: str, port: int) -> socket.socket:
    sock = reuseport_socket(host, port)
    sock.listen(2048)
    return sock


async def serve(args: dict) -> int:
    try:  # the scheduler checked the same files before starting us
        contexts = tls.server_contexts(tls.TlsSettings.from_dict(d) for d in args.get("tls", ()))
    except tls.TlsError as exc:
        log.error("cannot start: %s", exc)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    client = SchedulerClient()

    def lost() -> None:
        client.on_lost()
        stop.set()

    client.link = await ipc.open_link(socket.socket(fileno=args["link_fd"]), client.on_messages, lost)
    http = grpc = None
    listen = args["listen"]
    if "http" in listen:
        http_policy = access.Policy("http", args.get("http_restricted_api", ()))
        http = HttpServer(ForwardingRestFrontend(client.infer, client.http, client.refused, http_policy).handle,
                          max_body=args["max_input_size"], error_body=error_body,
                          limits=HttpLimits(**args.get("http_limits", {})))
        await http.start("", 0, sock=_listening(*listen["http"]), ssl=contexts.get("http"))
    if "grpc" in listen:
        names = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
        methods = {SERVICE + name: Method(bytes, client.grpc_forwarder(SERVICE + name)) for name in names}
        # ModelStreamInfer: decoded here and sent as an inference, like ModelInfer; a decoupled model's
        # request (refused as such) goes whole to the scheduler process, its replies coming back as parts
        methods.update(GrpcInfer(client.infer, refused=client.refused, forward_stream=client.grpc_stream_forwarder(
            SERVICE + "ModelStreamInfer")).methods())
        authorize = access.grpc_authorize(access.Policy("grpc", args.get("grpc_restricted_protocol", ())))
        grpc = GrpcServer(methods, max_message=args["max_input_size"], error_status=error_status,
                          authorize=authorize, limits=H2Limits(**args.get("grpc_limits", {})))
        await grpc.start("", 0, sock=_listening(*listen["grpc"]), ssl=contexts.get("grpc"))
    client.link.send(("hello", 0, os.getpid()))
    await stop.wait()
    # The scheduler has drained (or is gone): close listeners, finish what is open, exit.
    if grpc is not None:
        await grpc.stop(grace=2.0)
    if http is not None:
        await http.stop()
    client.link.close()
    return 0


def main() -> int:
    args = json.loads(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the scheduler, which stops us in order
    logging.basicConfig(level=logging.DEBUG if args.get("log_verbose") else logging.INFO,
                        format=f"%(asctime)s %(levelname).1s worker-{args.get('index', 0)} %(name)s: %(message)s")
    logging.getLogger("hpack").setLevel(logging.INFO)  # at DEBUG it logs every header: restricted-API values
    try:
        import uvloop

        return uvloop.run(serve(args))
    except ImportError:
        return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
