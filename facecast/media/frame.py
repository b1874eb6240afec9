"""The unit that flows through the pipeline."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np


@dataclass
class Frame:
    """One decoded video frame.

    ``image`` is BGR uint8 (OpenCV's layout, what every face stage expects). ``pts`` and
    ``time_base`` come from the container so the sink can keep the input's timing;
    ``t_ingest`` (monotonic seconds) is when the frame entered facecast, for latency.
    """

    image: np.ndarray
    index: int = 0
    pts: int | None = None
    time_base: Fraction | None = None
    t_ingest: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float | None:
        if self.pts is None or self.time_base is None:
            return None
        return float(self.pts * self.time_base)


@dataclass
class AudioChunk:
    """One compressed audio packet, detached from its container.

    Live inputs reconnect, and PyAV crashes if a packet is used after its container closed,
    so live audio travels as bytes plus timing; the sink turns it back into a packet."""

    data: bytes
    pts: int | None
    dts: int | None
    time_base: Fraction
    duration: int | None = None
    t_ingest: float = field(default_factory=time.monotonic)
