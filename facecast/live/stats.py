"""What a live path did, frame by frame: the counters and latency samples that the status
log, the API, /metrics and the benchmarks read.

``FrameStats`` is what every live path counts (a stream's ``LivePipeline``, a browser's
``WebSession``); ``LiveStats`` adds a stream's holding frames, rate steps and swap counts,
``SessionStats`` a browser's sent-frame rate. Each counter is written by one thread and
read without a lock: a reading may be a frame behind, never inconsistent.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from facecast.engine.timing import Histogram, StageClock

FPS_WINDOW = 2.0  # seconds of sent frames a browser session's fps is measured over
SESSION_LATENCY_SAMPLES = 150  # about the last 5 s at 30 fps
STREAM_LATENCY_SAMPLES = 2000


@dataclass
class FrameStats:
    frames_in: int = 0
    frames_processed: int = 0
    frames_out: int = 0
    frames_failed: int = 0  # frames whose processing raised: passed on unswapped
    faces_last: int = 0  # faces found in the last processed frame
    started: float = field(default_factory=time.monotonic)
    # seconds from decode (Frame.t_ingest) to the frame handed to the output
    latency: deque[float] = field(default_factory=lambda: deque(maxlen=STREAM_LATENCY_SAMPLES))
    clock: StageClock = field(default_factory=StageClock)

    def latency_percentile_ms(self, percentile: float) -> float | None:
        """The latency percentile over the kept samples, in ms; None before the first."""
        if not self.latency:
            return None
        return 1000.0 * float(np.percentile(np.fromiter(self.latency, float), percentile))


@dataclass
class LiveStats(FrameStats):
    """What the live pipeline did; read by the status log, the API and the benchmarks."""

    frames_held: int = 0  # holding frames sent while the input was down
    frames_rate_skipped: int = 0  # skipped to honour a stepped-down output rate
    faces_swapped: int = 0
    frames_swapped: int = 0
    frames_passed: int = 0  # no face, or swapping disabled
    rate_changes: int = 0
    rate_level: float = 1.0
    latency_histogram: Histogram = field(default_factory=Histogram)

    def latency_ms(self, percentile: float) -> float:
        value = self.latency_percentile_ms(percentile)
        return float("nan") if value is None else value


@dataclass
class SessionStats(FrameStats):
    """A browser session's counters, for its stats route."""

    latency: deque[float] = field(default_factory=lambda: deque(maxlen=SESSION_LATENCY_SAMPLES))
    sent_times: deque[float] = field(default_factory=lambda: deque(maxlen=600))

    def sent(self, now: float, latency: float) -> None:
        self.frames_out += 1
        self.sent_times.append(now)
        self.latency.append(latency)

    def fps(self, now: float) -> float:
        """Frames sent per second over the last ``FPS_WINDOW`` s (less at the start)."""
        window = min(FPS_WINDOW, max(now - self.started, 1e-3))
        recent = sum(1 for t in list(self.sent_times) if now - t <= window)
        return recent / window

    def latency_ms(self, percentile: float) -> float | None:
        value = self.latency_percentile_ms(percentile)
        return None if value is None else round(value, 1)
