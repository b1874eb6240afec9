"""SRT listeners (issue 17, point 3): facecast waits for callers instead of calling out.

What a new user does: ``facecast stream --input "srt://HOST:PORT?mode=listener"`` and then
pushes to it as OBS does (an SRT caller; here Debian's ffmpeg, built with libsrt), stops,
and pushes again later. facecast runs as its own process, as a user runs it. The output side
is the same turned around: ``--output "srt://HOST:PORT?mode=listener"`` that players call
(here ffmpeg as the SRT caller, counting the frames it decodes), one after another.

Every wait polls with a bound; nothing asserts a speed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from facecast.errors import MediaError
from facecast.media.backoff import Backoff
from facecast.media.frame import Frame
from facecast.media.live_sink import StreamSink
from facecast.media.live_source import StreamSource, free_udp_port
from tests import live_helpers
from tests.conftest import MEDIA, REPO
from tests.live_helpers import FFMPEG, grab_frames, process_log, publish, stop_process, wait_until

CLIP = MEDIA / "short_hamilton_clip.mp4"
FACE = MEDIA / "obama.jpg"
# Both ends must agree on it (SRT encrypts with it); 10 to 79 characters.
PASSPHRASE = "facecast-listener-42"

needs_srt = pytest.mark.skipif(
    shutil.which("ffmpeg") is None or shutil.which("srt-live-transmit") is None,
    reason="needs Debian ffmpeg (with libsrt) and srt-live-transmit (srt-tools)",
)

live_procs = live_helpers.live_procs


# ---------------------------------------------------------------------------- helpers


def port_bound(port: int) -> bool:
    """Whether some process has UDP ``port`` (SRT runs on UDP): a bind to it fails."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def start_stream(input_url: str, output_url: str, log_path: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "facecast.cli", "stream", "--source", str(FACE)]
    cmd += ["--input", input_url, "--output", output_url, "--stall-timeout", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
        )


def caller_url(port: int, **extra: str) -> str:
    """The URL an SRT caller (ffmpeg, OBS) uses; FFmpeg counts ``latency`` in µs."""
    query = "&".join(f"{k}={v}" for k, v in {"mode": "caller", **extra}.items())
    return f"srt://127.0.0.1:{port}?{query}"


