"""H2Connection: the server side of one HTTP/2 connection, sans I/O.

    events = conn.receive_data(data)   # bytes from the socket -> what the peer asked for
    conn.send_headers / send_data / send_trailers / reset_stream / close
    conn.data_to_send()                # -> bytes for the socket, everything queued since last time

Events are tuples, cheap on the hot path: `(REQUEST, sid, headers, end_stream)`,
`(DATA_RECEIVED, sid, payload, end_stream)`, `(STREAM_ENDED, sid, None, False)` (the client
half-closed with an empty frame or trailers), `(STREAM_RESET, sid, code, False)` (the peer reset it,
or we did because it broke a stream rule: the application drops its work either way).

Limits (docs/security.md has the threat model; each is a `Limits` field with its flag):
- at most `max_concurrent_streams` open streams, and no new stream while the replies held for
  window exceed `max_held_reply_bytes`: both answered with RST_STREAM REFUSED_STREAM;
- a header block (HEADERS alone or with its CONTINUATIONs) of at most `max_header_block` bytes,
  opened by at most two dynamic-table size updates (RFC 7541 §4.2); decoded blocks are cached for
  reuse within `header_cache_bytes` (both in `headers.py`);
- frames that ask for no work (empty DATA or CONTINUATION, PRIORITY, SETTINGS, PING, a
  WINDOW_UPDATE that unblocks nothing, RST_STREAM or DATA on a stream already closed) are counted;
  a frame that does work (opens a stream, carries data, ends a stream) clears the count. Past
  `max_idle_frames` in a row, GOAWAY ENHANCE_YOUR_CALM;
- at most `frames_per_turn` frames are parsed per call; the rest waits (`more_input`), so one
  connection's flood cannot hold the event loop from the others.
Window overflows are FLOW_CONTROL_ERROR: for a stream, RST_STREAM (RFC 9113 §6.9.1); for the
connection, GOAWAY.

Replies waiting for window are held as memoryviews and sent from an offset, never re-sliced or
copied per WINDOW_UPDATE; DATA is emitted once per `receive_data` (and per send), so a flood of
1-byte WINDOW_UPDATEs in one read costs one DATA frame, not one per update (h2's model: the
application writes `data_to_send()` once after processing a read).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from ..framing import Reassembly
from . import frames as f
from . import stream as st
from .headers import HeaderDecoder
from .stream import ConnectionError, Stream, StreamError
from .windows import ReceiveWindow

REQUEST, DATA_RECEIVED, STREAM_ENDED, STREAM_RESET = range(4)
_MAX_SETTINGS = 32  # entries in one SETTINGS frame
Event = tuple[int, int, Any, bool]


@dataclass(frozen=True)
class Limits:
    max_concurrent_streams: int = 100
    max_held_reply_bytes: int = 4 << 20
    max_idle_frames: int = 10_000
    frames_per_turn: int = 1_000
    max_header_block: int = 64 << 10
    header_cache_bytes: int = 256 << 10
    max_frame_size: int = 1 << 20  # what we accept (SETTINGS_MAX_FRAME_SIZE)
    stream_window: int = 4 << 20  # what a client may send ahead of us on one stream
    connection_window: int = 16 << 20  # and on the whole connection


class H2Connection:
    def __init__(self, limits: Limits = Limits()) -> None:
        self.limits = limits
        self.streams: dict[int, Stream] = {}
        self.last_sid = 0
        self.send_window = f.DEFAULT_WINDOW  # the peer's connection window for what we send
        self.peer_initial_window = f.DEFAULT_WINDOW
        self.peer_max_frame = f.DEFAULT_MAX_FRAME
        self.recv_window = ReceiveWindow(limits.connection_window)
        self._refill_at = limits.connection_window // 2
        # bytes the application holds unconsumed (partial messages): it sets this to its own count
        self.held_input: Callable[[], int] = lambda: 0
        # set when the window was not returned because held_input() fills it: with every stream's
        # message partial, no stream can finish; the application must drop one (it knows which)
        self.input_stalled = False
        self.unreturned = 0  # received on the connection and not yet returned
        self.held_output = 0  # reply bytes queued on streams, waiting for window
        self.output_blocked = False  # the application's socket is full: queue DATA, send none
        self.more_input = False  # input left unparsed for the frame budget: call receive_data(b"")
        self.closed: tuple[int, str] | None = None  # set once we sent GOAWAY for an error
        self.goaway = False  # no new streams (we or the peer said GOAWAY)
        self.idle_frames = 0
        self._input = Reassembly()
        self._preface_seen = False
        self.output: list[bytes | memoryview] = []  # what to send, in order: data_to_send() takes it
        self._ready: list[Stream] = []  # streams whose window opened during this read
        self._events: list[Event] = []
        self.header_decoder = HeaderDecoder(limits.max_header_block, limits.header_cache_bytes)
        self._pending_block: tuple[int, int, bytearray] | None = None  # sid, flags, fragments so far
        self._dispatch: dict[int, Callable[[int, int, memoryview | bytes], None]] = {
            f.DATA: self._data, f.HEADERS: self._headers, f.PRIORITY: self._priority,
            f.RST_STREAM: self._rst_stream, f.SETTINGS: self._settings, f.PUSH_PROMISE: self._push_promise,
            f.PING: self._ping, f.GOAWAY: self._goaway, f.WINDOW_UPDATE: self._window_update,
            f.CONTINUATION: self._continuation,
        }
        settings = b"".join(f.SETTING.pack(k, v) for k, v in (
            (f.S_MAX_CONCURRENT_STREAMS, limits.max_concurrent_streams),
            (f.S_INITIAL_WINDOW_SIZE, limits.stream_window), (f.S_MAX_FRAME_SIZE, limits.max_frame_size),
            (f.S_MAX_HEADER_LIST_SIZE, 2 * limits.max_header_block), (f.S_ENABLE_PUSH, 0)))
        self.output.append(f.frame(f.SETTINGS, 0, 0, settings))
        if limits.connection_window > f.DEFAULT_WINDOW:
            self.output.append(f.frame(f.WINDOW_UPDATE, 0, 0, f.U32.pack(limits.connection_window - f.DEFAULT_WINDOW)))

    # ---- input ---------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse what `data` completes, up to the frame budget; returns the events. After a
        connection error, `closed` is set, a GOAWAY is queued and nothing more is parsed."""
        events = self._events = []
        if self.closed is not None:
            return events
        inp = self._input
        buf = inp.feed(data) if inp.rest or inp.need else data  # (feed() would say the same, slower)
        self.more_input = False
        if buf is None:
            return events
        try:
            pos = 0 if self._preface_seen else self._preface(buf)
            if pos < 0:
                return events
            end, budget = len(buf), self.limits.frames_per_turn
            unpack, max_frame, view = f.FRAME_HEAD.unpack_from, self.limits.max_frame_size, memoryview(buf)
            dispatch = self._dispatch
            while end - pos >= 9:
                if not budget:
                    self.more_input = True
                    break
                hi, lo, ftype, flags, sid = unpack(buf, pos)
                length = (hi << 16) | lo
                if length > max_frame:
                    raise ConnectionError(f.FRAME_SIZE_ERROR,
                                          f"frame of {length} bytes exceeds SETTINGS_MAX_FRAME_SIZE")
                if end - pos - 9 < length:
                    self._input.keep(buf, pos, 9 + length)
                    pos = end = -1
                    break
                budget -= 1
                # a small frame is sliced (one object); a large one viewed, not copied
                payload = buf[pos + 9:pos + 9 + length] if length < 4096 else view[pos + 9:pos + 9 + length]
                pos += 9 + length
                if self._pending_block is not None and ftype != f.CONTINUATION:
                    raise ConnectionError(f.PROTOCOL_ERROR, "expected a CONTINUATION frame")
                handler = dispatch.get(ftype)
                if handler is None:
                    self._idle()  # unknown frame types are ignored, as the RFC asks, but counted
                    continue
                try:
                    handler(flags, sid & 0x7FFFFFFF, payload)
                except StreamError as exc:
                    self.reset_stream(exc.sid, exc.code)
                    events.append((STREAM_RESET, exc.sid, exc.code, False))
                    self._idle()  # a reset asks nothing of us either: a flood of them is counted
            if 0 <= pos < len(buf):
                inp.keep(buf, pos)
        except ConnectionError as exc:
            self.close(exc.code, exc.message)
            return events
        if self.unreturned >= self._refill_at or self.recv_window.available <= 0:
            self._refill()
        if self._ready:
            self._flush_ready()
        return events

    def _preface(self, buf: bytes) -> int:
        n = len(f.PREFACE)
        if len(buf) < n:
            if not f.PREFACE.startswith(buf):
                raise ConnectionError(f.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            self._input.keep(buf, 0)
            return -1
        if not buf.startswith(f.PREFACE):
            raise ConnectionError(f.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
        self._preface_seen = True
        return n

    def _idle(self) -> None:
        self.idle_frames += 1
        if self.idle_frames > self.limits.max_idle_frames:
            raise ConnectionError(f.ENHANCE_YOUR_CALM,
                                  f"more than {self.limits.max_idle_frames} frames in a row that ask for no work")

    # ---- frames --------------------------------------------------------------------------------

    def _data(self, flags: int, sid: int, payload: memoryview | bytes) -> None:
        size = len(payload)
        window = self.recv_window
        window.available -= size
        if window.available < 0:
            raise ConnectionError(f.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.unreturned += size
        stream = self.streams.get(sid)
        if stream is None:
            if sid == 0 or sid > self.last_sid:
                raise ConnectionError(f.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            self._idle()  # a stream we already closed: dropped (its bytes still count above)
            return
        end = bool(flags & f.END_STREAM)
        if flags & f.PADDED:
            if not size or payload[0] >= size:
                raise ConnectionError(f.PROTOCOL_ERROR, "DATA padding exceeds the frame")
            payload = payload[1:size - payload[0]]
        if payload or end:
            self.idle_frames = 0
        else:
            self._idle()
        stream.apply(st.RECV_DATA_END if end else st.RECV_DATA)
        if not end:
            stream.recv_window += size
            if stream.recv_window >= self.limits.stream_window // 2:
                self.output.append(f.frame(f.WINDOW_UPDATE, 0, sid, f.U32.pack(stream.recv_window)))
                stream.recv_window = 0
        self._events.append((DATA_RECEIVED, sid, payload, end))
        if stream.state == st.CLOSED:
            self._forget(stream)

    def _headers(self, flags: int, sid: int, payload: memoryview | bytes) -> None:
        if sid % 2 == 0:
            raise ConnectionError(f.PROTOCOL_ERROR, "client streams have odd identifiers")
        if flags & (f.END_HEADERS | f.PADDED | f.PRIORITY_FLAG) == f.END_HEADERS:  # the usual case
            if len(payload) > self.limits.max_header_block:
                raise ConnectionError(f.PROTOCOL_ERROR, f"header block exceeds {self.limits.max_header_block} bytes")
            return self._header_block(sid, flags, bytes(payload))
        start, end = 0, len(payload)
        if flags & f.PADDED:
            if not payload:
                raise ConnectionError(f.PROTOCOL_ERROR, "PADDED HEADERS frame without a pad length")
            start, end = 1, len(payload) - payload[0]
        if flags & f.PRIORITY_FLAG:
            start += 5
        if start > end or end > len(payload):
            raise ConnectionError(f.PROTOCOL_ERROR, "HEADERS padding exceeds the frame")
        if end - start > self.limits.max_header_block:
            raise ConnectionError(f.PROTOCOL_ERROR,
                                  f"header block exceeds {self.limits.max_header_block} bytes")
        if flags & f.END_HEADERS:
            self._header_block(sid, flags, bytes(payload[start:end]))
        else:
            self._pending_block = (sid, flags, bytearray(payload[start:end]))

    def _continuation(self, flags: int, sid: int, payload: memoryview | bytes) -> None:
        if self._pending_block is None or self._pending_block[0] != sid:
            raise ConnectionError(f.PROTOCOL_ERROR, "unexpected CONTINUATION frame")
        block = self._pending_block[2]
        block += payload
        if len(block) > self.limits.max_header_block:
            raise ConnectionError(f.PROTOCOL_ERROR, f"header block exceeds {self.limits.max_header_block} bytes")
        if flags & f.END_HEADERS:
            first_flags = self._pending_block[1]
            self._pending_block = None
            self._header_block(sid, first_flags, bytes(block))
        elif not payload:
            self._idle()

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        headers = self.header_decoder.decode(block)
        end = bool(flags & f.END_STREAM)
        stream = self.streams.get(sid)
        if stream is not None:  # trailers from the client: they must end the stream
            if not end:
                raise StreamError(sid, f.PROTOCOL_ERROR, "trailers without END_STREAM")
            stream.apply(st.RECV_HEADERS_END)
            self.idle_frames = 0
            self._events.append((STREAM_ENDED, sid, None, False))
            if stream.state == st.CLOSED:
                self._forget(stream)
            return
        if sid <= self.last_sid:  # a stream already closed (trailers after our reset, say): ignored, counted
            self._idle()
            return
        self.last_sid = sid
        self.idle_frames = 0
        if (self.goaway or len(self.streams) >= self.limits.max_concurrent_streams
                or self.held_output > self.limits.max_held_reply_bytes):
            self.output.append(f.frame(f.RST_STREAM, 0, sid, f.U32.pack(f.REFUSED_STREAM)))
            return
        stream = self.streams[sid] = Stream(sid, self.peer_initial_window)
        stream.apply(st.RECV_HEADERS_END if end else st.RECV_HEADERS)
        self._events.append((REQUEST, sid, headers, end))

    def _priority(self, flags: int, sid: int, payload: memoryview | bytes) -> None:
        if not sid:
            raise ConnectionError(f.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:  # a stream error by the RFC, which lets us treat it as the connection's
            raise ConnectionError(f.FRAME_SIZE_ERROR, "PRIORITY payload is not 5 bytes")
        self._idle()

    def _rst_stream(self, flags: int, sid: int, payload: memoryview | bytes) -> None:
        if not sid:
            raise ConnectionError(f.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ConnectionError(f.FRAME_SIZE_ERROR, "RST_STREAM payload is not 4 bytes")
        if sid > self.last_sid:
            raise ConnectionError(f.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        stream = self.streams.get(sid)
        if stream is None:
            self._idle()
            return
        stream.apply(st.RECV_RST)
        self._forget(stream)
        self._events.append((STREAM_RESET, sid, f.U32.unpack(payload)[0], False))

    def _settings(self, flags: int, sid: int, payload: memoryview | bytes) -> None:
        if sid:
            raise ConnectionError(f.PROTOCOL_ERROR, "SETTINGS on a stream")
        self._idle()
        if flags & f.ACK:
            if payload:
                raise ConnectionError(f.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ConnectionError(f.FRAME_SIZE_ERROR, "SETTINGS payload is not a multiple of 6")
        if len(payload) > 6 * _MAX_SETTINGS:  # there are six settings: more entries are only work for us
            raise ConnectionError(f.ENHANCE_YOUR_CALM, f"more than {_MAX_SETTINGS} entries in one SETTINGS frame")
        window = None
        for i in range(0, len(payload), 6):
            key, value = f.SETTING.unpack_from(payload, i)
            if key == f.S_INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise ConnectionError(f.FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too large")
                window = value  # applied once, below: the last value wins
            elif key == f.S_MAX_FRAME_SIZE:
                if not 16384 <= value <= 16777215:
                    raise ConnectionError(f.PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            elif key == f.S_ENABLE_PUSH and value > 1:
                raise ConnectionError(f.PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH must be 0 or 1")
            # header table size: our replies never use the dynamic table, so nothing to do
        if window is not None and window != self.peer_initial_window:
            delta = window - self.peer_initial_window
            self.peer_initial_window = window
            for stream in self.streams.values():
                stream.send_window += delta
                if stream.send_window > f.MAX_WINDOW:
                    raise ConnectionError(f.FLOW_CONTROL_ERROR, "a stream window overflows")
                if delta > 0 and stream.out:
                    self._ready.append(stream)
        self.output.append(f.frame(f.SETTINGS, f.ACK, 0))

    def _push_promise(self, flags: int, sid: int, payload: memoryview | bytes) -> None:
        raise ConnectionError(f.PROTOCOL_ERROR, "clients cannot push")

    def _ping(self, flags: int, sid: int, payload: memoryview | bytes) -> None:
        if len(payload) != 8:
            raise ConnectionError(f.FRAME_SIZE_ERROR, "PING payload is not 8 bytes")
        if sid:
            raise ConnectionError(f.PROTOCOL_ERROR, "PING on a stream")
        self._idle()
        if not flags & f.ACK:
            self.output.append(f.frame(f.PING, f.ACK, 0, bytes(payload)))

    def _goaway(self, flags: int, sid: int, payload: memoryview | bytes) -> None:
        if sid:
            raise ConnectionError(f.PROTOCOL_ERROR, "GOAWAY on a stream")
        self.goaway = True  # the peer is leaving: finish what is open, then close

    def _window_update(self, flags: int, sid: int, payload: memoryview | bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError(f.FRAME_SIZE_ERROR, "WINDOW_UPDATE payload is not 4 bytes")
        increment = f.U32.unpack(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if not increment:
                raise ConnectionError(f.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > f.MAX_WINDOW:
                raise ConnectionError(f.FLOW_CONTROL_ERROR, "connection window overflow")
            if self.held_output:
                self._ready.extend(s for s in self.streams.values() if s.out)
            else:
                self._idle()
            return
        stream = self.streams.get(sid)
        if stream is None:
            if sid > self.last_sid:
                raise ConnectionError(f.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            self._idle()
            return
        if not increment:
            raise StreamError(sid, f.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        stream.send_window += increment
        if stream.send_window > f.MAX_WINDOW:
            raise StreamError(sid, f.FLOW_CONTROL_ERROR, "stream window overflow")
        if stream.out:
            self._ready.append(stream)
        else:
            self._idle()

    # ---- output --------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = self.output
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        self.output = []
        return bytes(data)

    def send_headers(self, sid: int, block: bytes) -> None:
        stream = self.streams[sid]
        stream.apply(st.SEND_HEADERS)
        stream.headers_sent = True
        self.output.append(f.frame(f.HEADERS, f.END_HEADERS, sid, block))

    def send_data(self, sid: int, data: bytes) -> None:
        """Queue `data` on the stream; as much as the windows allow goes out now."""
        stream = self.streams[sid]
        stream.apply(st.SEND_DATA)
        n = len(data)
        if (not stream.out and not self.output_blocked and n <= self.send_window and n <= stream.send_window
                and n <= self.peer_max_frame):
            self.send_window -= n
            stream.send_window -= n
            self.output.append(f.frame_head(f.DATA, 0, sid, n))
            self.output.append(data)
            return
        stream.out.append(memoryview(data))
        stream.out_bytes += n
        self.held_output += n
        self._flush(stream)

    def send_response(self, sid: int, headers: bytes, data: bytes, trailers: bytes) -> None:
        """A whole response (headers, one DATA payload, trailers): one buffer when the windows
        allow it, which is a unary gRPC call's case; else the same as the three calls in turn."""
        stream = self.streams[sid]
        n = len(data)
        if (stream.out or self.output_blocked or n > self.send_window or n > stream.send_window
                or n > self.peer_max_frame):
            self.send_headers(sid, headers)
            self.send_data(sid, data)
            self.send_trailers(sid, trailers)
            return
        # SEND_HEADERS and SEND_DATA leave the state as it is wherever SEND_END_STREAM is allowed
        remote_open = stream.state == st.OPEN
        stream.apply(st.SEND_END_STREAM)
        self.send_window -= n
        stream.send_window -= n
        h, t, pack = len(headers), len(trailers), f.FRAME_HEAD.pack
        self.output.append(pack(h >> 16, h & 0xFFFF, f.HEADERS, f.END_HEADERS, sid) + headers
                           + pack(n >> 16, n & 0xFFFF, f.DATA, 0, sid) + data
                           + pack(t >> 16, t & 0xFFFF, f.HEADERS, f.END_HEADERS | f.END_STREAM, sid) + trailers)
        if remote_open:
            stream.apply(st.SEND_RST)
            self.output.append(f.frame(f.RST_STREAM, 0, sid, f.U32.pack(f.NO_ERROR)))
        del self.streams[sid]

    def send_trailers(self, sid: int, block: bytes) -> None:
        """End the stream with `block` (trailers, or a trailers-only response when no headers went
        out), after any DATA still held. If the client is still sending, it is then told to stop
        with RST_STREAM NO_ERROR (RFC 9113 §8.1)."""
        stream = self.streams.get(sid)
        if stream is None:  # reset (by the peer or for its errors) meanwhile: nothing more to send
            return
        stream.trailers = f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, sid, block)
        stream.headers_sent = True
        if not stream.out:
            self._end(stream)

    def reset_stream(self, sid: int, code: int) -> None:
        stream = self.streams.get(sid)
        if stream is not None:
            stream.apply(st.SEND_RST)
            self._forget(stream)
        self.output.append(f.frame(f.RST_STREAM, 0, sid, f.U32.pack(code)))

    def close(self, code: int, message: str = "") -> None:
        """GOAWAY with `code`: the application closes the socket once it has written it."""
        if self.closed is None:
            self.closed = (code, message)
            self.goaway = True
            self.output.append(f.frame(f.GOAWAY, 0, 0, f.U32.pack(self.last_sid) + f.U32.pack(code)
                                     + message.encode()[:256]))

    def shutdown(self) -> None:
        """GOAWAY NO_ERROR: no new streams; the open ones finish."""
        if not self.goaway:
            self.goaway = True
            self.output.append(f.frame(f.GOAWAY, 0, 0, f.U32.pack(self.last_sid) + f.U32.pack(f.NO_ERROR)))

    def set_output_blocked(self, blocked: bool) -> None:
        """The socket's buffer is full (True) or drained (False). While blocked, DATA stays queued on
        its streams (and counts toward `max_held_reply_bytes`)."""
        self.output_blocked = blocked
        if not blocked and self.held_output:
            self._ready.extend(s for s in self.streams.values() if s.out)
            self._flush_ready()

    def release_input(self) -> None:
        """The application let go of input it held (`held_input()` went down): return window now."""
        self._refill()

    # ---- internals -----------------------------------------------------------------------------

    def _refill(self) -> None:
        """Return the connection's window once half of it is used (or it ran dry), unless the
        partial messages the application holds fill it: then flow control makes the client wait
        until they complete, and a connection never holds much more than its window."""
        if not self.unreturned or (self.unreturned < self.recv_window.size // 2 and self.recv_window.available > 0):
            return
        if self.held_input() >= self.recv_window.size:
            self.input_stalled = True  # the application must let go of something, or nothing moves
            return
        self.input_stalled = False
        increment = self.recv_window.consume(self.unreturned)
        self.unreturned = 0
        if increment:
            self.output.append(f.frame(f.WINDOW_UPDATE, 0, 0, f.U32.pack(increment)))

    def _flush_ready(self) -> None:
        if self._ready:
            ready, self._ready = self._ready, []
            for stream in dict.fromkeys(ready):  # each once, in order
                if stream.out:
                    self._flush(stream)

    def _flush(self, stream: Stream) -> None:
        out = self.output
        while stream.out and not self.output_blocked:
            data = stream.out[0]
            n = min(len(data), self.send_window, stream.send_window, self.peer_max_frame)
            if n <= 0:
                return
            self.send_window -= n
            stream.send_window -= n
            stream.out_bytes -= n
            self.held_output -= n
            out.append(f.frame_head(f.DATA, 0, stream.sid, n))
            if n == len(data):
                out.append(data)
                stream.out.popleft()
            else:
                out.append(data[:n])
                stream.out[0] = data[n:]  # a view at an offset: nothing is copied
        if not stream.out and stream.trailers is not None and stream.sid in self.streams:
            self._end(stream)

    def _end(self, stream: Stream) -> None:
        self.output.append(cast(bytes, stream.trailers))
        stream.trailers = None
        remote_open = not stream.remote_closed
        stream.apply(st.SEND_END_STREAM)
        if remote_open:
            stream.apply(st.SEND_RST)
            self.output.append(f.frame(f.RST_STREAM, 0, stream.sid, f.U32.pack(f.NO_ERROR)))
        self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        if self.streams.pop(stream.sid, None) is not None and stream.out_bytes:
            self.held_output -= stream.out_bytes
            stream.out_bytes = 0
            stream.out.clear()
