"""One Euro smoothing on real landmarks: a still face stops shimmering, a moving one does
not lag far behind."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from facecast.faces.analyse import FaceAnalyser
from facecast.faces.smooth import OneEuroFilter

from .conftest import load

FPS = 30.0


@pytest.fixture(scope="module")
def mesh() -> np.ndarray:
    faces = FaceAnalyser(tiles=True).analyse(load("obama.jpg"))
    return faces[0].mesh[:, :2].astype(np.float64)


def rms_motion(frames: list[np.ndarray]) -> float:
    steps = [np.linalg.norm(b - a, axis=1) for a, b in itertools.pairwise(frames)]
    return float(np.sqrt(np.mean(np.square(steps))))


def test_a_still_face_stops_shimmering(mesh):
    rng = np.random.default_rng(0)
    noisy = [mesh + rng.normal(0, 1.0, mesh.shape) for _ in range(120)]  # 1 px detector noise
    smooth = OneEuroFilter()
    out = [smooth(frame, i / FPS) for i, frame in enumerate(noisy)]
    raw, filtered = rms_motion(noisy[30:]), rms_motion(out[30:])
    print(f"still face: frame-to-frame motion {raw:.2f} px raw, {filtered:.2f} px smoothed")
    assert filtered <= 0.5 < raw


def test_a_moving_face_does_not_lag_far_behind(mesh):
    rng = np.random.default_rng(1)
    speed = np.array([300.0, 0.0])  # px/s: a quick head turn across a 720p frame
    truth = [mesh + speed * (i / FPS) for i in range(60)]
    smooth = OneEuroFilter()
    out = [smooth(t + rng.normal(0, 1.0, mesh.shape), i / FPS) for i, t in enumerate(truth)]
    lag = float(np.mean(np.linalg.norm(truth[-1] - out[-1], axis=1)))
    print(f"moving face at 300 px/s: {lag:.1f} px behind")
    assert lag < 4.0


def test_reset_forgets_the_past(mesh):
    smooth = OneEuroFilter()
    for i in range(10):
        smooth(mesh, i / FPS)
    moved = mesh + 200.0
    smooth.reset()
    assert np.allclose(smooth(moved, 11 / FPS), moved)  # a cut: no blend with the old place
