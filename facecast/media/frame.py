"""The unit that flows through the pipeline."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
import numpy as np

from facecast.media.planes import (
    BT601,
    Box,
    ColourTags,
    keeps_planes,
    planes_of,
    to_bgr,
    to_i420,
    write_boxes,
)


class Frame:
    """One decoded video frame.

    ``image`` is BGR uint8 (OpenCV's layout, what every face stage expects). A frame from a
    decoder that gave 8-bit 4:2:0 also keeps the decoder's planes (``i420``, with their
    ``colours``): ``image`` is then made from them when first read, and the encoder side
    gets the planes back with only ``changed`` boxes converted from ``image`` (see
    ``media/planes.py``). ``pts`` and ``time_base`` come from the container so the sink
    can keep the input's timing; ``t_ingest`` (monotonic seconds) is when the frame entered
    facecast, for latency.
    """

    def __init__(
        self,
        image: np.ndarray | None = None,
        index: int = 0,
        pts: int | None = None,
        time_base: Fraction | None = None,
        t_ingest: float | None = None,
        *,
        i420: np.ndarray | None = None,
        colours: ColourTags | None = None,
    ) -> None:
        if image is None and i420 is None:
            raise ValueError("a Frame needs an image or its planes")
        self._image = image
        self.i420 = i420
        # how the planes are to be read; a BGR-only frame says what OpenCV's conversion
        # of it will be, so a sink can take its tags from any first frame
        self.colours = colours if i420 is not None and colours is not None else BT601
        self.index = index
        self.pts = pts
        self.time_base = time_base
        self.t_ingest = time.monotonic() if t_ingest is None else t_ingest
        # The boxes of ``image`` changed since decode; None: unknown, so once ``image`` has
        # been read the whole picture counts as changed (nothing a stage drew is lost).
        self.changed: list[Box] | None = None

    @classmethod
    def decoded(cls, vf: av.VideoFrame, **fields: Any) -> Frame:
        """A decoder's picture as a Frame (``fields``: index, pts, time_base, t_ingest):
        its own planes when they can travel (``planes.keeps_planes``), else BGR by
        swscale, which reads any pixel format and honours the colour tags."""
        if keeps_planes(vf):
            return cls(i420=planes_of(vf), colours=ColourTags.of(vf), **fields)
        return cls(np.ascontiguousarray(vf.to_ndarray(format="bgr24")), **fields)

    @property
    def image(self) -> np.ndarray:
        if self._image is None:
            assert self.i420 is not None
            self._image = to_bgr(self.i420)
        return self._image

    @image.setter
    def image(self, value: np.ndarray) -> None:
        """A new picture altogether: the planes no longer describe it."""
        self._image = value
        self.i420 = None
        self.colours = BT601
        self.changed = None

    @property
    def width(self) -> int:
        if self._image is not None:
            return self._image.shape[1]
        assert self.i420 is not None
        return self.i420.shape[1]

    @property
    def height(self) -> int:
        if self._image is not None:
            return self._image.shape[0]
        assert self.i420 is not None
        return self.i420.shape[0] * 2 // 3

    @property
    def seconds(self) -> float | None:
        if self.pts is None or self.time_base is None:
            return None
        return float(self.pts * self.time_base)

    def planes(self) -> np.ndarray | None:
        """The picture as I420 planes with every change to ``image`` in them, or None for a
        frame that has no planes (the caller converts ``image``). Only the ``changed``
        boxes are converted; without a list, the whole picture, if it was read at all."""
        if self.i420 is None:
            return None
        if self._image is not None:
            if self.changed is None:
                self.i420 = to_i420(self._image)
            else:
                write_boxes(self.i420, self._image, self.changed)
            self.changed = []  # written: a second call (a held frame) has nothing to add
        return self.i420


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
