"""``facecast bench faces``: what face analysis and the temporal layer cost per 720p frame.

On the sample clip scaled to 1280x720 (talking people, three scene cuts), every frame in
order goes through three runs:

- ``every_1``: ``FaceAnalyser(detect_every=1)``, BlazeFace and the mesh on every frame.
- ``every_3``: ``FaceAnalyser(detect_every=3)`` (the live and the file default), BlazeFace on
  every 3rd frame and meshes followed from the previous frame in between. Detection
  skipped is only worth having if no face is lost. So each run also counts the frames with
  a face and the faces found, and the report compares them frame by frame.
- ``temporal``: the temporal layer as ``SwapEngine.process`` drives it for a file:
  ``TemporalFaces.begin`` (a cut resets the analyser), analysis every 3rd frame, then
  ``TemporalFaces.settle``, with the dlib embedder (counted). Its ms per frame is
  begin + settle: the scene-cut check, the tracker, the smoothing and the embeddings.

The runs take turns on each decoded frame. A busy machine (2 cores, shared) then slows them
alike, and the saving stays a fair ratio. Decoding is not counted. A few frames spread over the
clip go once through every run before the measured pass, to warm up the models and dlib.
"""

from __future__ import annotations

import math
import platform
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from facecast.bench.swap import machine, scaled_copy, update_docs, write_results
from facecast.engine.files import FILE_DETECT_EVERY
from facecast.engine.timing import StageClock
from facecast.faces.analyse import FaceAnalyser
from facecast.faces.embed import FaceEmbedder
from facecast.faces.face import Face
from facecast.faces.temporal import TemporalFaces
from facecast.faces.track import Embed
from facecast.media.source import VideoFileSource

WARMUP_FRAMES = 5
ANALYSIS_STAGES = ("detect", "mesh")


def ms_stats(
    values: Sequence[float], percentiles: Iterable[int] = (50, 95, 99)
) -> dict[str, float]:
    """Mean, the given percentiles and max of per-frame milliseconds."""
    if not values:
        return {"mean": math.nan, **{f"p{p}": math.nan for p in percentiles}, "max": math.nan}
    data = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(data.mean()),
        **{f"p{p}": float(np.percentile(data, p)) for p in percentiles},
        "max": float(data.max()),
    }


class CountingEmbed:
    """``FaceEmbedder.embed`` with its calls and seconds counted: the dlib descriptor
    (~100 ms) is what tracking costs when it costs anything."""

    def __init__(self, embed: Embed) -> None:
        self._embed = embed
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, image: np.ndarray, face: Face) -> np.ndarray:
        start = time.perf_counter()
        try:
            return self._embed(image, face)
        finally:
            self.calls += 1
            self.seconds += time.perf_counter() - start


@dataclass
class AnalysisRun:
    """One analyser over the clip: ms and faces per frame; detect/mesh in its clock."""

    detect_every: int
    clock: StageClock = field(default_factory=StageClock)
    ms: list[float] = field(default_factory=list)
    faces: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.analyser = FaceAnalyser(detect_every=self.detect_every)

    def warm_up(self, images: Sequence[np.ndarray]) -> None:
        for image in images:
            self.analyser.analyse(image)
        self.analyser.reset()  # the measured pass starts from a detection, as a stream does

    def step(self, image: np.ndarray) -> None:
        start = time.perf_counter()
        faces = self.analyser.analyse(image, self.clock)
        self.ms.append(1000.0 * (time.perf_counter() - start))
        self.faces.append(len(faces))

    def summary(self) -> dict[str, Any]:
        frames = len(self.ms)
        detections = self.clock.calls.get("detect", 0)
        return {
            "detect_every": self.detect_every,
            "frames": frames,
            "ms_per_frame": ms_stats(self.ms),
            "stage_ms_per_frame": {s: self.clock.mean_ms(s, per=frames) for s in ANALYSIS_STAGES},
            "stage_ms_per_call": {s: self.clock.mean_ms(s) for s in ANALYSIS_STAGES},
            "calls": {s: self.clock.calls.get(s, 0) for s in ANALYSIS_STAGES},
            "detector_frames_pct": 100.0 * detections / frames if frames else math.nan,
            "frames_with_face": sum(1 for n in self.faces if n),
            "faces_found": sum(self.faces),
        }


