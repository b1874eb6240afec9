"""The live pipeline's policies with in-process endpoints: a source that produces real
frames (made from the test photos) at a set rate, and a sink that records what it gets and
can be made slow. The network endpoints are tested in test_live_media / test_live_stream."""

from __future__ import annotations

import threading
import time
from fractions import Fraction

import cv2
import numpy as np
import pytest

from facecast.engine.pipeline import EngineOptions, SwapEngine
from facecast.live.pipeline import LivePipeline
from facecast.live.rate import RateController, RateGate
from facecast.media.frame import AudioChunk, Frame

from .conftest import load


class PacedSource:
    """Frames of a real photo at ``fps``; ``gap`` = (start, end) seconds with no frames,
    as if the publisher dropped out."""

    def __init__(
        self, fps: float, seconds: float, gap: tuple[float, float] | None = None, hd: bool = False
    ):
        self.fps, self.seconds, self.gap = fps, seconds, gap
        self.connected, self.reconnects = True, 0
        image = load("obama-720p.jpg")
        self.image = image if hd else cv2.resize(image, (640, 360))

    def audio_params(self):
        return None

    def items(self, stop: threading.Event):
        start = time.monotonic()
        index = 0
        while not stop.is_set():
            t = index / self.fps
            if t >= self.seconds:
                return
            now = time.monotonic() - start
            if t > now:
                time.sleep(t - now)
            index += 1
            if self.gap and self.gap[0] <= t < self.gap[1]:
                self.connected = False
                continue
            self.connected = True
            yield Frame(
                image=self.image.copy(),
                index=index,
                pts=index,
                time_base=Fraction(1, int(self.fps)),
            )
            if index % 2 == 0:
                yield AudioChunk(b"\x00" * 8, pts=index, dts=index, time_base=Fraction(1, 30))


class RecordingSink:
    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.frames: list[tuple[float, int]] = []
        self.audio = 0
        self.connected, self.reconnects, self.send_seconds = True, 0, 0.0
        self.rates: list[tuple[float, int | None]] = []
        self.closed = False

    def write(self, frame: Frame) -> None:
        if self.delay:
            time.sleep(self.delay)
        self.send_seconds = self.delay
        self.frames.append((time.monotonic(), frame.index))

    def write_audio(self, chunk: AudioChunk) -> None:
        self.audio += 1

    def set_rate(self, fps: float, bitrate: int | None) -> None:
        self.rates.append((fps, bitrate))

    def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def engine():
    engine = SwapEngine(EngineOptions(detect_every=3))
    engine.load_source(load("biden.jpg"))
    return engine


def run_pipeline(engine, source, sink, seconds, until=None, **kwargs):
    """Run for ``seconds`` at most (or until the source ends); with ``until``, stop as soon
    as ``until()`` is true (looked at every 50 ms)."""
    pipeline = LivePipeline(engine, source, lambda w, h, fps, audio, colours: sink, **kwargs)
    stop = threading.Event()
    timer = threading.Timer(seconds, stop.set)
    timer.start()

    def watch() -> None:
        while not stop.wait(0.05):
            if until():
                stop.set()

    watcher = threading.Thread(target=watch, daemon=True)
    if until is not None:
        watcher.start()
    try:
        stats = pipeline.run(stop)
    finally:
        timer.cancel()
        stop.set()
    if until is not None:
        watcher.join(1)
    return pipeline, stats


def test_overload_drops_frames_instead_of_building_latency(engine):
    """720p input at 300 fps, several times what two cores can swap (a still face is followed
    at about 80 fps here, so 120 fps was no longer an overload): latency stays bounded (no
    queue grows), the drops are counted, and the output still moves forward in order."""
    source = PacedSource(fps=300, seconds=3.0, hd=True)
    sink = RecordingSink()
    pipeline, stats = run_pipeline(engine, source, sink, seconds=3.5)
    assert sink.closed
    dropped = pipeline.decoded.dropped + pipeline.processed.dropped
    print(
        f"in {stats.frames_in}, out {stats.frames_out}, dropped {dropped}, "
        f"latency p50 {stats.latency_ms(50):.0f} ms p99 {stats.latency_ms(99):.0f} ms"
    )
    assert stats.frames_in > 300
    assert dropped > stats.frames_in // 3
    assert stats.frames_out + dropped >= stats.frames_processed
    assert stats.latency_ms(99) < 250  # a frame or two of processing, never a backlog
    indexes = [i for _, i in sink.frames]
    assert indexes == sorted(indexes)
    assert stats.frames_swapped > 0 and sink.audio > 0


def test_input_gap_keeps_the_output_alive_with_holding_frames(engine):
    source = PacedSource(fps=15, seconds=3.0, gap=(1.0, 2.2))
    sink = RecordingSink()
    _, stats = run_pipeline(engine, source, sink, seconds=3.3, hold_after=0.3)
    times = [t for t, _ in sink.frames]
    longest_silence = max(np.diff(times))
    print(f"held {stats.frames_held} frames, longest output gap {longest_silence * 1000:.0f} ms")
    assert stats.frames_held >= 5
    assert longest_silence < 0.6  # the player never waits long for a frame


