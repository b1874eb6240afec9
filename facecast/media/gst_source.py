"""GStreamer input: ``GstSource("gst:DESCRIPTION")``, a self-healing reader of a pipeline
that ends in raw video: it runs ``DESCRIPTION ! videoconvert ! video/x-raw,format=BGR !
appsink`` and yields ``Frame``s.

Input. facecast appends ``videoconvert ! video/x-raw,format=BGR`` itself: a description
"ending in raw video" usually ends in a decoder's I420/NV12, and the face stages need BGR
(``videoconvert`` passes BGR through untouched). The appsink keeps only the newest frame
(``max-buffers=1 drop=true``, ``sync=false``): a slow consumer skips frames instead of
building latency. Drops are *counted*, not guessed: a pad probe on the appsink's sink pad
numbers every buffer that reaches it (keyed by its pts); when a frame is pulled, the gap
between its number and the previous pulled one is what the appsink threw away.

Reconnects. The bus is polled (no GLib main loop: every wait is a call with a timeout on the
consumer's thread). ERROR or EOS, a failed start, or no frame for ``stall_timeout`` (a UDP
sender that went quiet sends neither) tear the pipeline down to NULL and rebuild it from the
description after ``Backoff``'s delay, exactly as the PyAV inputs reconnect.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Generator, Iterator
from fractions import Fraction
from typing import Any

import numpy as np

from facecast.media import gst_runtime
from facecast.media.backoff import Backoff
from facecast.media.frame import AudioChunk, Frame
from facecast.media.link_state import InputState

log = logging.getLogger(__name__)

SINK_NAME = "facecast_sink"
PULL_STEP = 0.1  # seconds: how often the reader looks at ``stop`` and the bus
NS = Fraction(1, gst_runtime.SECOND)


def _fraction(structure: Any, field: str) -> Fraction | None:
    ok, num, den = structure.get_fraction(field)
    if ok and num > 0 and den > 0:
        return Fraction(num, den)
    return None


class _Counter:
    """Numbers the buffers reaching the appsink (called on the streaming thread) so the
    consumer can tell how many the appsink dropped between two pulls."""

    def __init__(self) -> None:
        self.arrived = 0
        self.numbers: OrderedDict[int, int] = OrderedDict()  # pts -> arrival number
        self.deltas: deque[int] = deque(maxlen=30)  # ns between consecutive arrivals' pts
        self._last_pts: int | None = None
        self._lock = threading.Lock()

    def probe(self, _pad: Any, info: Any) -> Any:
        Gst = gst_runtime.gst_modules()[0]
        buffer = info.get_buffer()
        with self._lock:
            self.arrived += 1
            pts = buffer.pts if buffer is not None else Gst.CLOCK_TIME_NONE
            if pts != Gst.CLOCK_TIME_NONE:
                self.numbers[pts] = self.arrived
                if len(self.numbers) > 256:
                    self.numbers.popitem(last=False)
                if self._last_pts is not None and pts > self._last_pts:
                    self.deltas.append(pts - self._last_pts)
                self._last_pts = pts
        return Gst.PadProbeReturn.OK

    def number(self, pts: int) -> int | None:
        with self._lock:
            return self.numbers.get(pts)

    def fps(self) -> Fraction | None:
        """The arrival rate from the buffers' pts, once enough have come."""
        with self._lock:
            if len(self.deltas) < 10:
                return None
            delta = float(np.median(self.deltas))
        if delta <= 0:
            return None
        return Fraction(gst_runtime.SECOND / delta).limit_denominator(1001)


