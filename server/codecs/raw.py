"""Raw tensor bytes, shared by HTTP's binary extension and gRPC's raw_*_contents.

Fixed-size types are the little-endian array in row-major order. BYTES is each element as a
4-byte little-endian length followed by that many bytes. Every size is checked against the shape
before anything is allocated, so a request claiming [1, 2**40] elements costs nothing.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from .. import dtypes
from ..errors import InvalidArgument

_LEN = struct.Struct("<I")


def element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)  # Python ints: no overflow, however absurd the dims


def check_shape(name: str, shape: object) -> tuple[int, ...]:
    """A V2 shape: a list of at most 32 non-negative integers (bools are not integers here)."""
    if isinstance(shape, (list, tuple)) and len(shape) <= 32:
        for d in shape:
            if type(d) is not int or d < 0:
                break
        else:
            return tuple(shape)
        raise InvalidArgument(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    if isinstance(shape, (list, tuple)):
        raise InvalidArgument(f"input '{name}': shape has {len(shape)} dims; at most 32 are supported")
    raise InvalidArgument(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")


def decode(name: str, datatype: str, shape: tuple[int, ...], buf: memoryview | bytes) -> np.ndarray:
    """Raw bytes -> an array of `shape` (zero-copy for fixed-size types)."""
    dt = dtypes.BY_V2.get(datatype)
    if dt is None:
        raise InvalidArgument(f"input '{name}': unknown datatype '{datatype}'")
    count = element_count(shape)
    if dt is dtypes.BYTES:
        return _decode_bytes(name, shape, count, buf)
    if count * dt.itemsize != len(buf):
        raise InvalidArgument(f"input '{name}': {len(buf)} bytes of data do not match shape {list(shape)} "
                              f"of {datatype} ({count * dt.itemsize} bytes expected)")
    return np.frombuffer(buf, dtype=dt.numpy, count=count).reshape(shape)


def _decode_bytes(name: str, shape: tuple[int, ...], count: int, buf: memoryview | bytes) -> np.ndarray:
    size = len(buf)
    if count * _LEN.size > size:
        raise InvalidArgument(f"input '{name}': {size} bytes cannot hold {count} BYTES elements of shape "
                              f"{list(shape)}")
    view = memoryview(buf)
    items = []
    pos = 0
    for _ in range(count):
        if pos + 4 > size:
            raise InvalidArgument(f"input '{name}': BYTES data ends inside an element's length prefix")
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + n > size:
            raise InvalidArgument(f"input '{name}': BYTES element of {n} bytes runs past the end of the data")
        items.append(bytes(view[pos:pos + n]))
        pos += n
    if pos != size:
        raise InvalidArgument(f"input '{name}': {size - pos} bytes left over after {count} BYTES elements")
    arr = np.empty(count, dtype=object)
    arr[:] = items
    return arr.reshape(shape)


def encode(arr: np.ndarray) -> bytes:
    """An array -> raw bytes in the wire layout."""
    if arr.dtype.kind in "OSU":
        parts = []
        for item in arr.reshape(-1):
            b = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(_LEN.pack(len(b)))
            parts.append(b)
        return b"".join(parts)
    return np.ascontiguousarray(arr).tobytes()
