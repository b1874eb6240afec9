"""``facecast bench quality``: how good the swap is, measured honestly on people it never saw.

The other-photo protocol. Person A's photo 1 is swapped onto person B's photo 1, and the
output is judged against A's photo 2 and B's photo 2, photos the swap never saw: copying
pixels from the source photo cannot pass for carrying A's identity, and keeping B's pixels
shows as nearness to B. Per pair and as means: d(out, A2), d(out, B2) and the margin
d(out, B2) - d(out, A2) (positive: the output is nearer the source person).

- Two judges that are not related (``quality.judges``): dlib's ResNet and a recogniser from
  another family. A change that helps one and hurts the other is not an improvement.
- The textbook Delaunay swap (``quality.textbook``) runs on the same pairs as a reference row.
- Expression and pose fidelity (``quality.expression``): the output's mesh against the
  target's, in % of the inter-ocular distance (degrees for pose).
- Held out: pairs whose *target* person is in ``HELD_OUT_TARGETS`` are reported apart, so a
  change tuned on the other half can be checked on people it was not tuned on.
- Contact sheets (target | facecast | textbook | source) are written beside the JSON.
- Video: frame-to-frame flicker inside the face on the sample clip, swapped vs original.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rich.console import Console

from facecast.bench.quality.flicker import mean_or_none, video_flicker
from facecast.bench.swap import machine, update_docs, write_results
from facecast.engine.pipeline import EngineOptions, SwapEngine
from facecast.errors import FacecastError
from facecast.faces.analyse import FaceAnalyser
from facecast.faces.face import Face
from facecast.faces.select import Selection
from facecast.media.image_io import read_image

PEOPLE = ("aniston", "damon", "dorsey", "jolie", "musk", "pichai", "zuckerberg")
# Tuning looks at pairs onto the first four people; these three are the held-out targets.
HELD_OUT_TARGETS = frozenset({"musk", "pichai", "zuckerberg"})
# The pairs the project judged on before (one photo per target person): obama.jpg onto each,
# judged against obama-720p.jpg and, for want of a second photo, the target photo itself.
CLASSIC_TARGETS = ("biden.jpg", "alex-lacamoire.png", "lin-manuel-miranda.png")
# Expression and pose errors shown in the table (all are in the JSON): % of the inter-ocular
# distance, degrees for the pose.
EXPRESSION_COLUMNS = ("mouth_open", "eye_open", "gaze", "yaw", "pitch", "roll")
SHEET_ROWS = 7  # pairs per contact sheet
TILE = 256  # pixels per contact-sheet tile

Swap = Callable[[np.ndarray, np.ndarray], "np.ndarray | None"]


@dataclass(frozen=True)
class Pair:
    """Swap ``source_photo``'s face onto ``target_photo``; judge against the other photos."""

    name: str
    source_photo: Path
    source_other: Path
    target_photo: Path
    target_other: Path
    held_out: bool = False
    group: str = "people"  # people | classic


def people_pairs(media: Path) -> list[Pair]:
    """Every ordered pair of different people: A's photo 1 onto B's photo 1."""
    folder = media / "people"
    pairs = []
    for a in PEOPLE:
        for b in PEOPLE:
            if a != b:
                pairs.append(
                    Pair(
                        name=f"{a}->{b}",
                        source_photo=folder / f"{a}1.jpg",
                        source_other=folder / f"{a}2.jpg",
                        target_photo=folder / f"{b}1.jpg",
                        target_other=folder / f"{b}2.jpg",
                        held_out=b in HELD_OUT_TARGETS,
                    )
                )
    return pairs


def classic_pairs(media: Path) -> list[Pair]:
    return [
        Pair(
            name=f"obama->{Path(target).stem}",
            source_photo=media / "obama.jpg",
            source_other=media / "obama-720p.jpg",
            target_photo=media / target,
            target_other=media / target,
            group="classic",
        )
        for target in CLASSIC_TARGETS
    ]


# ---------------------------------------------------------------------------- the swappers