class GstSource(InputState):
    """A self-healing GStreamer input (see the module docstring).

    State for the pipeline and metrics: ``connected``, ``state_since``, ``reconnects``,
    ``frames`` (pulled), ``frames_dropped`` (dropped by the appsink before facecast pulled
    them), ``fps`` (from the negotiated caps, else measured from the buffers' pts),
    ``width``/``height``, ``last_frame_at`` (monotonic), ``last_age`` (seconds from a frame's
    pts to when it was pulled, by the pipeline clock: the delay the input adds).
    """

    live = True

    def __init__(
        self,
        url: str,
        *,
        stall_timeout: float = 5.0,
        backoff: Backoff | None = None,
        realtime: bool = False,  # accepted for symmetry: a gst input is always live
    ):
        if stall_timeout <= 0:
            raise ValueError("stall_timeout must be positive")
        self.url = str(url)
        self.name = self.url if len(self.url) <= 60 else self.url[:57] + "..."
        self.stall_timeout = float(stall_timeout)
        self.backoff = backoff or Backoff()
        self.text = (
            f"{gst_runtime.description(self.url)} ! videoconvert ! video/x-raw,format=BGR ! "
            f"appsink name={SINK_NAME} max-buffers=1 drop=true sync=false emit-signals=false"
        )
        # a broken description fails here, at once
        gst_runtime.stop_pipeline(gst_runtime.parse(self.text, self.url))

        super().__init__()  # connected, state_since, reconnects, frames, fps, size, ...
        self.frames_dropped = 0
        self.last_age: float | None = None
        self._last_failure = ""

    @property
    def dropped(self) -> int:
        return self.frames_dropped

    def audio_params(self) -> None:
        return None  # a gst: input carries video only

    def close(self, timeout: float | None = None) -> bool:
        return True  # items() tears its pipeline down when it ends

    def items(self, stop: threading.Event) -> Iterator[Frame | AudioChunk]:
        """Frames until ``stop`` is set (or ``backoff.max_attempts`` is used up). Never raises
        for input trouble: it rebuilds the pipeline. Ends within ~0.1 s of ``stop``."""
        attempts = 0
        while not stop.is_set():
            if attempts:
                self.reconnects += 1
            attempts += 1
            pipeline = gst_runtime.parse(self.text, self.url)
            try:
                reason, got_frames = yield from self._run(pipeline, stop)
            finally:
                self._set_connected(False)
                gst_runtime.stop_pipeline(pipeline)
            if reason is None or stop.is_set():
                return
            self._log_down(reason)
            if got_frames:
                self.backoff.reset()  # it worked: retry quickly
            delay = self.backoff.next_delay()
            if delay is None:
                log.error("%s: giving up after %d attempts", self.name, self.backoff.attempts)
                return
            log.info("%s: rebuilding the pipeline in %.1f s", self.name, delay)
            if stop.wait(delay):
                return

    def _run(
        self, pipeline: Any, stop: threading.Event
    ) -> Generator[Frame, None, tuple[str | None, bool]]:
        """Run one pipeline: yields frames, returns (reason it failed or None, any frames)."""
        Gst = gst_runtime.gst_modules()[0]
        appsink = pipeline.get_by_name(SINK_NAME)
        counter = _Counter()
        appsink.get_static_pad("sink").add_probe(Gst.PadProbeType.BUFFER, counter.probe)
        bus = pipeline.get_bus()
        failed = gst_runtime.start_pipeline(pipeline)
        if failed:
            return f"cannot start ({failed})", False
        started = time.monotonic()
        last_frame = started
        last_number = 0
        got = 0
        while not stop.is_set():
            sample = appsink.try_pull_sample(int(PULL_STEP * gst_runtime.SECOND))
            now = time.monotonic()
            if sample is None:
                problem = gst_runtime.bus_problem(bus)
                if problem:
                    return problem, got > 0
                if appsink.is_eos():
                    return "end of stream", got > 0
                if now - last_frame > self.stall_timeout:
                    return f"no frame for {now - last_frame:.1f} s", got > 0
                continue
            frame = self._frame(sample, pipeline, counter, now)
            if frame is None:
                continue
            number = counter.number(frame.pts) if frame.pts is not None else None
            if number is not None:
                self.frames_dropped += max(0, number - last_number - 1)
                last_number = number
            if not got:
                self._set_connected(True, sample)
            got += 1
            last_frame = now
            yield frame
            problem = gst_runtime.bus_problem(bus)  # an error while frames still trickle in
            if problem:
                return problem, True
        return None, got > 0

    def _frame(self, sample: Any, pipeline: Any, counter: _Counter, now: float) -> Frame | None:
        Gst = gst_runtime.gst_modules()[0]
        buffer = sample.get_buffer()
        structure = sample.get_caps().get_structure(0)
        ok_w, width = structure.get_int("width")
        ok_h, height = structure.get_int("height")
        if not (ok_w and ok_h) or buffer is None:
            return None
        self.fps = _fraction(structure, "framerate") or counter.fps() or self.fps
        ok, info = buffer.map(Gst.MapFlags.READ)
        if not ok:
            return None
        try:
            stride = gst_runtime.bgr_stride(width)
            rows = np.frombuffer(info.data, np.uint8, count=stride * height)
            image = rows.reshape(height, stride)[:, : width * 3].reshape(height, width, 3).copy()
        finally:
            buffer.unmap(info)
        pts = buffer.pts if buffer.pts != Gst.CLOCK_TIME_NONE else None
        clock = pipeline.get_clock()
        if pts is not None and clock is not None:
            running = clock.get_time() - pipeline.get_base_time()
            self.last_age = (running - pts) / gst_runtime.SECOND
        self.width, self.height = width, height
        self.last_frame_at = now
        frame = Frame(image=image, index=self.frames, pts=pts, time_base=NS, t_ingest=now)
        self.frames += 1
        return frame

    def _set_connected(self, up: bool, sample: Any = None) -> None:
        if up == self.connected:
            return
        self.connected = up
        self.state_since = time.monotonic()
        if up:
            self._last_failure = ""
            caps = sample.get_caps().get_structure(0) if sample is not None else None
            size = f"{caps.get_int('width')[1]}x{caps.get_int('height')[1]}" if caps else "?"
            fps = f"{float(self.fps):.2f} fps" if self.fps else "fps unknown"
            log.info("%s: connected (%s, %s, GStreamer)", self.name, size, fps)

    def _log_down(self, reason: str) -> None:
        # A repeat of the same failure while retrying is routine: keep the log readable.
        level = logging.WARNING if reason != self._last_failure else logging.INFO
        log.log(level, "%s: lost (%s)", self.name, reason)
        self._last_failure = reason


__all__ = ["GstSource"]
