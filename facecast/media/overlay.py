"""The visible "AI-generated" label drawn on every output frame."""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from facecast.media.planes import Box

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BOX_OPACITY = 0.6  # of the dark box: the scene stays faintly visible behind it


@lru_cache(maxsize=64)
def label_box(
    width: int, height: int, text: str
) -> tuple[int, int, int, int, float, int, int, int]:
    """Where the label goes on a ``width`` x ``height`` frame.

    Returns the box (x0, y0, x1, y1), then font scale, thickness and the text origin
    relative to the box. Cached: a video asks the same question for every frame.
    """
    # Text height follows the frame height (~2 % of it), never below the size at which
    # Hershey glyphs stay legible (~9 px cap height, what 360p gets).
    scale = max(0.4, height / 800.0)
    thickness = max(1, round(scale * 1.5))
    (tw, th), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
    pad = max(3, round(th * 0.45))
    margin = max(2, round(height * 0.02))
    x1, y1 = width - margin, height - margin
    x0 = max(0, x1 - tw - 2 * pad)
    y0 = max(0, y1 - th - baseline - 2 * pad)
    return x0, y0, x1, y1, scale, thickness, pad, (y1 - y0) - pad - baseline


def draw_label(image: np.ndarray, text: str = "AI-generated") -> Box | None:
    """Draw ``text`` in the bottom-right corner of ``image`` IN PLACE; returns the box it
    changed (None: the frame is too small to hold any label).

    In place because the video path labels every frame: no full-frame copy, and only the
    label's box is read and written. Pass a copy to keep the original.
    """
    h, w = image.shape[:2]
    x0, y0, x1, y1, scale, thickness, tx, ty = label_box(w, h, text)
    if x1 <= x0 or y1 <= y0:
        return None  # frame too small to hold any label
    roi = image[y0:y1, x0:x1]
    # roi * (1 - opacity) is roi blended with a black box, done in place on the view.
    cv2.convertScaleAbs(roi, dst=roi, alpha=1.0 - _BOX_OPACITY)
    cv2.putText(roi, text, (tx, ty), _FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return x0, y0, x1, y1
