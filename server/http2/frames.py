"""HTTP/2 wire constants and the few encoders the server needs (RFC 9113 §4, §6; RFC 7541 §5-6)."""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9
ENHANCE_YOUR_CALM = 11
# settings
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 4, 5, 6

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384

FRAME_HEAD = struct.Struct(">BHBBL")  # length (24 bits as 8 + 16), type, flags, stream id
SETTING = struct.Struct(">HL")
U32 = struct.Struct(">L")


def frame_head(ftype: int, flags: int, sid: int, length: int) -> bytes:
    return FRAME_HEAD.pack(length >> 16, length & 0xFFFF, ftype, flags, sid)


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return FRAME_HEAD.pack(n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def hpack_int(value: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out = bytearray([limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """One header as an HPACK literal without indexing: the same bytes whatever the table holds."""
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


STATUS_200 = b"\x88"  # static table entry 8


def leading_size_updates(block: bytes | bytearray) -> int:
    """How many dynamic-table size updates open `block` (RFC 7541 §4.2 allows at most two), counted
    without decoding the block. Stops counting at three: more is an error anyway."""
    pos, n, end = 0, 0, len(block)
    while pos < end and block[pos] & 0xE0 == 0x20 and n < 3:
        n += 1
        if block[pos] & 0x1F == 0x1F:  # a multi-byte integer follows
            pos += 1
            while pos < end and block[pos] & 0x80:
                pos += 1
        pos += 1
    return n
