"""The live pipeline: input → analyse+swap → output on three threads.

Stages are joined by latest-value slots (``facecast.live.slots.LatestSlot``): when a stage is
slow the older frame is dropped and counted, never queued, so latency stays bounded under
any load. Audio takes its own small ordered queue to the output and is remuxed, not decoded.

While the input is down, the output keeps publishing the last frame (a holding frame) so
players stay connected; when the output link backs up, the frame rate and bitrate step down
and come back when it recovers.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from typing import Any, Protocol

import numpy as np

from facecast.config import StreamSettings
from facecast.engine.pipeline import EngineOptions, SwapEngine
from facecast.errors import FacecastError
from facecast.live.budget import running
from facecast.live.rate import RATE_LEVELS, RateController, RateGate
from facecast.live.slots import Closed, DropOldestQueue, LatestSlot
from facecast.live.stats import LiveStats
from facecast.media.frame import AudioChunk, Frame
from facecast.media.planes import ColourTags

log = logging.getLogger(__name__)

AUDIO_QUEUE = 256  # ~5 s of AAC packets: enough for any stall of the output thread


class Source(Protocol):
    connected: bool
    reconnects: int
    fps: Fraction | float | None

    def items(self, stop: threading.Event) -> Any: ...

    def audio_params(self) -> Any: ...


class Sink(Protocol):
    connected: bool
    reconnects: int
    send_seconds: float

    def write(self, frame: Frame) -> None: ...

    def write_audio(self, chunk: AudioChunk) -> None: ...

    def set_rate(self, fps: float, bitrate: int | None) -> None: ...

    def close(self) -> None: ...


# (width, height, fps, audio parameters, colour tags of the first frame) -> the output
SinkFactory = Callable[[int, int, float, Any, ColourTags], Sink]


class LivePipeline:
    def __init__(
        self,
        engine: SwapEngine,
        source: Source,
        sink_factory: SinkFactory,
        *,
        bitrate: int | None = None,
        hold_after: float = 0.5,
        status_interval: float = 10.0,
        name: str = "stream",
        lossless: bool = False,
    ) -> None:
        """``lossless``: stages wait for each other instead of dropping frames; for an input
        that can wait (a file read as fast as possible), never for a live one."""
        self.engine = engine
        self.source = source
        self.sink_factory = sink_factory
        self.sink: Sink | None = None
        self.bitrate = bitrate
        self.hold_after = hold_after
        self.status_interval = status_interval
        self.name = name
        self.lossless = lossless
        self.stats = LiveStats()
        self.swapping = True
        self.decoded: LatestSlot[Frame] = LatestSlot(lossless)
        self.processed: LatestSlot[Frame] = LatestSlot(lossless)
        self.audio: DropOldestQueue[AudioChunk] = DropOldestQueue(AUDIO_QUEUE)
        self.rate = RateController()
        self.rate_gate = RateGate()
        self._last_input = 0.0
        self._errors: list[BaseException] = []

    # ------------------------------------------------------------------ control

    def run(self, stop: threading.Event) -> LiveStats:
        """Run until ``stop`` is set (or a non-live input ends); then flush and close the
        output. Returns the stats. Counted as a live stream meanwhile (``live/budget.py``:
        the thread budgets of every stream in this process follow the count)."""
        with running():
            return self._run(stop)

    def _run(self, stop: threading.Event) -> LiveStats:
        threads = [
            threading.Thread(target=self._guard, args=(self._ingest, stop), name=f"{self.name}-in"),
            threading.Thread(
                target=self._guard, args=(self._process, stop), name=f"{self.name}-swap"
            ),
            threading.Thread(
                target=self._guard, args=(self._output, stop), name=f"{self.name}-out"
            ),
        ]
        for thread in threads:
            thread.start()
        next_status = time.monotonic() + self.status_interval
        try:
            while any(t.is_alive() for t in threads):
                threads[-1].join(0.2)
                if stop.is_set():
                    # wake a producer waiting on a lossless slot whose consumer has left
                    self.decoded.close()
                    self.processed.close()
                if time.monotonic() >= next_status:
                    self.log_status()
                    next_status += self.status_interval
        finally:
            stop.set()
            self.decoded.close()
            self.processed.close()
            for thread in threads:
                thread.join(10)
            if self.sink is not None:
                self.sink.close()  # first: the recording is safe before anything else
            # The input's own reader thread (demux, decode, close: all PyAV) is waited for
            # too. A process whose interpreter shuts down while a thread is still inside
            # PyAV can crash (PyAV's read-timeout callback takes the GIL from inside
            # FFmpeg, dozens of times a second while a live read waits): exit 139 at one
            # stop in 13, after the output had been flushed.
            close_source = getattr(self.source, "close", None)
            if close_source is not None and close_source() is False:
                log.warning("%s: the input did not close in time", self.name)
            stuck = [thread.name for thread in threads if thread.is_alive()]
            if stuck:
                # freeing the models under a stage that still runs them would crash it
                log.warning("%s: %s still running: models not freed", self.name, stuck)
            else:
                self.engine.close()
        self.log_status()
        if self._errors:
            raise self._errors[0]
        return self.stats

    def _guard(self, stage: Callable[[threading.Event], None], stop: threading.Event) -> None:
        """A stage that raises stops the pipeline (the error is re-raised by run())."""
        try:
            stage(stop)
        except Closed:
            pass
        except BaseException as exc:
            stage_name = threading.current_thread().name
            if isinstance(exc, FacecastError):
                # said by whoever runs the pipeline (the CLI's one line, the service's log)
                log.debug("%s: stage %s: %s", self.name, stage_name, exc, exc_info=True)
            else:
                log.exception("%s: stage %s failed", self.name, stage_name)
            self._errors.append(exc)
            stop.set()

    def log_status(self) -> None:
        s = self.stats
        elapsed = max(time.monotonic() - s.started, 1e-6)
        log.info(
            "%s: in %.1f fps, out %.1f fps, latency p50 %.0f ms p99 %.0f ms, dropped %d/%d "
            "(decode/output), held %d, failed %d, reconnects in %d out %d, rate x%.2f",
            self.name,
            s.frames_in / elapsed,
            s.frames_out / elapsed,
            s.latency_ms(50),
            s.latency_ms(99),
            self.decoded.dropped,
            self.processed.dropped,
            s.frames_held,
            s.frames_failed,
            self.source.reconnects,
            self.sink.reconnects if self.sink else 0,
            s.rate_level,
        )

    # ------------------------------------------------------------------ stages

    def _ingest(self, stop: threading.Event) -> None:
        for item in self.source.items(stop):
            if isinstance(item, Frame):
                self.stats.frames_in += 1
                self._last_input = time.monotonic()
                self.decoded.put(item)
            elif isinstance(item, AudioChunk):
                self.audio.put(item)
            if stop.is_set():
                break
        self.decoded.close()  # a file that ended: let the later stages finish

    def _process(self, stop: threading.Event) -> None:
        try:
            self._process_frames(stop)
        finally:
            self.processed.close()  # input ended (or stopping): let the output finish

    def _process_frames(self, stop: threading.Event) -> None:
        clock = self.stats.clock
        failures_logged = 0
        while not stop.is_set():
            frame = self.decoded.get(0.2)
            if frame is None:
                continue
            if self._left_out_for_rate(frame):
                self.stats.frames_rate_skipped += 1
                continue
            start = time.perf_counter()
            if self.swapping:
                try:
                    seconds = frame.seconds
                    result = self.engine.process_frame(
                        frame, clock, frame.t_ingest if seconds is None else seconds
                    )
                    self.stats.faces_last = result.faces
                    self.stats.faces_swapped += result.swapped
                    if result.swapped:
                        self.stats.frames_swapped += 1
                    else:
                        self.stats.frames_passed += 1
                except Exception:  # one bad frame must not stop a live stream
                    self.stats.frames_failed += 1
                    if failures_logged < 5:
                        log.exception(
                            "%s: frame %d failed; passed on unswapped", self.name, frame.index
                        )
                        failures_logged += 1
            else:
                self.stats.frames_passed += 1
            clock.add("process", time.perf_counter() - start)
            self.stats.frames_processed += 1
            self.processed.put(frame)

    def _output(self, stop: threading.Event) -> None:
        last: Frame | None = None
        last_write = 0.0
        while not stop.is_set():
            interval = self._frame_interval()
            frame = self.processed.get(interval)
            now = time.monotonic()
            if frame is None:
                # no new frame: if the input is down, repeat the last one so players hold on.
                # Never for a lossless input: there the gap is the swap working (the reader
                # waits for it), and a repeated frame would be one the input never had.
                input_down = not self.lossless and now - self._last_input > self.hold_after
                if last is not None and input_down and now - last_write >= interval:
                    self._write(last, held=True)
                    last_write = now
                continue
            last = frame
            self._write(frame, held=False)
            last_write = now

    # ------------------------------------------------------------------ output helpers

    def _left_out_for_rate(self, frame: Frame) -> bool:
        """At a stepped-down output rate, whether ``frame`` is one to leave out (see
        ``RateGate``); never for a lossless input, whose rate is never stepped down."""
        if self.lossless or self.stats.rate_level >= 1.0:
            self.rate_gate.reset()
            return False
        return not self.rate_gate.admit(frame.t_ingest, self._frame_interval())

    def _frame_interval(self) -> float:
        fps = float(self.source.fps or 30) * self.stats.rate_level
        return 1.0 / max(fps, 1.0)

    def _open_sink(self, frame: Frame) -> Sink:
        width, height = frame.width, frame.height
        fps = float(self.source.fps or 30)
        sink = self.sink_factory(width, height, fps, self.source.audio_params(), frame.colours)
        log.info("%s: output opened at %dx%d %.2f fps", self.name, width, height, fps)
        return sink

    def _write(self, frame: Frame, held: bool) -> None:
        if self.sink is None:
            self.sink = self._open_sink(frame)
        sink = self.sink
        start = time.perf_counter()
        for chunk in self.audio.drain():
            sink.write_audio(chunk)
        # the sink fits frames to the size it opened with (an input may reconnect at another)
        sink.write(frame)
        spent = time.perf_counter() - start
        self.stats.clock.add("output", spent)
        self.stats.frames_out += 1
        if held:
            self.stats.frames_held += 1
        else:
            latency = time.monotonic() - frame.t_ingest
            self.stats.latency.append(latency)
            self.stats.latency_histogram.observe(latency)
        self._adapt(sink, spent)

    def _adapt(self, sink: Sink, spent: float) -> None:
        if self.lossless:
            return  # every frame is kept: the input waits, there is no link to spare
        # only StreamSink's UDP output can tell (a GStreamer sink has no such attribute)
        backed_up = bool(getattr(sink, "backed_up", False))
        level = self.rate.observe(spent, self._frame_interval(), time.monotonic(), backed_up)
        if level is None:
            return
        down = RATE_LEVELS[level] < self.stats.rate_level  # else a step back up
        self.stats.rate_level = RATE_LEVELS[level]
        self.stats.rate_changes += 1
        fps = float(self.source.fps or 30) * self.stats.rate_level
        bitrate = int(self.bitrate * self.stats.rate_level) if self.bitrate else None
        queued = getattr(sink, "send_queue", None)
        log.warning(
            "%s: output %s: now %.1f fps%s%s",
            self.name,
            "backed up" if down else "recovered",
            fps,
            f", {bitrate // 1000} kb/s" if bitrate else "",
            f" ({queued // 1024} kB waiting to be sent on this host)"
            if down and backed_up and queued is not None
            else "",
        )
        sink.set_rate(fps, bitrate)


def engine_options(settings: StreamSettings) -> EngineOptions:
    """What a live stream's engine does, from its settings (the bench uses it too)."""
    from facecast.faces.select import Selection
    from facecast.models.choice import ModelChoice
    from facecast.swap.mesh_swapper import SwapOptions

    try:
        selection = Selection.parse(settings.faces)
    except ValueError as exc:
        raise FacecastError(str(exc)) from None
    return EngineOptions(
        selection=selection,
        swap=SwapOptions(blend=settings.blend),  # type: ignore[arg-type]
        label=settings.label,
        detect_every=settings.detect_every,
        temporal=True,  # cuts reset, track ids (index:N, references), steady mesh and colour
        models=ModelChoice.from_settings(settings),
    )


