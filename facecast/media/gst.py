"""GStreamer inputs and outputs: ``gst:PIPELINE`` beside the PyAV URLs.

``GstSource("gst:DESCRIPTION")`` runs ``DESCRIPTION ! videoconvert ! video/x-raw,format=BGR !
appsink`` and yields ``Frame``s; ``GstSink("gst:DESCRIPTION", ...)`` runs ``appsrc !
DESCRIPTION`` and is fed ``Frame``s. Both have the surface of the PyAV classes
(``facecast.live.pipeline.Source`` / ``Sink``), so the pipeline does not know which backend runs.

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

GStreamer is optional: ``gi`` is imported on first use, and a missing install gives a
``MediaError`` naming the fix. A description GStreamer cannot parse (unknown element, bad
property) is a ``MediaError`` at construction, never a hang.
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

from facecast.errors import MediaError
from facecast.media.backoff import Backoff
from facecast.media.frame import AudioChunk, Frame
from facecast.media.live_sink import output_geometry
from facecast.media.sink import fit_image

log = logging.getLogger(__name__)

PREFIX = "gst:"
SINK_NAME = "facecast_sink"
SRC_NAME = "facecast_src"
PULL_STEP = 0.1  # seconds: how often the reader looks at ``stop`` and the bus
SRC_QUEUE = 2  # frames the appsrc holds before dropping the oldest
EOS_WAIT = 3.0  # seconds close() waits for the EOS to drain through the output
STATE_WAIT = 5.0  # seconds to wait for a state change to finish
SECOND = 1_000_000_000  # GStreamer time is in nanoseconds
NS = Fraction(1, SECOND)
MISSING = (
    "GStreamer input/output needs the Debian GStreamer packages and pygobject<3.51 in the "
    "venv: run scripts/setup"
)
# Encoders whose ``bitrate`` property (kbit/s) can be changed while playing.
KBPS_ENCODERS = ("x264enc", "x265enc")

_gst: Any = None
_gst_lock = threading.Lock()


def is_gst(url: str | None) -> bool:
    return bool(url) and str(url).startswith(PREFIX)


def gst_modules() -> tuple[Any, Any]:
    """(Gst, GLib), initialised once; MediaError naming the fix when GStreamer is missing."""
    global _gst
    with _gst_lock:
        if _gst is None:
            try:
                import gi

                gi.require_version("Gst", "1.0")
                gi.require_version("GstApp", "1.0")
                from gi.repository import GLib, Gst, GstApp  # noqa: F401 (types the appsink)
            except (ImportError, ValueError) as exc:
                raise MediaError(f"{MISSING} ({exc})") from None
            Gst.init(None)
            _gst = (Gst, GLib)
    return _gst


def description(url: str) -> str:
    """The pipeline description of a ``gst:`` URL."""
    text = url[len(PREFIX) :] if url.startswith(PREFIX) else url
    text = text.strip().strip("!").strip()
    if not text:
        raise MediaError(f"{url!r}: a gst: input or output needs a pipeline description")
    return text


def parse(text: str, shown: str) -> Any:
    """``Gst.parse_launch`` with every error fatal; MediaError with GStreamer's reason."""
    Gst, GLib = gst_modules()
    try:
        return Gst.parse_launch_full(text, None, Gst.ParseFlags.FATAL_ERRORS)
    except GLib.Error as exc:
        raise MediaError(f"GStreamer cannot build {shown!r}: {exc.message}") from None


def check_output(url: str) -> None:
    """Raise MediaError now if ``url``'s description cannot be parsed (the sink itself is
    only made at the first frame, when its size is known)."""
    pipeline = parse(f"appsrc name={SRC_NAME} ! {description(url)}", url)
    pipeline.set_state(gst_modules()[0].State.NULL)


def _bus_problem(bus: Any, timeout_ns: int = 0) -> str | None:
    """The first ERROR or EOS waiting on ``bus`` as a one-line reason (warnings are logged)."""
    Gst = gst_modules()[0]
    kinds = Gst.MessageType.ERROR | Gst.MessageType.EOS | Gst.MessageType.WARNING
    while True:
        msg = bus.timed_pop_filtered(timeout_ns, kinds)
        if msg is None:
            return None
        if msg.type == Gst.MessageType.EOS:
            return "end of stream"
        if msg.type == Gst.MessageType.ERROR:
            err, _debug = msg.parse_error()
            return f"{msg.src.get_name()}: {err.message}"
        warn, _debug = msg.parse_warning()
        log.warning("GStreamer warning from %s: %s", msg.src.get_name(), warn.message)
        timeout_ns = 0


def _start(pipeline: Any) -> str | None:
    """Set ``pipeline`` PLAYING; the reason it failed, or None."""
    Gst = gst_modules()[0]
    result = pipeline.set_state(Gst.State.PLAYING)
    if result == Gst.StateChangeReturn.FAILURE:
        return _bus_problem(pipeline.get_bus()) or "cannot start the pipeline"
    return None


def _stop(pipeline: Any) -> None:
    Gst = gst_modules()[0]
    pipeline.set_state(Gst.State.NULL)
    pipeline.get_state(STATE_WAIT * SECOND)


def _fraction(structure: Any, field: str) -> Fraction | None:
    ok, num, den = structure.get_fraction(field)
    if ok and num > 0 and den > 0:
        return Fraction(num, den)
    return None


