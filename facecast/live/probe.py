"""Glass-to-glass latency: publish stamped frames, read the swapped stream, compare clocks.

The publisher and the reader run in one process, so both sides read the same monotonic
clock; each frame carries the millisecond it was made (``probe_pattern``), and the reader
subtracts it from the millisecond it decoded the frame. What is measured is everything in
between: encode, network, facecast's decode, swap and encode, network, decode.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from facecast.live.probe_pattern import draw_timestamp, read_timestamp
from facecast.media.frame import Frame

log = logging.getLogger(__name__)


def now_ms() -> int:
    return int(time.monotonic() * 1000) & 0xFFFFFFFF


@dataclass
class ProbeResult:
    sent: int = 0
    received: int = 0
    warmup_skipped: int = 0  # stamped frames read during the warm-up, not in the figures
    repeated: int = 0  # a stamp seen again: the stream repeated a frame (a holding frame)
    latencies_ms: list[float] = field(default_factory=list)

    def percentile(self, p: float) -> float:
        return float(np.percentile(self.latencies_ms, p)) if self.latencies_ms else float("nan")

    def summary(self) -> dict[str, float | int]:
        return {
            "sent": self.sent,
            "received": self.received,
            "stamped": len(self.latencies_ms),
            "warmup_skipped": self.warmup_skipped,
            "repeated": self.repeated,
            "p50_ms": self.percentile(50),
            "p95_ms": self.percentile(95),
            "p99_ms": self.percentile(99),
        }


def probe_scene(face_photo: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A frame with one real face in the middle over a blurred copy of the photo, so the
    swap has work to do while the stamp is read."""
    width, height = size
    background = cv2.GaussianBlur(cv2.resize(face_photo, (width, height)), (0, 0), 25)
    scale = 0.8 * height / face_photo.shape[0]
    face = cv2.resize(face_photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    fh, fw = face.shape[:2]
    y, x = (height - fh) // 2, (width - fw) // 2
    background[y : y + fh, x : x + fw] = face
    return background


class LatencyProbe:
    def __init__(
        self,
        publish_url: str,
        read_url: str,
        face_photo: np.ndarray,
        size: tuple[int, int] = (1280, 720),
        fps: float = 30.0,
        warmup: float = 0.0,
    ) -> None:
        """``warmup``: seconds after the first stamped frame comes back whose latencies are
        left out (the first keyframe, the encoders' and facecast's start-up)."""
        self.publish_url, self.read_url = publish_url, read_url
        self.warmup = warmup
        self.scene = probe_scene(face_photo, size)
        self.size, self.fps = size, fps
        self.result = ProbeResult()

    def run(self, seconds: float, stop: threading.Event | None = None) -> ProbeResult:
        stop = stop or threading.Event()
        reader = threading.Thread(target=self._read, args=(stop,), name="probe-read", daemon=True)
        reader.start()
        try:
            self._publish(seconds, stop)
            stop.wait(1.5)  # let the last frames through
        finally:
            stop.set()
            reader.join(10)
        return self.result

    def _publish(self, seconds: float, stop: threading.Event) -> None:
        from facecast.media.live_sink import StreamSink

        width, height = self.size
        sink = StreamSink(self.publish_url, width=width, height=height, fps=self.fps, audio=None)
        try:
            start = time.monotonic()
            index = 0
            while not stop.is_set() and time.monotonic() - start < seconds:
                due = start + index / self.fps
                if due > time.monotonic():
                    time.sleep(due - time.monotonic())
                image = draw_timestamp(self.scene.copy(), now_ms())
                sink.write(Frame(image=image, index=index))
                self.result.sent += 1
                index += 1
        finally:
            sink.close()

    def _read(self, stop: threading.Event) -> None:
        from facecast.media.live_source import StreamSource

        # every frame, not the newest only: a server that delivers in bursts (nginx-rtmp
        # does) would otherwise show the probe only each burst's last, freshest frame
        source = StreamSource(self.read_url, stall_timeout=3.0, keep_all=True)
        first: float | None = None
        last_stamp: int | None = None
        for item in source.items(stop):
            if not isinstance(item, Frame):
                continue
            self.result.received += 1
            stamp = read_timestamp(item.image)
            if stamp is None:
                continue
            if stamp == last_stamp:
                # A repeated frame (facecast holds the last frame while its input is down):
                # the latency of a frame is when it is first seen.
                self.result.repeated += 1
                continue
            last_stamp = stamp
            latency = float((now_ms() - stamp) & 0xFFFFFFFF)
            first = first if first is not None else time.monotonic()
            if time.monotonic() - first < self.warmup:
                self.result.warmup_skipped += 1
            else:
                self.result.latencies_ms.append(latency)


def load_probe_face(path: Path) -> np.ndarray:
    from facecast.media.image_io import read_image

    return read_image(path)
