"""One HTTP/2 stream on the server side: its state and what it still has to send.

The states and transitions are RFC 9113 §5.1's, written as one table in the way of h2's
`h2/stream.py`: `(state, input) -> next state`. An input the table does not list for a state is a
protocol violation by the peer, or a bug of ours, never something to paper over.
"""

from __future__ import annotations

from collections import deque
from enum import Enum


class State(Enum):
    IDLE = 0
    OPEN = 1
    HALF_CLOSED_REMOTE = 2  # the client has sent END_STREAM; we may still send
    HALF_CLOSED_LOCAL = 3  # we have sent END_STREAM; the client may still send
    CLOSED = 4


class Input(Enum):
    RECV_HEADERS = 0
    RECV_DATA = 1
    RECV_END_STREAM = 2
    RECV_RST = 3
    SEND_HEADERS = 4
    SEND_DATA = 5
    SEND_END_STREAM = 6
    SEND_RST = 7


S, I = State, Input  # noqa: E741
TRANSITIONS: dict[tuple[State, Input], State] = {
    (S.IDLE, I.RECV_HEADERS): S.OPEN,
    (S.OPEN, I.RECV_HEADERS): S.OPEN,  # trailers: must carry END_STREAM (checked by the connection)
    (S.OPEN, I.RECV_DATA): S.OPEN,
    (S.OPEN, I.RECV_END_STREAM): S.HALF_CLOSED_REMOTE,
    (S.OPEN, I.SEND_HEADERS): S.OPEN,
    (S.OPEN, I.SEND_DATA): S.OPEN,
    (S.OPEN, I.SEND_END_STREAM): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_REMOTE, I.SEND_HEADERS): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, I.SEND_DATA): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, I.SEND_END_STREAM): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, I.RECV_HEADERS): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, I.RECV_DATA): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, I.RECV_END_STREAM): S.CLOSED,
}
for _state in State:  # a reset, either way, closes any stream that exists
    if _state is not S.IDLE:
        TRANSITIONS[(_state, I.RECV_RST)] = S.CLOSED
        TRANSITIONS[(_state, I.SEND_RST)] = S.CLOSED


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
        self.state = State.IDLE
        self.send_window = send_window  # what the peer lets us send on this stream
        self.recv_window = 0  # bytes received on this stream and not yet returned to the peer
        # DATA waiting for window: views into the reply, sliced (never copied) as window opens
        self.out: deque[memoryview] = deque()
        self.out_bytes = 0
        self.trailers: bytes | None = None  # the closing HEADERS block, sent once `out` is empty
        self.headers_sent = False

    def apply(self, event: Input, code: int = 0) -> State:
        """Move to the state the table gives for `event`; StreamError (with `code`, STREAM_CLOSED
        by default) when the table has no entry."""
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise StreamError(self.sid, code or 5, f"{event.name} on a stream in state {self.state.name}")
        self.state = nxt
        return nxt

    @property
    def remote_closed(self) -> bool:
        return self.state in (State.HALF_CLOSED_REMOTE, State.CLOSED)
