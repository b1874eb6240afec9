"""Reference mode: only the chosen people are swapped, each with their own face, in every
frame where they are visible; nobody else ever is. Clips made from the real photos."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from facecast.engine.pipeline import EngineOptions, SwapEngine
from facecast.faces.select import Selection
from facecast.media.image_io import read_image
from tests import test_track

from .conftest import MEDIA
from .test_track import SIZE, scene

heads = test_track.heads  # a fixture, bound by name (see tests/live_helpers.py)
PHOTOS = ("obama-720p.jpg", "biden.jpg", "alex-lacamoire.png", "lin-manuel-miranda.png")


def person_at(face, positions: dict[str, float | None]) -> str:
    x = face.center[0] / SIZE[0]
    return min(
        (p for p, px in positions.items() if px is not None), key=lambda p: abs(positions[p] - x)
    )


def unambiguous(positions: dict[str, float | None]) -> bool:
    xs = sorted(x for x in positions.values() if x is not None)
    return all(b - a >= 0.3 for a, b in itertools.pairwise(xs))


def crossing_and_return() -> list[dict[str, float | None]]:
    """Obama and Biden cross (Obama in front); then Obama walks out right and comes back."""
    truth = []
    for i in range(100):
        s = min(i / 59, 1.0)
        obama = 0.2 + 0.6 * s if i < 60 else (None if i < 80 else 0.8)
        truth.append({"biden.jpg": 0.8 - 0.6 * s, "obama.jpg": obama})
    return truth


def run(engine: SwapEngine, people, truth):
    """Per frame: the positions, {(person, reference index)} swapped, and whether Obama was
    on screen in the frame before (the first frame after a re-entry may be missed)."""
    previous_visible = False
    for positions in truth:
        engine.process(scene(people, positions))
        done = {(person_at(face, positions), ref) for face, ref in engine.last_swaps}
        yield positions, done, previous_visible
        previous_visible = positions["obama.jpg"] is not None


@pytest.fixture(scope="module")
def photos():
    return {
        n: read_image(MEDIA / n)
        for n in ("obama-720p.jpg", "biden.jpg", "alex-lacamoire.png", "lin-manuel-miranda.png")
    }


def test_only_the_reference_person_is_swapped(heads, photos):
    engine = SwapEngine(EngineOptions(detect_every=3))
    engine.add_reference(photos["obama-720p.jpg"], photos["alex-lacamoire.png"], "obama")
    wrong = missed = 0
    for positions, done, was_visible in run(engine, heads, crossing_and_return()):
        wrong += sum(1 for person, _ in done if person != "obama.jpg")
        if positions["obama.jpg"] is not None and unambiguous(positions) and was_visible:
            missed += ("obama.jpg", 0) not in done
    print(f"wrong person swapped in {wrong} frames, obama visible and not swapped in {missed}")
    assert wrong == 0 and missed == 0


def test_two_references_each_get_their_own_face(heads, photos):
    engine = SwapEngine(EngineOptions(detect_every=3))
    engine.add_reference(photos["obama-720p.jpg"], photos["alex-lacamoire.png"], "obama")
    engine.add_reference(photos["biden.jpg"], photos["lin-manuel-miranda.png"], "biden")
    expected = {"obama.jpg": 0, "biden.jpg": 1}
    mismatched = 0
    for positions, done, _ in run(engine, heads, crossing_and_return()):
        if unambiguous(positions):
            mismatched += sum(1 for person, ref in done if expected[person] != ref)
            mismatched += sum(
                1 for p, x in positions.items() if x is not None and (p, expected[p]) not in done
            )
    assert mismatched <= 2  # at most the first frame after a re-entry


def changed_sides(clip, out) -> tuple[float, float]:
    """Share of pixels that changed (by more than re-encoding does) in the left and right
    halves of a 480-wide video, averaged over its frames."""
    import av

    def frames(path):
        with av.open(str(path)) as container:
            return [f.to_ndarray(format="bgr24").astype(np.int16) for f in container.decode(0)]

    def changed(a, b) -> float:
        return float(np.mean(np.abs(a - b).max(axis=2) > 30))

    before, after = frames(clip), frames(out)
    assert len(before) == len(after) == 20
    pairs = list(zip(before, after, strict=True))
    left = float(np.mean([changed(a[:, :240], b[:, :240]) for a, b in pairs]))
    right = float(np.mean([changed(a[:, 240:], b[:, 240:]) for a, b in pairs]))
    print(f"pixels changed: left (Obama) {left:.1%}, right (Biden) {right:.1%}")
    return left, right


@pytest.mark.parametrize("command", ["swap", "stream"])
def test_a_reference_on_the_command_line_changes_only_that_person(tmp_path, command):
    """`facecast swap|stream --reference`: in a two-people video only Obama (left) changes."""
    from .media_helpers import make_two_people_video
    from .test_cli import facecast

    clip = make_two_people_video(tmp_path / "two.mp4", size=(480, 270), frames=20, audio=False)
    out = tmp_path / "out.mp4"
    target = "-t" if command == "swap" else "-i"
    done = facecast(
        command, "-s", MEDIA / "alex-lacamoire.png", target, clip, "-o", out,
        "--reference", MEDIA / "obama-720p.jpg", "--no-label", timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    left, right = changed_sides(clip, out)
    assert left > 0.01 and right < 0.002  # swapping both would change ~2 % on the right


def test_index_selection_stays_with_the_person_when_people_cross(heads):
    """`index:0` is the person who was leftmost when first seen (Obama), also after he
    has walked past Biden; a per-frame left-to-right count would switch to Biden."""
    engine = SwapEngine(
        EngineOptions(detect_every=3, temporal=True, selection=Selection("index", 0))
    )
    engine.load_source(read_image(MEDIA / "alex-lacamoire.png"))
    truth = crossing_and_return()[:60]
    wrong = missed = 0
    for positions, done, _ in run(engine, heads, truth):
        if unambiguous(positions):
            wrong += sum(1 for person, _ in done if person != "obama.jpg")
            missed += ("obama.jpg", None) not in done
    assert wrong == 0 and missed == 0, (wrong, missed)


def test_a_reference_without_its_own_face_follows_a_new_source_face(heads, photos):
    """A live stream's face can be replaced while it runs (POST .../source); the people
    picked by reference photos then get the new face, not a copy of the old one."""
    frame = scene(heads, {"obama.jpg": 0.3, "biden.jpg": 0.75})

    def swapped(engine: SwapEngine) -> np.ndarray:
        image = frame.copy()
        engine.process(image)
        assert [ref for _, ref in engine.last_swaps] == [0]  # Obama, by his reference
        return image.astype(np.int16)

    running = SwapEngine(EngineOptions(label=False))
    running.load_source(photos["alex-lacamoire.png"])
    running.add_reference(photos["obama-720p.jpg"], name="obama")
    before = swapped(running)
    running.load_source(photos["lin-manuel-miranda.png"])
    after = swapped(running)

    fresh = SwapEngine(EngineOptions(label=False))
    fresh.load_source(photos["lin-manuel-miranda.png"])
    fresh.add_reference(photos["obama-720p.jpg"], name="obama")
    expected = swapped(fresh)
    changed = float(np.mean(np.abs(after - before).max(axis=2) > 30))
    off = float(np.mean(np.abs(after - expected).max(axis=2) > 30))
    print(f"pixels changed with the new face {changed:.2%}; unlike a fresh engine {off:.2%}")
    assert changed > 0.004  # the face changed (it covers ~3 % of the frame)...
    assert off < changed / 10  # ...to the new one
