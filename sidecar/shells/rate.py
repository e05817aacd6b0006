"""A token bucket for the messages of one socket: ``rate`` per second, bursts up to ``burst``.

Pure: the caller passes the clock (the event loop's), so it costs two float operations a
message and is tested without sleeping.
"""

from __future__ import annotations


class MessageRate:
    """Allows ``rate`` messages a second on average and ``burst`` at once."""

    __slots__ = ("_at", "_tokens", "burst", "dropped", "rate", "warned_at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a message rate needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now
        self.dropped = 0  # messages refused so far
        self.warned_at: float | None = None  # when the client was last told

    def allow(self, now: float) -> bool:
        """Take one message's token; False (and counted) when the bucket is empty."""
        tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if tokens >= 1:
            self._tokens = tokens - 1
            return True
        self._tokens = tokens
        self.dropped += 1
        return False

    def should_warn(self, now: float, every: float = 1.0) -> bool:
        """True at most once per ``every`` seconds: tell the client without answering each
        dropped message (that would double what a flooding client gets)."""
        if self.warned_at is None or now - self.warned_at >= every:
            self.warned_at = now
            return True
        return False
