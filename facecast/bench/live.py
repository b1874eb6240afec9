"""``facecast bench live``: the live pipeline's latency and throughput on 720p30.

Every run reads the sample clip scaled to 1280x720 through the real ``StreamSource`` (paced
at its frame rate, looping) and writes through the real ``StreamSink`` to a loopback UDP
MPEG-TS output, with the embedded models on this machine's cores. Runs:

- ``pipeline`` / ``serial`` at the input's own rate: processing latency (decoded → encoded
  and handed to the link) p50/p99. ``serial`` is capture → swap → write on one thread,
  the way webcam tools do it.
- the same two as fast as they can go (the input not paced): sustainable fps.
- ``pipeline`` with the input paced at twice the pipeline's sustainable fps: its p99 and
  the drops it counted.
- glass-to-glass over loopback UDP: ``facecast stream`` as its own process with
  ``facecast probe``'s publisher and reader, beside a plain ffmpeg relay (no decode, no
  swap, no encode) to show what the probe and the link alone cost; and over WebRTC:
  ``facecast serve`` with the probe published over WHIP and watched over WHEP
  (facecast/bench/webrtc.py; 640x360, as the aiortc peers run in the bench's own process).

The first seconds of each run (encoder and model warm-up, the first keyframe) are left out.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from facecast.bench.handoff import stop_process
from facecast.bench.swap import (
    machine,
    make_with_ffmpeg,
    scaled_copy,
    update_docs,
    write_results,
)
from facecast.bench.webrtc import whip_to_whep
from facecast.config import StreamSettings
from facecast.engine.pipeline import SwapEngine
from facecast.engine.timing import StageClock
from facecast.errors import MediaError
from facecast.live.cpu import cores_used, cpu_by_role
from facecast.live.pipeline import LivePipeline, SinkFactory, engine_options
from facecast.live.probe import LatencyProbe
from facecast.media.frame import AudioChunk, Frame
from facecast.media.image_io import read_image
from facecast.media.live_sink import StreamSink
from facecast.media.live_source import StreamSource
from facecast.media.planes import ColourTags
from facecast.serve.ingest import IngestServer, free_port, free_ports

log = logging.getLogger(__name__)

WARMUP_S = 3.0
RTMP_START_S = 8.0  # a longer run over RTMP (see glass_to_glass)
GOALS = {"p50_ms": 35.0, "p99_ms": 70.0, "glass_p50_ms": 120.0, "speedup": 1.5}


@dataclass
class Window:
    """Counts and latencies of one run, from the end of its warm-up to its end."""

    latencies: list[float] = field(default_factory=list)
    frames_out: int = 0
    started: float = 0.0
    ended: float = 0.0

    def summary(self) -> dict[str, float | int]:
        lat = np.asarray(self.latencies) * 1000.0
        seconds = max(self.ended - self.started, 1e-6)
        pick = (lambda p: float(np.percentile(lat, p))) if lat.size else (lambda p: math.nan)
        return {
            "seconds": round(seconds, 2),
            "frames_out": self.frames_out,
            "fps_out": self.frames_out / seconds,
            "p50_ms": pick(50),
            "p95_ms": pick(95),
            "p99_ms": pick(99),
            "max_ms": float(lat.max()) if lat.size else math.nan,
        }


def _engine(face: Path) -> SwapEngine:
    """Configured as `facecast stream` configures it by default."""
    engine = SwapEngine(engine_options(StreamSettings()))
    engine.load_source(read_image(face), name=face.name)
    return engine


def _udp_sink(port: int) -> SinkFactory:
    def open_sink(
        width: int, height: int, fps: float, audio: Any, colours: ColourTags
    ) -> StreamSink:
        return StreamSink(
            f"udp://127.0.0.1:{port}",
            width=width,
            height=height,
            fps=fps,
            audio=audio,
            colours=colours,
        )

    return open_sink


@contextmanager
def _timed_stop(seconds: float) -> Iterator[threading.Event]:
    stop = threading.Event()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    try:
        yield stop
    finally:
        timer.cancel()
        stop.set()


def run_pipeline(clip: Path, face: Path, seconds: float, paced: bool) -> dict[str, Any]:
    """The live pipeline (three threads, latest-value slots) for ``seconds``; unpaced, its
    stages wait for each other (lossless) as they do for a file input."""
    source = StreamSource(str(clip), realtime=paced, loop_file=True)
    pipeline = LivePipeline(
        _engine(face),
        source,
        _udp_sink(free_port()),
        status_interval=3600,
        name="bench",
        lossless=not paced,
    )
    stats = pipeline.stats
    window = Window()
    marks: dict[str, int] = {}

    cpu: dict[str, dict[str, float]] = {}

    def end_warmup() -> None:
        cpu["start"] = cpu_by_role()
        stats.latency.clear()
        marks.update(
            out=stats.frames_out,
            dropped=pipeline.decoded.dropped + pipeline.processed.dropped + source.dropped,
            frames_in=stats.frames_in,
        )
        window.started = time.monotonic()

    stop = threading.Event()

    def end_window() -> None:
        # read while the pipeline's threads still run: an ended thread's time is not listed
        cpu["end"] = cpu_by_role()
        cpu["seconds"] = {"window": time.monotonic() - window.started}
        stop.set()

    warmup = threading.Timer(WARMUP_S, end_warmup)
    ending = threading.Timer(WARMUP_S + seconds, end_window)
    warmup.start()
    ending.start()
    try:
        pipeline.run(stop)
    finally:
        warmup.cancel()
        ending.cancel()
        stop.set()
    window.ended = time.monotonic()
    window.latencies = list(stats.latency)
    window.frames_out = stats.frames_out - marks.get("out", 0)
    dropped = pipeline.decoded.dropped + pipeline.processed.dropped + source.dropped
    return {
        **window.summary(),
        "frames_in": stats.frames_in - marks.get("frames_in", 0),
        "dropped": dropped - marks.get("dropped", 0),
        "faces_swapped_whole_run": stats.faces_swapped,
        "process_ms": stats.clock.mean_ms("process"),
        "output_ms": stats.clock.mean_ms("output"),
        "cores": (
            cores_used(cpu["start"], cpu["end"], cpu["seconds"]["window"])
            if "end" in cpu and "start" in cpu
            else {}
        ),
    }


def run_serial(clip: Path, face: Path, seconds: float, paced: bool) -> dict[str, Any]:
    """Capture → swap → write on one thread, same source, engine and sink."""
    engine = _engine(face)
    source = StreamSource(str(clip), realtime=paced, loop_file=True)
    clock = StageClock()
    sink: StreamSink | None = None
    window = Window()
    pending_audio: list[AudioChunk] = []
    frames = 0
    faces = 0
    start = time.monotonic()
    with _timed_stop(WARMUP_S + seconds) as stop:
        for item in source.items(stop):
            if isinstance(item, AudioChunk):
                pending_audio.append(item)
                continue
            if not isinstance(item, Frame):
                continue
            faces += engine.process_frame(item, clock).swapped
            if sink is None:
                fps = float(source.fps or 30)
                sink = _udp_sink(free_port())(
                    item.width, item.height, fps, source.audio_params(), item.colours
                )
            for chunk in pending_audio:
                sink.write_audio(chunk)
            pending_audio.clear()
            sink.write(item)
            frames += 1
            now = time.monotonic()
            if now - start >= WARMUP_S:
                if not window.started:
                    window.started = now
                window.latencies.append(now - item.t_ingest)
                window.frames_out += 1
    window.ended = time.monotonic()
    if sink is not None:
        sink.close()
    source.close()
    return {
        **window.summary(),
        "frames_in": source.frames,
        "dropped": source.dropped,
        "faces_swapped_whole_run": faces,
    }


def retimed_copy(clip: Path, speed: float, folder: Path) -> Path:
    """The clip played ``speed`` times faster with every frame kept (a faster input)."""
    out = folder / f"{clip.stem}_x{speed:.2f}.mp4"
    rate = 30000 / 1001 * speed
    cmd = [
        "ffmpeg", "-v", "error", "-y", "-i", str(clip), "-an",
        "-vf", f"setpts=PTS/{speed:.4f}", "-r", f"{rate:.3f}",
        "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", str(out),
    ]  # fmt: skip
    make_with_ffmpeg(cmd, f"the x{speed:.2f} bench clip")
    return out


# ---------------------------------------------------------------------------- glass to glass


def _spawn(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as sink:
        return subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)


def glass_to_glass(
    face: Path,
    seconds: float,
    work: Path,
    relay: str,
    size: tuple[int, int] = (1280, 720),
    transport: str = "udp",
) -> dict[str, Any]:
    """``facecast probe`` through ``relay`` (``facecast`` or ``ffmpeg``) over loopback:
    ``transport`` ``udp`` (MPEG-TS both ways) or ``rtmp`` (through the project's own nginx
    ingest, live/bench in and swapped/bench out, as OBS and a player would use it; facecast
    only: an ffmpeg relay cannot wait for the probe's publish to start)."""
    with contextlib.ExitStack() as stack:
        if transport == "rtmp":
            rtmp_port, http_port = free_ports(2)
            ingest = IngestServer(rtmp_port, http_port, prefix=work / f"ingest-{relay}")
            ingest.start(timeout=10)
            stack.callback(ingest.stop)
            url_in, url_out = ingest.rtmp_url("live", "bench"), ingest.rtmp_url("swapped", "bench")
        else:
            url_in, url_out = f"udp://127.0.0.1:{free_port()}", f"udp://127.0.0.1:{free_port()}"
        # over RTMP the relay first waits for the probe's publish (it retries every second)
        # and the probe's player for the relay's: the run is longer by that start-up (the
        # warm-up counts from the first frame back)
        lead = RTMP_START_S if transport == "rtmp" else 0.0
        result = _probe_through(face, seconds, work, relay, size, url_in, url_out, lead)
    return {"relay": relay, "transport": transport, **result}


def _probe_through(
    face: Path,
    seconds: float,
    work: Path,
    relay: str,
    size: tuple[int, int],
    url_in: str,
    url_out: str,
    lead: float,
) -> dict[str, Any]:
    if relay == "facecast":
        cmd = [
            sys.executable, "-m", "facecast.cli", "stream", "--source", str(face),
            "--input", url_in, "--output", url_out,
        ]  # fmt: skip
    else:
        # A copy relay: demux and remux only; the floor the probe and the link set.
        # Same low-delay MPEG-TS framing as facecast's outputs (see media/output_plan._TS).
        listen = f"{url_in}?overrun_nonfatal=1&fifo_size=50000&buffer_size=4194304"
        cmd = [
            "ffmpeg", "-v", "error", "-fflags", "nobuffer", "-i", listen, "-c", "copy",
            "-flush_packets", "1", "-omit_video_pes_length", "0", "-f", "mpegts",
            f"{url_out}?pkt_size=1316",
        ]  # fmt: skip
    proc = _spawn(cmd, work / f"relay-{relay}.log")
    try:
        time.sleep(3.0 if relay == "facecast" else 0.5)  # models load / socket binds
        if proc.poll() is not None:
            text = (work / f"relay-{relay}.log").read_text(errors="replace")[-2000:]
            raise MediaError(f"the {relay} relay exited at start:\n{text}")
        probe = LatencyProbe(url_in, url_out, read_image(face), size, 30.0, warmup=WARMUP_S)
        result = probe.run(lead + WARMUP_S + seconds)
    finally:
        stop_process(proc, (signal.SIGTERM, signal.SIGKILL), timeout=10.0)
    return result.summary()


# ---------------------------------------------------------------------------- report


def live_table(result: dict[str, Any]) -> str:
    rows = [
        "| run | fps out | latency p50 ms | p99 ms | max ms | dropped | cores |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in result["runs"].items():
        cores = run.get("cores", {}).get("total")
        rows.append(
            f"| {name} | {run['fps_out']:.1f} | {run['p50_ms']:.0f} | {run['p99_ms']:.0f} | "
            f"{run['max_ms']:.0f} | {run['dropped']} | {'-' if cores is None else cores} |"
        )
    paced = next(iter(result["runs"].values()), {}).get("cores", {})
    if paced:
        rows += ["", "| where the cores go (first run: one 720p30 stream, paced) | cores |"]
        rows.append("|---|---|")
        rows += [f"| {role} | {value} |" for role, value in paced.items()]
    rows += ["", "| glass to glass (probe, loopback) | p50 ms | p95 ms | p99 ms | frames |"]
    rows.append("|---|---|---|---|---|")
    for name, run in result["glass"].items():
        rows.append(
            f"| {name} | {run['p50_ms']:.0f} | {run['p95_ms']:.0f} | {run['p99_ms']:.0f} | "
            f"{run['stamped']}/{run['sent']} |"
        )
    return "\n".join(rows)


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    runs, glass = result["runs"], result["glass"]
    normal, overload = runs["pipeline (input 29.97 fps)"], runs["pipeline (input 2x sustainable)"]
    fast, serial_fast = runs["pipeline (as fast as it can)"], runs["serial (as fast as it can)"]
    serial = runs["serial (input 29.97 fps)"]
    return {
        "p50_ms": {"got": normal["p50_ms"], "goal": GOALS["p50_ms"]},
        "p99_ms": {"got": normal["p99_ms"], "goal": GOALS["p99_ms"]},
        "glass_p50_ms": {"got": glass["facecast"]["p50_ms"], "goal": GOALS["glass_p50_ms"]},
        "overload_p99_over_normal": {
            "got": overload["p99_ms"] / normal["p99_ms"],
            "goal": 2.0,
            "drops_counted": overload["dropped"],
        },
        "pipeline_over_serial_fps": {
            "got": fast["fps_out"] / serial_fast["fps_out"],
            "goal": GOALS["speedup"],
        },
        "pipeline_p99_below_serial": normal["p99_ms"] < serial["p99_ms"],
    }


def run_live_bench(
    examples: Path,
    results_dir: Path,
    console: Console,
    seconds: float = 15.0,
    docs: Path | None = None,
) -> dict[str, Any]:
    clip, face = examples / "short_hamilton_clip.mp4", examples / "obama.jpg"
    runs: dict[str, dict[str, Any]] = {}
    glass: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="facecast-bench-live-") as tmp:
        work = Path(tmp)
        clip720 = scaled_copy(clip, 1280, 720, work, loopable=True)

        def measure(name: str, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
            console.print(f"bench live: {name} ({WARMUP_S + seconds:.0f} s)")
            runs[name] = fn(*args)
            return runs[name]

        measure("pipeline (input 29.97 fps)", run_pipeline, clip720, face, seconds, True)
        measure("serial (input 29.97 fps)", run_serial, clip720, face, seconds, True)
        fast = measure("pipeline (as fast as it can)", run_pipeline, clip720, face, seconds, False)
        measure("serial (as fast as it can)", run_serial, clip720, face, seconds, False)
        speed = 2 * fast["fps_out"] / (30000 / 1001)
        overload_clip = retimed_copy(clip720, speed, work)
        over = measure("pipeline (input 2x sustainable)", run_pipeline, overload_clip, face,
                       seconds, True)  # fmt: skip
        over["input_fps"] = 2 * fast["fps_out"]
        for relay in ("ffmpeg", "facecast"):
            console.print(f"bench live: glass to glass through {relay}")
            glass[relay] = glass_to_glass(face, seconds, work, relay)
        console.print("bench live: glass to glass through facecast, RTMP in and out")
        glass["facecast, RTMP via nginx"] = glass_to_glass(
            face, seconds, work, "facecast", transport="rtmp"
        )
        console.print("bench live: glass to glass through facecast serve, WHIP in, WHEP out")
        glass["serve, WHIP in, WHEP out (640x360)"] = whip_to_whep(face, seconds, WARMUP_S)

    payload: dict[str, Any] = {
        "bench": "live",
        "machine": machine(),
        "clip": f"{clip.name} scaled to 1280x720, 29.97 fps, looped",
        "warmup_s": WARMUP_S,
        "seconds": seconds,
        "runs": runs,
        "glass": glass,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "facecast bench live",
    }
    payload["verdict"] = verdict(payload)
    path = write_results("live", payload, results_dir)
    _print(payload, console)
    update_docs(
        "live",
        live_table(payload) + f"\n\nMeasured {payload['when']} on {machine()['cpu_count']}"
        " cores with `facecast bench live`; raw numbers and the goal check: "
        "`bench/results/live-latest.json`.",
        docs,
    )
    console.print(f"results: {path}")
    return payload


def _print(payload: dict[str, Any], console: Console) -> None:
    table = Table("run", "fps out", "p50 ms", "p99 ms", "max ms", "dropped")
    for name, run in payload["runs"].items():
        table.add_row(
            name,
            f"{run['fps_out']:.1f}",
            f"{run['p50_ms']:.0f}",
            f"{run['p99_ms']:.0f}",
            f"{run['max_ms']:.0f}",
            str(run["dropped"]),
        )
    for name, run in payload["glass"].items():
        table.add_row(
            f"glass to glass via {name}", "", f"{run['p50_ms']:.0f}", f"{run['p99_ms']:.0f}", "", ""
        )
    Console(width=160).print(table)
    for key, value in payload["verdict"].items():
        console.print(f"{key}: {value}")
