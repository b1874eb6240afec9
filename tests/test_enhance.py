"""The face enhancer on real photos with stand-in restorers: an identity model changes the
face only by interpolation, a constant model turns the face to that colour by the blend
factor, a model that copies the red channel proves the RGB order and the -1..1 scaling both
ways, and CodeFormer's extra weight input is fed 0.5. Pixels away from the face never
change."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from onnx import TensorProto, helper

from facecast.errors import FacecastError
from facecast.faces.align import five_points
from facecast.faces.face import Face
from facecast.models.runtime import ModelFileError, OnnxModel
from facecast.swap.enhance import FaceEnhancer, framing_for

from .conftest import load
from .onnx_helpers import constant_model, identity_model, save_model, scaled_by_input_model

IMAGE = [1, 3, 512, 512]
# the grey a -1..1 output of 0 becomes: (0 + 1) * 127.5, rounded half up
GREY = 128.0


@pytest.fixture(scope="module")
def obama(analyser):
    frame = load("obama.jpg")
    return frame, analyser.analyse(frame)[0]


def geometry(face: Face) -> tuple[np.ndarray, float]:
    """The five points' centroid and the eye distance, in image pixels."""
    points = five_points(face)
    return points.mean(0), float(np.linalg.norm(points[1] - points[0]))


def distance_map(shape, centre) -> np.ndarray:
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    return np.hypot(xs - centre[0], ys - centre[1])


def face_core(face: Face, shape) -> np.ndarray:
    """Pixels within half an eye distance of the nose tip and the eyes' midpoint: deep inside
    the blend mask, where it is 1 (the mask spans well over an eye distance either side)."""
    points = five_points(face)
    _, eyes = geometry(face)
    near_nose = distance_map(shape, points[2]) < 0.5 * eyes
    near_eyes = distance_map(shape, points[:2].mean(0)) < 0.3 * eyes
    return near_nose | near_eyes


def far_from(face: Face, shape, factor: float = 2.3) -> np.ndarray:
    """Pixels beyond ``factor`` eye distances of the five points' centroid. In the 512 FFHQ
    crop the eyes are 126 px apart and the crop's corners lie 2.9 eye distances from the
    centroid: a pasted square (no mask) would reach this zone, a face-shaped mask does not."""
    centre, eyes = geometry(face)
    return distance_map(shape, centre) > factor * eyes


def enhanced(model_path, frame, face, blend=0.8) -> np.ndarray:
    out = frame.copy()
    assert FaceEnhancer(OnnxModel(model_path), blend=blend).enhance(out, face)
    return out


def diff(a, b) -> np.ndarray:
    return np.abs(a.astype(np.float32) - b.astype(np.float32))


def test_identity_model_changes_the_face_only_by_interpolation(tmp_path, analyser):
    frame = load("two_people.jpg")
    faces = analyser.analyse(frame)
    assert len(faces) == 2
    model = identity_model(tmp_path / "gfpgan.onnx", "input", "output", IMAGE)
    out = enhanced(model, frame, faces[0], blend=1.0)
    d = diff(out, frame)

    core = face_core(faces[0], frame.shape)
    assert d[core].mean() < 3.0, d[core].mean()  # two bilinear resamplings, nothing else
    assert d[core].max() > 0  # it did paste
    assert d[far_from(faces[0], frame.shape)].max() == 0
    # the other person's face, beyond the mask, is untouched
    x0, y0, x1, y1 = faces[1].box.astype(int)
    assert d[y0:y1, x0:x1].max() == 0


@pytest.mark.parametrize("blend", [0.8, 0.35])
def test_a_grey_output_greys_the_face_by_the_blend_factor(tmp_path, obama, blend):
    frame, face = obama
    model = constant_model(tmp_path / "grey.onnx", {"input": IMAGE}, {"output": np.zeros(IMAGE)})
    out = enhanced(model, frame, face, blend)

    core = face_core(face, frame.shape)
    expected = blend * GREY + (1.0 - blend) * frame.astype(np.float32)
    assert diff(out, expected)[core].max() <= 1.0
    assert diff(out, frame)[far_from(face, frame.shape)].max() == 0
    # in between, the change fades: no pixel moves more than the blend allows
    assert (diff(out, frame) <= blend * diff(np.full_like(frame, 128), frame) + 1.0).all()


def test_a_coloured_output_comes_back_in_bgr_on_the_0_255_scale(tmp_path, obama):
    frame, face = obama
    rgb = np.array([1.0, 0.0, -0.5], np.float32)  # -1..1, as the model writes it
    output = np.broadcast_to(rgb[None, :, None, None], IMAGE).copy()
    model = constant_model(tmp_path / "colour.onnx", {"input": IMAGE}, {"output": output})
    out = enhanced(model, frame, face, blend=1.0)
    bgr = (rgb[::-1] + 1.0) * 127.5
    core = face_core(face, frame.shape)
    assert diff(out, np.round(bgr))[core].max() <= 1.0


# GPEN's inference code (yangxy/GPEN align_faces.py), written out independently: the MTCNN
# reference points of a 96x112 crop, made square (x + 8), padded by inner_padding_factor
# 0.25 on each side (crop 112 -> 168, points + 28), then scaled to the model's size.
MTCNN_96X112 = np.array(
    [[30.29459953, 51.69630051], [65.53179932, 51.50139999], [48.02519989, 71.73660278],
     [33.54930115, 92.3655014], [62.72990036, 92.20410156]]
)  # fmt: skip


