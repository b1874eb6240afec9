"""Face analysis on the real photos: detection counts, mesh sanity, identity distances."""

import numpy as np
import pytest

from facecast.faces.detect import (
    FULL_RANGE,
    SHORT_RANGE,
    BlazeFaceDetector,
    ssd_anchors,
    weighted_nms,
)
from facecast.faces.embed import face_distance
from facecast.faces.topology import mesh_topology

from .conftest import load


def test_anchor_grids_match_the_models_outputs():
    assert ssd_anchors(SHORT_RANGE).shape == (896, 2)
    assert ssd_anchors(FULL_RANGE).shape == (2304, 2)
    assert ssd_anchors(SHORT_RANGE).min() > 0 and ssd_anchors(SHORT_RANGE).max() < 1


def test_weighted_nms_merges_overlaps_and_keeps_separate_faces():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=np.float32)
    kps = np.zeros((3, 6, 2), dtype=np.float32)
    scores = np.array([0.9, 0.6, 0.8])
    kept = weighted_nms(boxes, kps, scores)
    assert len(kept) == 2
    merged = kept[0][0]
    assert 0 < merged[0] < 1  # pulled toward the weaker duplicate, by its weight
    assert kept[0][2] == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("photo", "expected"),
    [
        ("obama.jpg", 1),
        ("two_people.jpg", 2),
        ("group_t1.jpg", 6),
        ("biden.jpg", 1),
        ("obama-720p.jpg", 1),
    ],
)
def test_face_counts_on_real_photos(analyser, photo, expected):
    faces = analyser.analyse(load(photo))
    assert len(faces) == expected, [f.box.round() for f in faces]


@pytest.mark.parametrize("model", ["short", "full"])
def test_both_blazeface_models_find_the_faces_of_two_people(model):
    faces = BlazeFaceDetector(model).detect(load("two_people.jpg"))
    assert len(faces) == 2
    assert faces[0].keypoints.shape == (6, 2)


def test_mesh_points_lie_in_the_box_with_eyes_above_the_mouth(analyser):
    topo = mesh_topology()
    for photo in ("obama.jpg", "two_people.jpg", "group_t1.jpg"):
        for face in analyser.analyse(load(photo)):
            mesh = face.mesh
            assert mesh.shape == (468, 3)
            x0, y0, x1, y1 = face.box
            margin = 0.25 * face.width
            inside = (
                (mesh[:, 0] > x0 - margin)
                & (mesh[:, 0] < x1 + margin)
                & (mesh[:, 1] > y0 - margin)
                & (mesh[:, 1] < y1 + margin)
            )
            assert inside.mean() > 0.98, photo
            eyes_y = np.r_[mesh[topo.right_eye, 1], mesh[topo.left_eye, 1]].mean()
            mouth_y = mesh[topo.outer_lips, 1].mean()
            assert eyes_y < mouth_y, photo


def test_mesh_topology_is_a_closed_face():
    topo = mesh_topology()
    assert 840 <= len(topo.triangles) <= 900
    assert len(topo.face_oval) == 36 and len(topo.inner_lips) == 20
    assert 13 in topo.inner_lips and 13 not in topo.outer_lips


def test_embedding_distances_separate_people(analyser, embedder):
    def embed(photo):
        image = load(photo)
        return embedder.embed(image, analyser.analyse(image)[0])

    obama, obama_720p, biden = embed("obama.jpg"), embed("obama-720p.jpg"), embed("biden.jpg")
    assert obama.shape == (128,)
    same, other = face_distance(obama, obama_720p), face_distance(obama, biden)
    print(f"d(obama, obama-720p)={same:.3f}  d(obama, biden)={other:.3f}")
    assert same < 0.6 < other


def test_dlib_five_points_sit_on_the_face(analyser, embedder):
    image = load("obama.jpg")
    face = analyser.analyse(image)[0]
    points = embedder.five_points(image, face.box)
    assert points.shape == (5, 2)
    x0, y0, x1, y1 = face.box
    assert (
        (points[:, 0] > x0) & (points[:, 0] < x1) & (points[:, 1] > y0) & (points[:, 1] < y1)
    ).all()


def test_following_meshes_between_detections_keeps_the_face(tmp_path):
    """detect_every=3 (the video default) finds the moving face in every frame, with meshes
    as close to the detect-every-frame meshes as two detections are to each other."""
    from facecast.engine.timing import StageClock
    from facecast.faces.analyse import FaceAnalyser
    from facecast.media.source import VideoFileSource

    from .media_helpers import make_moving_face_video

    clip = make_moving_face_video(tmp_path / "moving.mp4", size=(640, 360), frames=30, audio=False)
    with VideoFileSource(clip) as src:
        images = [f.image for f in src.frames()]
    every, followed = FaceAnalyser(detect_every=1), FaceAnalyser(detect_every=3)
    clock = StageClock()
    errors = []
    for image in images:
        a, b = every.analyse(image), followed.analyse(image, clock)
        assert len(a) == len(b) == 1
        size = a[0].width
        errors.append(np.abs(a[0].mesh[:, :2] - b[0].mesh[:, :2]).mean() / size)
    print(f"mean mesh difference, followed vs detected: {100 * np.mean(errors):.2f}% of face width")
    assert np.mean(errors) < 0.03
    assert clock.calls["detect"] == len(images) // 3  # the detector really ran less often


def test_gaze_reader_reads_a_tracked_face_every_other_frame(analyser):
    """On the frame after a read, a tracked face's irises come from its last gaze placed in
    its new mesh (they move with the head); an untracked face is read every time."""
    from facecast.faces.iris import GazeReader, iris_centres

    image = load("people/jolie1.jpg")
    mesh = analyser.analyse(image)[0].mesh
    shifted_image = np.ascontiguousarray(np.roll(image, 12, axis=1))
    shifted_mesh = mesh + np.array([12.0, 0.0, 0.0])
    reader = GazeReader()
    first = reader.irises(image, mesh, track_id=7)
    np.testing.assert_allclose(first, iris_centres(image, mesh))
    # the frame after: the same gaze carried by the moved mesh, exactly 12 px along
    np.testing.assert_allclose(
        reader.irises(shifted_image, shifted_mesh, 7), first + np.array([12.0, 0.0]), atol=1e-6
    )
    # and the one after that is read again from the pixels
    np.testing.assert_allclose(
        reader.irises(shifted_image, shifted_mesh, 7), iris_centres(shifted_image, shifted_mesh)
    )
    untracked = [reader.irises(image, mesh, None) for _ in range(2)]
    np.testing.assert_allclose(untracked[1], iris_centres(image, mesh))
