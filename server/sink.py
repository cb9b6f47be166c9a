"""One request, many responses: the sink between a decoupled model's threads and the event loop.

    model thread:  respond(outputs | error | None, final)  ── waits while `credits` responses are
                   (Request.respond, through the batcher)      taken by nobody (backpressure)
                           │ a deque; call_soon_threadsafe only when the loop waits for it
    event loop:    ResponseSink.get() ──> the frontend writes it, then asks for the next one

A decoupled model may answer a request zero, one or many times, from `execute` or from any thread
after it, until it flags a response final. The sink holds at most `credits` responses that the
frontend has not taken yet; past that, the model's `send` waits, so a client that reads slowly
slows the model's sender instead of growing the server's memory (the frontend takes the next
response only once the transport has room for it). A closed sink (the client went away, or the
request ended) drops what is sent to it and wakes a waiting sender, and `cancelled()` turns true:
that is what the model's `is_cancelled()` reads.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

# Responses a sink holds for its frontend before the model's sender waits.
CREDITS = 16


class ResponseSink:
    """Made on the event loop thread, by the service, for one request to a decoupled model.

    Responses wait in one deque under a lock; the loop is woken (one `call_soon_threadsafe`) only
    when the frontend waits for a response, not for every response: a model sending a burst wakes
    the loop once for all that arrive before the loop runs. Credits are a count under the same
    lock; a sender blocks on an Event only when none is left."""

    __slots__ = ("_loop", "_loop_thread", "_items", "_lock", "_waiting", "_ready", "_credits", "_room",
                 "_closed", "_ended")

    def __init__(self, loop: asyncio.AbstractEventLoop, credits: int = CREDITS) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._items: deque[tuple[Any, bool, bool]] = deque()  # (result, final, took a credit)
        self._lock = threading.Lock()
        self._waiting = False  # the frontend waits on _ready: the next response wakes the loop
        self._ready = asyncio.Event()
        self._credits = credits
        self._room: threading.Event | None = None  # set when a sender waits for a credit
        self._closed = False
        self._ended = False  # a final response (or an error) was sent: nothing more is taken

    # ---- the model's side (any thread) -----------------------------------------------------------

    def respond(self, result: Any, final: bool) -> None:
        """A response (outputs, an exception, or None for a flag-only final). Waits for room while
        the frontend has not taken `credits` responses; returns at once once the sink is closed."""
        if self._closed or self._ended:
            return
        if isinstance(result, Exception) or final:
            self._ended = True
        on_loop = threading.get_ident() == self._loop_thread  # never waits there: the loop is the taker
        while True:
            with self._lock:
                if self._closed:
                    return
                if on_loop or self._credits > 0:
                    if not on_loop:
                        self._credits -= 1
                    self._items.append((result, final, not on_loop))
                    wake, self._waiting = self._waiting, False
                    break
                room = self._room = threading.Event()
            room.wait(0.05)
        if wake:
            if on_loop:
                self._ready.set()
            else:
                self._loop.call_soon_threadsafe(self._ready.set)

    def cancelled(self) -> bool:
        return self._closed

    # ---- the frontend's side (the event loop) ----------------------------------------------------

    async def get(self) -> tuple[Any, bool]:
        """The next response: (outputs dict | exception | None, final)."""
        while True:
            self._ready.clear()
            with self._lock:
                if self._items:
                    result, final, credited = self._items.popleft()
                    room = None
                    if credited:
                        self._credits += 1
                        room, self._room = self._room, None
                    break
                self._waiting = True
            await self._ready.wait()
        if room is not None:
            room.set()
        return result, final

    def fail(self, exc: BaseException) -> None:
        """The execution failed before the request's final response: it ends with this error."""
        if not self._ended:
            self._ended = True
            with self._lock:
                if self._closed:
                    return
                self._items.append((exc, True, False))
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
            room, self._room = self._room, None
        if room is not None:
            room.set()
