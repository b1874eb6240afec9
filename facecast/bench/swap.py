"""Benchmarks. Results are JSON files in a results folder (``--results``); with
``--update-docs``, also a table in the clone's docs/benchmarks.md.

Timings are measurements to report, never asserted by tests: they depend on the machine.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import av
from rich.console import Console
from rich.table import Table

from facecast import __version__
from facecast.engine.files import swap_video_file
from facecast.engine.pipeline import EngineOptions
from facecast.errors import MediaError
from facecast.media.sink import transcode
from facecast.media.source import VideoFileSource

SWAP_STAGES = ("decode", "detect", "mesh", "swap", "blend", "label", "encode")


def make_with_ffmpeg(cmd: list[str], what: str) -> None:
    """Run one ffmpeg command that writes a bench input; MediaError naming ``what`` if it
    cannot."""
    try:
        subprocess.run(cmd, check=True, timeout=300, capture_output=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise MediaError(f"cannot make {what} with ffmpeg: {exc}") from exc


def video_start(clip: Path) -> float:
    """Seconds from the file's start to its first video frame (the sample clip's video
    starts 0.85 s after its audio)."""
    with av.open(str(clip)) as container:
        video = container.streams.video[0]
        if video.start_time is None or video.time_base is None:
            return 0.0
        return max(0.0, float(video.start_time * video.time_base))


def loopable_args(clip: Path) -> list[str]:
    """ffmpeg output options that start video and audio together at 0: the audio before
    the first video frame is cut (re-encoded to AAC). A clip looped as a live input must
    not have a stretch of sound without pictures: the sample clip's 0.85 s gave every
    10 s loop a 0.84 s hole, which the live benchmarks read as frames the swap lost."""
    start = video_start(clip)
    return [
        "-af", f"atrim=start={start:.6f},asetpts=PTS-STARTPTS", "-c:a", "aac", "-b:a", "128k",
    ]  # fmt: skip


def scaled_copy(clip: Path, width: int, height: int, folder: Path, loopable: bool = False) -> Path:
    """The clip re-encoded at width x height, made once per run with ffmpeg; audio copied,
    or with ``loopable`` cut to start with the video (see ``loopable_args``)."""
    out = folder / f"{clip.stem}_{width}x{height}{'_loop' if loopable else ''}.mp4"
    scale = f"scale={width}:{height}" + (",setpts=PTS-STARTPTS" if loopable else "")
    audio = loopable_args(clip) if loopable else ["-c:a", "copy"]
    cmd = [
        "ffmpeg", "-v", "error", "-y", "-i", str(clip), "-vf", scale,
        # keep the clip's frames as they are: by default ffmpeg pads a video that starts
        # after its audio with copies of the first frame (25 more on the sample clip)
        "-fps_mode", "passthrough",
        "-c:v", "libx264", "-preset", "veryfast", "-crf", "18",
        *audio, str(out),
    ]  # fmt: skip
    make_with_ffmpeg(cmd, f"the {width}x{height} bench clip")
    return out


def bench_one(clip: Path, face: Path, work: Path) -> dict:
    with VideoFileSource(clip) as src:
        size = f"{src.width}x{src.height}"
        total = src.frame_count

    plain = transcode(clip, work / f"plain_{size}.mp4", lambda frame: None)
    plain_fps = plain.frames / plain.wall_s

    started = time.perf_counter()
    stats = swap_video_file(face, clip, work / f"swap_{size}.mp4", EngineOptions())
    wall = time.perf_counter() - started
    clock = stats.clock
    result = {
        "clip": clip.name,
        "size": size,
        "frames": stats.frames,
        "frames_in_file": total,
        "faces_swapped": stats.faces_swapped,
        "frames_without_face": stats.frames_without_face,
        "swap_fps": stats.frames / wall,
        "plain_transcode_fps": plain_fps,
        "ratio_to_plain": (stats.frames / wall) / plain_fps,
        "ms_per_frame": {s: clock.mean_ms(s, per=stats.frames) for s in SWAP_STAGES},
        "ms_per_call": {s: clock.mean_ms(s) for s in SWAP_STAGES},
        "calls": {s: clock.calls.get(s, 0) for s in SWAP_STAGES},
    }
    return result


def write_results(kind: str, payload: dict, results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = results_dir / f"{kind}-{stamp}.json"
    text = json.dumps(payload, indent=2)
    path.write_text(text)
    (results_dir / f"{kind}-latest.json").write_text(text)
    return path


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "facecast": __version__,
    }


def swap_table(runs: list[dict]) -> str:
    head = (
        "| clip | fps (swap) | fps (plain transcode) | ratio | "
        + " | ".join(f"{s} ms" for s in SWAP_STAGES)
        + " |"
    )
    rule = "|" + "---|" * (4 + len(SWAP_STAGES))
    rows = [
        f"| {r['size']} ({r['frames']} frames) | {r['swap_fps']:.1f} | "
        f"{r['plain_transcode_fps']:.1f} | {r['ratio_to_plain']:.2f} | "
        + " | ".join(f"{r['ms_per_call'][s]:.1f}" for s in SWAP_STAGES)
        + " |"
        for r in runs
    ]
    return "\n".join([head, rule, *rows])


def update_docs(section: str, body: str, docs: Path | None) -> None:
    """Replace (or add) the section between its markers in ``docs`` (the benchmarks page);
    None: the user did not ask for it, leave every page alone."""
    if docs is None:
        return
    start, end = f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text)


def run_swap_bench(
    examples: Path, results_dir: Path, console: Console, docs: Path | None = None
) -> dict:
    clip, face = examples / "short_hamilton_clip.mp4", examples / "obama.jpg"
    runs = []
    with tempfile.TemporaryDirectory(prefix="facecast-bench-") as tmp:
        work = Path(tmp)
        for candidate in (clip, scaled_copy(clip, 1280, 720, work)):
            console.print(f"bench swap: {candidate.name}")
            runs.append(bench_one(candidate, face, work))
    payload = {
        "bench": "swap",
        "machine": machine(),
        "runs": runs,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "facecast bench swap",
    }
    path = write_results("swap", payload, results_dir)
    table = Table("clip", "fps swap", "fps plain", "ratio", *(f"{s} ms" for s in SWAP_STAGES))
    for r in runs:
        table.add_row(
            f"{r['size']}",
            f"{r['swap_fps']:.1f}",
            f"{r['plain_transcode_fps']:.1f}",
            f"{r['ratio_to_plain']:.2f}",
            *(f"{r['ms_per_call'][s]:.1f}" for s in SWAP_STAGES),
        )
    Console(width=200).print(table)
    update_docs(
        "swap",
        swap_table(runs) + f"\n\nMeasured {payload['when']} on {machine()['cpu_count']}"
        " cores with `facecast bench swap`; raw numbers: `bench/results/swap-latest.json`.",
        docs,
    )
    console.print(f"results: {path}")
    return payload