class FacecastSwap:
    """The default engine as ``facecast swap`` runs it on a photo: tiled detection, the
    largest face, no visible label (it would sit on the judged image)."""

    name = "facecast"

    def __init__(self, options: EngineOptions | None = None) -> None:
        base = options or EngineOptions()
        self.engine = SwapEngine(
            EngineOptions(
                selection=Selection("largest"),
                swap=base.swap,
                label=False,
                tiles=True,
                models=base.models,
            )
        )
        self._loaded: Path | None = None

    def __call__(self, source: np.ndarray, target: np.ndarray, source_path: Path) -> np.ndarray:
        if self._loaded != source_path:  # sources repeat across pairs: prepare each once
            self.engine.load_source(source, name=str(source_path))
            self._loaded = source_path
        out = target.copy()
        self.engine.process(out)
        return out


class TextbookSwap:
    name = "textbook"

    def __init__(self) -> None:
        from facecast.bench.quality.textbook import TextbookSwapper

        self.swapper = TextbookSwapper()

    def __call__(self, source: np.ndarray, target: np.ndarray, source_path: Path) -> np.ndarray:
        out = self.swapper.swap(source, target)
        return target.copy() if out is None else out


# ---------------------------------------------------------------------------- one pair


@dataclass
class MethodResult:
    """One swapper on one pair: per judge d(out, A2), d(out, B2), the margin; expression."""

    distances: dict[str, dict[str, float | None]] = field(default_factory=dict)
    expression: dict[str, float] = field(default_factory=dict)
    ms: float = 0.0


def largest_face(analyser: FaceAnalyser, image: np.ndarray) -> Face | None:
    faces = [f for f in analyser.analyse(image) if f.mesh is not None]
    return max(faces, key=lambda f: f.area) if faces else None


def judge_output(
    judges: Sequence[Any], out: np.ndarray, refs: dict[str, tuple[Any, Any]]
) -> dict[str, dict[str, float | None]]:
    """Per judge: distances of ``out`` to A's and B's other photos (None: no face found)."""
    result: dict[str, dict[str, float | None]] = {}
    for judge in judges:
        embedding = judge.embed(out)
        a2, b2 = refs[judge.name]
        if embedding is None or a2 is None or b2 is None:
            result[judge.name] = {"d_source": None, "d_target": None, "margin": None}
            continue
        d_a, d_b = judge.distance(embedding, a2), judge.distance(embedding, b2)
        result[judge.name] = {"d_source": d_a, "d_target": d_b, "margin": d_b - d_a}
    return result


def face_crop(image: np.ndarray, face: Face | None, size: int = TILE) -> np.ndarray:
    """A square crop around the face (1.8x its box), or the whole image, as a tile."""
    if face is None:
        return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    cx, cy = face.center
    half = 0.9 * max(face.width, face.height)
    scale = size / (2 * half)
    # one affine map crops, pads (black) past the image's edge and scales
    matrix = np.array([[scale, 0, scale * (half - cx)], [0, scale, scale * (half - cy)]])
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR)


