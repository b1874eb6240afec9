"""GStreamer inputs and outputs (``gst:PIPELINE``), with real processes and real media.

gst-launch-1.0 sends RTP/H.264 over loopback UDP (a still made from a real photo, looped by
multifilesrc, or videotestsrc); ``facecast stream`` runs as its own process; a ``GstSource``
in the test receives what facecast sends and the grabbed frames are checked for the swapped
face with the real face models.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from facecast.errors import MediaError
from facecast.faces.embed import face_distance
from facecast.media import gst
from facecast.serve.ingest import free_ports
from tests import live_helpers
from tests.live_helpers import publish, stop_process, wait_until
from tests.media_helpers import (
    _scaled,
    blurred_background,
    head_crop,
    make_moving_face_video,
    paste_soft,
)

from .conftest import REPO, load

live_procs = live_helpers.live_procs

GST_LAUNCH = shutil.which("gst-launch-1.0")


def _gst_missing() -> str | None:
    if GST_LAUNCH is None:
        return "gst-launch-1.0 not found (Debian gstreamer1.0-tools: run scripts/setup)"
    try:
        gst.gst_modules()
    except MediaError as exc:
        return str(exc)
    return None


pytestmark = pytest.mark.skipif(bool(_gst_missing()), reason=_gst_missing() or "")

FACE = REPO / "examples" / "obama.jpg"
RTP_CAPS = "application/x-rtp,media=video,encoding-name=H264,payload=96,clock-rate=90000"
ENCODE = "x264enc tune=zerolatency speed-preset=ultrafast key-int-max=15"


def rtp_in(port: int) -> str:
    return (
        f'gst:udpsrc port={port} caps="{RTP_CAPS}" ! rtpjitterbuffer latency=50 ! '
        "rtph264depay ! avdec_h264"
    )


def rtp_out(port: int) -> str:
    return (
        "gst:videoconvert ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=30 ! "
        f"rtph264pay config-interval=1 pt=96 ! udpsink host=127.0.0.1 port={port}"
    )


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = log_path.open("wb")
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, env=env
    )


def face_still(path: Path, photo: str = "biden.jpg", white_edge: bool = False) -> Path:
    """A 320x240 still: the face of ``photo`` over a blurred real scene. ``white_edge``
    paints the left 24 columns white, a mark that survives the swap and the codec."""
    canvas = blurred_background((320, 240))
    paste_soft(canvas, _scaled(head_crop(photo), 240 * 0.6), 160, 125)
    if white_edge:
        canvas[:, :24] = 255
    cv2.imwrite(str(path), canvas)
    return path


def send_still(png: Path, port: int, log_path: Path, fps: int = 15) -> subprocess.Popen:
    """gst-launch-1.0 sending ``png`` forever as RTP/H.264 to udp 127.0.0.1:``port``."""
    pipeline = (
        f"multifilesrc location={png} loop=true caps=image/png,framerate={fps}/1 ! pngdec ! "
        f"videoconvert ! {ENCODE} ! rtph264pay config-interval=1 pt=96 ! "
        f"udpsink host=127.0.0.1 port={port}"
    )
    return _spawn([GST_LAUNCH, "-q", *pipeline.split()], log_path)  # type: ignore[list-item]


def start_stream(input_url: str, output_url: str, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FACECAST_STATUS_INTERVAL": "2"}
    cmd = [sys.executable, "-m", "facecast.cli", "stream", "--source", str(FACE)]
    cmd += ["--input", input_url, "--output", output_url, "--stall-timeout", "2"]
    return _spawn(cmd, log_path, env)


def terminate(proc: subprocess.Popen, timeout: float = 8.0) -> int | None:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        return None


def receive(
    source: gst.GstSource,
    timeout: float,
    until: Callable[[list[np.ndarray]], bool],
    keep: Callable[[np.ndarray], bool] = lambda image: True,
) -> list[np.ndarray]:
    """Frames from ``source`` that pass ``keep`` until ``until(frames)`` or ``timeout``."""
    stop = threading.Event()
    frames: list[np.ndarray] = []
    deadline = time.monotonic() + timeout
    timer = threading.Timer(timeout, stop.set)  # ends items() even if nothing ever arrives
    timer.start()
    try:
        for frame in source.items(stop):
            if keep(frame.image):
                frames.append(frame.image)
            if until(frames) or time.monotonic() > deadline:
                break
    finally:
        stop.set()
        timer.cancel()
    return frames


def identity(analyser, embedder, image: np.ndarray) -> np.ndarray | None:
    faces = analyser.analyse(image)
    return embedder.embed(image, faces[0]) if faces else None


def assert_swapped(analyser, embedder, frames: list[np.ndarray], original: np.ndarray) -> None:
    """The face in ``frames`` is nearer the source photo than ``original``'s face is."""
    source = load("obama.jpg")
    target = identity(analyser, embedder, source)
    before = identity(analyser, embedder, original)
    assert target is not None and before is not None
    after = [e for e in (identity(analyser, embedder, f) for f in frames[-3:]) if e is not None]
    assert after, "no face in the frames facecast sent"
    distances = sorted(face_distance(e, target) for e in after)
    print(f"distance to the source face: sent {face_distance(before, target):.3f}, "
          f"received {distances[len(distances) // 2]:.3f}")  # fmt: skip
    assert distances[len(distances) // 2] < face_distance(before, target)


def latency_figures(log_text: str) -> list[tuple[float, float]]:
    return [
        (float(a), float(b)) for a, b in re.findall(r"latency p50 (\d+) ms p99 (\d+) ms", log_text)
    ]


# ---------------------------------------------------------------------------- end to end


def test_gst_in_gst_out_swaps_and_survives_the_sender_restarting(
    live_procs, tmp_path, analyser, embedder
):
    port_in, port_out = free_ports(2)
    still = face_still(tmp_path / "face.png")
    sender = live_procs.add(send_still(still, port_in, tmp_path / "sender.log"))
    log_path = tmp_path / "stream.log"
    facecast = live_procs.add(start_stream(rtp_in(port_in), rtp_out(port_out), log_path))
    receiver = gst.GstSource(rtp_in(port_out), stall_timeout=3)

    started = time.monotonic()
    frames = receive(receiver, 40, until=lambda got: len(got) >= 10)
    assert len(frames) >= 10, log_path.read_text()[-3000:]
    print(f"first 10 swapped frames after {time.monotonic() - started:.1f} s")
    assert frames[-1].shape == (240, 320, 3)
    assert_swapped(analyser, embedder, frames, load_still(still))

    # The sender leaves (facecast's input stalls and rebuilds), then a new one comes back
    # with a white left edge: frames carrying it prove the input flows again.
    stop_process(sender)
    # facecast's input notices the stall (and rebuilds) before the new sender comes
    stalled = lambda: "lost (no frame for" in log_path.read_text()  # noqa: E731
    assert wait_until(stalled, 15), log_path.read_text()[-3000:]
    assert facecast.poll() is None, log_path.read_text()[-3000:]
    marked = face_still(tmp_path / "marked.png", white_edge=True)
    live_procs.add(send_still(marked, port_in, tmp_path / "sender2.log"))
    back = time.monotonic()
    frames = receive(
        receiver,
        25,
        until=lambda got: len(got) >= 3,
        keep=lambda image: float(image[:, 2:20].mean()) > 200,
    )
    assert len(frames) >= 3, log_path.read_text()[-3000:]
    print(f"frames from the new sender {time.monotonic() - back:.1f} s after it started")
    assert facecast.poll() is None

    assert terminate(facecast) == 0, log_path.read_text()[-3000:]
    text = log_path.read_text()
    assert "Traceback" not in text
    assert "lost (no frame for" in text, text[-3000:]  # the stall was noticed and rebuilt
    figures = latency_figures(text)
    assert figures, text[-3000:]
    p50, p99 = figures[-1]
    print(f"facecast latency decode -> output: p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    assert p99 < 1000


def load_still(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def test_gst_and_pyav_mix_both_ways(live_procs, tmp_path, analyser, embedder):
    """gst in -> PyAV file out, and PyAV udp:// in -> gst out, side by side."""
    port_gst_in, port_udp_in, port_gst_out = free_ports(3)
    still = face_still(tmp_path / "face.png")
    live_procs.add(send_still(still, port_gst_in, tmp_path / "sender.log"))
    out_file = tmp_path / "out.ts"
    log_a = tmp_path / "a.log"
    a = live_procs.add(start_stream(rtp_in(port_gst_in), str(out_file), log_a))

    clip = make_moving_face_video(
        tmp_path / "clip.mp4", photo="biden.jpg", frames=45, fps=15, audio=False
    )
    udp_in = f"udp://127.0.0.1:{port_udp_in}"
    log_b = tmp_path / "b.log"
    b = live_procs.add(start_stream(udp_in, rtp_out(port_gst_out), log_b))
    live_procs.add(publish(udp_in, clip, loop=True))

    receiver = gst.GstSource(rtp_in(port_gst_out), stall_timeout=3)
    has_face = lambda image: bool(analyser.analyse(image))  # noqa: E731
    frames = receive(receiver, 40, until=lambda got: len(got) >= 5, keep=has_face)
    assert len(frames) >= 5, log_b.read_text()[-3000:]
    original = load_video_frame(clip, 20)
    assert_swapped(analyser, embedder, frames, original)
    assert terminate(b) == 0, log_b.read_text()[-3000:]

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
        not out_file.exists() or out_file.stat().st_size < 50_000
    ):
        time.sleep(0.5)
    assert terminate(a) == 0, log_a.read_text()[-3000:]
    written = read_video(out_file)
    assert len(written) >= 15, log_a.read_text()[-3000:]
    assert_swapped(analyser, embedder, written, load_still(still))


def load_video_frame(path: Path, index: int) -> np.ndarray:
    return read_video(path)[index]


def read_video(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]


# ---------------------------------------------------------------------------- the source


def test_appsink_drops_and_counts_old_frames_under_load(live_procs, tmp_path):
    """A consumer taking 0.25 s a frame from a 30 fps stream: the appsink keeps only the
    newest frame, the drops are counted (pulled + dropped = what the sender sent), and a
    pulled frame is never older than one consumer step."""
    (port,) = free_ports(1)
    pipeline = (
        "videotestsrc is-live=true pattern=ball ! "
        "video/x-raw,width=320,height=240,framerate=30/1 ! "
        f"{ENCODE} ! rtph264pay config-interval=1 pt=96 ! udpsink host=127.0.0.1 port={port}"
    )
    live_procs.add(_spawn([GST_LAUNCH, "-q", *pipeline.split()], tmp_path / "sender.log"))  # type: ignore[list-item]
    source = gst.GstSource(rtp_in(port), stall_timeout=5)
    stop = threading.Event()
    ages: list[float] = []
    pulled = 0
    first_at = last_at = 0.0
    timer = threading.Timer(30, stop.set)
    timer.start()
    try:
        for _frame in source.items(stop):
            pulled += 1
            if pulled == 1:
                first_at, dropped_at_first = time.monotonic(), source.frames_dropped
                continue
            ages.append(source.last_age or 0.0)
            last_at = time.monotonic()
            if pulled == 13:
                break
            time.sleep(0.25)
    finally:
        stop.set()
        timer.cancel()
    assert pulled == 13
    assert source.fps == 30
    dropped = source.frames_dropped - dropped_at_first
    sent = (last_at - first_at) * 30  # frames the sender made meanwhile
    print(f"pulled 12, dropped {dropped}, sent ~{sent:.0f}; age max {max(ages) * 1000:.0f} ms")
    assert dropped > 0
    assert abs((12 + dropped) - sent) <= 0.15 * sent
    # Without dropping, the 12th frame would be ~11 x 0.22 s = 2.4 s old.
    assert max(ages) < 0.25


def test_a_broken_pipeline_is_a_clear_error_not_a_hang(live_procs, tmp_path):
    log_path = tmp_path / "stream.log"
    started = time.monotonic()
    proc = live_procs.add(
        start_stream("gst:nosuchelement ! fakesink", str(tmp_path / "out.ts"), log_path)
    )
    code = proc.wait(20)
    seconds = time.monotonic() - started
    text = log_path.read_text()
    print(f"facecast stream exited {code} after {seconds:.1f} s")
    assert code == 2, text[-2000:]
    assert seconds < 10
    assert 'no element "nosuchelement"' in text and "GStreamer cannot build" in text, text
    assert "Traceback" not in text

    with pytest.raises(MediaError, match="no property"):
        gst.check_output("gst:videoconvert ! fakesink nosuchproperty=1")
    with pytest.raises(MediaError, match="no element"):
        gst.GstSink("gst:nosuchencoder ! fakesink", width=64, height=48, fps=30)
    with pytest.raises(MediaError, match="pipeline description"):
        gst.GstSource("gst:  ")


def test_missing_gstreamer_names_the_fix(monkeypatch):
    monkeypatch.setattr("facecast.media.gst_runtime._gst", None)
    monkeypatch.setitem(sys.modules, "gi", None)  # import gi now raises ImportError
    with pytest.raises(MediaError, match=r"pygobject<3\.51 in the venv: run scripts/setup"):
        gst.GstSource(rtp_in(5000))


def test_sink_rebuilds_after_a_failure_and_closes_with_eos(tmp_path):
    """An output whose pipeline cannot start (filesink into a folder that does not exist
    yet) drops and counts frames, is rebuilt with backoff, writes once the folder exists,
    and close() drains it with EOS (the file decodes to the frames sent)."""
    from facecast.media.backoff import Backoff
    from facecast.media.frame import Frame

    folder = tmp_path / "later"
    target = folder / "frames.h264"
    sink = gst.GstSink(
        f"gst:videoconvert ! {ENCODE} ! h264parse ! "
        f"video/x-h264,stream-format=byte-stream ! filesink location={target}",
        width=161,
        height=121,
        fps=30,
        backoff=Backoff(initial=0.2, maximum=0.2),
    )
    image = np.zeros((121, 161, 3), np.uint8)
    image[:, :80] = (0, 0, 255)
    assert not sink.connected
    sink.write(Frame(image=image))
    assert sink.dropped == 1 and sink.frames == 0
    folder.mkdir()
    deadline = time.monotonic() + 5
    while sink.frames < 15 and time.monotonic() < deadline:
        sink.write(Frame(image=image))
        time.sleep(1 / 30)
    assert sink.connected and sink.frames == 15 and sink.reconnects >= 1
    started = time.monotonic()
    sink.close()
    assert time.monotonic() - started < 3
    decoded = read_video(target)
    assert len(decoded) == 15  # EOS flushed the encoder: every pushed frame is in the file
    assert decoded[-1].shape == (120, 160, 3)  # even size, as the encoder needs
    left, right = decoded[-1][:, :70].mean(axis=(0, 1)), decoded[-1][:, 90:].mean(axis=(0, 1))
    assert left[2] > 200 and right[2] < 50  # BGR order and row padding survived appsrc


def test_source_rebuilds_after_end_of_stream_and_errors(caplog):
    """EOS (a finite source) and ERROR (a file that is not there) both rebuild the pipeline
    with backoff, each with one log line; frames of every run come through."""
    from facecast.media.backoff import Backoff

    finite = gst.GstSource(
        "gst:videotestsrc num-buffers=5 ! video/x-raw,width=64,height=48,framerate=30/1",
        backoff=Backoff(initial=0.05, maximum=0.05),
    )
    frames = receive(finite, 10, until=lambda got: len(got) >= 12)
    assert len(frames) >= 12 and finite.reconnects >= 2
    assert frames[0].shape == (48, 64, 3) and finite.fps == 30
    assert "lost (end of stream)" in caplog.text

    broken = gst.GstSource(
        "gst:filesrc location=/nonexistent/clip.mp4 ! decodebin",
        backoff=Backoff(initial=0.05, maximum=0.05),
    )
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    started = time.monotonic()
    assert list(broken.items(stop)) == []
    assert time.monotonic() - started < 2 and broken.reconnects >= 3
    assert "cannot start" in caplog.text and "/nonexistent/clip.mp4" in caplog.text
