"""A Python model instance in a process of its own, asked for per model:

    parameters { key: "fuserve_process_isolation" value: { string_value: "true" } }

For GIL-heavy or crash-prone model code. Each instance of the model starts a child process
(`python -m server.backends.python.isolated_worker`, stdout and stderr inherited: they go to the
server's log) that builds a real `PythonInstance`, so initialize/execute/finalize and every error
text are the in-process backend's. `IsolatedInstance` stands in for it in the server, on the same
worker thread, and forwards each `execute_requests` call.

Transport. Tensors travel through two shared-memory regions the instance owns (created, reserved
with posix_fallocate, and unlinked by the server; the child only maps them): one for the requests'
inputs, one for the responses' outputs. Each grows (to the next power of two, at least 1 MiB) when
a batch needs more, and never shrinks. Only small metadata is pickled over a socketpair
(multiprocessing Connection framing): names, dtypes, shapes and offsets, request ids, parameters,
requested outputs. BYTES (object) tensors are pickled with the metadata, not put in the regions.
When the outputs do not fit, the child asks for a larger response region first (one more round
trip); a /dev/shm too full for a region fails that call alone, naming no region. Inputs reach
`execute` as read-only views of the request region, valid for that call: a model that keeps an
input array past `execute` sees it overwritten by the next call. The server copies the outputs out
(one copy a batch). `is_cancelled()` is the request's state when the batch was sent.

Region names are `fuserve_pyiso_<server pid>_<n>` (`SHM_PREFIX`): the `fuserve_` prefix is
reserved for fuserve's own regions, and client shared-memory registrations of it are to be
refused. No error sent to a client names a region.

Crashes. When the child dies (killed, segfault, `os._exit`) during a call, every request of that
call fails with a BackendError (500): "model 'M' instance 'I': its process exited (signal 9:
SIGKILL) while executing; it is being restarted", and a new child is started at once (the next
call waits for its initialize). A child found dead between calls is restarted before the call,
which then runs. A restart whose initialize fails or crashes counts as a crash too. Policy, per
instance: after `MAX_CRASHES` (5) crashes within `CRASH_WINDOW_S` (60 s) the instance stops
restarting and every later call fails at once with "model 'M' instance 'I' is disabled: its
process failed 5 times within 60 s (last: ...); reload the model to start it again". The model
stays READY (its other instances, if any, keep serving); unloading and loading it again gives
fresh instances. There is no execute timeout: a hung child hangs its calls, as an in-process model
would.

BLS is not supported: the child has no route to the server, so `exec()` and `async_exec()` return
an error response saying BLS needs the in-process backend. The child ignores SIGINT and SIGTERM (the
server owns its lifetime) and exits, after finalize(), when the socket closes. `close()` asks it to
run finalize() and exit, kills it after `CLOSE_TIMEOUT_S`, and unlinks the regions (if the server
itself is killed, multiprocessing's resource tracker unlinks them). Linux only (/dev/shm).
`auto_complete_config`, and so one import of model.py, still runs in the server process.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle  # nosec B403  # only between the server and its own child
import select
import signal
import socket
import subprocess  # nosec B404  # starts our own worker module, no shell
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from ...errors import BackendError, ModelLoadError
from ...model_config import InstanceSpec, ModelConfig, ModelIO
from ..base import Request, RequestResult
from .backend import _io
from .isolated_worker import DEV_SHM, as_error, layout, read, write

log = logging.getLogger(__name__)

PARAMETER = "fuserve_process_isolation"
SHM_PREFIX = "fuserve_pyiso_"  # under the reserved "fuserve_" prefix
MAX_CRASHES = 5
CRASH_WINDOW_S = 60.0
CLOSE_TIMEOUT_S = 10.0
_MIN_REGION = 1 << 20
_names = itertools.count()


def wanted(config: ModelConfig) -> bool:
    """Whether the config asks for process isolation; a value other than true/false fails the load."""
    if PARAMETER not in config.parameters:
        return False
    value = config.parameters[PARAMETER].string_value.strip().lower()
    if value not in ("true", "false"):
        raise ModelLoadError(f"model '{config.name}': parameter '{PARAMETER}' must be \"true\" or \"false\", "
                             f"not {value!r}")
    if value == "true" and config.model_transaction_policy.decoupled:
        raise ModelLoadError(f"model '{config.name}': parameter '{PARAMETER}' with model_transaction_policy "
                             f"{{ decoupled: true }} is not supported by fuserve yet (decoupled models run in "
                             f"process)")
    if value == "true" and config.HasField("sequence_batching"):
        raise ModelLoadError(f"model '{config.name}': parameter '{PARAMETER}' with sequence_batching is not "
                             f"supported by fuserve yet (sequence models run in process)")
    return value == "true"


class _Region:
    """A shared-memory region the server owns, replaced by a larger one when needed."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.shm: shared_memory.SharedMemory | None = None

    @property
    def name(self) -> str | None:
        return None if self.shm is None else self.shm.name

    def ensure(self, need: int) -> shared_memory.SharedMemory:
        if self.shm is not None and self.shm.size >= need:
            return self.shm
        size = max(_MIN_REGION, 1 << max(0, need - 1).bit_length())
        while True:
            try:
                new = shared_memory.SharedMemory(f"{SHM_PREFIX}{os.getpid()}_{next(_names)}", create=True, size=size)
                break
            except FileExistsError:  # left by an earlier process with our pid
                continue
        try:  # reserve the pages now: a full /dev/shm would otherwise be a SIGBUS on first write
            fd = os.open(f"{DEV_SHM}/{new.name}", os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError as exc:
            new.close()
            new.unlink()
            raise BackendError(f"{self.label}: not enough shared memory for {size} bytes of tensors "
                               f"({exc.strerror}; see the size of /dev/shm)") from None
        self.release()
        self.shm = new
        return new

    def release(self) -> None:
        if self.shm is not None:
            shm, self.shm = self.shm, None
            shm.close()
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()


class _Died(Exception):
    """The child exited (or closed its end); `what` says how, for the error text."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class IsolatedInstance:
    executes_requests = True
    inline_ok = False

    def __init__(self, model_path: Path, config: ModelConfig, instance: InstanceSpec) -> None:
        self.name = config.name
        self.label = f"model '{config.name}' instance '{instance.name}'"
        self._init = ("init", str(model_path), config.SerializeToString(),
                      (instance.name, instance.kind, instance.device_id), logging.getLogger().getEffectiveLevel())
        self._io = _io(config)
        self._device = "GPU" if instance.kind == "KIND_GPU" else "CPU"
        self._lock = threading.Lock()
        self._requests, self._responses = _Region(self.label), _Region(self.label)
        self._crashes: deque[float] = deque()
        self._disabled: str | None = None
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._poller = select.poll()
        self._ready = False
        self.pid = 0
        try:
            self._spawn()
            self._wait_ready()
        except _Died as died:
            self._stop()
            raise ModelLoadError(f"{model_path}: {self.label}: {died.what} while loading the model") from None
        except BaseException:
            self._stop()
            raise

    @property
    def io(self) -> ModelIO:
        return self._io

    @property
    def device(self) -> str:
        return self._device

    def check_inputs(self, feeds: Mapping[str, np.ndarray]) -> None:
        """A Python model checks its own inputs in execute()."""

    def execute(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError("Python models execute requests (execute_requests)")

    def execute_requests(self, requests: Sequence[Request]) -> list[RequestResult | None]:
        with self._lock:
            if self._disabled is not None:
                raise BackendError(self._disabled)
            if self._proc is not None and self._proc.poll() is not None:  # died between calls: nothing lost
                self._crashed(f"{_exit_text(self._proc.returncode)} while idle")
                if self._disabled is not None:
                    raise BackendError(self._disabled)
            try:
                if self._proc is None:
                    self._spawn()
                if not self._ready:
                    try:
                        self._wait_ready()
                    except ModelLoadError as exc:  # a restarted child's initialize failed
                        log.error("%s: its restarted process failed to initialize: %s", self.label, exc.message)
                        raise BackendError(self._crashed("its restarted process failed to initialize (see the "
                                                         "server log)")) from None
                    except _Died as died:
                        raise BackendError(self._crashed(f"{died.what} while initializing again")) from None
                return self._call(requests)
            except _Died as died:
                raise BackendError(self._crashed(f"{died.what} while executing")) from None
            except OSError as exc:  # starting the process, or a region (strerror: no region name)
                raise BackendError(f"{self.label}: {type(exc).__name__}: {exc.strerror}") from None

    def _call(self, requests: Sequence[Request]) -> list[RequestResult | None]:
        layouts, copies, need = layout([r.inputs for r in requests])
        if need:
            write(self._requests.ensure(need).buf, copies)
        batch = [(r.id, r.parameters, tuple(r.outputs), bool(r.is_cancelled()), m)
                 for r, m in zip(requests, layouts, strict=True)]
        self._send(("exec", self._requests.name, batch, self._responses.name))
        while (reply := self._recv())[0] == "grow":
            try:
                grown: str | None = self._responses.ensure(reply[1]).name
            except BackendError as exc:
                grown = None  # the child answers with "raise"
                log.error("%s", exc.message)
            self._send(("region", grown))
        if reply[0] == "raise":
            raise as_error(reply[1], reply[2])
        _, results, used = reply
        buf = self._responses.shm.buf if used and self._responses.shm is not None else None
        block = None if buf is None else np.frombuffer(buf, np.uint8, used).copy()  # one copy for the batch
        return [read(block, r[1], True) if r[0] == "ok" else as_error(*r[1:]) for r in results]

    def _crashed(self, what: str) -> str:
        """Count a crash, restart or disable; the text for the requests it failed."""
        now = time.monotonic()
        self._crashes.append(now)
        while now - self._crashes[0] > CRASH_WINDOW_S:
            self._crashes.popleft()
        self._stop(kill=True, regions=False)
        n = len(self._crashes)
        if n >= MAX_CRASHES:
            self._disabled = (f"{self.label} is disabled: its process failed {n} times within {CRASH_WINDOW_S:g} s "
                              f"(last: {what}); reload the model to start it again")
            log.error("%s", self._disabled)
            return f"{self.label}: {what}; it failed {n} times within {CRASH_WINDOW_S:g} s and is disabled until " \
                   f"the model is reloaded"
        log.error("%s: %s; restarting it (%d of %d within %g s)", self.label, what, n, MAX_CRASHES, CRASH_WINDOW_S)
        try:
            self._spawn()
        except (OSError, _Died):  # the next call finds it gone and tries again (another crash)
            log.exception("%s: cannot start its process", self.label)
        return f"{self.label}: {what}; it is being restarted"

    def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen(  # nosec B603  # sys.executable and fixed arguments
                [sys.executable, "-m", "server.backends.python.isolated_worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        self._poller = select.poll()
        self._poller.register(self._conn.fileno(), select.POLLIN)
        self._ready = False
        self._send(self._init)

    def _wait_ready(self) -> None:
        reply = self._recv()
        if reply[0] == "init_failed":
            self._stop(kill=False, regions=False)
            raise ModelLoadError(reply[1])
        self.pid, self._ready = reply[1], True
        log.info("%s runs in process %d", self.label, self.pid)

    def _send(self, message: tuple) -> None:
        assert self._conn is not None  # nosec B101  # for mypy: set by _spawn
        try:
            self._conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            raise _Died(self._reap()) from None

    def _recv(self, timeout: float | None = None) -> tuple:
        """The child's next message; _Died when it exits first (or after `timeout` seconds)."""
        assert self._conn is not None and self._proc is not None  # nosec B101  # for mypy: set by _spawn
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._poller.poll(500):  # wakes at once on a message or the socket's EOF
                if deadline is not None and time.monotonic() > deadline:
                    self._proc.kill()
                    raise _Died(f"its process did not answer within {timeout:g} s (killed)")
                if self._proc.poll() is not None:
                    raise _Died(self._reap())
            return pickle.loads(self._conn.recv_bytes())  # nosec B301  # from the child we started
        except (EOFError, OSError):
            raise _Died(self._reap()) from None

    def _reap(self, wait: float = 5.0) -> str:
        proc = self._proc
        if proc is None:
            return "its process is gone"
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return "its process stopped answering (killed)"
        return _exit_text(proc.returncode)

    def _stop(self, kill: bool = True, regions: bool = True) -> None:
        if self._proc is not None and self._proc.poll() is None and kill:
            self._proc.kill()
        if self._proc is not None:
            self._reap()
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn, self._ready = None, None, False
        if regions:
            self._requests.release()
            self._responses.release()

    def close(self) -> None:
        """Ask the child to run finalize() and exit; kill it after CLOSE_TIMEOUT_S."""
        with self._lock:
            self._disabled = self._disabled or f"{self.label} is closed"
            if self._proc is not None and self._proc.poll() is None:
                try:
                    self._send(("close",))
                    while self._recv(CLOSE_TIMEOUT_S)[0] != "closed":  # a pending restart's "ready" first
                        pass
                    self._reap(CLOSE_TIMEOUT_S)
                except _Died as died:
                    log.error("%s: on close, %s", self.label, died.what)
            self._stop()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "its process stopped answering"
    if code < 0:
        try:
            return f"its process exited (signal {-code}: {signal.Signals(-code).name})"
        except ValueError:
            return f"its process exited (signal {-code})"
    return f"its process exited (exit code {code})"
