"""The receive window we grant a peer, and when to give it back (RFC 9113 §6.9).

The algorithm is h2's (`h2/windows.py`, WindowManager): count the bytes the application has
consumed and return them in one WINDOW_UPDATE once they reach half the window, or sooner when the
window has run dry, so a peer is never stalled and we never send an update per frame.
"""

from __future__ import annotations


class ReceiveWindow:
    __slots__ = ("size", "available", "consumed")

    def __init__(self, size: int) -> None:
        self.size = size  # what we advertised
        self.available = size  # what the peer may still send (H2Connection counts DATA off it)
        self.consumed = 0  # received and consumed, not yet returned

    def consume(self, n: int) -> int:
        """The application is done with `n` bytes: the increment to send now, or 0."""
        self.consumed += n
        if self.consumed >= self.size // 2 or (self.available <= 0 and self.consumed):
            increment, self.consumed = self.consumed, 0
            self.available += increment
            return increment
        return 0
