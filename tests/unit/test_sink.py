"""The response sink's window: a sender on another thread waits once the frontend holds `credits`
responses, or `window_bytes` of their arrays, it has not taken; a take returns them all, in order,
and lets the sender go on. Every wait here is bounded."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from server.sink import ResponseSink


def _sending(sink: ResponseSink, responses: list, done: list) -> threading.Thread:
    def send() -> None:
        for i, response in enumerate(responses):
            sink.respond(response, i == len(responses) - 1)
            done.append(i)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


async def _settled(done: list, count: int) -> None:
    """Wait (bounded) until `done` has stopped growing, and return; it must have reached `count`."""
    deadline = time.monotonic() + 5
    while len(done) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # a sender that should wait would have gone on by now


def test_the_sender_waits_at_the_count_and_a_take_returns_all_in_order():
    async def main() -> None:
        sink = ResponseSink(asyncio.get_running_loop(), credits=4)
        done: list[int] = []
        responses = [{"OUT": np.array([i], np.int32)} for i in range(10)]
        thread = _sending(sink, responses, done)
        await _settled(done, 4)
        assert len(done) == 4  # four in the window, the fifth waits
        taken = await asyncio.wait_for(sink.take(), 5)
        assert [int(r["OUT"][0]) for r, _ in taken] == [0, 1, 2, 3]
        got = [int(r["OUT"][0]) for r, _ in taken]
        final = False
        while not final:
            batch = await asyncio.wait_for(sink.take(), 5)
            got += [int(r["OUT"][0]) for r, _ in batch]
            final = batch[-1][1]
            assert all(not f for _, f in list(batch)[:-1])  # only the last can end it
        assert got == list(range(10))
        thread.join(5)
        assert not thread.is_alive()

    asyncio.run(main())


def test_the_byte_window_holds_back_large_responses_but_always_fits_one():
    async def main() -> None:
        sink = ResponseSink(asyncio.get_running_loop(), credits=100, window_bytes=1000)
        done: list[int] = []
        big = [{"OUT": np.zeros(300, np.float32)} for _ in range(3)]  # 1200 bytes each: over the window
        thread = _sending(sink, big, done)
        await _settled(done, 1)
        assert len(done) == 1  # one fits, however large; the next waits
        for _ in range(3):
            batch = await asyncio.wait_for(sink.take(), 5)
            assert len(batch) == 1
        assert batch[-1][1]
        thread.join(5)
        assert not thread.is_alive()

    asyncio.run(main())


def test_closing_lets_a_waiting_sender_go_and_drops_what_follows():
    async def main() -> None:
        sink = ResponseSink(asyncio.get_running_loop(), credits=2)
        done: list[int] = []
        thread = _sending(sink, [{"OUT": np.array([i])} for i in range(50)], done)
        await _settled(done, 2)
        assert len(done) == 2
        sink.close()
        thread.join(5)
        assert not thread.is_alive() and len(done) == 50  # the rest went nowhere, at once
        assert sink.cancelled()

    asyncio.run(main())
