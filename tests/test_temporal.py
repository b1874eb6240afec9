"""Temporal stability in the engine: a still face under sensor noise stops shimmering, and
a scene cut starts the state afresh."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from facecast.engine.pipeline import EngineOptions, SwapEngine

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


def test_the_colour_match_is_steady_on_a_still_face(source_photo):
    """The skin statistics the colour match uses shift a little every frame (noise, the
    sample moving with the mesh); per track they are smoothed, and the output face's colour
    flickers less for it."""
    frames = still_frames("obama.jpg", 45, 0.5, seed=3)

    def run(smooth_colour: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """RMS frame-to-frame change of: the statistics measured, the statistics used, and
        the mean LAB of the middle of the output face."""
        swapper = engine(source_photo, True)
        assert swapper.temporal is not None
        swapper.temporal.smooth_colour = smooth_colour
        measured, used = [], []

        def settle(stats: np.ndarray) -> np.ndarray:
            measured.append(np.array(stats, np.float64))
            track = swapper.temporal.colour_settler(swapper.last_faces[0])
            settled = stats if track is None else track(stats)
            used.append(np.array(settled, np.float64))
            return settled

        original = swapper.swapper.swap
        swapper.swapper.swap = lambda *a: original(*a[:4], settle)  # record what it sees
        means, box = [], None
        for frame in frames:
            image = frame.copy()
            swapper.process(image)
            if box is None:
                x0, y0, x1, y1 = swapper.last_faces[0].box.astype(int)
                w, h = x1 - x0, y1 - y0
                box = (slice(y0 + h // 4, y1 - h // 4), slice(x0 + w // 4, x1 - w // 4))
            lab = cv2.cvtColor(image[box], cv2.COLOR_BGR2LAB).reshape(-1, 3)
            means.append(lab.astype(np.float64).mean(0))

        def flicker(values: list[np.ndarray]) -> np.ndarray:
            return np.sqrt(np.mean(np.square(np.diff(np.array(values[10:]), axis=0)), axis=0))

        return flicker(measured), flicker(used), flicker(means)

    measured, used, steady_out = run(True)
    _, _, raw_out = run(False)
    print(
        f"colour statistics flicker {measured.mean():.3f} measured, {used.mean():.3f} used; "
        f"output face a/b flicker {raw_out[1:].mean():.3f} unsmoothed, "
        f"{steady_out[1:].mean():.3f} smoothed"
    )
    assert used.mean() < measured.mean() / 4
    assert steady_out[1:].mean() < raw_out[1:].mean()


def test_the_smoothing_clock_follows_timestamps_and_survives_a_restart():
    """Live frames carry timestamps (frames are dropped under load, so counting them would
    misjudge speed); after a reconnect the timestamps may start again from zero."""
    from facecast.faces.temporal import TemporalFaces

    temporal = TemporalFaces(fps=30.0)
    image = np.zeros((90, 160, 3), np.uint8)
    times = []
    for seconds in (10.0, 10.1, 10.3, 0.0, 0.033, 50.0, None):
        temporal.settle(image, [], seconds)
        times.append(round(temporal.time, 3))
    # dropped frames show as bigger steps; the restart and the jump continue one frame on
    assert times == [10.0, 10.1, 10.3, 10.333, 10.366, 10.4, 10.433], times
