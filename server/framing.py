"""Input buffering for a protocol that frames its own messages (HTTP/2, the worker link).

Bytes left over after the last whole frame are kept and put before the next read. A frame
announced larger than 64 KiB is gathered in pieces and joined once, when whole: appending each read
to the buffer would copy a large frame over and over.
"""

from __future__ import annotations

_LARGE = 65536


class Reassembly:
    __slots__ = ("rest", "chunks", "have", "need")

    def __init__(self) -> None:
        self.rest = b""
        self.chunks: list[bytes] = []
        self.have = 0
        self.need = 0  # size of the large frame being gathered; 0 when none

    def feed(self, data: bytes) -> bytes | None:
        """The bytes to parse now, or None while a large frame is still incomplete."""
        if self.need:
            self.chunks.append(data)
            self.have += len(data)
            if self.have < self.need:
                return None
            data = b"".join(self.chunks)
            self.chunks, self.have, self.need = [], 0, 0
        if self.rest:
            data, self.rest = self.rest + data, b""
        return data

    def keep(self, buf: bytes, pos: int, frame_size: int = 0) -> None:
        """Keep `buf[pos:]`, unparsed; `frame_size` is the size of the frame it begins, when known."""
        if frame_size > _LARGE:
            self.need, self.have, self.chunks = frame_size, len(buf) - pos, [buf[pos:]]
        elif pos < len(buf):
            self.rest = buf[pos:]
