"""One request, many responses: the sink between a decoupled model's threads and the event loop.

    model thread:  respond(outputs | error | None, final)  ── waits while `credits` responses are
                   (Request.respond, through the batcher)      taken by nobody (backpressure)
                           │ call_soon_threadsafe
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
    """Made on the event loop thread, by the service, for one request to a decoupled model."""

    __slots__ = ("_loop", "_loop_thread", "_items", "_ready", "_credits", "_closed", "_ended")

    def __init__(self, loop: asyncio.AbstractEventLoop, credits: int = CREDITS) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._items: deque[tuple[Any, bool, bool]] = deque()  # (result, final, took a credit)
        self._ready = asyncio.Event()
        self._credits = threading.Semaphore(credits)
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
        if threading.get_ident() == self._loop_thread:  # never waits on the loop: it is the taker
            self._put(result, final, False)
            return
        while not self._credits.acquire(timeout=0.05):
            if self._closed:
                return
        self._loop.call_soon_threadsafe(self._put, result, final, True)

    def cancelled(self) -> bool:
        return self._closed

    # ---- the frontend's side (the event loop) ----------------------------------------------------

    def _put(self, result: Any, final: bool, credited: bool) -> None:
        if self._closed:
            if credited:
                self._credits.release()
            return
        self._items.append((result, final, credited))
        self._ready.set()

    async def get(self) -> tuple[Any, bool]:
        """The next response: (outputs dict | exception | None, final)."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        result, final, credited = self._items.popleft()
        if credited:
            self._credits.release()
        return result, final

    def fail(self, exc: BaseException) -> None:
        """The execution failed before the request's final response: it ends with this error."""
        if not self._ended:
            self._ended = True
            self._put(exc, True, False)

    def close(self) -> None:
        """Nothing more is taken; a sender waiting for room is let go."""
        if not self._closed:
            self._closed = True
            for _, _, credited in self._items:
                if credited:
                    self._credits.release()
            self._items.clear()
            self._credits.release()  # wakes a waiting sender now rather than at its next poll
