"""Per-stage wall-clock accounting, shared by the file pipeline and the benchmarks."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class StageClock:
    """Accumulates seconds and call counts per named stage. Safe to share between the
    threads of one pipeline (each stage adds under a lock)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float, calls: int = 1) -> None:
        with self._lock:
            self.seconds[name] += seconds
            self.calls[name] += calls

    def mean_ms(self, name: str, per: int | None = None) -> float:
        """Mean milliseconds per call, or per ``per`` items (e.g. per frame)."""
        count = per if per is not None else self.calls.get(name, 0)
        return 1000.0 * self.seconds.get(name, 0.0) / count if count else 0.0
