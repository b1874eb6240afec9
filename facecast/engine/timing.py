"""Per-stage wall-clock accounting, shared by the file pipeline and the benchmarks."""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

# Histogram bucket bounds (seconds) for per-stage and end-to-end times: 1 ms to 2.5 s, dense
# around a 30 fps frame interval where the live goals sit.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.033, 0.05, 0.07, 0.1, 0.15, 0.25,
           0.5, 1.0, 2.5)  # fmt: skip


class Histogram:
    """Counts per bucket (not cumulative) plus sum and count, for Prometheus histograms.
    Not locked: the owner serialises updates."""

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations at or below it), ending with +Inf."""
        out, total = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


class StageClock:
    """Accumulates seconds, call counts and a histogram per named stage. Safe to share
    between the threads of one pipeline (each stage adds under a lock)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.histograms: dict[str, Histogram] = defaultdict(Histogram)
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
            if calls == 1:
                self.histograms[name].observe(seconds)

    def mean_ms(self, name: str, per: int | None = None) -> float:
        """Mean milliseconds per call, or per ``per`` items (e.g. per frame)."""
        count = per if per is not None else self.calls.get(name, 0)
        return 1000.0 * self.seconds.get(name, 0.0) / count if count else 0.0
