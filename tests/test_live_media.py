"""The live media endpoints on real streams: ``StreamSource`` fed by Debian ``ffmpeg``
publishers over loopback UDP MPEG-TS (no ingest server needed), ``StreamSink`` read back with
PyAV and ffprobe. Every wait is bounded and every subprocess is stopped at teardown."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import itertools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from facecast.errors import MediaError
from facecast.media.backoff import Backoff
from facecast.media.frame import AudioChunk, Frame
from facecast.media.live_sink import StreamSink, _Connection, plan_output
from facecast.media.live_source import AudioParams, StreamSource, free_udp_port, plan_input
from facecast.media.mark import make_mark, read_video_mark
from tests import live_helpers

from .conftest import REPO
from .media_helpers import CLIP, ffprobe, probe_streams

FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="needs Debian ffmpeg")
needs_srt = pytest.mark.skipif(
    FFMPEG is None or shutil.which("srt-live-transmit") is None,
    reason="needs ffmpeg with libsrt and srt-live-transmit (srt-tools)",
)
FAST = dict(initial=0.1, maximum=0.4)  # Backoff for tests: retry quickly


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """Subprocesses a test starts; stopped at teardown whatever happened."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(2)


def publish_udp(procs: list, port: int, seconds: float) -> subprocess.Popen:
    """The test clip as MPEG-TS over UDP, in real time, for ``seconds``."""
    assert FFMPEG is not None
    cmd = [FFMPEG, "-nostdin", "-v", "error", "-re", "-stream_loop", "-1", "-i", str(CLIP)]
    cmd += ["-t", f"{seconds:g}", "-c", "copy", "-f", "mpegts"]
    cmd += [f"udp://127.0.0.1:{port}?pkt_size=1316"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    procs.append(proc)
    return proc


# polls finely: several tests time how soon something happens
wait_until = functools.partial(live_helpers.wait_until, step=0.02)


class Collector:
    """``source.items()`` on a thread, recording what arrives (not the pixels: memory)."""

    def __init__(self, source: StreamSource):
        self.source = source
        self.stop = threading.Event()
        self.frames: list[tuple[float, int | None, tuple[int, ...]]] = []
        self.audio: list[AudioChunk] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for item in self.source.items(self.stop):
                if isinstance(item, Frame):
                    self.frames.append((time.monotonic(), item.pts, item.image.shape))
                else:
                    self.audio.append(item)
        except BaseException as exc:
            self.error = exc

    def close(self, timeout: float = 3.0) -> float:
        """Stop; returns how long the iteration took to end."""
        start = time.monotonic()
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "items() did not end after stop"
        return time.monotonic() - start


@pytest.fixture
def collectors() -> Iterator[list[Collector]]:
    made: list[Collector] = []
    yield made
    for c in made:
        c.stop.set()
        c.source.join(5)


def clip_items(seconds: float | None = None) -> list[Frame | AudioChunk]:
    """Frames and audio chunks of the test clip, in container order (first ``seconds``)."""
    items: list[Frame | AudioChunk] = []
    with av.open(str(CLIP)) as c:
        video, audio = c.streams.video[0], c.streams.audio[0]
        for packet in c.demux(video, audio):
            if packet.dts is None:
                continue
            t = float(packet.pts * packet.time_base)
            if seconds is not None and t > seconds:
                break
            if packet.stream is audio:
                items.append(
                    AudioChunk(
                        bytes(packet),
                        packet.pts,
                        packet.dts,
                        Fraction(packet.time_base),
                        packet.duration,
                    )
                )
                continue
            for vf in video.decode(packet):
                items.append(
                    Frame(vf.to_ndarray(format="bgr24"), pts=vf.pts, time_base=vf.time_base)
                )
    return items


def clip_audio_params() -> AudioParams:
    with av.open(str(CLIP)) as c:
        return AudioParams.from_stream(c.streams.audio[0])


class UdpReader:
    """PyAV reading an MPEG-TS UDP stream on a thread: packet times per stream."""

    def __init__(self, port: int):
        self.port = port
        self.codecs: list[str] = []
        self.times: dict[str, list[float]] = {"video": [], "audio": []}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        options = {"timeout": "2000000", "analyzeduration": "1000000", "reuse": "1"}
        try:
            with av.open(f"udp://127.0.0.1:{self.port}", options=options, timeout=(8, 2)) as c:
                self.codecs = sorted(s.codec_context.name for s in c.streams)
                for packet in c.demux():
                    if packet.dts is not None and packet.stream.type in self.times:
                        self.times[packet.stream.type].append(float(packet.pts * packet.time_base))
        except av.FFmpegError:
            pass  # the read timeout after the sender stops ends the reading

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive()


def strictly_increasing(values: list[float]) -> bool:
    return all(b > a for a, b in itertools.pairwise(values))


# ---------------------------------------------------------------------------- plans


def test_input_plans_bound_every_blocking_call():
    rtmp = plan_input("rtmp://host/live/key", open_timeout=5, stall_timeout=4)
    assert rtmp.options["rtmp_live"] == "live"
    assert rtmp.options["rw_timeout"] == "5000000"  # backstop: stall + 1 s
    assert "timeout" not in rtmp.options  # RTMP's "timeout" makes it listen
    assert "fflags" not in rtmp.options  # nobuffer would drop the probe's keyframe
    assert int(rtmp.options["analyzeduration"]) <= 3_000_000

    udp = plan_input("udp://127.0.0.1:5000", stall_timeout=2)
    assert udp.options["timeout"] == "3000000"
    assert udp.options["overrun_nonfatal"] == "1" and int(udp.options["fifo_size"]) > 0

    sdp = plan_input("/tmp/cam.sdp")
    assert (sdp.kind, sdp.format, sdp.options["protocol_whitelist"]) == (
        "sdp",
        "sdp",
        "file,udp,rtp",
    )
    hls = plan_input("http://server/hls/key.m3u8")
    assert hls.kind == "hls" and hls.options["live_start_index"] == "-1" and hls.live
    assert plan_input(str(CLIP)).live is False


def test_camera_plan_takes_its_settings_from_the_query():
    cam = plan_input("/dev/video2?video_size=1280x720&framerate=30&input_format=mjpeg")
    assert (cam.kind, cam.target, cam.format) == ("v4l2", "/dev/video2", "v4l2")
    assert cam.options["video_size"] == "1280x720"
    assert cam.options["framerate"] == "30" and cam.options["input_format"] == "mjpeg"
    assert cam.options["fflags"] == "nonblock"  # a stuck camera cannot block a read
    assert cam.live


@needs_srt
def test_srt_plans_use_a_loopback_bridge():
    src = plan_input("srt://10.0.0.5:9000?latency=200", bridge_port=40123)
    assert src.target.startswith("udp://127.0.0.1:40123") and src.format == "mpegts"
    assert src.bridge is not None and src.bridge[-2:] == [
        "srt://10.0.0.5:9000?latency=200",
        "udp://127.0.0.1:40123",
    ]
    out = plan_output("srt://10.0.0.5:9001", bridge_port=40124)
    assert out.target == "udp://127.0.0.1:40124?pkt_size=1316" and out.format == "mpegts"
    assert out.bridge is not None and out.bridge[-2:] == [
        "udp://127.0.0.1:40124",
        "srt://10.0.0.5:9001",
    ]


def test_output_plans(tmp_path):
    assert plan_output("rtmp://host/swapped/key").format == "flv"
    udp = plan_output("udp://127.0.0.1:6000")
    assert (udp.format, udp.target) == ("mpegts", "udp://127.0.0.1:6000?pkt_size=1316")
    assert plan_output("udp://127.0.0.1:6000?pkt_size=188").target.endswith("pkt_size=188")
    rtp = plan_output("rtp://127.0.0.1:6002", sdp_path=tmp_path / "out.sdp")
    assert (rtp.format, rtp.audio, rtp.sdp_path) == ("rtp", False, tmp_path / "out.sdp")
    assert "frag_keyframe" in plan_output(str(tmp_path / "x.mp4")).options["movflags"]
    assert plan_output(str(tmp_path / "x.ts")).format == "mpegts"
    with pytest.raises(MediaError, match="unknown output format"):
        plan_output(str(tmp_path / "x.gif"))


# ---------------------------------------------------------------------------- the source


@needs_ffmpeg
def test_udp_input_survives_publisher_loss_garbage_and_return(procs, collectors, caplog):
    caplog.set_level(logging.INFO, logger="facecast.media.live_source")
    port = free_udp_port()
    first = publish_udp(procs, port, 2.5)
    stall = 1.0
    source = StreamSource(
        f"udp://127.0.0.1:{port}", stall_timeout=stall, open_timeout=2.0, backoff=Backoff(**FAST)
    )
    c = Collector(source)
    collectors.append(c)

    assert wait_until(lambda: len(c.frames) >= 20 and len(c.audio) >= 10, 8), "no media"
    _, _, shape = c.frames[0]
    assert shape == (360, 640, 3) and (source.width, source.height) == (640, 360)
    assert source.fps is not None and abs(float(source.fps) - 29.97) < 0.1
    params = source.audio_params()
    assert params is not None and (params.codec, params.sample_rate) == ("aac", 44100)
    assert {type(chunk.data) for chunk in c.audio} == {bytes}

    # The publisher goes away: the source must notice within the stall timeout.
    first.wait(10)
    assert wait_until(lambda: not source.connected, stall + 3), "stall not detected"
    assert source.last_frame_at is not None
    assert source.state_since - source.last_frame_at <= stall + 0.6
    assert wait_until(lambda: source.reconnects >= 1, 3)

    # Garbage on the port while nobody publishes: skipped, never fatal.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        rng = np.random.default_rng(1)
        for _ in range(200):
            sock.sendto(rng.bytes(1316), ("127.0.0.1", port))
            time.sleep(0.002)
    before = len(c.frames)
    publish_udp(procs, port, 4)
    assert wait_until(lambda: len(c.frames) >= before + 20, 10), "frames did not resume"
    assert source.connected

    assert c.close() < 1.0
    assert c.error is None
    messages = [r.getMessage() for r in caplog.records]
    assert any("lost (no data for" in m or "lost (no video frame" in m for m in messages)
    assert sum("connected (" in m for m in messages) >= 2
    assert not any(r.exc_info for r in caplog.records)  # no tracebacks


@needs_ffmpeg
def test_garbage_inside_a_live_stream_is_skipped(procs, collectors):
    port = free_udp_port()
    publish_udp(procs, port, 4)
    source = StreamSource(f"udp://127.0.0.1:{port}", stall_timeout=2, backoff=Backoff(**FAST))
    c = Collector(source)
    collectors.append(c)
    assert wait_until(lambda: len(c.frames) >= 10, 8)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        rng = np.random.default_rng(2)
        for _ in range(300):  # mixed into the real stream for ~0.6 s
            sock.sendto(rng.bytes(int(rng.integers(1, 1500))), ("127.0.0.1", port))
            time.sleep(0.002)
    after = len(c.frames)
    assert wait_until(lambda: len(c.frames) >= after + 15, 5), "frames stopped after garbage"
    c.close()
    assert c.error is None


def test_unreachable_rtmp_retries_quietly_and_stops_fast(collectors, caplog):
    caplog.set_level(logging.INFO, logger="facecast.media.live_source")
    source = StreamSource("rtmp://127.0.0.1:1/live/none", backoff=Backoff(**FAST))
    c = Collector(source)
    collectors.append(c)
    assert wait_until(lambda: source.reconnects >= 3, 5), "not retrying"
    assert not source.connected and c.frames == []
    assert c.close() < 2.0
    assert source.join(2.0), "reader thread still running"
    assert c.error is None
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot connect" in m for m in messages)
    assert any("retry in" in m for m in messages)
    assert not any(r.exc_info for r in caplog.records)


def test_file_input_realtime_is_paced_and_fast_mode_is_not(collectors):
    paced = Collector(StreamSource(str(CLIP), realtime=True))
    collectors.append(paced)
    assert wait_until(lambda: len(paced.frames) >= 45, 5)
    start = time.monotonic()
    count = len(paced.frames)
    time.sleep(1.0)
    rate = (len(paced.frames) - count) / (time.monotonic() - start)
    paced.close()
    assert 22 <= rate <= 38, f"realtime file read at {rate:.1f} fps, clip is 29.97"

    start = time.monotonic()
    fast = StreamSource(str(CLIP), realtime=False)
    frames = sum(isinstance(i, Frame) for i in fast.items(threading.Event()))
    elapsed = time.monotonic() - start
    assert frames == 275  # every frame: a file read as fast as possible drops nothing
    assert elapsed < 5.0, f"a 10 s clip took {elapsed:.1f} s"


def test_file_input_loops(collectors):
    c = Collector(StreamSource(str(CLIP), loop_file=True))
    collectors.append(c)
    assert wait_until(lambda: len(c.frames) > 300, 15), "the file did not loop"
    c.close()
    pts = [p for _, p, _ in c.frames]
    assert min(pts[280:]) < max(pts[:275])  # pts start again after the loop
    assert c.source.reconnects == 0


def test_missing_file_is_an_error_at_once(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        StreamSource(str(tmp_path / "nope.mp4"))


# ---------------------------------------------------------------------------- the sink


def feed(
    sink: StreamSink,
    items: list[Frame | AudioChunk],
    fps: float = 30.0,
    stop: threading.Event | None = None,
) -> None:
    """Write ``items`` at about ``fps`` video frames a second, as a pipeline would."""
    interval = 1.0 / fps
    next_at = time.monotonic()
    for item in items:
        if stop is not None and stop.is_set():
            return
        if isinstance(item, Frame):
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at += interval
            sink.write(Frame(item.image, pts=item.pts, time_base=item.time_base))
        else:
            sink.write_audio(dataclasses.replace(item, t_ingest=time.monotonic()))


@pytest.fixture(scope="module")
def clip_start() -> list[Frame | AudioChunk]:
    return clip_items(seconds=2.3)


def test_sink_udp_h264_aac_with_increasing_pts_across_an_input_reconnect(clip_start):
    port = free_udp_port()
    reader = UdpReader(port)
    time.sleep(0.2)  # the reader's socket is bound before anything is sent
    sink = StreamSink(
        f"udp://127.0.0.1:{port}",
        width=640,
        height=360,
        fps=Fraction(2997, 100),
        audio=clip_audio_params(),
        bitrate=600_000,
    )
    try:
        assert sink.connected
        # The input "reconnects" halfway: its video and audio pts go back to the start.
        feed(sink, clip_start[: len(clip_start) // 2])
        feed(sink, clip_start)
    finally:
        sink.close()
    reader.join(10)
    assert reader.codecs == ["aac", "h264"]
    video, audio = reader.times["video"], reader.times["audio"]
    assert len(video) >= 0.9 * sink.frames
    assert strictly_increasing(video) and strictly_increasing(audio)
    assert sink.dropped == 0 and sink.reconnects == 0
    assert sink.audio_packets > 50
    # Audio spans the same output time as video (mapped onto the same clock).
    assert abs(audio[-1] - video[-1]) < 0.5 and abs(audio[0] - video[0]) < 0.5
    assert 0 < sink.send_seconds_avg < 0.05


@pytest.mark.parametrize("suffix", [".ts", ".mp4", ".flv"])
def test_sink_file_is_playable_after_close(tmp_path, clip_start, suffix):
    path = tmp_path / f"out{suffix}"
    mark = make_mark(source="test")
    sink = StreamSink(path, width=640, height=360, fps=30, audio=clip_audio_params(), mark=mark)
    feed(sink, clip_start, fps=60)
    sink.close()
    sink.close()  # idempotent
    info = probe_streams(path, count_frames=True)
    codecs = {s["codec_type"]: s for s in info["streams"]}
    assert codecs["video"]["codec_name"] == "h264" and codecs["audio"]["codec_name"] == "aac"
    assert int(codecs["video"]["nb_read_frames"]) == sink.frames
    assert sink.frames > 30 and float(info["format"]["duration"]) > 0.8 * sink.frames / 60
    if suffix == ".ts":  # MPEG-TS keeps only its service tags
        tags = ffprobe(path, "-show_programs")["programs"][0]["tags"]
        assert tags["service_name"] == "AI-generated (facecast)"
    else:  # the MP4 and FLV (RTMP) outputs carry the full mark
        assert read_video_mark(path) == mark


_KILLED_WRITER = """
import sys, time, numpy as np
from facecast.media.frame import Frame
from facecast.media.live_sink import StreamSink
sink = StreamSink(sys.argv[1], width=320, height=180, fps=30, audio=None, keyint=10)
print("ready", flush=True)
for i in range(10_000):
    sink.write(Frame(np.full((180, 320, 3), i % 255, np.uint8)))
    time.sleep(1 / 30)
"""


def test_mp4_output_survives_sigterm(tmp_path):
    path = tmp_path / "killed.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)  # no handler: dies without close()
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    info = probe_streams(path, count_frames=True)
    assert int(info["streams"][0]["nb_read_frames"]) >= 20  # the fragments written so far


def test_sink_drops_and_retries_while_the_output_is_unreachable(caplog):
    caplog.set_level(logging.INFO, logger="facecast.media.live_sink")
    sink = StreamSink(
        "rtmp://127.0.0.1:1/live/none",
        width=320,
        height=180,
        fps=30,
        audio=None,
        backoff=Backoff(**FAST),
        connect_wait=0.2,
    )
    try:
        image = np.zeros((180, 320, 3), np.uint8)
        start = time.monotonic()
        for _ in range(10):
            sink.write(Frame(image))
        assert time.monotonic() - start < 0.2  # never blocks the pipeline
        assert sink.dropped == 10 and sink.frames == 0 and not sink.connected
        assert wait_until(lambda: sink.reconnects >= 2, 3)
    finally:
        start = time.monotonic()
        sink.close()
        assert time.monotonic() - start < 1.0
    assert any("cannot connect" in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records)


def test_a_stuck_write_is_abandoned_and_the_output_reconnects(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="facecast.media.live_sink")
    real = _Connection.encode_video
    stuck = {"done": False}

    def sometimes_stuck(self, frame, bit_rate):
        if self.frames == 5 and not stuck["done"]:
            stuck["done"] = True
            time.sleep(2.0)  # a TCP send into a link that went silent
        return real(self, frame, bit_rate)

    monkeypatch.setattr(_Connection, "encode_video", sometimes_stuck)
    port = free_udp_port()
    sink = StreamSink(
        f"udp://127.0.0.1:{port}",
        width=320,
        height=180,
        fps=30,
        audio=None,
        backoff=Backoff(**FAST),
        write_timeout=0.3,
    )
    try:
        image = np.zeros((180, 320, 3), np.uint8)
        slowest = 0.0
        for _ in range(40):
            start = time.monotonic()
            sink.write(Frame(image))
            slowest = max(slowest, time.monotonic() - start)
            time.sleep(1 / 30)
        assert slowest < 0.5, f"write() blocked {slowest:.2f} s"
        assert sink.reconnects == 1 and sink.connected
        assert sink.dropped >= 1 and sink.frames >= 25
    finally:
        sink.close()
    assert any("lost (a frame took more than" in r.getMessage() for r in caplog.records)


def test_set_rate_lowers_the_bitrate_live(tmp_path):
    path = tmp_path / "rate.ts"
    rng = np.random.default_rng(3)
    noise = [rng.integers(0, 255, (180, 320, 3), np.uint8) for _ in range(8)]
    sink = StreamSink(path, width=320, height=180, fps=30, audio=None, bitrate=1_000_000)
    switch = 45
    for i in range(switch + 36):
        if i == switch:
            sink.set_rate(15, 250_000)  # a quarter of the bits at half the frames
            switch -= sink.dropped  # frames a loaded machine could not send are not in the file
        sink.write(Frame(noise[i % len(noise)]))
        time.sleep(1 / 30 if i < switch else 1 / 15)
    sink.close()
    with av.open(str(path)) as c:
        packets = [
            (float(p.pts * p.time_base), p.size, p.is_keyframe)
            for p in c.demux(video=0)
            if p.pts is not None
        ]
    t_switch = packets[switch][0]
    assert packets[switch][2], "the new rate starts on a keyframe"

    def rate(t0: float, t1: float) -> float:
        return sum(size for t, size, _ in packets if t0 <= t < t1) * 8 / (t1 - t0)

    before, after = rate(0.3, t_switch), rate(t_switch + 0.7, packets[-1][0])
    assert 0.6e6 < before < 1.4e6 and after < 0.45e6, (before, after)


# ---------------------------------------------------------------------------- A/V sync


def flash_and_beep_clip(path: Path, seconds: float = 4.0, fps: int = 30) -> Path:
    """Dark frames and silence, except a white flash and a 1 kHz beep together at 1, 2 and
    3 s (4 frames, 0.12 s): the same instants in both streams."""
    rate = 44100
    events = [1.0, 2.0, 3.0]
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        video.width, video.height, video.pix_fmt = 320, 180, "yuv420p"
        audio = out.add_stream("aac", rate=rate)
        audio.layout = "stereo"
        t = np.arange(round(seconds * rate)) / rate
        beep = np.zeros_like(t)
        for e in events:
            on = (t >= e) & (t < e + 0.12)
            beep[on] = 0.5 * np.sin(2 * np.pi * 1000 * t[on])
        wave = beep.astype(np.float32)
        chunks = []
        for start in range(0, len(wave), 1024):
            part = wave[start : start + 1024]
            af = av.AudioFrame.from_ndarray(np.stack([part, part]), format="fltp", layout="stereo")
            af.sample_rate, af.pts, af.time_base = rate, start, Fraction(1, rate)
            chunks.append(af)
        a = 0
        for i in range(round(seconds * fps)):
            while a < len(chunks) and chunks[a].pts / rate <= i / fps:
                out.mux(audio.encode(chunks[a]))
                a += 1
            lit = any(e <= i / fps < e + 4 / fps for e in events)
            image = np.full((180, 320, 3), 230 if lit else 20, np.uint8)
            vf = av.VideoFrame.from_ndarray(image, format="bgr24")
            vf.pts = i
            out.mux(video.encode(vf))
        for chunk in chunks[a:]:
            out.mux(audio.encode(chunk))
        out.mux(video.encode(None))
        out.mux(audio.encode(None))
    return path


def onsets(times: list[float], gap: float = 0.5) -> list[float]:
    """The first time of each cluster of ``times``."""
    out: list[float] = []
    for t in sorted(times):
        if not out or t - out[-1] > gap:
            out.append(t)
    return out


PROCESSING_S = 0.1  # the face swap: each frame reaches the sink 100 ms after its audio


def test_audio_stays_in_sync_with_video_through_a_slow_pipeline(tmp_path):
    clip = flash_and_beep_clip(tmp_path / "sync.mp4")
    source = StreamSource(str(clip), realtime=True)
    items = source.items(threading.Event())
    first = next(i for i in items if isinstance(i, Frame))  # the source knows its audio now
    sink = StreamSink(
        tmp_path / "out.ts", width=320, height=180, fps=30, audio=source.audio_params()
    )
    delayed: deque[tuple[float, Frame]] = deque([(first.t_ingest + PROCESSING_S, first)])

    def write_due(until: float) -> None:
        while delayed and delayed[0][0] <= until:
            sink.write(delayed.popleft()[1])

    for item in items:
        write_due(time.monotonic())
        if isinstance(item, AudioChunk):
            sink.write_audio(item)
        else:
            delayed.append((item.t_ingest + PROCESSING_S, item))
    while delayed:
        time.sleep(max(0.0, delayed[0][0] - time.monotonic()))
        write_due(time.monotonic())
    sink.close()
    out = tmp_path / "out.ts"

    with av.open(str(out)) as c:
        bright = [
            float(f.pts * f.time_base)
            for f in c.decode(video=0)
            if f.to_ndarray(format="gray").mean() > 128
        ]
    with av.open(str(out)) as c:
        loud = []
        for f in c.decode(audio=0):
            samples = f.to_ndarray()[0]
            for k in range(0, len(samples), 64):
                if np.abs(samples[k : k + 64]).max() > 0.2:
                    loud.append(float(f.pts * f.time_base) + k / f.sample_rate)
    flashes, beeps = onsets(bright), onsets(loud)
    assert len(flashes) == 3 and len(beeps) == 3, (flashes, beeps)
    skew = [abs(a - v) for a, v in zip(beeps, flashes, strict=True)]
    print("audio-video skew per event (s):", [round(x, 3) for x in skew])
    assert max(skew) < 0.06, f"audio/video skew {skew}"


# ---------------------------------------------------------------------------- RTP and SRT


def test_rtp_output_with_sdp_is_readable(tmp_path, clip_start, collectors):
    port = free_udp_port()
    sdp = tmp_path / "out.sdp"
    sink = StreamSink(
        f"rtp://127.0.0.1:{port}", width=640, height=360, fps=30, audio=None, sdp_path=sdp
    )
    frames = [i for i in clip_start if isinstance(i, Frame)]
    done = threading.Event()
    feeder = threading.Thread(target=feed, args=(sink, frames * 4, 30, done), daemon=True)
    feeder.start()
    try:
        assert wait_until(lambda: "sprop-parameter-sets" in sdp.read_text(), 3)
        c = Collector(StreamSource(str(sdp), stall_timeout=2, backoff=Backoff(**FAST)))
        collectors.append(c)
        assert wait_until(lambda: len(c.frames) >= 15, 8), "nothing came through RTP"
        assert c.frames[-1][2] == (360, 640, 3)
        c.close()
    finally:
        done.set()
        feeder.join(10)
        sink.close()


@needs_ffmpeg
def test_hls_input(tmp_path, procs, collectors):
    served = tmp_path / "hls"
    served.mkdir()
    handler = functools.partial(QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert FFMPEG is not None
        cmd = [FFMPEG, "-nostdin", "-v", "error", "-re", "-stream_loop", "-1", "-i", str(CLIP)]
        cmd += ["-t", "8", "-c", "copy", "-f", "hls", "-hls_time", "1", "-hls_list_size", "4"]
        cmd += ["-hls_flags", "delete_segments", str(served / "live.m3u8")]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL))
        playlist = served / "live.m3u8"
        assert wait_until(lambda: playlist.exists() and "#EXTINF" in playlist.read_text(), 6)
        url = f"http://127.0.0.1:{server.server_address[1]}/live.m3u8"
        c = Collector(StreamSource(url, stall_timeout=3, backoff=Backoff(**FAST)))
        collectors.append(c)
        assert wait_until(lambda: len(c.frames) >= 30 and len(c.audio) >= 10, 8)
        assert c.source.plan.kind == "hls"
        c.close()
        assert c.error is None
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@needs_srt
def test_srt_input_through_the_bridge(procs, collectors, caplog):
    caplog.set_level(logging.INFO, logger="facecast.media.live_source")
    port = free_udp_port()
    assert FFMPEG is not None
    cmd = [FFMPEG, "-nostdin", "-v", "error", "-re", "-stream_loop", "-1", "-i", str(CLIP)]
    cmd += ["-t", "5", "-c", "copy", "-f", "mpegts", f"srt://127.0.0.1:{port}?mode=listener"]
    procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL))
    time.sleep(0.3)  # the listener is up
    source = StreamSource(
        f"srt://127.0.0.1:{port}", stall_timeout=1, open_timeout=1.5, backoff=Backoff(**FAST)
    )
    c = Collector(source)
    collectors.append(c)
    assert wait_until(lambda: len(c.frames) >= 20 and len(c.audio) >= 10, 8)
    # The bridge dies: the input notices and starts over, with a new bridge (which
    # finds no listener: ffmpeg's SRT listener serves a single caller, then exits).
    pid = source.bridge_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: source.reconnects >= 1, 3), "bridge death not noticed"
    assert any("srt-live-transmit was killed" in r.getMessage() for r in caplog.records)
    c.close()
    assert source.join(source.reader_linger)
    assert bridges_for(port) == [], "an SRT bridge outlived its input"


def bridges_for(port: int) -> list[int]:
    """Live srt-live-transmit processes whose command line names ``port``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            argv
            and argv[0].endswith(b"srt-live-transmit")
            and f":{port}".encode() in b" ".join(argv)
        ):
            found.append(int(entry.name))
    return found


@needs_srt
def test_srt_output_through_the_bridge(tmp_path, procs, clip_start):
    port = free_udp_port()
    received = tmp_path / "srt.ts"
    assert FFMPEG is not None
    cmd = [FFMPEG, "-nostdin", "-v", "error", "-y", "-i", f"srt://127.0.0.1:{port}?mode=listener"]
    cmd += ["-c", "copy", "-f", "mpegts", str(received)]
    receiver = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    procs.append(receiver)
    time.sleep(0.3)
    sink = StreamSink(
        f"srt://127.0.0.1:{port}", width=640, height=360, fps=30, audio=clip_audio_params()
    )
    try:
        feed(sink, clip_start)
    finally:
        sink.close()
    receiver.wait(10)  # it ends when the sender goes away
    info = probe_streams(received)
    assert sorted(s["codec_name"] for s in info["streams"]) == ["aac", "h264"]