def play(url: str, frames: int, timeout: float = 20.0) -> tuple[int, str]:
    """An SRT player: Debian ffmpeg calls ``url`` and decodes ``frames`` video frames, then
    leaves (cleanly: SRT tells the listener). Returns how many it decoded and its errors."""
    assert FFMPEG is not None
    # a short probe, as a live player would: FFmpeg's default reads 5 s of MPEG-TS first
    cmd = [FFMPEG, "-hide_banner", "-nostdin", "-v", "error", "-analyzeduration", "500000"]
    cmd += ["-i", url]
    cmd += ["-map", "0:v:0", "-frames:v", str(frames), "-f", "framecrc", "-"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        return 0, f"no {frames} frames within {timeout:g} s ({exc.stderr!r})"
    decoded = sum(1 for line in done.stdout.splitlines() if line and not line.startswith("#"))
    return decoded, done.stderr.strip()


def text_of(path: Path) -> str:
    return path.read_text(errors="replace")


class Feeder:
    """Writes a moving test picture into a sink at 30 fps on a thread, as the pipeline would."""

    def __init__(self, sink: StreamSink):
        self.sink = sink
        self.stop = threading.Event()
        self.written = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        image = np.zeros((180, 320, 3), np.uint8)
        image[:, :, 1] = np.linspace(0, 255, 320, dtype=np.uint8)
        try:
            while not self.stop.is_set():
                moved = np.roll(image, self.written * 4, axis=1)
                self.sink.write(Frame(image=moved, index=self.written))
                self.written += 1
                self.stop.wait(1 / 30)
        except BaseException as exc:  # the test reports it
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.fixture
def feeders() -> Iterator[list[Feeder]]:
    made: list[Feeder] = []
    yield made
    for feeder in made:
        feeder.close()
        feeder.sink.close()


class Frames:
    """``source.items()`` on a thread, counting its frames."""

    def __init__(self, source: StreamSource):
        self.source = source
        self.stop = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for item in self.source.items(self.stop):
            if isinstance(item, Frame):
                self.count += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.source.close(5)


# ---------------------------------------------------------------------------- input


@needs_srt
def test_listener_input_takes_a_caller_that_leaves_and_comes_back(live_procs, tmp_path):
    """The user's report, as they ran it: a listener input, an OBS-style caller pushing
    MPEG-TS, the caller leaving and calling again. The output carries frames both times,
    neither caller is cut off, and facecast never exits."""
    in_port, out_port = free_udp_port(), free_udp_port()
    listen = f"srt://127.0.0.1:{in_port}?mode=listener&latency=120&passphrase={PASSPHRASE}"
    out = f"udp://127.0.0.1:{out_port}"
    log_path = tmp_path / "stream.log"
    facecast = live_procs.add(start_stream(listen, out, log_path))
    # The caller can only call once facecast listens (ffmpeg gives up after 3 s).
    assert wait_until(lambda: port_bound(in_port) or facecast.poll() is not None, 60)
    assert facecast.poll() is None, text_of(log_path)[-3000:]
    push = caller_url(in_port, passphrase=PASSPHRASE, latency="120000")

    for round_ in (1, 2):
        caller = live_procs.add(publish(push, CLIP, loop=True))
        try:
            frames = grab_frames(out, 5, timeout=30)
        except (TimeoutError, av.FFmpegError, OSError) as exc:
            said = f"facecast: {text_of(log_path)[-3000:]}\ncaller: {process_log(caller)}"
            pytest.fail(f"round {round_}: no frames out ({exc})\n{said}")
        assert len(frames) == 5 and frames[0].shape[2] == 3
        # the caller was never cut off (the report: "the publisher gets I/O errors")
        assert caller.poll() is None, f"round {round_}: {process_log(caller)}"
        assert facecast.poll() is None, text_of(log_path)[-3000:]
        stop_process(caller)
        # facecast sees the caller leave, and waits for the next one
        left = functools.partial(lambda n: text_of(log_path).count("lost (") >= n, round_)
        assert wait_until(left, 15), text_of(log_path)[-3000:]

    facecast.send_signal(signal.SIGTERM)
    assert facecast.wait(15) == 0, text_of(log_path)[-3000:]
    text = text_of(log_path)
    assert "Traceback" not in text
    assert "SRT connect timed out" not in text, text[-3000:]


@needs_srt
def test_a_listener_port_taken_while_live_is_retried_and_logged(live_procs, caplog):
    """Live mode: the port is free when the input is made but taken when it starts
    listening. Each attempt fails, is counted and said in words; once the port is free
    again a caller gets through."""
    caplog.set_level(logging.DEBUG, logger="facecast.media.live_source")
    port = free_udp_port()
    source = StreamSource(
        f"srt://127.0.0.1:{port}?mode=listener",
        stall_timeout=2,
        open_timeout=2,
        backoff=Backoff(initial=0.1, maximum=0.3),
    )
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    squatter.bind(("127.0.0.1", port))
    reader = Frames(source)
    try:
        assert wait_until(lambda: source.reconnects >= 2, 10), source.reconnects
        said = " ".join(r.getMessage() for r in caplog.records)
        assert f"cannot listen on 127.0.0.1:{port}" in said, said[-2000:]
        assert "Traceback" not in caplog.text
        squatter.close()
        assert wait_until(lambda: port_bound(port), 5), "the listener never came back"
        caller = live_procs.add(publish(caller_url(port), CLIP, loop=True))
        assert wait_until(lambda: reader.count >= 10, 15), process_log(caller)
    finally:
        squatter.close()
        reader.close()


# ---------------------------------------------------------------------------- output


@needs_srt
def test_listener_output_serves_players_one_after_another(feeders):
    """An output nobody has called takes every frame without blocking and drops what it
    cannot send; a player who calls gets frames, leaves, and the next player gets frames
    too, with no frame lost to a reconnect."""
    port = free_udp_port()
    sink = StreamSink(
        f"srt://127.0.0.1:{port}?mode=listener&latency=80&passphrase={PASSPHRASE}",
        width=320,
        height=180,
        fps=30,
        audio=None,
    )
    feeder = Feeder(sink)
    feeders.append(feeder)
    # nobody has called: every frame is taken at once (UDP to the bridge) and none dropped
    assert wait_until(lambda: sink.frames >= 30 or feeder.error is not None, 15)
    assert feeder.error is None and sink.dropped == 0

    player = caller_url(port, passphrase=PASSPHRASE, latency="80000")
    for round_ in (1, 2):
        decoded, errors = play(player, 15)
        assert decoded == 15, f"player {round_}: {decoded} frames; {errors}"
    assert feeder.error is None
    assert sink.dropped == 0 and sink.reconnects == 0, (sink.dropped, sink.reconnects)
    # a player with the wrong passphrase is turned away; the output goes on
    decoded, _ = play(caller_url(port, passphrase="not-the-passphrase"), 1, timeout=8)
    assert decoded == 0
    decoded, errors = play(player, 5)
    assert decoded == 5, errors
    assert sink.dropped == 0 and feeder.error is None


@needs_srt
def test_a_listener_output_whose_port_is_taken_while_live_retries(feeders, caplog):
    """Live mode, output side: the bridge dies and another program takes the port before
    the output reopens. Each attempt fails in words and is counted, frames are dropped (not
    queued) meanwhile, and once the port is free again a player gets frames."""
    caplog.set_level(logging.INFO, logger="facecast.media.live_sink")
    port = free_udp_port()
    sink = StreamSink(
        f"srt://127.0.0.1:{port}?mode=listener",
        width=320,
        height=180,
        fps=30,
        audio=None,
        backoff=Backoff(initial=0.2, maximum=0.4),
    )
    feeder = Feeder(sink)
    feeders.append(feeder)
    assert wait_until(lambda: sink.frames >= 10, 10)
    (bridge,) = bridges_on(port)
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        os.kill(bridge, signal.SIGKILL)
        assert take_port(squatter, port), "the squatter never got the port"
        assert wait_until(lambda: sink.reconnects >= 3, 10), sink.reconnects
        said = " ".join(r.getMessage() for r in caplog.records)
        assert f"cannot listen on 127.0.0.1:{port} (in use" in said, said[-2000:]
        assert sink.dropped > 0 and feeder.error is None
    finally:
        squatter.close()
    assert wait_until(lambda: bool(bridges_on(port)), 10), "the output never listened again"
    decoded, errors = play(caller_url(port), 5)
    assert decoded == 5, errors
    assert feeder.error is None and "Traceback" not in caplog.text


def take_port(squatter: socket.socket, port: int, timeout: float = 5) -> bool:
    """Bind ``squatter`` to ``port`` although the sink reopens its output within 0.2 s:
    whichever bridge won the port since is killed too, until the squatter wins the race."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in bridges_on(port):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            squatter.bind(("127.0.0.1", port))
        except OSError:
            time.sleep(0.01)  # the killed bridge's socket is not closed yet
        else:
            return True
    return False


def bridges_on(port: int) -> list[int]:
    """Running srt-live-transmit processes whose command line names ``port``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        ours = argv[0].endswith(b"srt-live-transmit") and f":{port}?".encode() in b" ".join(argv)
        if ours and state != "Z":  # a zombie (killed, not yet reaped) holds no port
            found.append(int(entry.name))
    return found


# ---------------------------------------------------------------------------- bad input


@needs_srt
@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("mode=listener&passphrase=short", "passphrase"),
        (f"mode=listener&passphrase={PASSPHRASE}&pbkeylen=20", "pbkeylen"),
        ("mode=speaker", "mode"),
    ],
)
def test_bad_srt_options_are_one_clear_error(query, said):
    port = free_udp_port()
    with pytest.raises(MediaError, match=said):
        StreamSource(f"srt://127.0.0.1:{port}?{query}")
    with pytest.raises(MediaError, match=said):
        StreamSink(f"srt://127.0.0.1:{port}?{query}", width=64, height=64, fps=30, audio=None)


@needs_srt
def test_a_listener_port_in_use_is_one_clear_error(tmp_path):
    """The CLI: one line naming the port, exit code 2, no traceback. And the output side,
    which the pipeline opens at the first frame, says the same."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        port = squatter.getsockname()[1]
        listen = f"srt://127.0.0.1:{port}?mode=listener"
        with pytest.raises(MediaError, match=f"cannot listen on 127.0.0.1:{port}"):
            StreamSink(listen, width=64, height=64, fps=30, audio=None)
        cmd = [sys.executable, "-m", "facecast.cli", "stream", "--source", str(FACE)]
        cmd += ["--input", listen, "--output", f"udp://127.0.0.1:{free_udp_port()}"]
        env = {**os.environ, "COLUMNS": "200"}
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=60, cwd=REPO, env=env, check=False
        )
    said = done.stdout + done.stderr
    assert done.returncode == 2, said[-3000:]
    assert "Traceback" not in said
    errors = [line for line in said.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0], said[-3000:]
