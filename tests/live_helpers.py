"""Helpers for live-stream tests: a real nginx-rtmp ingest server, ffmpeg publishers, readers.

Use
---
Fixtures are defined here, not in conftest, so bring them in where they are needed. In
``tests/conftest.py`` (for every test)::

    from tests.live_helpers import (  # noqa: F401  (pytest finds fixtures by name)
        ingest_factory, ingest_server, ingest_session, live_procs,
    )

or in one test module, bind them by name (importing them there would trip ruff's F811, since
the test functions' parameters reuse the names)::

    from tests import live_helpers
    ingest_server = live_helpers.ingest_server
    live_procs = live_helpers.live_procs

and then::

    def test_round_trip(ingest_server, live_procs):
        live_procs.add(publish(ingest_server.rtmp_url("live", "k"), CLIP, loop=True))
        wait_for_stream(ingest_server.rtmp_url("live", "k"), timeout=10)
        frames = grab_frames(ingest_server.rtmp_url("live", "k"), 5, timeout=10)

Fixtures:

- ``ingest_server``: function scope; an ``IngestServer`` on free loopback ports with its prefix
  in ``tmp_path`` (its logs stay there when a test fails); stopped afterwards.
- ``ingest_session``: the same, one per test session (cheaper; tests must use distinct keys
  and must not restart it).
- ``ingest_factory``: a callable ``make(**IngestServer kwargs) -> started IngestServer`` for
  tests that need several servers or custom settings (``on_publish_url``); all are stopped.
- ``live_procs``: ``live_procs.add(proc)`` registers a subprocess (publisher, bridge) that is
  stopped at teardown even if the test fails.

Functions: ``publish``, ``srt_bridge``, ``wait_for_stream``, ``wait_for_http``, ``probe``,
``codecs``, ``open_stream``, ``grab_frames``, ``stop_process``, ``process_log``, ``in_parallel``.

Every wait takes a timeout and every subprocess call is bounded, so no helper can hang a run.
ffmpeg/ffprobe are Debian's (``deploy/apt-packages.txt``; ``scripts/setup`` installs them);
readers use PyAV with live options (PyAV's FFmpeg opens RTMP in ~10 s unless told not to
probe).

Behaviour of the ingest server worth knowing (measured; see tests/test_ingest.py):

- Reading ``live/KEY`` nobody publishes fails at once (nginx refuses: PyAV ``PermissionError``),
  so retry until the publisher is up: ``wait_for_stream``, or ``grab_frames`` (it retries).
- When the publisher leaves, nginx disconnects its readers at once (``idle_streams off``):
  PyAV raises ``OSError`` (EIO) from ``demux``/``decode`` rather than ending cleanly.
- A reader's first frame comes at the next keyframe (``wait_key on``); the test clip has one
  every 2 s.
- ``restart()`` and ``reload()`` cut every RTMP session; Debian ffmpeg as publisher then exits
  (it does not reconnect), so start a new ``publish``.
- HLS: the playlist appears ~2 s after publishing starts with a 0.5 s GOP; fragments are cut at
  keyframes, so they are ``max(1 s, GOP)`` long.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from facecast.serve.ingest import IngestServer, free_ports

FFMPEG = shutil.which("ffmpeg") or "ffmpeg"
FFPROBE = shutil.which("ffprobe") or "ffprobe"

# Short GOP re-encode for publishers whose output must cut into ~1 s pieces (HLS) or be
# readable soon after joining (a reader waits for a keyframe). 640x360 ultrafast is cheap.
FAST_GOP_ARGS: tuple[str, ...] = (
    "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "15",
    "-c:a", "aac", "-b:a", "96k",
)  # fmt: skip


# ---------------------------------------------------------------------- processes


def _output_args(url: str) -> list[str]:
    """Container and URL options by scheme: FLV for RTMP, MPEG-TS for UDP and SRT."""
    if url.startswith(("rtmp://", "rtmps://")):
        # no_duration_filesize: a live FLV has no end to seek back to and patch.
        return ["-f", "flv", "-flvflags", "no_duration_filesize", url]
    if url.startswith("udp://"):
        # 1316 = 7 TS packets: one UDP datagram below a 1500-byte MTU.
        if "pkt_size=" not in url:
            url += ("&" if "?" in url else "?") + "pkt_size=1316"
        return ["-f", "mpegts", url]
    if url.startswith("srt://"):
        return ["-f", "mpegts", url]
    return [url]


def publish(
    url: str,
    media_path: Path | str,
    *,
    loop: bool = False,
    realtime: bool = True,
    codec_args: Sequence[str] | None = None,
    duration: float | None = None,
    extra_args: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start Debian ffmpeg publishing ``media_path`` to ``url`` (rtmp://, udp://, srt://).

    ``realtime`` paces input at its frame rate (``-re``), as a camera would; ``loop`` repeats
    it forever; ``codec_args`` replaces the default ``-c copy`` (e.g. ``FAST_GOP_ARGS``);
    ``duration`` stops after that many seconds (``-t``). ffmpeg's stderr goes to a temp file
    (see ``process_log``), never a pipe nobody drains. Stop it with ``stop_process``.
    """
    cmd = [FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error"]
    if realtime:
        cmd.append("-re")
    if loop:
        cmd += ["-stream_loop", "-1"]
    cmd += ["-i", str(media_path)]
    cmd += list(codec_args) if codec_args is not None else ["-c", "copy"]
    if duration is not None:
        cmd += ["-t", f"{duration:g}"]
    cmd += [*extra_args, *_output_args(url)]
    return _spawn(cmd)


def srt_bridge(src: str, dst: str) -> subprocess.Popen[bytes]:
    """``srt-live-transmit SRC DST``, e.g. ``srt://:9000?mode=listener`` to
    ``udp://127.0.0.1:9001``: PyAV has no libsrt, so SRT is read as loopback UDP/MPEG-TS."""
    binary = shutil.which("srt-live-transmit")
    if binary is None:
        raise FileNotFoundError("srt-live-transmit not found: install it with scripts/setup")
    return _spawn([binary, "-q", src, dst])


def _spawn(cmd: list[str]) -> subprocess.Popen[bytes]:
    log = tempfile.TemporaryFile()  # noqa: SIM115 (open as long as the process runs)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    proc._facecast_log = log  # type: ignore[attr-defined]
    return proc


def process_log(proc: subprocess.Popen[bytes], limit: int = 4000) -> str:
    """The tail of a ``publish``/``srt_bridge`` process's output (for assertion messages)."""
    log = getattr(proc, "_facecast_log", None)
    if log is None or log.closed:
        return ""
    log.seek(0)
    return log.read().decode(errors="replace")[-limit:]


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int | None:
    """Stop a child: SIGINT (ffmpeg finishes its output cleanly), then SIGTERM, then SIGKILL,
    waiting up to ``timeout`` for each of the first two. Returns its exit code."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    if proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    log = getattr(proc, "_facecast_log", None)
    if log is not None:
        # Keep it readable by process_log(); TemporaryFile is deleted once garbage-collected.
        log.flush()
    return proc.returncode


class LiveProcs:
    """Subprocesses a test started; all are stopped at teardown, failed test or not."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def add(self, proc: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        # Politely in parallel first (each stop_process waits), then one by one.
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            stop_process(proc, timeout=3)
        self.procs.clear()


# ---------------------------------------------------------------------- probing


def _probe_input_args(url: str, timeout: float) -> list[str]:
    # rw_timeout (µs) bounds each network read inside ffprobe; subprocess timeout bounds it all.
    args = ["-rw_timeout", str(int(max(timeout, 0.5) * 1e6))]
    if url.startswith("rtmp"):
        # Without these ffprobe probes a live RTMP stream for ~5-10 s.
        args += ["-rtmp_live", "live", "-analyzeduration", "1000000", "-probesize", "500000"]
    return args


def probe(url: str, timeout: float = 10.0) -> dict[str, Any]:
    """``ffprobe -show_streams -show_format -of json`` on a file or stream URL.

    Raises RuntimeError (ffprobe's message) if it fails, TimeoutError if it takes longer than
    ``timeout`` seconds. See ``codecs()`` for the short form.
    """
    cmd = [FFPROBE, "-v", "error", *_probe_input_args(url, timeout)]
    cmd += ["-show_streams", "-show_format", "-of", "json", url]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise TimeoutError(f"ffprobe {url}: no answer within {timeout:g} s") from exc
    if done.returncode != 0:
        raise RuntimeError(f"ffprobe {url}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return json.loads(done.stdout)


def codecs(info: dict[str, Any]) -> dict[str, str]:
    """``{"video": "h264", "audio": "aac"}`` from a ``probe()`` result (first of each type)."""
    out: dict[str, str] = {}
    for stream in info.get("streams", []):
        out.setdefault(stream.get("codec_type", "?"), stream.get("codec_name", "?"))
    return out


def wait_for_stream(
    url: str, timeout: float = 10.0, *, need: Sequence[str] = ("video",)
) -> dict[str, Any]:
    """Retry ``probe(url)`` until it shows streams of every type in ``need``; returns it.

    Raises TimeoutError, with ffprobe's last complaint, after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last = "never probed"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no stream at {url} within {timeout:g} s: {last}")
        try:
            info = probe(url, timeout=min(left, 5.0))
            found = codecs(info)
            if all(kind in found for kind in need):
                return info
            last = f"only {found}"
        except (RuntimeError, TimeoutError) as exc:
            last = str(exc)
        time.sleep(0.2)


def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    """Poll ``condition`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()  # one last look: the deadline may have passed during a sleep


def in_parallel(*calls: Callable[[], Any]) -> list[Any]:
    """Run ``calls`` (each bounded by its own timeout) on threads at once, so their waits on
    live streams overlap; their results in order. Once all have ended, the first exception
    any of them raised is raised here."""
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
    return [future.result() for future in futures]


def wait_for_http(url: str, timeout: float = 10.0) -> bytes:
    """GET ``url`` until it answers 200 (e.g. an HLS playlist that appears later); the body."""
    deadline = time.monotonic() + timeout
    last = "never fetched"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{url} not available within {timeout:g} s: {last}")
        try:
            with urllib.request.urlopen(url, timeout=min(left, 2.0)) as resp:
                return resp.read()
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.1)


# ---------------------------------------------------------------------- reading frames


def live_options(url: str) -> dict[str, str]:
    """PyAV/FFmpeg input options that open a live URL in about a keyframe interval."""
    opts = {"fflags": "nobuffer", "analyzeduration": "500000", "probesize": "65536"}
    if url.startswith("rtmp"):
        opts["rtmp_live"] = "live"
    elif url.startswith("udp://"):
        # Listen and keep going if the reader falls behind (a live source does not wait).
        opts.update(overrun_nonfatal="1", fifo_size="50000")
        opts["probesize"] = "500000"  # MPEG-TS needs a few PES packets to see every stream
    return opts


@contextlib.contextmanager
def open_stream(url: str, timeout: float = 10.0) -> Iterator[av.container.InputContainer]:
    """``av.open`` a live URL with ``live_options`` and bounded opening and reading.

    A read that waits more than ``min(timeout, 5)`` s raises (PyAV ``ExitError``), so a stream
    that stalls (publisher gone, nginx restarted) cannot hang the test.
    """
    container = av.open(url, options=live_options(url), timeout=(timeout, min(timeout, 5.0)))
    try:
        yield container
    finally:
        container.close()


def grab_frames(
    url: str,
    n: int,
    timeout: float = 10.0,
    keep: Callable[[np.ndarray], bool] | None = None,
) -> list[np.ndarray]:
    """The first ``n`` decoded video frames of a live URL as BGR uint8 arrays.

    With ``keep``, only frames it accepts count (e.g. frames that show a face: the test clip
    has a two-second stretch with nobody in it, so a short grab can land there entirely).
    Opening is retried while nginx refuses the key (publisher not up yet, server restarting).
    Raises TimeoutError if ``n`` frames do not arrive within ``timeout`` seconds in all; a
    read stall fails within 5 s.
    """
    deadline = time.monotonic() + timeout
    frames: list[np.ndarray] = []
    while True:
        try:
            with open_stream(url, max(deadline - time.monotonic(), 0.5)) as container:
                if not container.streams.video:
                    raise RuntimeError(f"{url} has no video stream")
                stream = container.streams.video[0]
                for packet in container.demux(stream):
                    for frame in packet.decode():
                        image = frame.to_ndarray(format="bgr24")
                        if keep is None or keep(image):
                            frames.append(image)
                        if len(frames) >= n:
                            return frames
                    if time.monotonic() > deadline:
                        break
            break
        except (PermissionError, ConnectionRefusedError):
            # nginx refuses to play a key nobody publishes (or the port is not back yet).
            if frames or time.monotonic() + 0.2 > deadline:
                raise
            time.sleep(0.2)
    raise TimeoutError(f"{url}: {len(frames)} of {n} frames within {timeout:g} s")


# ---------------------------------------------------------------------- fixtures


def _with_free_ports(kwargs: dict[str, Any]) -> dict[str, Any]:
    rtmp_port, http_port = free_ports(2)
    return {"rtmp_port": rtmp_port, "http_port": http_port, **kwargs}


def _start_server(prefix: Path, **kwargs: Any) -> IngestServer:
    server = IngestServer(prefix=prefix, **_with_free_ports(kwargs))
    server.start(timeout=10)
    return server


@pytest.fixture
def ingest_server(tmp_path: Path) -> Iterator[IngestServer]:
    """A started IngestServer on free loopback ports, prefix in tmp_path; stopped after."""
    server = _start_server(tmp_path / "ingest")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ingest_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestServer]:
    """One IngestServer for the whole session: use distinct stream keys; do not restart."""
    server = _start_server(tmp_path_factory.mktemp("ingest"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ingest_factory(tmp_path: Path) -> Iterator[Callable[..., IngestServer]]:
    """``make(**IngestServer kwargs)`` starts another server (free ports unless given)."""
    servers: list[IngestServer] = []

    def make(**kwargs: Any) -> IngestServer:
        prefix = kwargs.pop("prefix", None) or tmp_path / f"ingest{len(servers)}"
        server = IngestServer(prefix=prefix, **_with_free_ports(kwargs))
        servers.append(server)  # before start(): a failed start is cleaned up too
        server.start(timeout=10)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def live_procs() -> Iterator[LiveProcs]:
    """Register subprocesses with ``live_procs.add(proc)``; all are stopped at teardown."""
    procs = LiveProcs()
    try:
        yield procs
    finally:
        procs.stop_all()


__all__ = [
    "FAST_GOP_ARGS",
    "LiveProcs",
    "codecs",
    "grab_frames",
    "in_parallel",
    "ingest_factory",
    "ingest_server",
    "ingest_session",
    "live_options",
    "live_procs",
    "open_stream",
    "probe",
    "process_log",
    "publish",
    "srt_bridge",
    "stop_process",
    "wait_for_http",
    "wait_for_stream",
    "wait_until",
]
