"""The child process of an isolated Python model instance (see isolated.py for the design).

    python -m server.backends.python.isolated_worker <fd>

Also the tensor codec both sides use (`layout`, `write`, `read`, `as_error`). `<fd>` is this
end of the server's socketpair. The first message is ("init", model path, config
bytes, (instance name, kind, device id), log level); the child builds a `PythonInstance` and answers
("ready", pid) or ("init_failed", the load error's text), then serves ("exec", ...) until ("close",)
(finalize, then ("closed",)) or the socket closes (finalize, then exit).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import mmap
import os
import pickle  # nosec B403  # only between the server and its own child
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from ... import errors
from ...errors import BackendError, ModelError, ServerError
from ...model_config import InstanceSpec, mc
from ..base import Request
from . import pb_utils
from .backend import PythonInstance

log = logging.getLogger(__name__)

_ALIGN = 64
DEV_SHM = "/dev/shm"  # nosec B108  # where POSIX shared memory lives on Linux; names are our own (O_EXCL)
Meta = tuple[str, Any, tuple[int, ...], Any]  # name, dtype (None: BYTES), shape, offset (BYTES: the items)

NO_BLS = ("BLS (InferenceRequest.exec / async_exec) is not available to a model that runs with "
          "fuserve_process_isolation; it needs the in-process Python backend")


# ---- tensors in a region (both sides: isolated.py imports these) ------------------------------

def layout(groups: Sequence[Mapping[str, np.ndarray]]) -> tuple[list[list[Meta]], list[tuple[int, np.ndarray]], int]:
    """Where each group's (request's) tensors go in one region, 64-byte aligned: the metadata per
    group, the copies to make (offset, array) and the bytes needed."""
    out: list[list[Meta]] = []
    copies: list[tuple[int, np.ndarray]] = []
    end = 0
    for group in groups:
        metas: list[Meta] = []
        for name, a in group.items():
            dtype = a.dtype
            if dtype.hasobject:
                metas.append((name, None, a.shape, a.ravel().tolist()))  # BYTES: pickled
                continue
            n, at = a.nbytes, 0
            if n:
                at = (end + _ALIGN - 1) & -_ALIGN
                end = at + n
                copies.append((at, a))
            metas.append((name, dtype.str if dtype.kind != "V" else dtype, a.shape, at))  # V: e.g. bfloat16
        out.append(metas)
    return out, copies, end


def write(buf: Any, copies: Sequence[tuple[int, np.ndarray]]) -> None:
    for at, a in copies:
        np.ndarray(a.shape, a.dtype, buf, at)[...] = a


def read(buf: Any, metas: Sequence[Meta], writeable: bool) -> dict[str, np.ndarray]:
    """The tensors of one group, as views of `buf` (None: there are only empty or BYTES tensors)."""
    out: dict[str, np.ndarray] = {}
    for name, code, shape, at in metas:
        if code is None:
            a = np.empty(len(at), dtype=object)
            a[:] = at
            out[name] = a.reshape(shape)
        elif buf is None:
            out[name] = np.empty(shape, code)
        else:
            a = np.ndarray(shape, code, buf, at)
            if not writeable:
                a.flags.writeable = False
            out[name] = a
    return out


def as_error(kind: str, message: str, code: int = 1) -> Exception:
    """An error the child reported, as the class it had (a ServerError; BackendError otherwise)."""
    if kind == "ModelError":
        return ModelError(message, code)
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.ServerError)):
        cls = BackendError
    return cls(message)


class NoBridge:
    """pb_utils' bridge in the child: every BLS call is answered with an error response."""

    def exec(self, request: pb_utils.InferenceRequest, decoupled: bool) -> pb_utils.InferenceResponse:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(NO_BLS))

    async def async_exec(self, request: pb_utils.InferenceRequest, decoupled: bool) -> pb_utils.InferenceResponse:
        return self.exec(request, decoupled)


