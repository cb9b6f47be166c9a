"""One HTTP/2 stream on the server side: its state and what it still has to send.

The states and transitions are RFC 9113 §5.1's, written as one table in the way of h2's
`h2/stream.py`: `(state, input) -> next state`. An input the table does not list for a state is a
protocol violation by the peer, or a bug of ours, never something to paper over.
"""

from __future__ import annotations

from collections import deque

# States and inputs are plain ints (an Enum member hashes in Python, and the table is consulted
# several times per call on the hot path); NAMES spells them in errors.
IDLE, OPEN, HALF_CLOSED_REMOTE, HALF_CLOSED_LOCAL, CLOSED = range(5)
# HALF_CLOSED_REMOTE: the client has sent END_STREAM, we may still send;
# HALF_CLOSED_LOCAL: we have sent END_STREAM, the client may still send.
# *_END: the frame carries END_STREAM (one input, so the hot path looks the table up once per frame)
RECV_HEADERS, RECV_HEADERS_END, RECV_DATA, RECV_DATA_END, RECV_RST = range(5)
SEND_HEADERS, SEND_DATA, SEND_END_STREAM, SEND_RST = range(5, 9)
STATE_NAMES = ("IDLE", "OPEN", "HALF_CLOSED_REMOTE", "HALF_CLOSED_LOCAL", "CLOSED")
INPUT_NAMES = ("RECV_HEADERS", "RECV_HEADERS_END", "RECV_DATA", "RECV_DATA_END", "RECV_RST",
               "SEND_HEADERS", "SEND_DATA", "SEND_END_STREAM", "SEND_RST")

TRANSITIONS: dict[tuple[int, int], int] = {
    (IDLE, RECV_HEADERS): OPEN,
    (IDLE, RECV_HEADERS_END): HALF_CLOSED_REMOTE,
    (OPEN, RECV_HEADERS_END): HALF_CLOSED_REMOTE,  # trailers (without END_STREAM: the connection refuses them)
    (OPEN, RECV_DATA): OPEN,
    (OPEN, RECV_DATA_END): HALF_CLOSED_REMOTE,
    (OPEN, SEND_HEADERS): OPEN,
    (OPEN, SEND_DATA): OPEN,
    (OPEN, SEND_END_STREAM): HALF_CLOSED_LOCAL,
    (HALF_CLOSED_REMOTE, SEND_HEADERS): HALF_CLOSED_REMOTE,
    (HALF_CLOSED_REMOTE, SEND_DATA): HALF_CLOSED_REMOTE,
    (HALF_CLOSED_REMOTE, SEND_END_STREAM): CLOSED,
    (HALF_CLOSED_LOCAL, RECV_HEADERS_END): CLOSED,
    (HALF_CLOSED_LOCAL, RECV_DATA): HALF_CLOSED_LOCAL,
    (HALF_CLOSED_LOCAL, RECV_DATA_END): CLOSED,
}
for _state in (OPEN, HALF_CLOSED_REMOTE, HALF_CLOSED_LOCAL, CLOSED):  # a reset, either way, closes the stream
    TRANSITIONS[(_state, RECV_RST)] = CLOSED
    TRANSITIONS[(_state, SEND_RST)] = CLOSED
# the same table keyed by one int, state * 16 + input, for the lookup on the hot path
_TABLE = {state * 16 + event: nxt for (state, event), nxt in TRANSITIONS.items()}


class ConnectionError(Exception):  # noqa: A001 (HTTP/2's term; shadows the builtin only here)
    """The peer broke the rules for the connection: GOAWAY with `code`, then close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StreamError(Exception):
    """The peer broke the rules for one stream: it is reset with `code`, the connection goes on."""

    def __init__(self, sid: int, code: int, message: str) -> None:
        super().__init__(message)
        self.sid = sid
        self.code = code
        self.message = message


class Stream:
    __slots__ = ("sid", "state", "send_window", "recv_window", "out", "out_bytes", "trailers", "headers_sent")

    def __init__(self, sid: int, send_window: int) -> None:
        self.sid = sid
        self.state = IDLE
        self.send_window = send_window  # what the peer lets us send on this stream
        self.recv_window = 0  # bytes received on this stream and not yet returned to the peer
        # DATA waiting for window: views into the reply, sliced (never copied) as window opens
        self.out: deque[memoryview] = deque()
        self.out_bytes = 0
        self.trailers: bytes | None = None  # the closing HEADERS block, sent once `out` is empty
        self.headers_sent = False

    def apply(self, event: int) -> int:
        """Move to the state the table gives for `event`; StreamError STREAM_CLOSED when the table
        has no entry."""
        nxt = _TABLE.get(self.state * 16 + event)
        if nxt is None:
            raise StreamError(self.sid, 5, f"{INPUT_NAMES[event]} on a stream in state {STATE_NAMES[self.state]}")
        self.state = nxt
        return nxt

    @property
    def remote_closed(self) -> bool:
        return self.state == HALF_CLOSED_REMOTE or self.state == CLOSED
