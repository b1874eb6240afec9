"""Reconnect pacing: exponential backoff with full jitter, forever unless told otherwise."""

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

    def reset(self) -> None:
        self.attempts = 0

    def next_delay(self) -> float | None:
        """The next wait in seconds, or None when the attempts are used up."""
        if self.max_attempts is not None and self.attempts >= self.max_attempts:
            return None
        delay = min(self.maximum, self.initial * self.factor**self.attempts)
        self.attempts += 1
        return self._rng.uniform(delay / 2, delay)

    def wait(self, stop: threading.Event) -> bool:
        """Sleep the next delay; False if attempts are used up or ``stop`` was set."""
        delay = self.next_delay()
        if delay is None:
            return False
        return not stop.wait(delay)