# ---------------------------------------------------------------------------- input


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
        Gst = gst_modules()[0]
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
        return Fraction(SECOND / delta).limit_denominator(1001)


class GstSource:
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
            f"{description(self.url)} ! videoconvert ! video/x-raw,format=BGR ! "
            f"appsink name={SINK_NAME} max-buffers=1 drop=true sync=false emit-signals=false"
        )
        _stop(parse(self.text, self.url))  # a broken description fails here, at once

        self.connected = False
        self.state_since = time.monotonic()
        self.reconnects = 0
        self.frames = 0
        self.frames_dropped = 0
        self.fps: Fraction | None = None
        self.width: int | None = None
        self.height: int | None = None
        self.last_frame_at: float | None = None
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
            pipeline = parse(self.text, self.url)
            try:
                reason, got_frames = yield from self._run(pipeline, stop)
            finally:
                self._set_connected(False)
                _stop(pipeline)
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
        Gst = gst_modules()[0]
        appsink = pipeline.get_by_name(SINK_NAME)
        counter = _Counter()
        appsink.get_static_pad("sink").add_probe(Gst.PadProbeType.BUFFER, counter.probe)
        bus = pipeline.get_bus()
        failed = _start(pipeline)
        if failed:
            return f"cannot start ({failed})", False
        started = time.monotonic()
        last_frame = started
        last_number = 0
        got = 0
        while not stop.is_set():
            sample = appsink.try_pull_sample(int(PULL_STEP * SECOND))
            now = time.monotonic()
            if sample is None:
                problem = _bus_problem(bus)
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
            problem = _bus_problem(bus)  # an error while frames still trickle in
            if problem:
                return problem, True
        return None, got > 0

    def _frame(self, sample: Any, pipeline: Any, counter: _Counter, now: float) -> Frame | None:
        Gst = gst_modules()[0]
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
            stride = _stride(width)
            rows = np.frombuffer(info.data, np.uint8, count=stride * height)
            image = rows.reshape(height, stride)[:, : width * 3].reshape(height, width, 3).copy()
        finally:
            buffer.unmap(info)
        pts = buffer.pts if buffer.pts != Gst.CLOCK_TIME_NONE else None
        clock = pipeline.get_clock()
        if pts is not None and clock is not None:
            running = clock.get_time() - pipeline.get_base_time()
            self.last_age = (running - pts) / SECOND
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


# ---------------------------------------------------------------------------- output


class GstSink:
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
            f"min-latency=0 max-latency={10 * SECOND} max-buffers={SRC_QUEUE} "
            f"max-bytes={SRC_QUEUE * _stride(self.width) * self.height} "
            f'leaky-type=downstream caps="{caps}" ! {description(self.url)}'
        )
        self.backoff = backoff or Backoff()
        self.bitrate = bitrate
        self.connected = False
        self.state_since = time.monotonic()
        self.reconnects = 0
        self.frames = 0
        self.dropped = 0
        self.send_seconds = 0.0
        self._last_pts = -1
        self._closed = False
        self._retry_at: float | None = None
        self._said_bitrate = False
        self._pipeline: Any = None
        self._appsrc: Any = None
        self._pipeline = parse(self.text, self.url)  # a broken description fails here
        self._open(first=True)

    # ------------------------------------------------------------------ lifetime

    def _open(self, first: bool = False) -> None:
        if self._pipeline is None:
            self._pipeline = parse(self.text, self.url)
        self._appsrc = self._pipeline.get_by_name(SRC_NAME)
        if self.bitrate:
            self._apply_bitrate(self.bitrate)
        failed = _start(self._pipeline)
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
            _stop(self._pipeline)
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
            problem = _bus_problem(self._pipeline.get_bus())
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
        Gst = gst_modules()[0]
        appsrc.end_of_stream()
        kinds = Gst.MessageType.EOS | Gst.MessageType.ERROR
        msg = pipeline.get_bus().timed_pop_filtered(int(timeout * SECOND), kinds)
        if msg is None:
            log.warning("%s: output did not drain within %g s", self.name, timeout)
        _stop(pipeline)
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
        Gst = gst_modules()[0]
        start = time.perf_counter()
        image, _ = fit_image(frame.image, self.width, self.height)
        data = _rows(np.ascontiguousarray(image, dtype=np.uint8))
        buffer = Gst.Buffer.new_wrapped(data)
        pts = max(self._running_time(), self._last_pts + 1)
        self._last_pts = pts
        buffer.pts = buffer.dts = pts
        buffer.duration = round(SECOND / self.fps)
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


def _stride(width: int) -> int:
    """Bytes per row of video/x-raw BGR: GStreamer pads rows to a multiple of 4."""
    return (width * 3 + 3) & ~3


def _rows(image: np.ndarray) -> bytes:
    """BGR rows padded as GStreamer lays out video/x-raw BGR."""
    height, width = image.shape[:2]
    stride = _stride(width)
    if stride == width * 3:
        return image.tobytes()
    padded = np.zeros((height, stride), np.uint8)
    padded[:, : width * 3] = image.reshape(height, width * 3)
    return padded.tobytes()


__all__ = ["GstSink", "GstSource", "check_output", "gst_modules", "is_gst"]
