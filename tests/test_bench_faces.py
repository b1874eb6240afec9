"""``facecast bench faces`` on tiny clips: what it counts must be right (no timing asserts)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from facecast.bench.faces import faces_table, measure_faces, saving_pct

from .media_helpers import (
    _scaled,
    blurred_background,
    head_crop,
    make_two_people_video,
    paste_soft,
    write_video,
)

FRAMES = 30
SIZE = (320, 180)


@pytest.fixture(scope="module")
def two_people(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two faces visible in every frame, no cut."""
    clip = make_two_people_video(
        tmp_path_factory.mktemp("bench-faces") / "two.mp4", size=SIZE, frames=FRAMES, audio=False
    )
    return measure_faces(clip, warmup=2)


def shot(photo: str, background: str, x: float, count: int) -> list[np.ndarray]:
    canvas = blurred_background(SIZE, background)
    paste_soft(canvas, _scaled(head_crop(photo), SIZE[1] * 0.6), SIZE[0] * x, SIZE[1] * 0.5)
    return [canvas] * count


def test_detecting_every_3rd_frame_runs_the_detector_on_a_third_of_the_frames(two_people):
    every_1, every_3 = two_people["analysis"]["every_1"], two_people["analysis"]["every_3"]
    assert two_people["frames"] == FRAMES
    assert every_1["calls"]["detect"] == FRAMES
    # one detection per 3 frames; a followed mesh that is lost adds one, so allow a couple
    assert math.ceil(FRAMES / 3) <= every_3["calls"]["detect"] <= math.ceil(FRAMES / 3) + 2
    assert every_3["stage_ms_per_frame"]["detect"] < every_1["stage_ms_per_frame"]["detect"]


def test_both_modes_find_both_faces_in_every_frame(two_people):
    for run in two_people["analysis"].values():
        assert run["frames_with_face"] == FRAMES
        assert run["faces_found"] == 2 * FRAMES
    assert two_people["faces_compared"] == {
        "frames_fewer_faces": 0,
        "frames_more_faces": 0,
        "frames_face_lost": 0,
        "faces_fewer": 0,
    }


def test_the_tracker_embeds_only_new_people(two_people):
    temporal = two_people["temporal"]
    assert temporal["cuts"] == 0
    assert temporal["tracks_created"] == temporal["track_ids_seen"] == 2
    assert temporal["faces_tracked"] == 2 * FRAMES
    # each new track costs one embedding; nothing else in this clip calls for one
    assert 0 < temporal["embeddings"] <= 4
    assert temporal["embeddings"] * 10 <= temporal["faces_tracked"]
    assert len(temporal["temporal_ms_per_frame"]) == 5  # mean, p50, p95, p99, max


def test_a_cut_is_counted_and_starts_new_tracks(tmp_path: Path):
    frames = shot("obama.jpg", "group_t1.jpg", 0.35, 12)
    frames += shot("biden.jpg", "two_people.jpg", 0.65, 12)
    clip = write_video(tmp_path / "cut.mp4", frames, audio=False)
    temporal = measure_faces(clip, warmup=1)["temporal"]
    assert temporal["cuts"] == 1 and temporal["cut_frames"] == [12]
    assert temporal["tracks_created"] == 2
    assert temporal["frames_with_face"] == 24


def test_the_docs_table_has_a_row_per_mode(two_people):
    table = faces_table(two_people)
    assert "| every frame |" in table and "| every 3rd frame |" in table
    assert f"{FRAMES}/{FRAMES}" in table


def test_the_saving_is_taken_over_the_frames_asked_for():
    assert saving_pct([10.0, 10.0, 4.0], [5.0, 5.0, 4.0]) == pytest.approx(100 * (1 - 14 / 24))
    assert saving_pct([10.0, 10.0, 4.0], [5.0, 5.0, 4.0], [True, True, False]) == 50.0
    assert math.isnan(saving_pct([1.0], [1.0], [False]))
