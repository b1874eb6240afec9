"""GStreamer output: ``GstSink("gst:DESCRIPTION", ...)`` runs ``appsrc ! DESCRIPTION`` and is
fed ``Frame``s.

Output. The appsrc is live, ``format=time``, caps fixed from the first frame's size; buffers
get pts from the output pipeline's clock (its running time at ``write()``, monotonic), not
from the input, so dropped, held and rate-skipped frames still give clean timing, and a sink
that syncs (udpsink) holds a frame only for the pipeline's latency. (Stamping from a clock
started earlier than the pipeline put every frame that much in the future and, through the
two-frame queue, halved the rate.) The appsrc answers latency queries with 0..10 s: left at
its default it reports a maximum of 0, and an encoder's own latency then makes the sink warn
"Pipeline construction is invalid, please add queues". Its queue is two frames with
``leaky-type=downstream``: when the user's pipeline cannot keep up the oldest queued frame
is dropped (counted in ``dropped``) and ``write()`` never blocks. ``send_seconds`` is the
time the frame will wait in that queue (queued frames / fps), so a backed-up pipeline looks
to the rate controller like a slow link. ``set_rate``: the pipeline already skips frames to
the lower rate and the pts carry the timing, so the caps keep their frame rate; a bitrate is
applied live to an x264enc/x265enc in the description (its ``bitrate`` is in kbit/s), and
ignored (logged once) for other encoders. A bus ERROR/EOS rebuilds the pipeline after
``Backoff``'s delay; frames in the meantime are dropped and counted.
"""

from __future__ import annotations

import logging
import time
from fractions import Fraction
from typing import Any

import numpy as np

from facecast.media import gst_runtime
from facecast.media.backoff import Backoff
from facecast.media.frame import AudioChunk, Frame
from facecast.media.link_state import OutputState
from facecast.media.live_sink import output_geometry
from facecast.media.video_encode import fit_image

log = logging.getLogger(__name__)

SRC_NAME = "facecast_src"
SRC_QUEUE = 2  # frames the appsrc holds before dropping the oldest
EOS_WAIT = 3.0  # seconds close() waits for the EOS to drain through the output
# Encoders whose ``bitrate`` property (kbit/s) can be changed while playing.
KBPS_ENCODERS = ("x264enc", "x265enc")


def check_output(url: str) -> None:
    """Raise MediaError now if ``url``'s description cannot be parsed (the sink itself is
    only made at the first frame, when its size is known)."""
    pipeline = gst_runtime.parse(f"appsrc name={SRC_NAME} ! {gst_runtime.description(url)}", url)
    pipeline.set_state(gst_runtime.gst_modules()[0].State.NULL)