class TemporalRun:
    """Cut check, analysis and tracking per frame, in ``SwapEngine.process``'s order."""

    def __init__(self, fps: float, embedder: FaceEmbedder) -> None:
        self.embedder = embedder
        self.analyser = FaceAnalyser(detect_every=FILE_DETECT_EVERY)
        self.embed = CountingEmbed(embedder.embed)
        self.temporal = TemporalFaces(fps, embed=self.embed)
        self.clock = StageClock()
        self.begin_ms: list[float] = []
        self.settle_ms: list[float] = []
        self.analyse_ms: list[float] = []
        self.faces: list[int] = []
        self.cut_frames: list[int] = []
        self.track_ids: set[int] = set()

    def warm_up(self, images: Sequence[np.ndarray]) -> None:
        """Models and dlib warmed outside ``temporal``, whose state must start clean."""
        for image in images:
            faces = self.analyser.analyse(image)
            if faces:
                self.embedder.embed(image, faces[0])
        self.analyser.reset()

    def step(self, image: np.ndarray) -> None:
        t0 = time.perf_counter()
        cut = self.temporal.begin(image)
        t1 = time.perf_counter()
        if cut:
            self.cut_frames.append(len(self.faces))
            self.analyser.reset()  # as the engine does: nothing to follow into a new shot
        faces = self.analyser.analyse(image, self.clock)
        t2 = time.perf_counter()
        faces = self.temporal.settle(image, faces)
        t3 = time.perf_counter()
        self.begin_ms.append(1000.0 * (t1 - t0))
        self.analyse_ms.append(1000.0 * (t2 - t1))
        self.settle_ms.append(1000.0 * (t3 - t2))
        self.faces.append(len(faces))
        self.track_ids.update(f.track_id for f in faces if f.track_id is not None)

    def summary(self) -> dict[str, Any]:
        frames = len(self.faces)
        step_ms = [b + s for b, s in zip(self.begin_ms, self.settle_ms, strict=True)]
        embed_ms = 1000.0 * self.embed.seconds
        return {
            "detect_every": FILE_DETECT_EVERY,
            "frames": frames,
            "temporal_ms_per_frame": ms_stats(step_ms),
            "begin_ms_per_frame": float(np.mean(self.begin_ms)) if frames else math.nan,
            "settle_ms_per_frame": float(np.mean(self.settle_ms)) if frames else math.nan,
            # the tracker and smoothing alone, embeddings taken out
            "settle_ms_per_frame_without_embed": (
                (sum(self.settle_ms) - embed_ms) / frames if frames else math.nan
            ),
            "analysis_ms_per_frame": ms_stats(self.analyse_ms),
            "cuts": self.temporal.cuts,
            "cut_frames": self.cut_frames,
            # ids are handed out from 0 and every new track is given to a face at once
            "tracks_created": max(self.track_ids) + 1 if self.track_ids else 0,
            "track_ids_seen": len(self.track_ids),
            "embeddings": self.embed.calls,
            "embed_ms_per_call": embed_ms / self.embed.calls if self.embed.calls else math.nan,
            "embeddings_per_100_frames": 100.0 * self.embed.calls / frames if frames else math.nan,
            "frames_with_face": sum(1 for n in self.faces if n),
            "faces_tracked": sum(self.faces),
        }


def saving_pct(
    every: Sequence[float], skipping: Sequence[float], keep: Sequence[bool] | None = None
) -> float:
    """How much less time the skipping run took, in %, over the frames in ``keep``."""
    mask = np.ones(len(every), bool) if keep is None else np.asarray(keep, bool)
    if not mask.any():
        return math.nan
    base = float(np.mean(np.asarray(every)[mask]))
    return 100.0 * (1.0 - float(np.mean(np.asarray(skipping)[mask])) / base)


