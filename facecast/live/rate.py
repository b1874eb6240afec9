"""Adaptive output rate: when the output cannot keep up, send fewer frames rather than late
ones; step back up once it has been easy for a while."""

from __future__ import annotations

from collections import deque

import numpy as np

# Relative frame rates the output steps through when its link backs up (30 → 25 → 20 → 15).
RATE_LEVELS = (1.0, 5 / 6, 2 / 3, 1 / 2)


class RateController:
    """Steps the output rate down when writing a frame takes most of a frame interval (the
    link, or the encoder feeding it, cannot keep up), or when the output says it is backed
    up (a UDP output whose send queue on this host holds a standing backlog: its writes
    never block, see live_sink's "Backlog"), and back up after it has been easy for a
    while. Hysteresis keeps it from flapping."""

    def __init__(
        self, window: int = 30, high: float = 0.8, low: float = 0.35, recover_after: float = 10.0
    ) -> None:
        self.level = 0
        self.samples: deque[float] = deque(maxlen=window)
        self.high, self.low, self.recover_after = high, low, recover_after
        self.easy_since: float | None = None

    def observe(
        self, send_seconds: float, interval: float, now: float, backed_up: bool = False
    ) -> int | None:
        """Record one frame's send time (and whether earlier frames were still queued when
        it was due); returns the new level index when it changes."""
        load = send_seconds / max(interval, 1e-6)
        # still sending the frames before when the next is due: the link needed at least
        # a whole frame interval for each, a load of 1
        self.samples.append(max(load, 1.0) if backed_up else load)
        if len(self.samples) < self.samples.maxlen:
            return None
        load = float(np.mean(self.samples))
        if load > self.high and self.level < len(RATE_LEVELS) - 1:
            self.level += 1
            self.samples.clear()
            self.easy_since = None
            return self.level
        if load < self.low and self.level > 0:
            self.easy_since = self.easy_since or now
            if now - self.easy_since >= self.recover_after:
                self.level -= 1
                self.samples.clear()
                self.easy_since = None
                return self.level
        else:
            self.easy_since = None
        return None


class RateGate:
    """Which frames go on to the swap at a stepped-down output rate: a token bucket filled
    at that rate, so a 30 fps input at 25 fps keeps 5 frames of 6 whatever the timestamps'
    jitter, and a swap that already runs slower than the rate keeps every frame it takes.
    Left out before the swap, not after it: the frames left out cost nothing, and every
    frame the swap paid for is sent."""

    BURST = 2.0  # tokens the bucket holds: room for a frame that comes a little early

    def __init__(self) -> None:
        self.tokens = self.BURST
        self.last: float | None = None

    def reset(self) -> None:
        """Full again, for the next step down."""
        self.tokens, self.last = self.BURST, None

    def admit(self, t: float, interval: float) -> bool:
        """Whether the frame that came in at ``t`` (seconds) goes on, at one frame per
        ``interval`` seconds."""
        if self.last is not None:
            self.tokens = min(self.BURST, self.tokens + max(t - self.last, 0.0) / interval)
        self.last = t
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True
