"""``facecast bench capacity``: how many live streams one worker process carries.

(A little over 500 lines on purpose: measuring a run, searching the stream counts and
reporting them share one record format; the rig it runs on is in ``capacity_rig.py``.)

A worker runs several stream pipelines in one process (``StreamManager``, the live pipeline
of ``facecast.live.pipeline``), each reading ``live/KEY`` from the ingest server over RTMP and
publishing ``swapped/KEY`` back. This bench does exactly that, on this machine:

- the project's own ingest server (``IngestServer``: a private nginx-rtmp on free loopback
  ports, with a worker secret as ``facecast serve`` gives it);
- N ffmpeg publishers, each looping the sample clip in real time (``-re -stream_loop -1``)
  into its own ``live/KEY``. The clip is re-encoded once per run at 30 fps with a keyframe
  every 15 frames (0.5 s), at 640x360 and at 1280x720; the publishers only copy it, so
  they cost next to nothing;
- N pipelines in this process, started through ``StreamManager.start`` with the settings a
  ``serve`` stream gets for a default profile (``Service.settings_for``: one face, feather
  blend, label on, the models and encoder defaults), so each decodes RTMP, detects, tracks
  and swaps the face, encodes and publishes RTMP;
- N viewer-side readers (ffmpeg, stream copy, nothing decoded) on ``swapped/KEY``,
  counting the frames that actually come back.

For N = 1, 2, ... each size runs afresh: everything starts, every output must reach its
reader, then a warm-up (3 s) and a measured window (``seconds``). A stream's fps is the
frames its reader received in the window, less the holding frames (repeats of the last
frame while the input was late) its pipeline wrote meanwhile, over the window. The search
for a size stops once the slowest stream is under 15 fps, or at ``max_streams``.

"Holds N streams at >= X fps" means N = 1 up to N all had every stream at >= X fps (the
first failure ends the count; a later lucky run does not raise it). CPU is given as cores:
this process (the worker), the helpers (nginx, publishers, readers) and the whole machine.
The worker's resident memory is read at the end of each window, with what it grew by
during that run (the process keeps what earlier runs left in its heap).

Then the hand-off between workers (facecast/bench/handoff.py): with an ingest, a store and
worker processes, how long a key's output is gone when its worker is killed, and when it
drains on SIGTERM.
"""

from __future__ import annotations

import contextlib
import re
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from facecast.bench.capacity_rig import (
    OutputReader,
    Rig,
    machine_busy_s,
    proc_cpu_s,
    rig,
    rss_mb,
    tail,
)
from facecast.bench.handoff import measure_handoff
from facecast.bench.swap import (
    loopable_args,
    machine,
    make_with_ffmpeg,
    update_docs,
    write_results,
)
from facecast.config import StreamSettings
from facecast.errors import FacecastError, MediaError
from facecast.serve.profiles import Profile, stream_settings
from facecast.serve.streams import StreamHandle, StreamManager, dropped_frames

SIZES = ((640, 360), (1280, 720))
THRESHOLDS = (25.0, 15.0)  # fps each stream must hold; the search stops under the last
INPUT_FPS = 30
GOP = 15  # frames between the publishers' keyframes: a new reader waits at most 0.5 s
WARMUP_S = 3.0
POLL_S = 0.25

Progress = Callable[[str], None]

# ---------------------------------------------------------------------------- input


def prepare_input(clip: Path, width: int, height: int, folder: Path) -> Path:
    """The clip at width x height, 30 fps, a keyframe every GOP frames, video and audio
    starting together (``loopable_args``): what the publishers loop. Made once per run with
    ffmpeg."""
    out = folder / f"{clip.stem}_{width}x{height}_{INPUT_FPS}fps_g{GOP}.mp4"
    cmd = [
        "ffmpeg", "-v", "error", "-y", "-i", str(clip),
        "-vf", f"scale={width}:{height},fps={INPUT_FPS},setpts=PTS-STARTPTS",
        "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p",
        "-g", str(GOP), "-keyint_min", str(GOP), "-sc_threshold", "0",
        *loopable_args(clip), str(out),
    ]  # fmt: skip
    make_with_ffmpeg(cmd, f"the {width}x{height} bench input")
    return out


# ---------------------------------------------------------------------------- processes


def bench_settings(face: Path, bench_rig: Rig, key: str) -> StreamSettings:
    """What a ``serve`` stream gets for a default profile (this face), on ``serve``'s
    default base settings; the status log line only at the end."""
    return stream_settings(
        StreamSettings(status_interval=3600.0),
        Profile(face),
        bench_rig.ingest.worker_url("live", key),
        bench_rig.ingest.worker_url("swapped", key),
    )


