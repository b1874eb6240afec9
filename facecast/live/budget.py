"""Thread budgets that fit the box: how many threads each stream's encoder may use, from
the core count and the number of live streams in this process.

One stream's x264 may spread over every core. Several streams must not each do so: on 2
cores, N streams x (x264's own threads + the three stage threads) oversubscribe them. So
each encoder gets cores / streams threads (at least one). Streams are counted while their
pipeline runs (``running``); an encoder takes its budget when its output opens (or reopens).

OpenCV's pool is left at every core on purpose: `facecast bench capacity` with OpenCV on
the calling thread only (one pool thread) was slower, 4 x 360p 17.8 fps for the slowest
stream against 19.5-25.8 with the pool (docs/benchmarks.md): its loops release the GIL,
which the streams' Python stages otherwise contend for.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_streams = 0


def cores() -> int:
    """The cores this process may run on (its affinity, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def encoder_threads(core_count: int, streams: int) -> int:
    """x264 threads for one of ``streams`` live streams on ``core_count`` cores."""
    return max(1, core_count // max(1, streams))


def live_streams() -> int:
    with _lock:
        return _streams


def encoder_budget() -> int:
    """x264 threads for an output opening now."""
    return encoder_threads(cores(), live_streams())


@contextmanager
def running() -> Iterator[None]:
    """Counts one live stream while the block runs."""
    global _streams
    with _lock:
        _streams += 1
    try:
        yield
    finally:
        with _lock:
            _streams -= 1
