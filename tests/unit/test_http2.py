"""The sans-IO HTTP/2 core (server/http2), fed bytes built with hyperframe/hpack: no sockets.

Each limit is tested at the limit and one past it."""

from __future__ import annotations

import struct

import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from server.http2 import frames as fr
from server.http2.connection import DATA_RECEIVED, REQUEST, STREAM_RESET, H2Connection, Limits
from server.http2.stream import CLOSED, IDLE, OPEN, RECV_DATA, SEND_DATA, TRANSITIONS, Stream, StreamError

REQUEST_HEADERS = [(":method", "POST"), (":scheme", "http"), (":path", "/svc/M"), (":authority", "x"),
                   ("content-type", "application/grpc")]


class Client:
    """Builds a client's bytes and parses what the server sent."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.conn = H2Connection(limits or Limits())
        self.encoder = hpack.Encoder()
        self.frames(self.conn.data_to_send())  # our SETTINGS and connection WINDOW_UPDATE
        self.conn.receive_data(fr.PREFACE)

    def send(self, *frames: Frame | bytes) -> list:
        data = b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames)
        return self.conn.receive_data(data)

    def headers(self, sid: int, end_stream: bool = False, extra: list | None = None) -> HeadersFrame:
        f = HeadersFrame(sid, self.encoder.encode(REQUEST_HEADERS + (extra or [])))
        f.flags.add("END_HEADERS")
        if end_stream:
            f.flags.add("END_STREAM")
        return f

    def received(self) -> list[Frame]:
        return self.frames(self.conn.data_to_send())

    @staticmethod
    def frames(data: bytes) -> list[Frame]:
        out, pos = [], 0
        while pos < len(data):
            f, length = Frame.parse_frame_header(memoryview(data[pos:pos + 9]))
            f.parse_body(memoryview(data[pos + 9:pos + 9 + length]))
            out.append(f)
            pos += 9 + length
        return out


def data(sid: int, payload: bytes, end_stream: bool = False) -> DataFrame:
    f = DataFrame(sid, payload)
    if end_stream:
        f.flags.add("END_STREAM")
    return f


def settings(**values: int) -> SettingsFrame:
    f = SettingsFrame(0)
    f.settings = {getattr(SettingsFrame, k): v for k, v in values.items()}
    return f


def window_update(sid: int, n: int) -> WindowUpdateFrame:
    f = WindowUpdateFrame(sid)
    f.window_increment = n
    return f


def goaway_code(frames: list[Frame]) -> int | None:
    codes = [f.error_code for f in frames if isinstance(f, GoAwayFrame)]
    return codes[-1] if codes else None


def test_a_unary_call_is_three_events_and_one_buffer_back():
    c = Client()
    events = c.send(c.headers(1), data(1, b"hello", end_stream=True))
    assert [(e[0], e[1]) for e in events] == [(REQUEST, 1), (DATA_RECEIVED, 1)]
    assert events[0][2][":path"] == "/svc/M" and events[1][3] is True and bytes(events[1][2]) == b"hello"
    c.received()
    c.conn.send_response(1, fr.STATUS_200, b"reply", fr.literal(b"grpc-status", b"0"))
    frames = c.received()
    assert [type(f) for f in frames] == [HeadersFrame, DataFrame, HeadersFrame]
    assert frames[1].data == b"reply" and "END_STREAM" in frames[2].flags
    assert 1 not in c.conn.streams  # closed and forgotten


def test_the_stream_table_refuses_what_it_does_not_list():
    assert TRANSITIONS[(IDLE, 0)] == OPEN
    s = Stream(1, 100)
    with pytest.raises(StreamError):
        s.apply(SEND_DATA)  # an idle stream cannot send
    s.state = CLOSED
    with pytest.raises(StreamError):
        s.apply(RECV_DATA)


def test_data_after_end_stream_resets_only_that_stream():
    c = Client()
    c.send(c.headers(1), data(1, b"x", end_stream=True))
    c.received()
    events = c.send(data(1, b"more"))
    assert (STREAM_RESET, 1) in [(e[0], e[1]) for e in events]
    resets = [f for f in c.received() if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in resets] == [(1, fr.STREAM_CLOSED)]
    assert c.conn.closed is None


def test_concurrent_streams_at_the_limit_and_one_past():
    c = Client(Limits(max_concurrent_streams=3))
    events = c.send(*(c.headers(sid) for sid in (1, 3, 5)))
    assert len([e for e in events if e[0] == REQUEST]) == 3
    assert not [f for f in c.received() if isinstance(f, RstStreamFrame)]
    assert c.send(c.headers(7)) == []
    assert [(f.stream_id, f.error_code) for f in c.received()] == [(7, fr.REFUSED_STREAM)]


def test_held_reply_bytes_at_the_cap_and_past_it():
    c = Client(Limits(max_held_reply_bytes=1000))
    c.send(settings(INITIAL_WINDOW_SIZE=0))
    c.send(c.headers(1), c.headers(3))
    c.conn.send_data(1, b"x" * 1000)  # held: the stream window is 0
    assert c.conn.held_output == 1000
    assert c.send(c.headers(5))[0][0] == REQUEST  # at the cap: still accepted
    c.conn.send_data(3, b"y")
    c.received()
    assert c.send(c.headers(7)) == []  # past it: refused
    assert [(f.stream_id, f.error_code) for f in c.received()] == [(7, fr.REFUSED_STREAM)]
    c.send(RstStreamFrame(1))  # a reset stream's held bytes are let go
    assert c.conn.held_output == 1


def test_frames_that_ask_for_no_work_at_the_limit_and_one_past():
    c = Client(Limits(max_idle_frames=10, frames_per_turn=1000))
    c.send(*(PingFrame(0, b"12345678") for _ in range(10)))
    assert c.conn.closed is None
    c.send(c.headers(1))  # work: the count starts again
    c.send(*(PingFrame(0, b"12345678") for _ in range(10)))
    assert c.conn.closed is None
    c.send(PingFrame(0, b"12345678"))
    assert goaway_code(c.received()) == fr.ENHANCE_YOUR_CALM


@pytest.mark.parametrize("flood", ["empty_data", "empty_continuation", "settings", "window_update_idle"])
def test_each_kind_of_no_work_frame_is_counted(flood):
    c = Client(Limits(max_idle_frames=5))
    c.send(c.headers(1), c.headers(3))
    frames = {
        "empty_data": lambda: data(1, b""),
        "settings": lambda: settings(MAX_FRAME_SIZE=16384),
        "window_update_idle": lambda: window_update(1, 1),
    }
    if flood == "empty_continuation":
        f = HeadersFrame(5, c.encoder.encode(REQUEST_HEADERS))
        c.send(f)  # no END_HEADERS: CONTINUATION must follow
        c.send(*(ContinuationFrame(5, b"") for _ in range(6)))
    else:
        c.send(*(frames[flood]() for _ in range(6)))
    assert goaway_code(c.received()) == fr.ENHANCE_YOUR_CALM


def test_a_connection_parses_at_most_its_frame_budget_per_call():
    c = Client(Limits(frames_per_turn=10, max_idle_frames=1000))
    c.received()
    c.send(*(PingFrame(0, b"12345678") for _ in range(25)))
    assert len(c.received()) == 10 and c.conn.more_input
    c.conn.receive_data(b"")
    assert len(c.received()) == 10 and c.conn.more_input
    c.conn.receive_data(b"")
    assert len(c.received()) == 5 and not c.conn.more_input


def test_header_block_at_the_limit_and_one_past_in_headers_and_continuation():
    for split in (False, True):
        limits = Limits(max_header_block=300)
        c = Client(limits)
        block = c.encoder.encode(REQUEST_HEADERS)
        head = block
        block = head + fr.literal(b"x-pad", b"p" * (300 - len(head) - 10))  # 10: the literal's own bytes
        assert len(block) == 300
        if split:
            c.send(HeadersFrame(1, block[:100]), ContinuationFrame(1, block[100:], flags=["END_HEADERS"]))
        else:
            c.send(HeadersFrame(1, block, flags=["END_HEADERS"]))
        assert c.conn.closed is None and 1 in c.conn.streams
        c2 = Client(limits)
        big = block + b"\x00"  # one byte past
        if split:
            c2.send(HeadersFrame(1, big[:100]), ContinuationFrame(1, big[100:], flags=["END_HEADERS"]))
        else:
            c2.send(HeadersFrame(1, big, flags=["END_HEADERS"]))
        assert goaway_code(c2.received()) == fr.PROTOCOL_ERROR


def test_at_most_two_table_size_updates_open_a_block():
    two = b"\x3f\xe1\x1f" + b"\x20"  # size 4096, then size 0
    c = Client()
    c.send(HeadersFrame(1, two + hpack.Encoder().encode(REQUEST_HEADERS), flags=["END_HEADERS"]))
    assert c.conn.closed is None and 1 in c.conn.streams
    c = Client()
    c.send(HeadersFrame(1, two + b"\x20" + hpack.Encoder().encode(REQUEST_HEADERS), flags=["END_HEADERS"]))
    assert goaway_code(c.received()) == fr.COMPRESSION_ERROR
    assert fr.leading_size_updates(b"\x20" * 1_000_000) == 3  # counting stops early


def test_the_decoded_header_cache_is_bounded_in_bytes():
    c = Client(Limits(header_cache_bytes=4096))
    for i in range(200):
        c.send(c.headers(2 * i + 1, end_stream=True, extra=[("x-id", f"{i:08d}" * 8)]))
        c.conn.reset_stream(2 * i + 1, fr.CANCEL)
        assert c.conn.header_decoder.cache_bytes <= 4096


def test_window_overflow_resets_the_stream_or_closes_the_connection():
    c = Client()
    c.send(c.headers(1))
    c.received()
    c.send(window_update(1, fr.MAX_WINDOW))  # 65535 + 2**31 - 1 overflows
    assert [(f.stream_id, f.error_code) for f in c.received()] == [(1, fr.FLOW_CONTROL_ERROR)]
    assert c.conn.closed is None
    c.send(window_update(0, fr.MAX_WINDOW))
    assert goaway_code(c.received()) == fr.FLOW_CONTROL_ERROR


def test_data_beyond_the_connection_window_is_a_flow_control_error():
    """While the application holds what was sent (partial messages), the window is not returned,
    and a client that sends past it has broken flow control."""
    c = Client(Limits(connection_window=65535, stream_window=1 << 20, max_frame_size=1 << 20))
    c.send(settings(MAX_FRAME_SIZE=1 << 20))
    c.conn.held_input = lambda: 1 << 30  # the application holds it all: no window goes back
    c.send(c.headers(1))
    c.received()
    c.send(data(1, b"x" * 65535))
    assert c.conn.closed is None and not [f for f in c.received() if isinstance(f, WindowUpdateFrame)]
    c.send(data(1, b"x"))
    assert goaway_code(c.received()) == fr.FLOW_CONTROL_ERROR


def test_a_reply_held_for_window_is_sent_from_offsets_and_tiny_updates_coalesce():
    c = Client(Limits(max_idle_frames=10_000))
    c.send(settings(INITIAL_WINDOW_SIZE=0), c.headers(1))
    c.received()
    reply = bytes(range(256)) * 16  # 4 KiB
    c.conn.send_data(1, reply)
    assert c.received() == []
    c.send(*(window_update(1, 1) for _ in range(1000)))  # one read of 1,000 one-byte updates
    frames = [f for f in c.received() if isinstance(f, DataFrame)]
    assert [len(f.data) for f in frames] == [1000]  # one DATA frame, not one per update
    held = c.conn.streams[1].out[0]
    assert held.obj is reply and len(held) == len(reply) - 1000  # a view into the reply: no copy
    c.send(window_update(1, 10_000))
    assert b"".join(f.data for f in c.received() if isinstance(f, DataFrame)) == reply[1000:]


def test_blocked_output_holds_data_until_released():
    c = Client()
    c.send(c.headers(1))
    c.received()
    c.conn.set_output_blocked(True)
    c.conn.send_data(1, b"abc")
    assert c.received() == [] and c.conn.held_output == 3
    c.conn.set_output_blocked(False)
    assert [f.data for f in c.received()] == [b"abc"]


def test_settings_entries_at_the_cap_and_past_it_and_the_window_applied_once():
    c = Client()
    c.send(c.headers(1))
    c.received()
    entries = b"".join(struct.pack(">HL", fr.S_INITIAL_WINDOW_SIZE, 1000 + i) for i in range(32))
    c.send(fr.frame(fr.SETTINGS, 0, 0, entries))
    assert c.conn.closed is None and c.conn.streams[1].send_window == 1031  # the last value wins
    c.send(fr.frame(fr.SETTINGS, 0, 0, entries + entries[:6]))
    assert goaway_code(c.received()) == fr.ENHANCE_YOUR_CALM


@pytest.mark.parametrize("sid,payload,code", [(0, b"\x00" * 5, fr.PROTOCOL_ERROR),
                                              (1, b"\x00" * 4, fr.FRAME_SIZE_ERROR)])
def test_bad_priority_frames_close_the_connection(sid, payload, code):
    c = Client()
    c.send(fr.frame(fr.PRIORITY, 0, sid, payload))
    frames = c.received()
    assert goaway_code(frames) == code and not [f for f in frames if isinstance(f, RstStreamFrame)]


def test_a_block_that_changes_the_table_is_decoded_again_when_repeated():
    """Reusing a cached decode for a block that inserts into the dynamic table would skip the
    insertion, and the decoder's table would drift from the client's."""
    c = Client()
    enc = hpack.Encoder()
    first = enc.encode(REQUEST_HEADERS + [("z", "9")])
    c.send(HeadersFrame(1, first, flags=["END_HEADERS", "END_STREAM"]))
    adds = b"\x40\x01a\x011"  # literal with incremental indexing: a: 1
    for sid in (3, 5):
        c.send(HeadersFrame(sid, enc.encode(REQUEST_HEADERS) + adds, flags=["END_HEADERS", "END_STREAM"]))
    table = [(bytes(n), bytes(v)) for n, v in c.conn.header_decoder.table.dynamic_entries]
    assert table[:2] == [(b"a", b"1"), (b"a", b"1")]  # both insertions happened, as in the client's table


def test_headers_on_a_stream_already_closed_are_ignored_not_fatal():
    c = Client()
    c.send(c.headers(1, end_stream=True))
    c.conn.send_response(1, fr.STATUS_200, b"r", fr.literal(b"grpc-status", b"0"))
    c.received()
    c.send(c.headers(1, end_stream=True))  # trailers (or a reuse) after the stream closed
    assert c.conn.closed is None and c.conn.idle_frames == 1


def test_an_hpack_bomb_is_refused_past_twice_the_block_limit():
    """A small block that decodes to a large header list (one big indexed entry, referenced many
    times) fails on the decoded size: at most twice the block limit."""
    limits = Limits(max_header_block=1024)
    c = Client(limits)
    entry = b"\x40" + fr.hpack_int(1, 7) + b"x" + fr.hpack_int(700, 7) + b"v" * 700  # x: v*700, indexed as 62
    c.send(HeadersFrame(1, c.encoder.encode(REQUEST_HEADERS) + entry, flags=["END_HEADERS", "END_STREAM"]))
    assert c.conn.closed is None  # one copy: within the limit
    c.send(HeadersFrame(3, b"\xbe" * 2, flags=["END_HEADERS", "END_STREAM"]))  # index 62 twice: ~1.5 KiB
    assert c.conn.closed is None
    c.send(HeadersFrame(5, b"\xbe" * 40, flags=["END_HEADERS", "END_STREAM"]))  # forty times: ~29 KiB
    assert goaway_code(c.received()) == fr.COMPRESSION_ERROR
