"""Several photos of the source person: each face is swapped with the photo nearest its own
expression (``swap/sources.py``), chosen with hysteresis in video.

jolie1.jpg smiles with her mouth open, jolie2.jpg has it closed; pichai1.jpg smiles open,
damon1.jpg's mouth is closed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from facecast.engine.pipeline import EngineOptions, SwapEngine
from facecast.faces.analyse import FaceAnalyser
from facecast.media.image_io import read_image, read_image_mark
from facecast.swap.sources import SWITCH_FRAMES, SourceSet, expression_vector, source_photos

from .test_cli import assert_ok, assert_usage_error, swap


@pytest.fixture(scope="module")
def people(media):
    return media / "people"


def mesh_of(path):
    faces = FaceAnalyser(tiles=True).analyse(read_image(path))
    return max(faces, key=lambda f: f.area).mesh


def swapped(sources, target, people) -> np.ndarray:
    engine = SwapEngine(EngineOptions(label=False, tiles=True))
    engine.load_sources([(read_image(people / s), s) for s in sources])
    image = read_image(people / target)
    engine.process(image)
    return image


def test_expression_vector_tells_an_open_mouth_from_a_closed_one(people):
    smiling, closed = (
        expression_vector(mesh_of(people / "jolie1.jpg")),
        expression_vector(mesh_of(people / "jolie2.jpg")),
    )
    print("jolie1", smiling.round(2), "jolie2", closed.round(2))
    assert smiling[0] - closed[0] > 1.5  # mouth opening, in units of 10 % of the eye distance


@pytest.mark.parametrize(
    ("target", "expected"), [("pichai1.jpg", "jolie1.jpg"), ("damon1.jpg", "jolie2.jpg")]
)
def test_each_face_gets_the_photo_nearest_its_expression(people, target, expected):
    both = swapped(["jolie1.jpg", "jolie2.jpg"], target, people)
    alone = swapped([expected], target, people)
    other = swapped(
        [{"jolie1.jpg": "jolie2.jpg", "jolie2.jpg": "jolie1.jpg"}[expected]], target, people
    )
    # the swap is deterministic: with both photos, the output is the nearest photo's swap
    assert np.array_equal(both, alone)
    assert not np.array_equal(both, other)


def test_a_track_switches_photo_only_after_several_frames(people):
    open_mesh, closed_mesh = mesh_of(people / "jolie1.jpg"), mesh_of(people / "jolie2.jpg")
    vectors = np.array([expression_vector(open_mesh), expression_vector(closed_mesh)])
    sources = SourceSet(["open", "closed"], vectors, ["jolie1", "jolie2"])
    assert sources.pick(open_mesh, track_id=7) == "open"
    # a single frame (or a flicker back and forth) nearer the other photo changes nothing
    for mesh in (closed_mesh, open_mesh, closed_mesh, open_mesh):
        assert sources.pick(mesh, track_id=7) == "open"
    picks = [sources.pick(closed_mesh, track_id=7) for _ in range(SWITCH_FRAMES)]
    assert picks[:-1] == ["open"] * (SWITCH_FRAMES - 1) and picks[-1] == "closed"
    # no track (a still image): simply the nearest, and other tracks keep their own choice
    assert sources.pick(closed_mesh) == "closed"
    assert sources.pick(open_mesh, track_id=8) == "open"
    sources.forget({8})
    assert sources.pick(open_mesh, track_id=7) == "open"  # track 7 starts afresh


def test_cli_takes_repeated_sources_and_a_folder(tmp_path, people):
    output = tmp_path / "out.png"
    result = swap(
        people / "jolie1.jpg", people / "pichai1.jpg", output, "-s", people / "jolie2.jpg"
    )
    assert_ok(result, output)
    mark = json.loads(read_image_mark(output)["facecast"])
    assert mark["source_face"] == "jolie1.jpg, jolie2.jpg"
    folder = tmp_path / "jolie"
    folder.mkdir()
    for name in ("jolie1.jpg", "jolie2.jpg"):
        (folder / name).write_bytes((people / name).read_bytes())
    from_folder = tmp_path / "folder.png"
    assert_ok(swap(folder, people / "pichai1.jpg", from_folder), from_folder)
    assert np.array_equal(read_image(from_folder), read_image(output))
    assert source_photos([folder]) == [folder / "jolie1.jpg", folder / "jolie2.jpg"]


def test_an_empty_source_folder_exits_2(tmp_path, people):
    empty = tmp_path / "nobody"
    empty.mkdir()
    output = tmp_path / "out.png"
    assert_usage_error(swap(empty, people / "pichai1.jpg", output), "no .jpg or .png photo")
    assert not output.exists()


def test_a_profile_and_a_stream_take_a_folder_of_source_photos(tmp_path, people):
    from facecast.config import StreamSettings
    from facecast.errors import FacecastError
    from facecast.live.pipeline import build_pipeline
    from facecast.serve.profiles import load_profiles

    from .media_helpers import make_moving_face_video

    folder = tmp_path / "faces"
    folder.mkdir()
    for name in ("jolie1.jpg", "jolie2.jpg"):
        (folder / name).write_bytes((people / name).read_bytes())
    (tmp_path / "empty").mkdir()
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text("studio:\n  source: faces\n")
    assert load_profiles(profiles)["studio"].source == folder
    profiles.write_text("studio:\n  source: empty\n")
    with pytest.raises(FacecastError, match=r"empty: a directory with no \.jpg or \.png"):
        load_profiles(profiles)

    clip = make_moving_face_video(tmp_path / "in.mp4", frames=5)
    settings = StreamSettings(source_image=folder, input=str(clip), output=str(tmp_path / "o.mp4"))
    pipeline = build_pipeline(settings)
    assert pipeline.engine.source_set is not None
    assert pipeline.engine.source_set.names == [
        str(folder / "jolie1.jpg"),
        str(folder / "jolie2.jpg"),
    ]
    extra = StreamSettings(
        source_image=people / "jolie1.jpg",
        extra_sources=[people / "jolie2.jpg"],
        input=str(clip),
        output=str(tmp_path / "p.mp4"),
    )
    assert len(build_pipeline(extra).engine.source_set.names) == 2
