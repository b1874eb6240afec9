"""Temporal smoothing of per-face values (landmarks, colour statistics) across frames.

The One Euro filter (Casiez, Roussel, Vogel, CHI 2012) is a low-pass filter whose cut-off
rises with speed. A still face is smoothed hard, so detector noise does not shimmer. A
moving face is smoothed little, so the swap does not visibly lag. It runs element-wise on
arrays of any shape (a 468x3 mesh, a LAB mean), one instance per tracked face.
"""

from __future__ import annotations

import math

import numpy as np


def _alpha(cutoff_hz: float, dt: float) -> float:
    """Smoothing factor of an exponential filter with this cut-off at this time step."""
    tau = 1.0 / (2.0 * math.pi * cutoff_hz)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """``min_cutoff`` (Hz): smoothing at rest; lower is steadier. ``beta``: how fast the
    cut-off rises with speed; higher lags less. ``d_cutoff``: smoothing of the speed."""

    def __init__(self, min_cutoff: float = 1.0, beta: float = 0.05, d_cutoff: float = 1.0):
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self._value: np.ndarray | None = None
        self._speed: np.ndarray | None = None
        self._time: float | None = None

    def reset(self) -> None:
        """Forget the past (a scene cut, a new person under this track)."""
        self._value = self._speed = self._time = None

    def __call__(self, value: np.ndarray, t: float) -> np.ndarray:
        """The filtered ``value`` observed at time ``t`` (seconds, increasing)."""
        x = np.asarray(value, dtype=np.float64)
        if self._value is None or self._time is None or self._value.shape != x.shape:
            self._value, self._speed, self._time = x.copy(), np.zeros_like(x), t
            return x.copy()
        dt = t - self._time
        if dt <= 0:
            return self._value.copy()  # same instant (or clock went back): keep the last
        assert self._speed is not None
        speed = (x - self._value) / dt
        a_d = _alpha(self.d_cutoff, dt)
        self._speed = a_d * speed + (1 - a_d) * self._speed
        cutoff = self.min_cutoff + self.beta * np.abs(self._speed)
        tau = 1.0 / (2.0 * math.pi * cutoff)
        a = 1.0 / (1.0 + tau / dt)
        self._value = a * x + (1 - a) * self._value
        self._time = t
        return self._value.copy()