class Maps:
    """The server's regions as this process maps them, by slot; remapped when a name changes."""

    def __init__(self) -> None:
        self.maps: dict[str, tuple[str, mmap.mmap]] = {}

    def get(self, slot: str, name: str | None) -> mmap.mmap | None:
        if name is None:
            return None
        current = self.maps.get(slot)
        if current is not None and current[0] == name:
            return current[1]
        fd = os.open(f"{DEV_SHM}/{name}", os.O_RDWR)
        try:
            mapped = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        if current is not None:
            with contextlib.suppress(BufferError):  # a model still holds an input view: unmapped with it
                current[1].close()
        self.maps[slot] = (name, mapped)
        return mapped


class Child:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.maps = Maps()

    def send(self, message: tuple) -> None:
        self.conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def recv(self) -> Any:
        return pickle.loads(self.conn.recv_bytes())  # nosec B301  # from the server that started us

    def execute(self, instance: PythonInstance, message: tuple) -> tuple:
        _, region, batch, responses = message
        buf = self.maps.get("requests", region)
        requests = [Request(read(buf, metas, False), outputs, rid, params, _answer(cancelled))
                    for rid, params, outputs, cancelled, metas in batch]
        try:
            results = instance.execute_requests(requests)
        except ServerError as exc:
            return "raise", type(exc).__name__, exc.message
        except Exception as exc:
            log.exception("model '%s': execute_requests failed", instance.name)
            return "raise", "BackendError", f"model '{instance.name}': {type(exc).__name__}: {exc}"
        del requests
        layouts, copies, need = layout([r for r in results if isinstance(r, dict)])  # (never decoupled)
        if need:
            current = self.maps.get("responses", responses)
            if current is None or len(current) < need:
                self.send(("grow", need))
                responses = self.recv()[1]
                if responses is None:
                    return "raise", "BackendError", f"model '{instance.name}': not enough shared memory for its " \
                                                    f"outputs ({need} bytes; see the server log)"
            write(self.maps.get("responses", responses), copies)
        out: list[tuple] = []
        done = iter(layouts)
        for r in results:
            if isinstance(r, Exception):
                message_ = r.message if isinstance(r, ServerError) else f"{type(r).__name__}: {r}"
                out.append(("err", type(r).__name__, message_, r.code if isinstance(r, ModelError) else 1))
            else:
                out.append(("ok", next(done)))
        return "done", out, need

    def serve(self) -> int:
        _, model_path, config_bytes, (name, kind, device_id), level = self.recv()
        logging.basicConfig(level=level, format=f"%(asctime)s %(levelname).1s pyiso-{os.getpid()} %(name)s: "
                                                "%(message)s")
        pb_utils.set_bridge(NoBridge())
        try:
            instance = PythonInstance(Path(model_path), mc.ModelConfig.FromString(config_bytes),
                                      InstanceSpec(name, kind, device_id))
        except Exception as exc:
            text = exc.message if isinstance(exc, ServerError) else f"{model_path}: {type(exc).__name__}: {exc}"
            self.send(("init_failed", text))
            return 1
        self.send(("ready", os.getpid()))
        try:
            while True:
                try:
                    message = self.recv()
                except (EOFError, OSError):  # the server is gone
                    return 0
                if message[0] == "close":
                    break
                try:
                    reply = self.execute(instance, message)
                except (EOFError, OSError):
                    raise
                except Exception as exc:  # packing its outputs failed: the model's problem, not a crash
                    log.exception("model '%s': cannot pack the outputs", instance.name)
                    reply = ("raise", "BackendError", f"model '{instance.name}': {type(exc).__name__}: {exc}")
                try:
                    data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
                except Exception as exc:  # e.g. a BYTES output holding objects pickle refuses
                    data = pickle.dumps(("raise", "BackendError", f"model '{instance.name}': cannot send its "
                                         f"outputs to the server: {type(exc).__name__}: {exc}"))
                self.conn.send_bytes(data)
        finally:
            instance.close()  # finalize(), on close and when the server went away
        self.send(("closed",))
        return 0


def _answer(cancelled: bool) -> Callable[[], bool]:
    return lambda: cancelled


def main() -> int:
    faulthandler.enable()  # a segfault's Python traceback goes to the server's log
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server owns our lifetime: it closes the socket
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = Child(Connection(int(sys.argv[1])))
    try:
        return child.serve()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return 0


if __name__ == "__main__":
    sys.exit(main())
