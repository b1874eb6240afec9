"""How a live input's reader thread hands its items to the consumer and is told to stop:
the bounded ``Handoff`` buffer, the ``Halted`` callback every blocking step checks, and a
sleep that a halt cuts short."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from facecast.media.frame import AudioChunk, Frame

Halted = Callable[[], bool]


class Handoff:
    """Reader → consumer. Bounded: a live input drops its oldest waiting video frame when
    the consumer falls behind (latency must not pile up; audio is kept, it is tiny and must
    stay continuous); a file read as fast as possible waits for room instead (no drops)."""

    def __init__(self, capacity: int, drop: bool):
        self._items: deque[Frame | AudioChunk] = deque()
        self._cond = threading.Condition()
        self.capacity, self.drop = capacity, drop
        self.dropped = 0
        self.finished = False  # the reader is done: nothing more will come
        self.closed = False  # the consumer is gone

    def put(self, item: Frame | AudioChunk, halted: Halted) -> bool:
        """False when the consumer is gone or the reader must stop."""
        with self._cond:
            while len(self._items) >= self.capacity:
                if self.closed or halted():
                    return False
                if self.drop:
                    self._drop_oldest()
                    break
                self._cond.wait(0.1)
            if self.closed:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def _drop_oldest(self) -> None:
        for i, old in enumerate(self._items):
            if isinstance(old, Frame):
                del self._items[i]
                self.dropped += 1
                return
        self._items.popleft()  # only audio waiting: the consumer is not reading at all

    def get(self, timeout: float) -> Frame | AudioChunk | None:
        with self._cond:
            if not self._items and not self.finished:
                self._cond.wait(timeout)
            if self._items:
                item = self._items.popleft()
                self._cond.notify_all()
                return item
            return None

    def finish(self) -> None:
        with self._cond:
            self.finished = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._items.clear()
            self._cond.notify_all()


def sleep_unless_halted(seconds: float, halted: Halted) -> bool:
    """Sleep ``seconds`` in short steps; True if halted meanwhile."""
    end = time.monotonic() + seconds
    while True:
        if halted():
            return True
        left = end - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(left, 0.05))


__all__ = ["Halted", "Handoff", "sleep_unless_halted"]