def caption(tile: np.ndarray, lines: Iterable[str]) -> np.ndarray:
    out = tile.copy()
    for i, text in enumerate(lines):
        y = 16 + 16 * i
        cv2.putText(out, text, (5, y), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(
            out, text, (5, y), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1, cv2.LINE_AA
        )
    return out


def margin_text(result: MethodResult) -> list[str]:
    return [
        f"{judge}: {values['margin']:+.2f}" if values["margin"] is not None else f"{judge}: -"
        for judge, values in result.distances.items()
    ]


# ---------------------------------------------------------------------------- the run


def run_pairs(
    pairs: Sequence[Pair],
    swappers: Sequence[Any],
    judges: Sequence[Any],
    analyser: FaceAnalyser,
    expression: Callable[[Face, Face, np.ndarray, np.ndarray], dict[str, float]] | None,
    on_pair: Callable[[int, Pair], None] | None = None,
) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Every pair through every swapper; per pair a JSON-ready row and a contact-sheet row
    (target | each swapper | source)."""
    photos: dict[Path, np.ndarray] = {}
    embeddings: dict[tuple[str, Path], Any] = {}

    def photo(path: Path) -> np.ndarray:
        if path not in photos:
            photos[path] = read_image(path)
        return photos[path]

    def embedding(judge: Any, path: Path) -> Any:
        key = (judge.name, path)
        if key not in embeddings:
            embeddings[key] = judge.embed(photo(path))
        return embeddings[key]

    rows, sheet_rows = [], []
    for i, pair in enumerate(pairs):
        if on_pair is not None:
            on_pair(i, pair)
        source, target = photo(pair.source_photo), photo(pair.target_photo)
        refs = {
            j.name: (embedding(j, pair.source_other), embedding(j, pair.target_other))
            for j in judges
        }
        target_face = largest_face(analyser, target)
        results: dict[str, MethodResult] = {}
        tiles = [caption(face_crop(target, target_face), [pair.name, "target"])]
        for swapper in swappers:
            started = time.perf_counter()
            out = swapper(source, target, pair.source_photo)
            result = MethodResult(ms=1000 * (time.perf_counter() - started))
            result.distances = judge_output(judges, out, refs)
            out_face = largest_face(analyser, out)
            if expression is not None and target_face is not None and out_face is not None:
                result.expression = expression(target_face, out_face, target, out)
            results[swapper.name] = result
            tiles.append(caption(face_crop(out, target_face), [swapper.name, *margin_text(result)]))
        tiles.append(caption(face_crop(source, largest_face(analyser, source)), ["source"]))
        sheet_rows.append(np.hstack(tiles))
        rows.append(
            {
                "pair": pair.name,
                "group": pair.group,
                "held_out": pair.held_out,
                "source": pair.source_photo.name,
                "target": pair.target_photo.name,
                "judged_against": [pair.source_other.name, pair.target_other.name],
                "methods": {
                    name: {
                        "distances": r.distances,
                        "expression": r.expression,
                        "ms": round(r.ms, 1),
                    }
                    for name, r in results.items()
                },
            }
        )
    return rows, sheet_rows


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means per method and judge, over the tuning half, the held-out half and both; the
    pairs where the output is nearer the source person; mean expression errors."""
    halves = {
        "tune": [r for r in rows if r["group"] == "people" and not r["held_out"]],
        "held_out": [r for r in rows if r["group"] == "people" and r["held_out"]],
        "people": [r for r in rows if r["group"] == "people"],
        "classic": [r for r in rows if r["group"] == "classic"],
    }
    methods = list(rows[0]["methods"]) if rows else []
    out: dict[str, Any] = {}
    for half, members in halves.items():
        if not members:
            continue
        out[half] = {}
        for method in methods:
            per_judge: dict[str, Any] = {}
            judges = members[0]["methods"][method]["distances"]
            for judge in judges:
                values = [r["methods"][method]["distances"][judge] for r in members]
                scored = [v for v in values if v["margin"] is not None]
                per_judge[judge] = {
                    "d_source": mean_or_none(v["d_source"] for v in scored),
                    "d_target": mean_or_none(v["d_target"] for v in scored),
                    "margin": mean_or_none(v["margin"] for v in scored),
                    "nearer_source": sum(1 for v in scored if v["margin"] > 0),
                    "pairs": len(values),
                    "no_face": len(values) - len(scored),
                }
            expressions = [r["methods"][method]["expression"] for r in members]
            keys = sorted({k for e in expressions for k in e})
            out[half][method] = {
                "judges": per_judge,
                "expression": {k: mean_or_none(e[k] for e in expressions if k in e) for k in keys},
                "ms": mean_or_none(r["methods"][method]["ms"] for r in members),
            }
    return out


def write_sheets(sheet_rows: Sequence[np.ndarray], folder: Path) -> list[Path]:
    """Contact sheets of ``SHEET_ROWS`` pairs each; the previous run's are replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("sheet-*.png"):
        old.unlink()
    paths = []
    for n, start in enumerate(range(0, len(sheet_rows), SHEET_ROWS), 1):
        path = folder / f"sheet-{n}.png"
        cv2.imwrite(
            str(path),
            np.vstack(sheet_rows[start : start + SHEET_ROWS]),
            [cv2.IMWRITE_PNG_COMPRESSION, 6],
        )
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------- video flicker


def quality_table(summary: dict[str, Any]) -> str:
    """Markdown: one row per half, method and judge."""
    head = "| pairs | method | judge | d(out, A2) | d(out, B2) | margin | nearer A |"
    rule = "|---|---|---|---|---|---|---|"
    lines = [head, rule]
    for half, methods in summary.items():
        for method, values in methods.items():
            for judge, v in values["judges"].items():
                lines.append(
                    f"| {half} | {method} | {judge} | {_fmt(v['d_source'])} | "
                    f"{_fmt(v['d_target'])} | {_fmt(v['margin'], '+.3f')} | "
                    f"{v['nearer_source']}/{v['pairs']} |"
                )
    people = summary.get("people", {})
    seen = {k for m in people.values() for k in m["expression"]}
    exp_keys = [k for k in EXPRESSION_COLUMNS if k in seen]
    if exp_keys:
        lines += ["", "| method | " + " | ".join(exp_keys) + " |", "|---|" + "---|" * len(exp_keys)]
        for method, values in people.items():
            cells = " | ".join(_fmt(values["expression"].get(k), ".1f") for k in exp_keys)
            lines.append(f"| {method} | {cells} |")
    return "\n".join(lines)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def run_quality_bench(
    media: Path,
    examples: Path,
    results_dir: Path,
    console: Console,
    docs: Path | None = None,
    video: bool = True,
    pairs: str = "all",
) -> dict[str, Any]:
    from facecast.bench.quality.expression import expression_errors
    from facecast.bench.quality.judges import available_judges

    chosen = people_pairs(media) + classic_pairs(media)
    if pairs == "tune":
        chosen = [p for p in chosen if p.group == "people" and not p.held_out]
    elif pairs == "held-out":
        chosen = [p for p in chosen if p.held_out]
    elif pairs != "all":
        raise FacecastError(f"--pairs {pairs!r}: use all, tune or held-out")
    missing = sorted(
        {
            str(p)
            for pair in chosen
            for p in (pair.source_photo, pair.target_photo)
            if not p.is_file()
        }
    )
    if missing:
        raise FacecastError(f"quality bench media not found: {', '.join(missing)}")
    judges = available_judges()
    try:
        swappers = [FacecastSwap(), TextbookSwap()]
        analyser = FaceAnalyser(tiles=True)
        rows, sheet_rows = run_pairs(
            chosen,
            swappers,
            judges,
            analyser,
            expression_errors,
            on_pair=lambda i, p: console.print(f"bench quality: {i + 1}/{len(chosen)} {p.name}"),
        )
    finally:
        for judge in judges:
            judge.close()
    summary = summarise(rows)
    payload: dict[str, Any] = {
        "bench": "quality",
        "machine": machine(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "facecast bench quality",
        "judges": [j.name for j in judges],
        "held_out_targets": sorted(HELD_OUT_TARGETS),
        "summary": summary,
        "pairs": rows,
    }
    if video:
        console.print("bench quality: flicker on the sample clip")
        with tempfile.TemporaryDirectory(prefix="facecast-quality-") as tmp:
            payload["video"] = video_flicker(
                examples / "short_hamilton_clip.mp4", examples / "obama.jpg", Path(tmp)
            )
    path = write_results("quality", payload, results_dir)
    sheets = write_sheets(sheet_rows, results_dir / "quality-sheets")
    table = quality_table(summary)
    console.print(table, highlight=False)
    if "video" in payload:
        for name, v in payload["video"].items():
            if isinstance(v, dict):
                console.print(
                    f"flicker in the face ({name}), mean |Δluma| per frame: original "
                    f"{v['original']}, swapped {v['swapped']} (x{v['ratio']})",
                    highlight=False,
                )
    update_docs(
        "quality",
        table + f"\n\nMeasured {payload['when']} with `facecast bench quality`; per pair: "
        "`bench/results/quality-latest.json`, contact sheets: `bench/results/quality-sheets/`.",
        docs,
    )
    console.print(f"results: {path}; contact sheets: {', '.join(str(s) for s in sheets)}")
    return payload