def compare_faces(every_1: Sequence[int], every_3: Sequence[int]) -> dict[str, int]:
    """Frame by frame, what following meshes changed in the faces found."""
    pairs = list(zip(every_1, every_3, strict=True))
    return {
        "frames_fewer_faces": sum(1 for a, b in pairs if b < a),
        "frames_more_faces": sum(1 for a, b in pairs if b > a),
        "frames_face_lost": sum(1 for a, b in pairs if a and not b),
        "faces_fewer": sum(a - b for a, b in pairs if b < a),
    }


def warmup_images(clip: Path, count: int) -> list[np.ndarray]:
    """``count`` frames spread over the clip. Its first frames may show no face (the sample
    clip opens without one), and a frame without a face leaves the mesh model cold."""
    with VideoFileSource(clip) as src:
        total = max(src.frame_count, count)
        picks = {i * total // count for i in range(count)}
        frames = islice(src.frames(), max(picks, default=-1) + 1)
        return [frame.image for frame in frames if frame.index in picks]


def measure_faces(
    clip: Path, max_frames: int | None = None, warmup: int = WARMUP_FRAMES
) -> dict[str, Any]:
    """Every frame of ``clip`` (or the first ``max_frames``) through the three runs."""
    with VideoFileSource(clip) as src:
        fps, size = float(src.fps), f"{src.width}x{src.height}"
    runs = {f"every_{n}": AnalysisRun(n) for n in (1, FILE_DETECT_EVERY)}
    temporal = TemporalRun(fps, FaceEmbedder())
    warm = warmup_images(clip, warmup)
    for run in (*runs.values(), temporal):
        run.warm_up(warm)
    with VideoFileSource(clip) as src:
        for frame in islice(src.frames(), max_frames):
            for run in (*runs.values(), temporal):
                run.step(frame.image)
    every, skipping = runs["every_1"], runs[f"every_{FILE_DETECT_EVERY}"]
    return {
        "clip": clip.name,
        "size": size,
        "fps": fps,
        "frames": len(every.ms),
        "warmup_frames": len(warm),
        "analysis": {name: run.summary() for name, run in runs.items()},
        "saving_pct": saving_pct(every.ms, skipping.ms),
        # without the frames with no face, where both run the detector every time
        "saving_pct_frames_with_face": saving_pct(
            every.ms, skipping.ms, [n > 0 for n in every.faces]
        ),
        "faces_compared": compare_faces(every.faces, skipping.faces),
        "temporal": temporal.summary(),
    }


# ---------------------------------------------------------------------------- report


def _mode_name(detect_every: int) -> str:
    if detect_every == 1:
        return "every frame"
    return f"every {detect_every}{ {2: 'nd', 3: 'rd'}.get(detect_every, 'th') } frame"


def faces_table(result: dict[str, Any]) -> str:
    frames = result["frames"]
    rows = [
        "| detection | ms/frame mean | p50 | p95 | detect ms/frame | mesh ms/frame | "
        "detector runs | frames with a face | faces found |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["analysis"].values():
        ms, stage = run["ms_per_frame"], run["stage_ms_per_frame"]
        rows.append(
            f"| {_mode_name(run['detect_every'])} | {ms['mean']:.1f} | {ms['p50']:.1f} | "
            f"{ms['p95']:.1f} | {stage['detect']:.1f} | {stage['mesh']:.1f} | "
            f"{run['calls']['detect']}/{frames} | {run['frames_with_face']}/{frames} | "
            f"{run['faces_found']} |"
        )
    diff = result["faces_compared"]
    rows += [
        "",
        f"Saving: {result['saving_pct']:.0f} % of the analysis time "
        f"({result['saving_pct_frames_with_face']:.0f} % over the frames with a face). "
        "Frame by frame, detection "
        f"{_mode_name(FILE_DETECT_EVERY)} found fewer faces in {diff['frames_fewer_faces']} frames "
        f"({diff['faces_fewer']} faces; no face at all where detection every frame found one: "
        f"{diff['frames_face_lost']}) and more in {diff['frames_more_faces']}.",
        "",
    ]
    t = result["temporal"]
    step = t["temporal_ms_per_frame"]
    rows += [
        f"| temporal layer (detection {_mode_name(FILE_DETECT_EVERY)}) | ms/frame mean | p99 | "
        "max | without embeddings | cuts | tracks | embeddings | per 100 frames |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| begin + settle | {step['mean']:.2f} | {step['p99']:.1f} | {step['max']:.1f} | "
        f"{t['begin_ms_per_frame'] + t['settle_ms_per_frame_without_embed']:.2f} | "
        f"{t['cuts']} | {t['tracks_created']} | {t['embeddings']} "
        f"({t['embed_ms_per_call']:.0f} ms each) | {t['embeddings_per_100_frames']:.1f} |",
    ]
    return "\n".join(rows)


def _print(result: dict[str, Any], console: Console) -> None:
    frames = result["frames"]
    table = Table(
        "detection", "ms mean", "p50", "p95", "detect ms", "mesh ms", "detector runs",
        "frames with face", "faces",
        title=f"face analysis, {result['size']}, {frames} frames",
    )  # fmt: skip
    for run in result["analysis"].values():
        ms, stage = run["ms_per_frame"], run["stage_ms_per_frame"]
        table.add_row(
            _mode_name(run["detect_every"]),
            f"{ms['mean']:.1f}",
            f"{ms['p50']:.1f}",
            f"{ms['p95']:.1f}",
            f"{stage['detect']:.1f}",
            f"{stage['mesh']:.1f}",
            f"{run['calls']['detect']}/{frames}",
            f"{run['frames_with_face']}/{frames}",
            str(run["faces_found"]),
        )
    t = result["temporal"]
    step = t["temporal_ms_per_frame"]
    temporal = Table(
        "ms mean", "p99", "max", "cut check ms", "settle ms (no embed)", "cuts", "tracks",
        "embeddings", "per 100 frames", "ms each",
        title="temporal layer: begin + settle per frame",
    )  # fmt: skip
    temporal.add_row(
        f"{step['mean']:.2f}",
        f"{step['p99']:.1f}",
        f"{step['max']:.1f}",
        f"{t['begin_ms_per_frame']:.2f}",
        f"{t['settle_ms_per_frame_without_embed']:.2f}",
        str(t["cuts"]),
        str(t["tracks_created"]),
        str(t["embeddings"]),
        f"{t['embeddings_per_100_frames']:.1f}",
        f"{t['embed_ms_per_call']:.0f}",
    )
    wide = Console(width=200)
    wide.print(table)
    diff = result["faces_compared"]
    console.print(
        f"saving: {result['saving_pct']:.1f} % "
        f"({result['saving_pct_frames_with_face']:.1f} % on frames with a face); "
        f"{_mode_name(FILE_DETECT_EVERY)} vs every frame: "
        f"fewer faces in {diff['frames_fewer_faces']} frames, "
        f"no face in {diff['frames_face_lost']}, more in {diff['frames_more_faces']}"
    )
    wide.print(temporal)


def run_faces_bench(
    examples: Path, results_dir: Path, console: Console, docs: Path | None = None
) -> dict[str, Any]:
    clip = examples / "short_hamilton_clip.mp4"
    with tempfile.TemporaryDirectory(prefix="facecast-bench-faces-") as tmp:
        clip720 = scaled_copy(clip, 1280, 720, Path(tmp))
        console.print(f"bench faces: {clip720.name}")
        result = measure_faces(clip720)
    payload: dict[str, Any] = {
        "bench": "faces",
        "machine": {**machine(), "platform": platform.platform()},
        **result,
        "clip": f"{clip.name} scaled to 1280x720",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "facecast bench faces",
    }
    path = write_results("faces", payload, results_dir)
    _print(payload, console)
    update_docs(
        "faces",
        faces_table(payload) + f"\n\nMeasured {payload['when']} on {machine()['cpu_count']}"
        " cores with `facecast bench faces`; raw numbers: `bench/results/faces-latest.json`.",
        docs,
    )
    console.print(f"results: {path}")
    return payload
