"""System shared memory: the client's regions, and the requests that read from and write to them.

A client creates a POSIX shared memory object (`/dev/shm/<key>`), registers a region of it by
name (`register`), then names the region in an input's or a requested output's parameters
(`shared_memory_region`, `shared_memory_byte_size`, `shared_memory_offset`). An input is read
straight from the mapping (`np.frombuffer`, read-only; a copy only where the model makes one),
and an output is written straight into it. The codecs leave such a tensor's `region`
(types.RegionRef) set; the service resolves it here, under a `Lease`.

The decisions (docs/protocol.md, "Shared memory"):
- Off unless `--allow-client-shm=true` (Triton's flag since 2.69): while off, register and
  unregister fail with Triton's text and nothing is mapped; status answers the empty list.
- A key is one file name under /dev/shm: no '/', '.', '..' or NUL, at most NAME_MAX bytes, not a
  symlink (O_NOFOLLOW), a regular file, and not one of the prefixes kept for server-internal
  regions. No error echoes a key: errors name the region.
- Every offset and size is checked, as Python ints (no overflow), against the region before
  anything is read or written: offset < byte_size and offset + size <= byte_size.
- A request holds the regions it names (a refcount, in its Lease) from its checks until its
  outputs are written; unregistering such a region takes it out of the table at once, and the
  last request to release it unmaps it; the unregister call waits for that (a bounded time). A
  view still alive after that (a model that kept an input) keeps the mapping alive with it; the
  mapping is never pulled from under an array.
- Each request checks (fstat) that the object still holds the region: a client that truncates
  its object would otherwise make reads fault. A truncation during the request itself can still
  fault the server, as in Triton: a client that may register regions is trusted that far, which
  is one reason it is off by default.
- The client owns its shared memory objects: the server opens and maps them, never creates or
  unlinks one; at shutdown and on unregister-all it unmaps everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import mmap
import os
import stat
from typing import Any

import numpy as np

from .codecs import raw
from .errors import AlreadyExists, InvalidArgument, NotFound, ServerError, Unavailable, Unsupported
from .types import InferRequest, RegionRef, Tensor

log = logging.getLogger(__name__)

DISABLED = "Client shared memory is disabled. Start the server with '--allow-client-shm=true' to enable."
# Keys kept for server-internal regions: fuserve's own, and Triton's Python backend's.
RESERVED_PREFIXES = ("fuserve_", "triton_python_backend_shm_region_")
MAX_REGIONS = 256  # each is a mapping and an open file; bounded, whatever clients register
MAX_NAME = 256
UNREGISTER_WAIT = 60.0  # seconds an unregister waits for the requests that hold its regions
NAME_MAX = 255
_ROOT = "/dev/shm"  # nosec B108  # where POSIX shared memory objects live; the client names one, it is opened O_NOFOLLOW


class Region:
    """One registered region: `byte_size` bytes of the object `key`, from `offset`, mapped; `fd`
    stays open, so that each request can check the object still holds the region."""

    __slots__ = ("name", "key", "offset", "byte_size", "fd", "map", "start", "refs", "gone", "idle")

    def __init__(self, name: str, key: str, offset: int, byte_size: int, fd: int, mapped: mmap.mmap,
                 start: int) -> None:
        self.name, self.key, self.offset, self.byte_size, self.fd = name, key, offset, byte_size, fd
        self.map: mmap.mmap | None = mapped
        self.start = start  # where the region begins in the mapping (the mapping starts at a page)
        self.refs = 0  # requests holding the region
        self.gone = False  # unregistered: unmapped once no request holds it
        self.idle: asyncio.Event | None = None  # set when it is unmapped, for an unregister that waits

    def check(self) -> None:
        """Refuse a request when the object no longer holds the region: a client that truncated its
        object after registering it would otherwise make the mapping fault (SIGBUS) when read."""
        if os.fstat(self.fd).st_size < self.offset + self.byte_size:
            raise InvalidArgument(f"shared memory region '{self.name}' is no longer backed: its object is smaller "
                                  f"than when the region was registered")

    def span(self, offset: Any, size: Any) -> int:
        """Where a tensor of `size` bytes at `offset` in the region begins in the mapping; raises
        InvalidArgument (Triton's texts) unless it lies wholly inside the region."""
        if type(offset) is not int or not 0 <= offset < self.byte_size:
            raise InvalidArgument(f"Invalid offset for shared memory region: '{self.name}'")
        if type(size) is not int or size < 0 or offset + size > self.byte_size:
            raise InvalidArgument(f"Invalid offset + byte size for shared memory region: '{self.name}'")
        return self.start + offset

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0 and self.gone:
            # once the request's frames are gone too (they hold its arrays): on the loop's next turn
            asyncio.get_running_loop().call_soon(self.unmap)

    def unmap(self) -> None:
        mapped, self.map = self.map, None
        if mapped is None:
            return
        os.close(self.fd)
        if self.idle is not None:
            self.idle.set()
        _close(mapped, self.name, 0.0)


def _close(mapped: mmap.mmap, name: str, retried: float) -> None:
    """Unmap, once no array views the mapping. An array still alive (a model that kept an input, or
    one that is done with it but sits in a reference cycle, such as an exception's traceback) makes
    `close` refuse: then the garbage collector is run and, if that is not enough, it is tried again
    later (after 1 s, doubling up to a minute), for as long as it takes. Until then the mapping
    stays, so no array ever loses its memory."""
    for collect in (False, True):
        if collect:
            gc.collect()
        try:
            mapped.close()
            return
        except BufferError:
            pass
    delay = min(60.0, max(1.0, retried * 2))
    log.debug("shared memory region '%s' is still viewed; trying to unmap it again in %.0fs", name, delay)
    with contextlib.suppress(RuntimeError):  # no loop (shutdown): it goes with the last view, or the process
        asyncio.get_running_loop().call_later(delay, _close, mapped, name, delay)


class Lease:
    """The regions one request holds, and where its outputs go."""

    __slots__ = ("regions", "outputs")

    def __init__(self) -> None:
        self.regions: list[Region] = []
        # output name -> its region, where it starts in the mapping, its capacity, and the client's reference
        self.outputs: dict[str, tuple[Region, int, int, RegionRef]] = {}

    def hold(self, region: Region) -> None:
        region.refs += 1
        self.regions.append(region)

    def release(self) -> None:
        regions, self.regions = self.regions, []
        for region in regions:
            region.release()

    def write(self, tensor: Tensor) -> RegionRef | None:
        """Write an output into its region, if the request put it in one: then that region's reference."""
        place = self.outputs.get(tensor.name)
        if place is None:
            return None
        region, start, capacity, ref = place
        arr = tensor.data
        mapped = region.map
        if mapped is None:  # cannot happen while this lease holds the region; never write blind
            raise ServerError(f"shared memory region '{region.name}' is no longer mapped")
        if arr.dtype.kind in "OSU":
            blob = raw.encode(arr)
            _fits(tensor.name, len(blob), capacity)
            mapped[start:start + len(blob)] = blob
        else:
            _fits(tensor.name, arr.nbytes, capacity)
            dst = np.frombuffer(mapped, dtype=arr.dtype, count=arr.size, offset=start)
            np.copyto(dst.reshape(arr.shape), arr, casting="no")
        return ref


def _fits(name: str, need: int, capacity: int) -> None:
    if need > capacity:
        raise InvalidArgument(f"shared memory size specified with the request for output '{name}' ({capacity} "
                              f"bytes) should be at least {need} bytes to hold the results")


def _file_name(name: str, key: Any) -> str:
    """The object's name under /dev/shm: the key without its one leading '/'."""
    if type(key) is not str:
        raise InvalidArgument(f"shared memory region '{name}': 'key' must be a string")
    leaf = key[1:] if key.startswith("/") else key
    if not leaf or leaf in (".", "..") or "/" in leaf or "\0" in leaf or len(leaf.encode()) > NAME_MAX:
        raise InvalidArgument(f"cannot register shared memory region '{name}': its key is not the name of a "
                              f"shared memory object ('/' and one file name of at most {NAME_MAX} bytes)")
    if leaf.startswith(RESERVED_PREFIXES):
        raise InvalidArgument(f"cannot register shared memory region '{name}': its key uses a prefix reserved for "
                              f"the server's own regions")
    return leaf


def _unsigned(name: str, field: str, value: Any) -> int:
    if type(value) is not int or not 0 <= value < 1 << 64:
        raise InvalidArgument(f"shared memory region '{name}': '{field}' must be an unsigned 64-bit integer")
    return value


class SharedMemory:
    """The registered system shared memory regions, by name."""

    def __init__(self, allowed: bool, root: str = _ROOT) -> None:
        self.allowed = allowed
        self.root = root
        self._regions: dict[str, Region] = {}

    def check_allowed(self) -> None:
        """Refuse a register or unregister while client shared memory is off (Triton's text)."""
        if not self.allowed:
            raise Unsupported(DISABLED)

    def register(self, name: str, key: Any, offset: Any, byte_size: Any) -> None:
        self.check_allowed()
        if not name:
            raise InvalidArgument("'region name' is necessary to register system shared memory region")
        if len(name) > MAX_NAME:
            raise InvalidArgument(f"a shared memory region's name may have at most {MAX_NAME} characters")
        if name in self._regions:
            raise AlreadyExists(f"shared memory region '{name}' already in manager")
        if len(self._regions) >= MAX_REGIONS:
            raise InvalidArgument(f"cannot register shared memory region '{name}': {MAX_REGIONS} regions are "
                                  f"registered, the most this server holds")
        leaf = _file_name(name, key)
        offset = _unsigned(name, "offset", offset)
        byte_size = _unsigned(name, "byte_size", byte_size)
        if byte_size == 0:
            raise InvalidArgument(f"failed to register shared memory region '{name}': byte_size must be positive")
        try:
            fd = os.open(os.path.join(self.root, leaf), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            raise ServerError(f"Unable to open shared memory region '{name}': no shared memory object of its key "
                              f"can be opened") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgument(f"failed to register shared memory region '{name}': its key is not a shared "
                                      f"memory object")
            if offset + byte_size > info.st_size:
                raise InvalidArgument(f"failed to register shared memory region '{name}': offset + byte_size "
                                      f"({offset} + {byte_size}) is past the end of the object ({info.st_size} "
                                      f"bytes)")
            page = offset - offset % mmap.ALLOCATIONGRANULARITY
            mapped = mmap.mmap(fd, offset + byte_size - page, offset=page)
        except BaseException:
            os.close(fd)
            raise
        self._regions[name] = Region(name, key, offset, byte_size, fd, mapped, offset - page)

    def status(self, name: str = "") -> list[dict[str, Any]]:
        if name:
            region = self._regions.get(name)
            if region is None:
                raise NotFound(f"Unable to find system shared memory region: '{name}'")
            return [region.status()]
        return [self._regions[n].status() for n in sorted(self._regions)]

    async def unregister(self, name: str = "") -> None:
        """Unregister one region (an unknown name is no error, as in Triton) or all of them. The
        regions leave the table at once; each is unmapped when the last request holding it is done,
        and this waits for that (at most UNREGISTER_WAIT seconds: then Unavailable, saying so)."""
        self.check_allowed()
        if name:
            region = self._regions.pop(name, None)
            gone = [region] if region is not None else []
        else:
            gone, self._regions = list(self._regions.values()), {}
        waits = []
        for region in gone:
            region.gone = True
            if region.refs:
                region.idle = asyncio.Event()
                waits.append(region.idle.wait())
            else:
                region.unmap()
        if not waits:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*waits), UNREGISTER_WAIT)
        except asyncio.TimeoutError:
            held = ", ".join(f"'{r.name}'" for r in gone if r.map is not None)
            raise Unavailable(f"shared memory region(s) {held} are unregistered but still in use by requests after "
                              f"{UNREGISTER_WAIT:.0f}s; each is unmapped when its requests finish") from None

    def close(self) -> None:
        """Unmap every region (shutdown: nothing is in flight any more)."""
        regions, self._regions = list(self._regions.values()), {}
        for region in regions:
            region.gone = True
            region.unmap()

    def _held(self, lease: Lease, ref: RegionRef) -> Region:
        region = self._regions.get(ref.name)
        if region is None or region.map is None:
            raise NotFound(f"Unable to find shared memory region: '{ref.name}'")
        if region not in lease.regions:
            region.check()
            lease.hold(region)
        return region

    def lease(self, request: InferRequest) -> Lease:
        """Resolve a request's regions: each input that names one gets its data, a read-only array
        over the mapping; each requested output that names one gets its place. The request holds
        them until `Lease.release`; on an error it holds nothing."""
        lease = Lease()
        try:
            for t in request.inputs:
                ref = t.region
                if ref is not None:
                    region = self._held(lease, ref)
                    start = region.span(ref.offset, ref.byte_size)
                    mapped = region.map
                    assert mapped is not None  # (_held checked it)
                    data = raw.decode(t.name, t.datatype, t.shape,
                                      memoryview(mapped)[start:start + ref.byte_size])
                    if data.dtype.kind != "O":
                        data.flags.writeable = False  # the client's memory: a model may not write to it
                    t.data = data
            for o in request.outputs:
                ref = o.region
                if ref is not None:
                    region = self._held(lease, ref)
                    lease.outputs[o.name] = (region, region.span(ref.offset, ref.byte_size), ref.byte_size, ref)
        except BaseException:
            lease.release()
            raise
        return lease

    # ---- CUDA shared memory: not served; its calls answer as a server with no CUDA region -------

    def cuda_register(self, name: str) -> None:
        self.check_allowed()
        raise Unsupported(f"failed to register CUDA shared memory region '{name}': CUDA shared memory is not "
                          f"supported by this server; use system shared memory")

    def cuda_status(self, name: str = "") -> list[dict[str, Any]]:
        if name in self._regions:
            raise NotFound(f"The region named '{name}' is registered as system shared memory, not CUDA shared "
                           f"memory")
        if name:
            raise NotFound(f"Unable to find cuda shared memory region: '{name}'")
        return []

    def cuda_unregister(self, name: str = "") -> None:
        self.check_allowed()
