"""Channels between pipeline stages.

Live stages are joined by ``LatestSlot``: capacity one, the newest value wins and every
value overwritten before it was taken is counted as dropped, so a slow stage never makes
latency pile up. ``DropOldestQueue`` is for data that must keep its order but may not grow
without bound (live audio).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Closed(Exception):
    """The channel was closed: the producer has finished or the pipeline is stopping."""


class LatestSlot(Generic[T]):
    """``lossless=True`` makes ``put`` wait for the slot to be taken instead of overwriting:
    back-pressure for inputs that can wait (a file read as fast as possible), so every
    frame goes through the same stages and none is dropped."""

    def __init__(self, lossless: bool = False) -> None:
        self.lossless = lossless
        self._value: T | None = None
        self._full = False
        self._closed = False
        self._cond = threading.Condition()
        self.dropped = 0
        self.put_count = 0

    def put(self, value: T) -> bool:
        """Store ``value``; True if it overwrote one nobody took (a drop). A lossless slot
        waits until the last value was taken (raises Closed if closed meanwhile)."""
        with self._cond:
            while self.lossless and self._full and not self._closed:
                self._cond.wait(0.5)
            if self._closed and self.lossless:
                raise Closed
            overwrote = self._full
            if overwrote:
                self.dropped += 1
            self._value, self._full = value, True
            self.put_count += 1
            self._cond.notify_all()
            return overwrote

    def get(self, timeout: float) -> T | None:
        """The newest value, waiting up to ``timeout`` s; None on timeout. Raises Closed
        once closed and empty."""
        with self._cond:
            if not self._full and not self._closed:
                self._cond.wait(timeout)
            if self._full:
                value, self._value, self._full = self._value, None, False
                self._cond.notify_all()  # a lossless producer may be waiting for the room
                return value
            if self._closed:
                raise Closed
            return None

    def values(self, running: Callable[[], bool], poll: float) -> Iterator[T]:
        """The newest values as they come, while ``running()`` holds (checked every
        ``poll`` s) and until the slot is closed and empty."""
        while running():
            try:
                value = self.get(poll)
            except Closed:
                return
            if value is not None:
                yield value

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class DropOldestQueue(Generic[T]):
    """A FIFO of at most ``capacity`` items: when full, the oldest item is dropped."""

    def __init__(self, capacity: int) -> None:
        self._items: collections.deque[T] = collections.deque()
        self._capacity = capacity
        self._lock = threading.Lock()
        self.dropped = 0

    def put(self, item: T) -> None:
        with self._lock:
            if len(self._items) >= self._capacity:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)

    def drain(self) -> list[T]:
        with self._lock:
            items = list(self._items)
            self._items.clear()
            return items

    def __len__(self) -> int:
        return len(self._items)