@dataclass
class _Snapshot:
    at: float
    worker_cpu: float
    helpers_cpu: float
    machine_busy: float
    streams: list[dict[str, int]]


def _snapshot(
    handles: list[StreamHandle], readers: list[OutputReader], bench_rig: Rig
) -> _Snapshot:
    streams = []
    for handle, reader in zip(handles, readers, strict=True):
        stats = handle.pipeline.stats
        streams.append(
            {
                "delivered": reader.frames(),
                "out": stats.frames_out,
                "held": stats.frames_held,
                "in": stats.frames_in,
                "dropped": dropped_frames(handle.pipeline),
            }
        )
    return _Snapshot(
        at=time.monotonic(),
        worker_cpu=time.process_time(),
        helpers_cpu=sum(proc_cpu_s(pid) for pid in bench_rig.helper_pids()),
        machine_busy=machine_busy_s(),
        streams=streams,
    )


def _wait(seconds: float, readers: list[OutputReader]) -> None:
    """Sleep ``seconds``, keeping the readers up."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(POLL_S, left))
        for reader in readers:
            reader.poll()


def measure(
    bench_rig: Rig,
    clip: Path,
    face: Path,
    streams: int,
    seconds: float,
    warmup: float = WARMUP_S,
    tag: str = "cap",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """``streams`` publishers, pipelines (one StreamManager, this process) and readers on
    ``clip``; after every output has reached its reader and ``warmup`` seconds, measure
    ``seconds``. Everything this run started is stopped before it returns."""
    say = progress or (lambda _line: None)
    keys = [f"{tag}-n{streams}-{i + 1}" for i in range(streams)]
    manager = StreamManager()
    errors: list[str] = []
    rss_before = rss_mb()  # the process carries what earlier runs left in its heap
    try:
        publishers = [bench_rig.publish(key, clip) for key in keys]
        _until(
            lambda: set(keys) <= bench_rig.published("live"),
            15.0,
            lambda: _publisher_trouble(publishers, keys, bench_rig),
        )
        handles = [
            manager.start(key, bench_settings(face, bench_rig, key), source_name=face.name)
            for key in keys
        ]
        readers = [bench_rig.reader(key) for key in keys]
        up_timeout = 20.0 + 5.0 * streams
        say(f"{streams} stream(s) started; waiting for every output (at most {up_timeout:.0f} s)")
        deadline = time.monotonic() + up_timeout
        # (a stream that stopped with an error will not come up: no use waiting for it)
        while time.monotonic() < deadline and not all(
            r.frames() > 0 or not h.running for r, h in zip(readers, handles, strict=True)
        ):
            _wait(POLL_S, readers)
        not_up = [key for key, r in zip(keys, readers, strict=True) if r.frames() == 0]
        if not_up:
            errors.append(f"no frame came back within {up_timeout:.0f} s on {', '.join(not_up)}")
        say(f"{streams} stream(s): warm-up {warmup:g} s, then measuring {seconds:g} s")
        _wait(warmup, readers)
        before = _snapshot(handles, readers, bench_rig)
        _wait(seconds, readers)
        after = _snapshot(handles, readers, bench_rig)
        result = _summary(keys, handles, before, after)
        result["worker_rss_before_mb"] = round(rss_before, 1)
        result["errors"] = errors + [f"{h.key}: {h.error}" for h in handles if h.error]
        return result
    finally:
        manager.stop_all(timeout=15.0)
        bench_rig.stop_processes()


def _until(done: Callable[[], bool], timeout: float, trouble: Callable[[], str | None]) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        problem = trouble()
        if problem:
            raise MediaError(problem)
        if time.monotonic() > deadline:
            raise MediaError(f"the bench's publishers were not up within {timeout:g} s")
        time.sleep(POLL_S)


def _publisher_trouble(
    publishers: list[subprocess.Popen[bytes]], keys: list[str], bench_rig: Rig
) -> str | None:
    for proc, key in zip(publishers, keys, strict=True):
        if proc.poll() is not None:
            log = tail(bench_rig.work / f"publish-{key}.log")
            return f"the bench's ffmpeg publisher for {key} exited ({proc.returncode}): {log}"
    return None


def _summary(
    keys: list[str], handles: list[StreamHandle], before: _Snapshot, after: _Snapshot
) -> dict[str, Any]:
    window = max(after.at - before.at, 1e-6)
    per_stream = []
    latencies: list[float] = []
    for key, handle, a, b in zip(keys, handles, before.streams, after.streams, strict=True):
        delta = {name: b[name] - a[name] for name in a}
        fresh_out = delta["out"] - delta["held"]
        per_stream.append(
            {
                "key": key,
                "fps": max(delta["delivered"] - delta["held"], 0) / window,
                "fps_out": fresh_out / window,
                "fps_in": delta["in"] / window,
                "frames_delivered": delta["delivered"],
                "frames_out": delta["out"],
                "frames_held": delta["held"],
                "frames_dropped": delta["dropped"],
                "frames_swapped_whole_run": handle.pipeline.stats.frames_swapped,
                "rate_level": handle.pipeline.stats.rate_level,
            }
        )
        # latencies appended in the window (each fresh frame written adds one)
        if fresh_out > 0:
            recorded = list(handle.pipeline.stats.latency)
            latencies += recorded[-min(fresh_out, len(recorded)) :]
    fps = [s["fps"] for s in per_stream]
    lat = np.asarray(latencies) * 1000.0
    return {
        "streams": len(keys),
        "window_s": round(window, 2),
        "fps_min": min(fps),
        "fps_median": statistics.median(fps),
        "fps_max": max(fps),
        "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "latency_p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "worker_cores": (after.worker_cpu - before.worker_cpu) / window,
        "helper_cores": (after.helpers_cpu - before.helpers_cpu) / window,
        "machine_cores_busy": (after.machine_busy - before.machine_busy) / window,
        "worker_rss_mb": round(rss_mb(), 1),
        "per_stream": per_stream,
    }


# ---------------------------------------------------------------------------- the search


def max_streams_at(runs: list[dict[str, Any]], fps: float) -> int:
    """How many streams held ``fps`` each: N = 1, 2, ... in order, up to the first run whose
    slowest stream was under it."""
    held = 0
    for run in sorted(runs, key=lambda r: r["streams"]):
        if run["streams"] != held + 1 or run["fps_min"] < fps:
            break
        held = run["streams"]
    return held


def search(
    bench_rig: Rig,
    clip: Path,
    face: Path,
    seconds: float,
    max_streams: int,
    warmup: float = WARMUP_S,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """N = 1, 2, ... up to ``max_streams``, until the slowest stream is under the lowest
    threshold."""
    say = progress or (lambda _line: None)
    runs: list[dict[str, Any]] = []
    size = _size_of(clip)
    for n in range(1, max_streams + 1):
        run = measure(
            bench_rig, clip, face, n, seconds, warmup, tag=f"cap{size.split('x')[1]}",
            progress=lambda line: say(f"{size}, {line}"),
        )  # fmt: skip
        runs.append(run)
        say(
            f"{size}, {n} stream(s): slowest {run['fps_min']:.1f} fps, median "
            f"{run['fps_median']:.1f} fps, worker {run['worker_cores']:.2f} cores, machine "
            f"{run['machine_cores_busy']:.2f} cores busy"
        )
        if run["fps_min"] < min(THRESHOLDS):
            break
    top = runs[-1]["streams"]
    held = {f"{t:g}": max_streams_at(runs, t) for t in THRESHOLDS}
    return {
        "size": size,
        "input": f"{clip.name}, {INPUT_FPS} fps, keyframe every {GOP} frames, looped",
        "runs": runs,
        "max_streams": held,
        # every run passed up to the cap: the machine may hold more than was tried
        "capped": {t: n == top == max_streams for t, n in held.items()},
    }


def _size_of(clip: Path) -> str:
    match = re.search(r"_(\d+x\d+)_", clip.name)
    return match.group(1) if match else clip.stem


# ---------------------------------------------------------------------------- the command


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM unwind the run as Ctrl-C does (KeyboardInterrupt), so nginx (in
    its own session) and the ffmpeg processes are stopped on the way out. Installed
    whatever the inherited disposition: a command started in the background by a script
    inherits SIGINT ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_capacity_bench(
    examples: Path,
    results_dir: Path,
    console: Console,
    seconds: float = 12.0,
    max_streams: int = 8,
    docs: Path | None = None,
    sizes: tuple[tuple[int, int], ...] = SIZES,
) -> dict[str, Any]:
    if seconds <= 0 or max_streams < 1:
        raise MediaError("--seconds must be above 0 and --max-streams at least 1")
    clip, face = examples / "short_hamilton_clip.mp4", examples / "obama.jpg"
    started = time.monotonic()

    def say(line: str) -> None:
        console.print(f"bench capacity [{time.monotonic() - started:4.0f} s]: {line}")

    results: list[dict[str, Any]] = []
    with (
        _signals_as_interrupt(),
        tempfile.TemporaryDirectory(prefix="facecast-bench-capacity-") as tmp,
    ):
        work = Path(tmp)
        inputs = []
        for width, height in sizes:
            say(f"making the {width}x{height} input")
            inputs.append(prepare_input(clip, width, height, work))
        try:
            with rig(work) as bench_rig:
                for path in inputs:
                    results.append(
                        search(bench_rig, path, face, seconds, max_streams, progress=say)
                    )
        except KeyboardInterrupt:
            say("interrupted; nginx and every ffmpeg it started are stopped, nothing written")
            raise
        try:
            handoff: dict[str, Any] | str = measure_handoff(work, inputs[0], face, say)
        except FacecastError as exc:  # no redis-server here: the rest still counts
            handoff = f"not measured: {exc}"
            say(handoff)

    settings = StreamSettings()
    payload: dict[str, Any] = {
        "bench": "capacity",
        "machine": machine(),
        "seconds": seconds,
        "warmup_s": WARMUP_S,
        "max_streams": max_streams,
        "thresholds_fps": list(THRESHOLDS),
        "stream_settings": {
            "faces": Profile(face).faces,
            "blend": Profile(face).blend,
            "label": settings.label,
            "detect_every": settings.detect_every,
            "preset": settings.preset,
            "keyint": settings.keyint,
            "bitrate": settings.bitrate,
            "detector": settings.detector,
            "swapper": settings.swapper,
            "execution_providers": settings.execution_providers,
        },
        "sizes": results,
        "handoff": handoff,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"facecast bench capacity --seconds {seconds:g} --max-streams {max_streams}",
    }
    path = write_results("capacity", payload, results_dir)
    _print(payload)
    for line in summary_lines(payload):
        console.print(line)
    update_docs(
        "capacity",
        capacity_table(payload)
        + "\n\n"
        + "\n".join(f"- {line}" for line in summary_lines(payload))
        + f"\n\nMeasured {payload['when']} on {machine()['cpu_count']} cores with "
        f"`{payload['command']}`; raw numbers: `bench/results/capacity-latest.json`.",
        docs,
    )
    console.print(f"results: {path}")
    return payload


# ---------------------------------------------------------------------------- report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _rss(run: dict[str, Any]) -> str:
    added = run["worker_rss_mb"] - run.get("worker_rss_before_mb", run["worker_rss_mb"])
    return f"{run['worker_rss_mb']:.0f} ({added:+.0f})"


def summary_lines(payload: dict[str, Any]) -> list[str]:
    lines = []
    for size in payload["sizes"]:
        parts = []
        for t in THRESHOLDS:
            n = size["max_streams"][f"{t:g}"]
            more = (
                " (or more: every run passed up to --max-streams)"
                if size["capped"][f"{t:g}"]
                else ""
            )
            parts.append(f"{n} at >= {t:g} fps each{more}")
        lines.append(f"{size['size']}: {'; '.join(parts)}")
    handoff = payload["handoff"]
    if isinstance(handoff, dict):
        lines.append(
            f"hand-off to another worker: {handoff['kill_s']:.1f} s after a SIGKILL, "
            f"{handoff['term_s']:.1f} s after a SIGTERM (drain), output back at the ingest"
        )
    else:
        lines.append(f"hand-off to another worker: {handoff}")
    return lines


def capacity_table(payload: dict[str, Any]) -> str:
    rows = [
        "| size | streams | fps slowest | fps median | latency p50 ms | p99 ms | worker cores "
        "| helper cores | machine cores busy | worker RSS MB (+ these streams) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in payload["sizes"]:
        for run in size["runs"]:
            rows.append(
                f"| {size['size']} | {run['streams']} | {run['fps_min']:.1f} | "
                f"{run['fps_median']:.1f} | {_ms(run['latency_p50_ms'])} | "
                f"{_ms(run['latency_p99_ms'])} | {run['worker_cores']:.2f} | "
                f"{run['helper_cores']:.2f} | {run['machine_cores_busy']:.2f} | "
                f"{_rss(run)} |"
            )
    return "\n".join(rows)


def _print(payload: dict[str, Any]) -> None:
    table = Table(
        "size", "streams", "fps slowest", "fps median", "p50 ms", "p99 ms", "worker cores",
        "helper cores", "machine busy", "RSS MB",
    )  # fmt: skip
    for size in payload["sizes"]:
        for run in size["runs"]:
            table.add_row(
                size["size"],
                str(run["streams"]),
                f"{run['fps_min']:.1f}",
                f"{run['fps_median']:.1f}",
                _ms(run["latency_p50_ms"]),
                _ms(run["latency_p99_ms"]),
                f"{run['worker_cores']:.2f}",
                f"{run['helper_cores']:.2f}",
                f"{run['machine_cores_busy']:.2f}",
                _rss(run),
            )
    Console(width=200).print(table)
