"""One request, many responses: the sink between a decoupled model's threads and the event loop.

    model thread:  respond(outputs | error | None, final)  ── waits while the window is full of
                   (Request.respond, through the batcher)      responses taken by nobody (backpressure)
                           │ a deque; call_soon_threadsafe only when the loop waits for it
    event loop:    ResponseSink.take() ──> the frontend writes what came, then asks for more

A decoupled model may answer a request zero, one or many times, from `execute` or from any thread
after it, until it flags a response final. The sink holds at most `credits` responses that the
frontend has not taken yet, and about `window_bytes` of their arrays (a window, as HTTP/2's is: at
least one response fits, however large); past that, the model's `send` waits, so a client that reads
slowly slows the model's sender instead of growing the server's memory (the frontend takes more only
once the transport has room for what it took). A closed sink (the client went away, or the request
ended) drops what is sent to it and wakes a waiting sender, and `cancelled()` turns true: that is
what the model's `is_cancelled()` reads.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

# What a sink holds for its frontend before the model's sender waits: responses, and bytes of
# their arrays (object arrays count their pointers; the count bounds those). The frontend takes
# all it holds at once and writes them together, so the window is also the largest batch: at 16
# responses a batch, a stream of small ones ran at 57-59k responses/s over gRPC, at 50 about 76k,
# whole (100) about 120k (docs/perf.md).
CREDITS = 256
WINDOW_BYTES = 1 << 20


class ResponseSink:
    """Made on the event loop thread, by the service, for one request to a decoupled model.

    Responses wait in one deque under a lock; the loop is woken (one `call_soon_threadsafe`) only
    when the frontend waits for a response, not for every response: a model sending a burst wakes
    the loop once for all that arrive before the loop runs, and the frontend takes them all at
    once (`take`). Credits are a count under the same lock; a sender blocks on the sink's one
    Event only when none is left, and is woken once the frontend has taken what was there, not
    once per response (each wake is a thread switch)."""

    __slots__ = ("_loop", "_loop_thread", "_items", "_lock", "_waiting", "_ready", "_credits", "_held",
                 "_window", "_held_bytes", "_room", "_sender_waits", "_closed", "_ended")

    def __init__(self, loop: asyncio.AbstractEventLoop, credits: int = CREDITS,
                 window_bytes: int = WINDOW_BYTES) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._items: deque[tuple[Any, bool]] = deque()  # (result, final); an ending one is the last
        self._lock = threading.Lock()
        self._waiting = False  # the frontend waits on _ready: the next response wakes the loop
        self._ready = asyncio.Event()
        self._credits = credits
        self._held = 0  # credits taken by the responses in _items
        self._window = window_bytes
        self._held_bytes = 0  # their arrays' bytes
        self._room = threading.Event()  # set when credits come back to a sender that waits for one
        self._sender_waits = False
        self._closed = False
        self._ended = False  # a final response (or an error) was taken in: nothing more is

    # ---- the model's side (any thread) -----------------------------------------------------------

    def respond(self, result: Any, final: bool) -> None:
        """A response (outputs, an exception, or None for a flag-only final). Waits for room while
        the frontend has not taken `credits` responses; returns at once once the sink is closed
        or has ended (what comes after a final response is dropped, whichever thread sends it)."""
        on_loop = threading.get_ident() == self._loop_thread  # never waits there: the loop is the taker
        size = 0
        if type(result) is dict and not on_loop:
            for array in result.values():
                size += array.nbytes
        while True:
            with self._lock:
                if self._closed or self._ended:
                    return
                if on_loop or (self._credits > 0 and (self._held_bytes + size <= self._window or not self._held)):
                    if not on_loop:
                        self._credits -= 1
                        self._held += 1
                        self._held_bytes += size
                    self._items.append((result, final))
                    if final or isinstance(result, Exception):
                        self._ended = True
                    wake, self._waiting = self._waiting, False
                    break
                self._sender_waits = True
                self._room.clear()
            self._room.wait(0.05)
        if wake:
            if on_loop:
                self._ready.set()
            else:
                self._loop.call_soon_threadsafe(self._ready.set)

    def cancelled(self) -> bool:
        return self._closed

    # ---- the frontend's side (the event loop) ----------------------------------------------------

    async def take(self) -> deque[tuple[Any, bool]]:
        """Every response sent and not yet taken, at least one, in order: (outputs dict |
        exception | None, final) each. Only the last can end the request (final, or an error)."""
        while True:
            self._ready.clear()
            with self._lock:
                if self._items:
                    items = self._items
                    self._items = deque()
                    self._credits += self._held
                    self._held = self._held_bytes = 0
                    room, self._sender_waits = self._sender_waits, False
                    break
                self._waiting = True
            await self._ready.wait()
        if room:
            self._room.set()
        return items

    def fail(self, exc: BaseException) -> None:
        """The execution failed before the request's final response: it ends with this error."""
        with self._lock:
            if self._closed or self._ended:
                return
            self._ended = True
            self._items.append((exc, True))
            wake, self._waiting = self._waiting, False
        if wake:
            self._ready.set()

    def close(self) -> None:
        """Nothing more is taken; a sender waiting for room is let go."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._items.clear()
        self._room.set()
