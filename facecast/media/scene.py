"""Scene cuts: where a video jumps to another shot.

On a cut nobody on screen is where anyone was a frame ago. Tracks, followed meshes and
smoothing state must start again there, or the first frames of the new shot are pulled
towards the old one. A cut changes the whole picture's colours at once. A moving face, or
someone walking through, changes only part of them. So the test is a colour histogram
distance between consecutive thumbnails, confirmed by their mean brightness difference.
"""

from __future__ import annotations

import cv2
import numpy as np

THUMB = (64, 36)


def _signature(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Area-averaging a whole 720p frame costs ~1 ms a frame; every few pixels, still several
    # per thumbnail pixel, give the same histogram for a quarter of that.
    step = max(1, min(image.shape[0] // (THUMB[1] * 2), image.shape[1] // (THUMB[0] * 2)))
    small = cv2.resize(image[::step, ::step], THUMB, interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, [8, 4, 4], [0, 180, 0, 256, 0, 256])
    cv2.normalize(hist, hist)
    gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY).astype(np.float32) / 255.0
    return hist, gray


class SceneCutDetector:
    """Call once per frame, in order. On the sample clip the three cuts score 0.36 to 0.48
    (Bhattacharyya) and everything else 0.10 or less; the thresholds sit between."""

    def __init__(self, hist_threshold: float = 0.25, diff_threshold: float = 0.06) -> None:
        self.hist_threshold, self.diff_threshold = hist_threshold, diff_threshold
        self._previous: tuple[np.ndarray, np.ndarray] | None = None

    def is_cut(self, image: np.ndarray) -> bool:
        current = _signature(image)
        previous, self._previous = self._previous, current
        if previous is None:
            return False
        distance = cv2.compareHist(previous[0], current[0], cv2.HISTCMP_BHATTACHARYYA)
        change = float(np.mean(np.abs(current[1] - previous[1])))
        return distance > self.hist_threshold and change > self.diff_threshold
