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