def test_a_backed_up_output_steps_the_rate_down(engine):
    """Each write takes 60 ms at a 15 fps input (67 ms a frame): the controller steps down."""
    source = PacedSource(fps=15, seconds=4.0)
    sink = RecordingSink(delay=0.06)
    # ends at the first new rate the sink is given (or after the 4 s of input)
    _, stats = run_pipeline(
        engine, source, sink, seconds=4.2, until=lambda: sink.rates, bitrate=2_000_000
    )
    print(f"rate changes {stats.rate_changes}, level {stats.rate_level:.2f}, {sink.rates}")
    assert stats.rate_changes >= 1 and stats.rate_level < 1.0
    assert sink.rates and sink.rates[0][0] < 15 and sink.rates[0][1] < 2_000_000


def test_a_stepped_down_rate_leaves_frames_out_before_the_swap(engine):
    """At a stepped-down output rate the frames to leave out are left out before they are
    swapped: every frame the swap paid for is sent. (Under CPU load the rate steps down
    too; swapping frames only to drop them at the output took the swap's time from the
    frames that were sent: 4 x 720p streams sent 14.3 fps where they swapped 18.)"""
    source = PacedSource(fps=30, seconds=2.0)
    sink = RecordingSink()
    pipeline = LivePipeline(engine, source, lambda w, h, fps, audio, colours: sink)
    pipeline.stats.rate_level = 0.5  # 15 fps out of a 30 fps input
    stop = threading.Event()
    timer = threading.Timer(2.5, stop.set)
    timer.start()
    try:
        stats = pipeline.run(stop)
    finally:
        timer.cancel()
    print(
        f"in {stats.frames_in}, swapped or passed {stats.frames_processed}, "
        f"left out for the rate {stats.frames_rate_skipped}, out {stats.frames_out}"
    )
    assert stats.frames_rate_skipped >= stats.frames_in // 3
    assert stats.frames_out == stats.frames_processed  # nothing swapped was thrown away
    assert stats.frames_out <= 0.6 * stats.frames_in


def test_a_failing_frame_is_counted_and_the_stream_goes_on(engine, monkeypatch):
    calls = {"n": 0}
    real = engine.analyse  # where a frame enters the engine, whichever entry point

    def flaky(image, clock=None, seconds=None):
        calls["n"] += 1
        if calls["n"] % 5 == 0:
            raise ValueError("simulated bad frame")
        return real(image, clock, seconds)

    monkeypatch.setattr(engine, "analyse", flaky)
    source = PacedSource(fps=15, seconds=2.0)
    sink = RecordingSink()
    _, stats = run_pipeline(engine, source, sink, seconds=2.3)
    assert stats.frames_failed >= 3
    assert stats.frames_out >= stats.frames_processed - 2


def test_rate_controller_recovers_with_hysteresis():
    controller = RateController(window=5, recover_after=1.0)
    levels = [controller.observe(0.9, 1.0, now=i * 0.1) for i in range(5)]
    assert levels[-1] == 1
    # easy now, but not for long enough: stays down
    assert all(controller.observe(0.1, 1.0, now=1 + i * 0.1) is None for i in range(5))
    back = [controller.observe(0.1, 1.0, now=2.5 + i * 0.1) for i in range(5)]
    assert 0 in back


@pytest.mark.parametrize(
    ("spacing", "level", "kept"),
    [
        (1 / 30, 5 / 6, 250),  # a 30 fps input at 25 fps: 5 frames of 6
        (1 / 30, 1 / 2, 150),  # at 15 fps: every other
        (0.055, 5 / 6, 300),  # a swap already slower than 25 fps: keeps all it takes
    ],
)
def test_rate_gate_keeps_the_stepped_down_rate_through_jitter(spacing, level, kept):
    gate = RateGate()
    jitter = np.random.default_rng(3).uniform(-0.004, 0.004, 300)
    times = np.arange(300) * spacing + jitter
    admitted = sum(gate.admit(float(t), (1 / 30) / level) for t in times)
    assert abs(admitted - kept) <= 3


def test_lossless_mode_passes_every_frame_and_stops_when_asked(engine):
    """A file read flat out: the stages wait for each other, so every frame comes out in
    order; and a stop in the middle ends the run (a producer left waiting on a full slot
    must be released)."""
    source = PacedSource(fps=1000, seconds=0.06)  # 60 frames as fast as they can be made
    sink = RecordingSink(delay=0.01)
    pipeline, _ = run_pipeline(engine, source, sink, seconds=30, lossless=True)
    assert [index for _, index in sink.frames] == list(range(1, 61))
    assert pipeline.decoded.dropped == pipeline.processed.dropped == 0

    endless = PacedSource(fps=1000, seconds=3600)
    started = time.monotonic()
    run_pipeline(engine, endless, RecordingSink(delay=0.05), seconds=1.0, lossless=True)
    assert time.monotonic() - started < 5