class GstSink(OutputState):
    """A GStreamer output fed through an appsrc (see the module docstring). Call its methods
    from one thread.

    State: ``connected``, ``state_since``, ``reconnects``, ``frames`` (pushed), ``dropped``
    (not sent: pipeline down, or the appsrc queue full), ``send_seconds``.
    """

    def __init__(
        self,
        url: str,
        *,
        width: int,
        height: int,
        fps: Fraction | float,
        audio: Any = None,
        bitrate: int | None = None,
        backoff: Backoff | None = None,
    ):
        self.url = str(url)
        self.name = self.url if len(self.url) <= 60 else self.url[:57] + "..."
        self.width, self.height, self.fps = output_geometry(self.name, width, height, fps)
        if audio is not None:
            log.info("%s: a gst: output carries video only; audio is not sent", self.name)
        caps = (
            f"video/x-raw,format=BGR,width={self.width},height={self.height},"
            f"framerate={self.fps.numerator}/{self.fps.denominator}"
        )
        self.text = (
            f"appsrc name={SRC_NAME} is-live=true format=time do-timestamp=false block=false "
            f"min-latency=0 max-latency={10 * gst_runtime.SECOND} max-buffers={SRC_QUEUE} "
            f"max-bytes={SRC_QUEUE * gst_runtime.bgr_stride(self.width) * self.height} "
            f'leaky-type=downstream caps="{caps}" ! {gst_runtime.description(self.url)}'
        )
        self.backoff = backoff or Backoff()
        self.bitrate = bitrate
        super().__init__()  # connected, state_since, reconnects, frames, dropped, send_seconds
        self._last_pts = -1
        self._closed = False
        self._retry_at: float | None = None
        self._said_bitrate = False
        self._pipeline: Any = None
        self._appsrc: Any = None
        self._pipeline = gst_runtime.parse(self.text, self.url)  # a broken description fails here
        self._open(first=True)

    # ------------------------------------------------------------------ lifetime

    def _open(self, first: bool = False) -> None:
        if self._pipeline is None:
            self._pipeline = gst_runtime.parse(self.text, self.url)
        self._appsrc = self._pipeline.get_by_name(SRC_NAME)
        if self.bitrate:
            self._apply_bitrate(self.bitrate)
        failed = gst_runtime.start_pipeline(self._pipeline)
        if failed:
            self._down(f"cannot start ({failed})")
            return
        self.connected = True
        self.state_since = time.monotonic()
        self._retry_at = None
        self._last_pts = -1  # a new pipeline: its running time starts again at 0
        log.info("%s: output %s", self.name, "started" if first else "restarted")

    def _down(self, reason: str) -> None:
        if self._pipeline is not None:
            gst_runtime.stop_pipeline(self._pipeline)
        self._pipeline = self._appsrc = None
        log.warning("%s: output down (%s)", self.name, reason)
        if self.connected and self.frames:
            self.backoff.reset()
        self.connected = False
        self.state_since = time.monotonic()
        delay = self.backoff.next_delay()
        if delay is None:
            log.error("%s: giving up after %d attempts", self.name, self.backoff.attempts)
            self._retry_at = float("inf")
            return
        log.info("%s: rebuilding the output in %.1f s", self.name, delay)
        self._retry_at = time.monotonic() + delay

    def _healthy(self) -> bool:
        """Check the bus; rebuild when a retry is due. True if frames can be pushed now."""
        if self._pipeline is not None:
            problem = gst_runtime.bus_problem(self._pipeline.get_bus())
            if problem:
                self._down(problem)
        retry_at = self._retry_at
        if self._pipeline is None and retry_at is not None and time.monotonic() >= retry_at:
            self.reconnects += 1
            self._open()
        return self._pipeline is not None

    def close(self, timeout: float = EOS_WAIT) -> None:
        """Send EOS, wait up to ``timeout`` s for it to reach the end, then stop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        pipeline, appsrc = self._pipeline, self._appsrc
        self._pipeline = self._appsrc = None
        if pipeline is None:
            return
        Gst = gst_runtime.gst_modules()[0]
        appsrc.end_of_stream()
        kinds = Gst.MessageType.EOS | Gst.MessageType.ERROR
        msg = pipeline.get_bus().timed_pop_filtered(int(timeout * gst_runtime.SECOND), kinds)
        if msg is None:
            log.warning("%s: output did not drain within %g s", self.name, timeout)
        gst_runtime.stop_pipeline(pipeline)
        self.connected = False
        self.state_since = time.monotonic()
        log.info("%s: output closed", self.name)

    def __enter__(self) -> GstSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def write(self, frame: Frame) -> None:
        """Push one frame (pts from the sink's clock). Never blocks or raises for pipeline
        trouble: a frame that cannot be sent is dropped and counted."""
        if self._closed:
            return
        if not self._healthy():
            self.dropped += 1
            return
        Gst = gst_runtime.gst_modules()[0]
        start = time.perf_counter()
        image, _ = fit_image(frame.image, self.width, self.height)
        data = gst_runtime.bgr_rows(np.ascontiguousarray(image, dtype=np.uint8))
        buffer = Gst.Buffer.new_wrapped(data)
        pts = max(self._running_time(), self._last_pts + 1)
        self._last_pts = pts
        buffer.pts = buffer.dts = pts
        buffer.duration = round(gst_runtime.SECOND / self.fps)
        appsrc = self._appsrc
        queued = appsrc.get_property("current-level-buffers")
        if queued >= SRC_QUEUE:
            self.dropped += 1  # leaky-type=downstream drops the oldest to make room
        result = appsrc.push_buffer(buffer)
        if result != Gst.FlowReturn.OK:
            self.dropped += 1
            self._down(f"the pipeline refused a frame ({result.value_nick})")
            return
        self.frames += 1
        self.send_seconds = (time.perf_counter() - start) + queued / float(self.fps)

    def _running_time(self) -> int:
        """The output pipeline's running time now (ns): a frame stamped with it is due at
        once, so a sink that syncs to the clock holds it only for the pipeline's latency."""
        pipeline = self._pipeline
        clock = pipeline.get_clock() if pipeline is not None else None
        if clock is None:
            return self._last_pts + 1
        return max(0, clock.get_time() - pipeline.get_base_time())

    def write_audio(self, chunk: AudioChunk) -> None:
        """Audio is not carried by a gst: output."""

    def set_rate(self, fps: float, bitrate: int | None) -> None:
        """The pipeline now sends ``fps`` frames a second (it skips the others itself) and
        wants ``bitrate`` bits a second: applied to an x264enc/x265enc in the description."""
        if fps <= 0:
            raise ValueError("fps must be positive")
        if bitrate:
            self.bitrate = bitrate
            self._apply_bitrate(bitrate)

    def _apply_bitrate(self, bitrate: int) -> None:
        if self._pipeline is None:
            return
        for element in self._pipeline.iterate_recurse():
            factory = element.get_factory()
            if factory is not None and factory.get_name() in KBPS_ENCODERS:
                element.set_property("bitrate", max(1, round(bitrate / 1000)))
                return
        if not self._said_bitrate:
            log.info("%s: no x264enc/x265enc in the output: bitrate not adapted", self.name)
            self._said_bitrate = True


__all__ = ["GstSink", "check_output"]