@pytest.mark.parametrize("size", [256, 512])
def test_gpen_models_are_framed_as_gpens_own_code_frames_them(tmp_path, obama, size):
    frame, face = obama
    shape = [1, 3, size, size]
    grey = constant_model(
        tmp_path / f"GPEN-BFR-{size}.onnx", {"input": shape}, {"output": np.zeros(shape)}
    )
    assert framing_for(grey.stem) == "gpen" and framing_for("GFPGANv1.4") == "ffhq"
    enhancer = FaceEnhancer(OnnxModel(grey), blend=1.0, framing=framing_for(grey.stem))
    square = MTCNN_96X112 + np.array([8.0, 0.0])
    want = (square + 112 * 0.25) * size / (112 * 1.5)
    assert np.abs(enhancer.template - want).max() < 1e-4  # ArcFace points: 4 decimals
    # its crop shows more around the face than FFHQ's: the eyes span less of it
    ffhq = FaceEnhancer(OnnxModel(grey), blend=1.0).template
    assert np.ptp(enhancer.template[:2, 0]) < 0.9 * np.ptp(ffhq[:2, 0])
    # and the mask follows the face in that framing: the face greyed, far pixels untouched
    out = frame.copy()
    assert enhancer.enhance(out, face)
    assert diff(out, np.full_like(frame, 128))[face_core(face, frame.shape)].max() <= 1.0
    assert diff(out, frame)[far_from(face, frame.shape)].max() == 0


def test_the_model_sees_rgb_scaled_to_minus_one_one(tmp_path, obama):
    """A stand-in that writes its first input channel to all three: the face turns into the
    frame's red channel, which only happens if the crop went in as RGB and the -1..1
    scaling is undone exactly on the way out."""
    frame, face = obama
    nodes = [
        helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["first"]),
        helper.make_node("Concat", ["first", "first", "first"], ["output"], axis=1),
    ]
    model = save_model(
        tmp_path / "red.onnx",
        nodes,
        {"input": IMAGE},
        {"output": IMAGE},
        {"starts": np.array([0]), "ends": np.array([1]), "axes": np.array([1])},
    )
    out = enhanced(model, frame, face, blend=1.0)
    core = face_core(face, frame.shape)
    red = np.repeat(frame[:, :, 2:3], 3, axis=2)
    assert diff(out, red)[core].mean() < 3.0
    assert diff(out, frame)[core].mean() > 15.0  # red alone is far from the real colours


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [(TensorProto.DOUBLE, [1]), (TensorProto.FLOAT, [])],
    ids=["double", "float"],
)
def test_codeformer_weight_input_is_fed_one_half(tmp_path, obama, dtype, shape):
    """output = input x weight: with 0.5 the face's contrast around mid-grey halves."""
    frame, face = obama
    model = scaled_by_input_model(
        tmp_path / "codeformer.onnx", "input", "weight", "output", IMAGE, dtype, shape
    )
    enhancer = FaceEnhancer(OnnxModel(model), blend=0.8)
    out = frame.copy()
    assert enhancer.enhance(out, face)
    core = face_core(face, frame.shape)
    original = frame.astype(np.float32)
    halved = 127.5 + 0.5 * (original - 127.5)
    expected = 0.8 * halved + 0.2 * original
    assert diff(out, expected)[core].mean() < 2.5
    assert diff(out, original)[core].mean() > 10.0  # far from what weight 1 would give


def test_faces_outside_the_frame_and_bad_settings(tmp_path, obama):
    frame, face = obama
    model = OnnxModel(identity_model(tmp_path / "gfpgan.onnx", "input", "output", IMAGE))
    away = Face(
        box=face.box + 5000,
        score=face.score,
        keypoints=face.keypoints + 5000,
        points5=five_points(face) + 5000,
    )
    out = frame.copy()
    assert FaceEnhancer(model).enhance(out, away) is None
    assert (out == frame).all()
    with pytest.raises(FacecastError, match="blend"):
        FaceEnhancer(model, blend=1.5)
    inswapper = constant_model(
        tmp_path / "inswapper.onnx",
        {"target": [1, 3, 128, 128], "source": [1, 512]},
        {"output": np.zeros((1, 3, 128, 128))},
    )
    with pytest.raises(ModelFileError, match="not a face enhancer"):
        FaceEnhancer(OnnxModel(inswapper))


def test_contact_sheet(tmp_path, obama, artifacts):
    """original | identity | grey 0.8 | CodeFormer-like | |identity - original| x 8, around
    the face, for a look by eye."""
    frame, face = obama
    identity = identity_model(tmp_path / "id.onnx", "input", "output", IMAGE)
    grey = constant_model(tmp_path / "grey.onnx", {"input": IMAGE}, {"output": np.zeros(IMAGE)})
    weighted = scaled_by_input_model(tmp_path / "cf.onnx", "input", "weight", "output", IMAGE)
    panels = [frame, *(enhanced(m, frame, face) for m in (identity, grey, weighted))]
    panels.append(np.clip(diff(panels[1], frame) * 8, 0, 255).astype(np.uint8))
    centre, eyes = geometry(face)
    half = int(2.0 * eyes)
    x, y = np.round(centre).astype(int)
    crops = [
        cv2.resize(
            cv2.copyMakeBorder(p, half, half, half, half, cv2.BORDER_CONSTANT)[
                y : y + 2 * half, x : x + 2 * half
            ],
            (384, 384),
        )
        for p in panels
    ]
    sheet = np.hstack(crops)
    assert cv2.imwrite(str(artifacts / "enhance_sheet.png"), sheet)
