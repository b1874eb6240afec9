"""The decoder's own pictures, kept from decode to encode: 8-bit 4:2:0 planes (I420).

A swap changes a face box and the label; the rest of a frame should reach the encoder as
the decoder gave it. So a decoded frame keeps its planes (one ``(h * 3 / 2, w)`` uint8
array: Y, then U, then V), the face stages get a BGR view of them, and only the boxes the
stages changed are converted back and written into the planes. Pixels outside those boxes
are the decoder's, bit for bit, and the encoder is fed the planes without a conversion.

Both directions use OpenCV's I420 conversions (0.14 ms each way for a whole 720p frame,
0.02 ms for a 300 x 300 box) rather than swscale's (its BGR to YUV costs 3.7 ms at 720p,
and its fast modes do not return a pixel to its value: 1.6 levels of Y on average). OpenCV
knows one matrix, BT.601 limited range. Whatever the planes' own tag, the same matrix is
used on the way in and on the way out, so a pixel the swap does not change comes back
within a level, and the output keeps the input's tags (``ColourTags``): a BT.709 picture is
still BT.709. The face stages then see a BT.709 picture through BT.601 eyes, a shift of
under a level on average that detection and the colour transfer (which matches the face to
the target's own statistics in that same space) do not notice. Full-range pictures (JPEG's
``yuvj420p``, range tag "JPEG") would be clipped by a limited-range matrix, so they, and
every other pixel format, take the BGR path (swscale, which honours the tags).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import av
import cv2
import numpy as np

# A rectangle of pixels: x0, y0, x1, y1 with the ends exclusive (numpy slice bounds).
Box = tuple[int, int, int, int]

# AVColorSpace / AVColorRange / AVColorPrimaries / AVColorTransferCharacteristic values
AVCOL_SPC_SMPTE170M = 6
AVCOL_RANGE_MPEG = 1
AVCOL_RANGE_JPEG = 2
AVCOL_UNSPECIFIED = 2  # "unspecified" in the space, primaries and transfer tables


@dataclass(frozen=True)
class ColourTags:
    """How a picture's YUV values are to be read (the FFmpeg enums, as ints)."""

    space: int = AVCOL_UNSPECIFIED
    range: int = 0  # AVCOL_RANGE_UNSPECIFIED
    primaries: int = AVCOL_UNSPECIFIED
    trc: int = AVCOL_UNSPECIFIED

    @classmethod
    def of(cls, item: Any) -> ColourTags:
        """The tags of a decoded ``av.VideoFrame`` or of a stream's codec context."""
        return cls(
            int(item.colorspace),
            int(item.color_range),
            int(getattr(item, "color_primaries", AVCOL_UNSPECIFIED)),
            int(getattr(item, "color_trc", AVCOL_UNSPECIFIED)),
        )

    def tag(self, ctx: av.VideoCodecContext) -> None:
        """Make an encoder say these tags in its stream."""
        ctx.colorspace = self.space
        ctx.color_range = self.range
        ctx.color_primaries = self.primaries
        ctx.color_trc = self.trc


# What a BGR picture converted by OpenCV is: BT.601, limited range.
BT601 = ColourTags(space=AVCOL_SPC_SMPTE170M, range=AVCOL_RANGE_MPEG)


def keeps_planes(item: av.VideoFrame | av.VideoCodecContext) -> bool:
    """Whether a decoded frame (or every frame of a decoder) can travel as its own planes:
    8-bit 4:2:0, even sizes, limited range (see the module docstring)."""
    return (
        item.format is not None
        and item.format.name == "yuv420p"
        and item.width % 2 == 0
        and item.height % 2 == 0
        and int(item.color_range) != AVCOL_RANGE_JPEG
    )


def planes_of(vf: av.VideoFrame) -> np.ndarray:
    """A yuv420p frame's planes as one I420 array (a copy: the decoder reuses its buffers,
    and may still read this picture as a reference for the next)."""
    return vf.to_ndarray()


def to_bgr(i420: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(i420, cv2.COLOR_YUV2BGR_I420)


def to_i420(bgr: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420)


def chroma(i420: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Views of the U and V planes of an I420 array of a ``width`` x ``height`` picture."""
    flat = i420[height:].reshape(-1)
    quarter = (height // 2) * (width // 2)
    shape = (height // 2, width // 2)
    return flat[:quarter].reshape(shape), flat[quarter : 2 * quarter].reshape(shape)


def even_box(box: Box, width: int, height: int) -> Box | None:
    """``box`` grown to even corners (a 2 x 2 block shares one chroma sample) and clipped
    to the picture; None when nothing is left."""
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, y0 = max(0, x0 - x0 % 2), max(0, y0 - y0 % 2)
    x1, y1 = min(width, x1 + x1 % 2), min(height, y1 + y1 % 2)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def write_boxes(i420: np.ndarray, bgr: np.ndarray, boxes: Iterable[Box]) -> None:
    """Convert each box of ``bgr`` back to YUV and write it into ``i420`` (in place).

    The boxes are grown to even corners first, so each 2 x 2 block, and the chroma sample
    it shares, is converted whole: overlapping boxes then write the same values twice.
    The picture must have an even size."""
    height, width = bgr.shape[:2]
    u_plane, v_plane = chroma(i420, width, height)
    evens = [b for b in (even_box(box, width, height) for box in boxes) if b is not None]
    for x0, y0, x1, y1 in evens:
        part = to_i420(np.ascontiguousarray(bgr[y0:y1, x0:x1]))
        w, h = x1 - x0, y1 - y0
        i420[y0:y1, x0:x1] = part[:h]
        u, v = chroma(part, w, h)
        u_plane[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2] = u
        v_plane[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2] = v


__all__ = [
    "BT601",
    "Box",
    "ColourTags",
    "chroma",
    "even_box",
    "keeps_planes",
    "planes_of",
    "to_bgr",
    "to_i420",
    "write_boxes",
]