def build_pipeline(
    settings: StreamSettings, source_image: np.ndarray | None = None, name: str | None = None
) -> LivePipeline:
    """A ready-to-run pipeline for ``settings``: engine with the source face loaded (from
    ``source_image`` if given, else ``settings.source_image``), input and output."""
    from facecast.engine.pipeline import output_mark
    from facecast.media.image_io import read_image
    from facecast.media.live_sink import StreamSink, plan_output
    from facecast.media.live_source import StreamSource
    from facecast.swap.sources import source_photos

    assert settings.input and settings.output
    assert source_image is not None or settings.source_image
    # the input first: a port in use or a bad URL is said before the models load
    from facecast.media import gst
    from facecast.webrtc.listen import WhipListenSource, is_whip_listen

    source: Any
    if gst.is_gst(settings.input):
        source = gst.GstSource(settings.input, stall_timeout=settings.stall_timeout)
    elif is_whip_listen(settings.input):
        # publishers' bearer token: the same as service mode's API token
        source = WhipListenSource(settings.input, token=os.environ.get("FACECAST_API_TOKEN"))
    else:
        source = StreamSource(
            settings.input, realtime=settings.realtime, stall_timeout=settings.stall_timeout
        )
    # the output's description or URL too: a broken one fails now, not at the first frame
    if gst.is_gst(settings.output):
        gst.check_output(settings.output)
    else:
        plan_output(settings.output)
    options = engine_options(settings)
    engine = SwapEngine(options)
    source_name = str(settings.source_image or "uploaded face")
    if source_image is not None:
        engine.load_source(source_image, name=source_name)
    else:
        assert settings.source_image is not None
        photos = source_photos([settings.source_image, *settings.extra_sources])
        engine.load_sources([(read_image(photo), str(photo)) for photo in photos])
        source_name = ", ".join(photo.name for photo in photos)
    for photo, face in settings.references:
        face_image = None if face is None else read_image(face)  # None: the stream's face
        engine.add_reference(read_image(photo), face_image, name=str(photo))
    mark = output_mark(source_name, options)
    # a file read flat out: every frame kept, and the output on the file's own timeline
    lossless = not (source.live or settings.realtime)

    def open_sink(width: int, height: int, fps: float, audio: Any, colours: ColourTags) -> Sink:
        output: str = settings.output  # type: ignore[assignment]
        stream = {"width": width, "height": height, "fps": fps, "audio": audio}
        if gst.is_gst(output):
            return gst.GstSink(output, **stream, bitrate=settings.bitrate)  # BGR: no tags
        return StreamSink(
            output,
            **stream,
            colours=colours,
            preset=settings.preset,
            keyint=settings.keyint,
            bitrate=settings.bitrate,
            mark=mark,
            media_time=lossless,
        )

    return LivePipeline(
        engine,
        source,
        open_sink,
        bitrate=settings.bitrate,
        status_interval=settings.status_interval,
        name=name or _stream_name(settings.input),
        lossless=lossless,
    )


def run_stream(settings: StreamSettings) -> LiveStats:
    """``facecast stream``: build the engine and both endpoints, run until SIGINT/SIGTERM
    (or until a non-live input ends), flush the output and return."""
    from facecast.media.live_source import redact

    assert settings.source_image and settings.input and settings.output
    pipeline = build_pipeline(settings)
    stop = threading.Event()
    with _stop_on_signals(stop):
        log.info(
            "streaming %s → %s with the face from %s (stop with Ctrl-C)",
            redact(settings.input),
            redact(settings.output),
            settings.source_image,
        )
        return pipeline.run(stop)


def _stream_name(url: str) -> str:
    """A short label for logs and metrics: the stream key or file name ("gst" for a
    GStreamer description, whose caps strings make poor labels)."""
    if url.startswith("gst:"):
        return "gst"
    return url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or "stream"


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[list[int]]:
    """SIGINT/SIGTERM set ``stop`` so the pipeline flushes and closes its output; yields
    the signals received, in order. Installed whatever the inherited disposition: a
    command started in the background by a script inherits SIGINT ignored, and would
    otherwise run on through a ``kill -INT``."""
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        received.append(signum)
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
