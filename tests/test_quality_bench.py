"""The quality bench on a fast subset of its pairs: the swap must carry the source person's
identity by both judges (against photos the swap never saw) and keep an open mouth open.

The full run is ``facecast bench quality``; these four pairs cover both halves (two onto the
tuning people, two onto held-out ones) and two open-mouthed targets (jolie1, pichai1).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest

from facecast.bench.quality.bench import (
    FacecastSwap,
    TextbookSwap,
    people_pairs,
    quality_table,
    run_pairs,
    summarise,
    write_sheets,
)
from facecast.bench.quality.expression import expression_errors
from facecast.bench.quality.flicker import video_flicker
from facecast.bench.quality.judges import available_judges
from facecast.faces.analyse import FaceAnalyser

from .media_helpers import make_moving_face_video
from .test_cli import facecast

SUBSET = ("musk->jolie", "musk->damon", "zuckerberg->pichai", "dorsey->pichai")


@pytest.fixture(scope="module")
def subset_run(media):
    pairs = [p for p in people_pairs(media) if p.name in SUBSET]
    assert len(pairs) == len(SUBSET)
    judges = available_judges()
    try:
        rows, sheet_rows = run_pairs(
            pairs,
            [FacecastSwap(), TextbookSwap()],
            judges,
            FaceAnalyser(tiles=True),
            expression_errors,
        )
    finally:
        for judge in judges:
            judge.close()
    return rows, sheet_rows


def test_the_swap_is_nearer_the_source_person_by_both_judges(subset_run):
    rows, _ = subset_run
    for row in rows:
        distances = row["methods"]["facecast"]["distances"]
        print(row["pair"], {j: round(v["margin"], 3) for j, v in distances.items()})
        assert set(distances) == {"dlib", "faceres"}
        for judge, values in distances.items():
            # judged against A's and B's *other* photos: d(out, B2) - d(out, A2) > 0
            assert values["margin"] > 0, f"{row['pair']}: nearer the target by {judge}"


def test_an_open_target_mouth_stays_open(subset_run):
    rows, _ = subset_run
    open_mouths = [
        r for r in rows if r["methods"]["facecast"]["expression"]["mouth_open_target"] > 10
    ]
    assert {r["target"] for r in open_mouths} == {"jolie1.jpg", "pichai1.jpg"}
    for row in open_mouths:
        expression = row["methods"]["facecast"]["expression"]
        print(row["pair"], expression["mouth_open_target"], expression["mouth_open_output"])
        assert expression["mouth_open_output"] > 0.75 * expression["mouth_open_target"]


def test_summary_table_and_contact_sheets(subset_run, tmp_path):
    rows, sheet_rows = subset_run
    summary = summarise(rows)
    assert set(summary) == {"tune", "held_out", "people"}
    for half in ("tune", "held_out"):
        assert summary[half]["facecast"]["judges"]["dlib"]["pairs"] == 2
    table = quality_table(summary)
    assert "| held_out | textbook | faceres |" in table and "mouth_open" in table
    sheets = write_sheets(sheet_rows, tmp_path / "sheets")
    assert [p.name for p in sheets] == ["sheet-1.png"]
    image = cv2.imread(str(sheets[0]))
    # one row per pair; tiles: target | facecast | textbook | source
    assert image.shape[:2] == (4 * 256, 4 * 256)


def test_video_flicker_compares_swapped_and_original(tmp_path, media):
    clip = make_moving_face_video(tmp_path / "face.mp4", frames=16)
    result = video_flicker(clip, media / "biden.jpg", tmp_path)
    print(result)
    assert result["frame_pairs"] >= 10
    for kind in ("raw", "aligned"):
        assert result[kind]["original"] > 0 and result[kind]["swapped"] > 0, result
    # the face moves across the frame: aligning the head's motion takes most of the change
    assert result["aligned"]["original"] < 0.7 * result["raw"]["original"], result


def test_bench_quality_refuses_unknown_pairs():
    result = facecast("bench", "quality", "--pairs", "some", "--results", Path("/tmp/unused"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --pairs 'some': use all, tune or held-out"
    ]
