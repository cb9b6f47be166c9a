"""The scheduler process's side of `--frontend-workers N`: start the workers, answer their links.

This process holds the HTTP and gRPC ports and never accepts on them; N worker processes
(`server/frontend_worker.py`) listen on the same ports (SO_REUSEPORT) and serve every connection. A worker sends
each decoded inference here, where `InferenceService.infer` runs it through the model's one
batcher, and every other request whole, answered by this process's own REST and gRPC frontends.
So statistics, metrics, model control and batching see all traffic in one place, and the
protocol work (~2/3 of a request's CPU) spreads over the workers' cores.

A streamed answer (a decoupled model's ModelStreamInfer replies, /generate_stream's events)
crosses the link part by part, credited (ipc.py), so it arrives as the model sends it.

A worker that dies is started again; on shutdown this process drains first, then stops the
workers (SIGTERM), which close their connections once their last replies are out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import socket
import sys
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from . import ipc
from .context import CallContext
from .frontends.grpc_server import CallError, Method
from .frontends.http_messages import HttpLimits, HttpRequest, HttpResponse
from .http2.connection import Limits as H2Limits
from .service import InferenceService
from .types import InferRequest, InferResponse

log = logging.getLogger("fuserve")


class WorkerEndpoint:
    """Answers one worker's link."""

    def __init__(self, service: InferenceService, rest: Callable[[HttpRequest], Any],
                 grpc_methods: dict[str, Method], error_status: Callable[[BaseException], tuple[int, str]],
                 authorize: Callable[[str, CallContext], None] | None = None) -> None:
        self.service = service
        self.rest = rest
        self.grpc_methods = grpc_methods
        self.error_status = error_status
        self.authorize = authorize  # --grpc-restricted-protocol, checked again on forwarded calls
        self.link: ipc.Link | None = None
        self.tasks: dict[int, asyncio.Task] = {}  # forwarded requests being answered
        # inferences queued or executing: how to cancel each (a grouped member's: its run, _member_gone)
        self.cancels: dict[int, Callable[[], None] | _Run] = {}
        self.credits: dict[int, int] = {}  # streamed answers: parts the worker may still take
        # the forwarded calls a `cancel` stops: streamed answers (model control runs to its end)
        self.streaming: set[int] = set()
        self.gone: set[int] = set()  # forwarded HTTP calls whose client left before any answer
        self.wakes: dict[int, asyncio.Event] = {}
        self.hello = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def on_messages(self, messages: list[ipc.Message]) -> None:
        with self.service.held():  # the frame's inferences are batched together (scheduler/hold.py)
            self._on_messages(messages)

    def _on_messages(self, messages: list[ipc.Message]) -> None:
        loop = self._loop
        for kind, rid, payload in messages:
            if kind == "infer":
                try:
                    self.cancels[rid] = self.service.submit(ipc.unpack_request(payload),
                                                            functools.partial(self._infer_done, rid))
                except Exception as exc:
                    self._send(("err", rid, ipc.pack_error(exc)))
            elif kind == "group":
                try:
                    self._group(ipc.unpack_request(payload[0]), payload[1])
                except Exception as exc:  # every member is answered, whatever went wrong
                    for member, _, _ in payload[1]:
                        self.cancels.pop(member, None)
                        self._send(("err", member, ipc.pack_error(exc)))
            elif kind == "cancel":
                self._cancel(rid, self.cancels.pop(rid, None))
                task = self.tasks.get(rid)
                if task is not None and rid in self.streaming:
                    task.cancel()  # a stream whose client went away
                elif task is not None:
                    self.gone.add(rid)  # a call still being answered: should it stream, nobody reads it
            elif kind == "credit":
                if rid in self.credits:
                    self.credits[rid] += payload
                    self.wakes[rid].set()
            elif kind == "http":
                self._track(rid, loop.create_task(self._http(rid, payload)))
            elif kind == "grpc":
                self._track(rid, loop.create_task(self._grpc(rid, payload)))
            elif kind == "gstream":
                self.streaming.add(rid)
                self._track(rid, loop.create_task(self._grpc_stream(rid, payload)))
            elif kind == "refused":  # a request the worker could not decode: its model judged here
                name, version, cls, message = payload
                try:
                    self.service.refused(name, version, ipc.unpack_error((cls, message)))
                except Exception as exc:
                    self._send(("err", rid, ipc.pack_error(exc)))
            elif kind == "hello":
                self.hello.set()

    # ---- groups (ipc.py): several inferences of one model, queued as one where the model allows ----

    def _group(self, request: InferRequest, members: list[ipc.GroupMember]) -> None:
        """Cut the group into runs of members of at most `group_rows` rows; a run of two or more
        is submitted as one, anything else alone."""
        try:
            limit = self.service.group_rows(request)
        except Exception:
            limit = 0  # (the model is not there, say: each member gets that answer alone)
        start = i = 0
        while i < len(members):
            j, rows = i + 1, members[i][1]
            while j < len(members) and rows + members[j][1] <= limit:
                rows += members[j][1]
                j += 1
            run = members[i:j]
            whole = start == 0 and j == len(members)
            part = request if whole else ipc.slice_request(request, start, start + rows)
            if len(run) > 1 and rows <= limit:
                self._submit_run(part, run)
            else:
                self._alone(part, run)
            start += rows
            i = j

    def _submit_run(self, request: InferRequest, run: list[ipc.GroupMember]) -> None:
        state = _Run(run)
        try:
            state.withdraw = self.service.submit_group(request, [m[1] for m in run],
                                                       functools.partial(self._run_done, request, state))
        except Exception:
            self._alone(request, run)  # each gets its own answer (and its own count)
            return
        self.cancels.update(dict.fromkeys([m[0] for m in run], state))

    def _cancel(self, rid: int, cancel: Callable[[], None] | _Run | None) -> None:
        if isinstance(cancel, _Run):
            self._member_gone(cancel, rid)
        elif cancel is not None:
            cancel()

    def _member_gone(self, state: _Run, rid: int) -> None:
        state.gone.add(rid)
        if len(state.gone) == len(state.members) and state.withdraw is not None:
            state.withdraw()

    def _run_done(self, request: InferRequest, state: _Run, response: InferResponse | None,
                  exc: BaseException | None) -> None:
        for rid, _, _ in state.members:
            self.cancels.pop(rid, None)
        if response is not None:
            self._send(("gok", state.members[0][0], (ipc.pack_response(response), state.members)))
        elif exc is not None:
            err = ipc.pack_error(exc)
            for rid, _, _ in state.members:
                self._send(("err", rid, err))
        else:  # the execution failed: each member alone, so that only the ones that fail alone fail
            self._alone(request, state.members, state.gone, accepted=True)

    def _alone(self, request: InferRequest, run: list[ipc.GroupMember], gone: set[int] | frozenset = frozenset(),
               accepted: bool = False) -> None:
        """Each member of `run` (whose rows are `request`'s, in order) as an inference of its own,
        but those in `gone` (their clients left); `accepted`: the run was accepted and failed to
        execute, so its members are answered even while the server drains."""
        start = 0
        for rid, rows, client_id in run:
            one = ipc.slice_request(request, start, start + rows, client_id)
            start += rows
            if rid in gone:
                continue
            try:
                self.cancels[rid] = self.service.submit(one, functools.partial(self._infer_done, rid), accepted)
            except Exception as exc:
                self._send(("err", rid, ipc.pack_error(exc)))

    def _track(self, rid: int, task: asyncio.Task) -> None:
        self.tasks[rid] = task

        def done(_: asyncio.Task) -> None:
            self.tasks.pop(rid, None)
            self.streaming.discard(rid)
            self.gone.discard(rid)
        task.add_done_callback(done)

    def _send(self, message: ipc.Message) -> None:
        if self.link is not None:
            self.link.send(message)

    def _infer_done(self, rid: int, response: InferResponse | None, exc: BaseException | None) -> None:
        self.cancels.pop(rid, None)
        if response is not None:
            self._send(("ok", rid, ipc.pack_response(response)))
        else:
            self._send(("err", rid, ipc.pack_error(exc or RuntimeError("no answer"))))

    async def _http(self, rid: int, payload: tuple) -> None:
        method, path, headers, body = payload
        response: HttpResponse = await self.rest(HttpRequest(method, path, headers, body))
        head = (response.status, response.body, response.content_type, response.headers)
        if response.stream is None:
            self._send(("http", rid, head))
            return
        if rid in self.gone:  # its client left while the answer was made: withdraw the stream's request
            await response.stream.aclose()
            return
        self._send(("shttp", rid, head))
        self.streaming.add(rid)
        await self._pump(rid, response.stream)

    async def _grpc_stream(self, rid: int, payload: tuple[str, bytes, dict[str, str], str]) -> None:
        """One message of a streaming call, answered by this process's own method (so its replies
        are exactly those of a server without workers), each reply a part."""
        path, message, metadata, peer = payload
        method = self.grpc_methods.get(path)
        try:
            if method is None or not method.replies:
                raise CallError(12, f"unknown method {path}")
            ctx = CallContext("grpc", metadata, peer)
            if self.authorize is not None:
                self.authorize(path, ctx)
            await self._pump(rid, _serialized(method.call(method.parse(message), ctx)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code, text = (exc.code, exc.message) if isinstance(exc, CallError) else self.error_status(exc)
            self._send(("gerr", rid, (code, text)))

    async def _pump(self, rid: int, pieces: AsyncGenerator[Any, None]) -> None:
        """Send a streamed answer's pieces as parts, at most STREAM_WINDOW ahead of the worker; while
        it has no credit the next piece is not taken (and so the model's sender waits)."""
        self.credits[rid] = ipc.STREAM_WINDOW
        wake = self.wakes[rid] = asyncio.Event()
        try:
            async for piece in pieces:
                while self.credits[rid] <= 0:
                    wake.clear()
                    await wake.wait()
                self.credits[rid] -= 1
                self._send(("part", rid, piece))
            self._send(("end", rid, None))
        finally:
            self.credits.pop(rid, None)
            self.wakes.pop(rid, None)
            await pieces.aclose()  # now: a cancelled stream withdraws its request at once

    async def _grpc(self, rid: int, payload: tuple[str, bytes, dict[str, str], str]) -> None:
        path, message, metadata, peer = payload
        method = self.grpc_methods.get(path)
        if method is None or method.streaming:
            self._send(("grpc", rid, (12, f"unknown method {path}", b"")))
            return
        try:
            ctx = CallContext("grpc", metadata, peer)
            if self.authorize is not None:  # the worker checked; its metadata came along, so check here too
                self.authorize(path, ctx)
            reply = await method.call(method.parse(message), ctx)
            self._send(("grpc", rid, (0, "", reply.SerializeToString())))
        except Exception as exc:
            code, text = self.error_status(exc)
            self._send(("grpc", rid, (code, text, b"")))

    def lost(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()  # the worker is gone: so are its clients
        self.tasks.clear()
        cancels, self.cancels = self.cancels, {}
        for rid, cancel in cancels.items():
            self._cancel(rid, cancel)


@dataclasses.dataclass(slots=True, eq=False)
class _Run:
    """Members of a group submitted as one: whose clients have gone, and how to withdraw it."""

    members: list[ipc.GroupMember]
    gone: set[int] = dataclasses.field(default_factory=set)
    withdraw: Callable[[], None] | None = None


class WorkerPool:
    def __init__(self, count: int, sockets: dict[str, socket.socket], make_endpoint: Callable[[], WorkerEndpoint],
                 *, max_input_size: int, log_verbose: int, http_restricted_api: Sequence[str] = (),
                 grpc_restricted_protocol: Sequence[str] = (), tls: Sequence[dict[str, Any]] = (),
                 http_limits: HttpLimits | None = None, grpc_limits: H2Limits | None = None) -> None:
        self.count = count
        self.sockets = sockets
        self.make_endpoint = make_endpoint
        # the restriction specs (server/access.py) as given on the command line, values included;
        # `tls`: TlsSettings.to_dict() of each listener with TLS on (certificate and key paths, not contents)
        self.args = {"max_input_size": max_input_size, "log_verbose": log_verbose,
                     "http_restricted_api": list(http_restricted_api),
                     "grpc_restricted_protocol": list(grpc_restricted_protocol),
                     "tls": list(tls)}
        self.args["http_limits"] = (http_limits or HttpLimits()).to_dict()  # the --http-max-* & co. flags
        self.args["grpc_limits"] = dataclasses.asdict(grpc_limits or H2Limits())  # the --grpc-max-* flags
        self.procs: list[asyncio.subprocess.Process | None] = [None] * count
        self.stopping = False
        self._runners: list[asyncio.Task] = []

    async def start(self, timeout: float = 60.0) -> None:
        """Start every worker; return once each says it is serving."""
        ready = [asyncio.Event() for _ in range(self.count)]
        self._runners = [asyncio.create_task(self._keep_running(i, ready[i])) for i in range(self.count)]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), timeout)

    async def _spawn(self, index: int) -> tuple[asyncio.subprocess.Process, WorkerEndpoint]:
        ours, theirs = socket.socketpair()
        endpoint = self.make_endpoint()
        endpoint.link = await ipc.open_link(ours, endpoint.on_messages, endpoint.lost)
        listen = {name: s.getsockname()[:2] for name, s in self.sockets.items()}
        args = {**self.args, "listen": listen, "link_fd": theirs.fileno(), "index": index}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.frontend_worker", json.dumps(args), pass_fds=[theirs.fileno()])
        theirs.close()
        return proc, endpoint

    async def _keep_running(self, index: int, ready: asyncio.Event) -> None:
        while not self.stopping:
            proc, endpoint = await self._spawn(index)
            self.procs[index] = proc
            hello = asyncio.create_task(endpoint.hello.wait())
            hello.add_done_callback(lambda _: ready.set())
            code = await proc.wait()
            hello.cancel()
            if endpoint.link is not None:
                endpoint.link.close()
            if not self.stopping:
                log.error("frontend worker %d (pid %d) exited with %s; starting another", index, proc.pid, code)
                await asyncio.sleep(0.5)

    async def stop(self, timeout: float = 10.0) -> None:
        self.stopping = True
        for proc in self.procs:
            if proc is not None and proc.returncode is None:
                proc.terminate()
        waits = [p.wait() for p in self.procs if p is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout)
        except asyncio.TimeoutError:
            for proc in self.procs:
                if proc is not None and proc.returncode is None:
                    proc.kill()
        for runner in self._runners:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT. The scheduler process binds one without
    listening, to hold the port (and learn it, when port is 0); each worker binds its own to the
    same port and listens, and the kernel spreads new connections evenly over the workers. (One
    listening socket shared by all would not: the first worker to wake accepts every waiting
    connection.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


async def _serialized(replies: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
    """A streaming method's replies as parts: bytes, or a list of them that leave together."""
    try:
        async for reply in replies:
            yield [r if isinstance(r, bytes) else r.SerializeToString() for r in reply] if type(reply) is list \
                else reply.SerializeToString()
    finally:
        await replies.aclose()
