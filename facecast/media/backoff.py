"""Reconnect pacing: exponential backoff with jitter, forever unless told otherwise.

Two kinds of failure are paced differently. A peer that is down (connection refused, a name
that does not resolve, a timeout) gets exponentially longer waits, so that many clients do not
hammer a server that is struggling or restarting. A peer that answered "nothing here yet" (an
RTMP server with no publisher on the key, an HLS 404) is up and cheap to ask again, and what
it lacks can come back at any moment, so it is polled (``poll_delay``) at a short fixed
interval instead: a grown backoff would only add seconds to the stream's return.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays 0.5 s, 1 s, 2 s, ... capped at ``maximum``, each drawn uniformly from
    [delay/2, delay] so that many clients of one server do not reconnect in lockstep."""

    initial: float = 0.5
    maximum: float = 10.0
    factor: float = 2.0
    max_attempts: int | None = None  # None: forever
    attempts: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)
    # The exponent of the next delay. Apart from ``attempts`` because a poll counts toward
    # ``max_attempts`` but says the peer is up, which restarts the exponential climb.
    _level: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self._level = max(self._level, self.attempts)  # Backoff(attempts=n) starts climbed

    def reset(self) -> None:
        self.attempts = 0
        self._level = 0

    def next_delay(self) -> float | None:
        """The next wait in seconds, or None when the attempts are used up."""
        if self._used_up():
            return None
        delay = min(self.maximum, self.initial * self.factor**self._level)
        self.attempts += 1
        self._level += 1
        return self._rng.uniform(delay / 2, delay)

    def poll_delay(self, interval: float) -> float | None:
        """A wait of at most ``interval`` (drawn from [interval/2, interval]) after a failure
        that showed the peer is up, or None when the attempts are used up. The exponential
        delay starts over: if the peer goes down next, the first retries are quick again."""
        if self._used_up():
            return None
        self.attempts += 1
        self._level = 0
        return self._rng.uniform(interval / 2, interval)

    def _used_up(self) -> bool:
        return self.max_attempts is not None and self.attempts >= self.max_attempts

    def wait(self, stop: threading.Event) -> bool:
        """Sleep the next delay; False if attempts are used up or ``stop`` was set."""
        delay = self.next_delay()
        if delay is None:
            return False
        return not stop.wait(delay)
