"""Temporal stability in the engine: a still face under sensor noise stops shimmering, and
a scene cut starts the state afresh."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from facecast.pipeline import EngineOptions, SwapEngine

from .conftest import load
from .media_helpers import _scaled, blurred_background, head_crop, paste_soft

SIZE = (640, 360)


def still_frames(
    photo: str, count: int, x: float, seed: int, background: str = "group_t1.jpg"
) -> list[np.ndarray]:
    """One still head, with fresh sensor noise (sigma 4 levels) in every frame."""
    canvas = blurred_background(SIZE, background)
    paste_soft(canvas, _scaled(head_crop(photo), SIZE[1] * 0.6), SIZE[0] * x, SIZE[1] * 0.5)
    rng = np.random.default_rng(seed)
    return [
        np.clip(canvas + rng.normal(0, 4, canvas.shape), 0, 255).astype(np.uint8)
        for _ in range(count)
    ]


def meshes(engine: SwapEngine, frames: list[np.ndarray]) -> list[np.ndarray]:
    out = []
    for frame in frames:
        engine.process(frame.copy())
        out.append(engine.last_faces[0].mesh[:, :2].astype(np.float64))
    return out


def rms_motion(points: list[np.ndarray]) -> float:
    steps = [np.linalg.norm(b - a, axis=1) for a, b in itertools.pairwise(points)]
    return float(np.sqrt(np.mean(np.square(steps))))


@pytest.fixture(scope="module")
def source_photo():
    return load("biden.jpg")


def engine(source_photo, temporal: bool) -> SwapEngine:
    engine = SwapEngine(EngineOptions(detect_every=3, temporal=temporal))
    engine.load_source(source_photo)
    return engine


def test_a_still_face_does_not_shimmer(source_photo):
    frames = still_frames("obama.jpg", 45, 0.5, seed=0)
    raw = rms_motion(meshes(engine(source_photo, False), frames)[10:])
    smooth = rms_motion(meshes(engine(source_photo, True), frames)[10:])
    print(f"still face, landmark motion frame to frame: {raw:.2f} px raw, {smooth:.2f} px smoothed")
    assert smooth <= 0.5
    assert smooth < raw


def test_a_scene_cut_resets_tracks_and_smoothing(source_photo):
    first = still_frames("obama.jpg", 10, 0.3, seed=1)
    second = still_frames("biden.jpg", 5, 0.7, seed=2, background="two_people.jpg")  # new shot
    with_state = engine(source_photo, True)
    without = engine(source_photo, False)
    smoothed = meshes(with_state, first)
    old_id = with_state.last_faces[0].track_id
    smoothed += meshes(with_state, second)
    raw = meshes(without, first + second)
    assert with_state.temporal is not None and with_state.temporal.cuts == 1
    # the first frame of the new shot is not pulled towards the old face's place
    gap = float(np.mean(np.linalg.norm(smoothed[10] - raw[10], axis=1)))
    assert gap < 1.0, gap
    assert with_state.last_faces[0].track_id != old_id  # no track runs across the cut
