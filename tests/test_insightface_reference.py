"""facecast's adapters against insightface's own classes (issue 18, point 4).

insightface (PyPI, MIT code; no weights) runs the same stand-in graphs as facecast on the
same real faces and five points. Stand-ins with non-trivial weights: an ArcFace projection
that every pixel's channel and place reaches, an inswapper whose embedding map is the last
initializer with a decoy of the same shape before it, and whose output turns into a
high-contrast pattern unless it is fed the latent facecast computes. Agreement is asserted
to what two float pipelines allow: crops within 1 LSB (2 for the swapped face, which
insightface truncates to uint8 and facecast rounds), embeddings within 1e-4.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

# installed by scripts/setup for the tests (code only, without its own dependencies)
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.inswapper import INSwapper
from insightface.model_zoo.scrfd import SCRFD
from insightface.utils import face_align

from facecast.faces.align import align_crop, arcface_template, five_points
from facecast.faces.detect_onnx import ScrfdDetector
from facecast.faces.recognise import ArcFaceRecogniser, normalise
from facecast.models.runtime import OnnxModel
from facecast.swap.learned import LearnedSwapper

from . import test_inswapper
from .conftest import load
from .onnx_helpers import arcface_model, constant_model, inswapper_model
from .test_detect_onnx import PHOTO, scrfd_outputs

faces = test_inswapper.faces  # the fixture: three real photos and their faces


def arcface_stand_in(folder, normalises_inside: bool = False):
    rng = np.random.default_rng(7)
    weight = rng.normal(0, 0.05, (3 * 14 * 14, 512))
    weight[: 14 * 14] *= 3.0  # the first channel (R after the swap to RGB) weighs more
    bias = rng.normal(0, 0.01, 512)
    path = folder / ("mx_r50.onnx" if normalises_inside else "w600k_r50.onnx")
    return arcface_model(path, weight, bias, normalises_inside=normalises_inside)


@pytest.fixture(scope="module")
def arcface_path(tmp_path_factory):
    return arcface_stand_in(tmp_path_factory.mktemp("arc"))


def their_face(face) -> SimpleNamespace:
    """insightface's view of one of our faces: the same five points as ``kps``."""
    return SimpleNamespace(kps=five_points(face).astype(np.float32))


@pytest.mark.parametrize("normalises_inside", [False, True])
def test_the_arcface_crop_and_embedding_match_insightface(tmp_path, faces, normalises_inside):
    """Both exports: the plain one and the MXNet-converted kind that scales its own input
    (insightface then feeds raw pixels, and so must facecast)."""
    path = arcface_stand_in(tmp_path, normalises_inside)
    theirs = ArcFaceONNX(model_file=str(path))
    ours = ArcFaceRecogniser(OnnxModel(path))
    assert (ours.mean, ours.std) == (theirs.input_mean, theirs.input_std)
    for name, (image, face) in faces.items():
        their_crop = face_align.norm_crop(image, landmark=their_face(face).kps, image_size=112)
        our_crop = ours.crop(image, face)
        assert np.abs(their_crop.astype(int) - our_crop.astype(int)).max() <= 1, name
        embedding = normalise(theirs.get(image, their_face(face)))
        assert np.abs(embedding - ours.embed(image, face)).max() < 1e-4, name


def test_the_inswapper_crop_latent_and_output_match_insightface(tmp_path, faces, arcface_path):
    rng = np.random.default_rng(5)
    decoy, emap = rng.normal(size=(512, 512)), rng.normal(size=(512, 512))
    recogniser = ArcFaceRecogniser(OnnxModel(arcface_path))
    source_image, source_face = faces["alex-lacamoire.png"]
    embedding = recogniser.embed(source_image, source_face)
    # the latent facecast feeds: a stand-in that paints a checkerboard unless fed exactly it
    plain = LearnedSwapper(
        OnnxModel(inswapper_model(tmp_path / "plain.onnx", emap, leading={"decoy": decoy})),
        recogniser,
    )
    latent = plain.prepare(source_image, source_face, embedding).value
    gated = inswapper_model(
        tmp_path / "inswapper_128.onnx",
        emap,
        leading={"decoy": decoy},
        expected_latent=latent,
        gain=50.0,
    )
    theirs = INSwapper(model_file=str(gated))
    ours = LearnedSwapper(OnnxModel(gated), recogniser)
    source = SimpleNamespace(normed_embedding=embedding.astype(np.float32))
    for name in ("obama.jpg", "two_people.jpg"):
        image, face = faces[name]
        their_out, their_matrix = theirs.get(image, their_face(face), source, paste_back=False)
        our_crop, our_matrix = align_crop(image, five_points(face), arcface_template(128), 128)
        assert np.abs(their_matrix - our_matrix).max() < 1e-3, name
        our_out = ours.redraw(our_crop, latent)
        # same crop and same latent: the identity body comes back from both, no pattern.
        # 2 LSB: the crops may differ by 1 (interpolation rounding), and insightface
        # truncates the model's output to uint8 where facecast rounds it
        assert np.abs(their_out.astype(int) - our_out.astype(int)).max() <= 2, name
        assert np.abs(our_out.astype(int) - our_crop.astype(int)).max() <= 1, name


def test_scrfd_boxes_and_keypoints_match_insightface(tmp_path):
    """The same raw outputs (two faces and a weaker duplicate among random anchors) decoded
    by both: anchors, strides, distances and keypoint order agree. Within 2 px: for a
    letterboxed image insightface scales both axes back by one factor (from the rounded
    height), facecast each axis by its own (the model saw the image resized to both
    rounded sides); over this 1126x661 photo that differs by up to 1.3 px."""
    image = load(PHOTO)
    outputs = dict(scrfd_outputs(image, (640, 640), False))
    path = constant_model(tmp_path / "det_10g.onnx", {"input.1": [1, 3, 640, 640]}, outputs)
    ours = ScrfdDetector(OnnxModel(path)).detect(image)
    theirs = SCRFD(model_file=str(path))
    theirs.prepare(-1, input_size=(640, 640))
    boxes, keypoints = theirs.detect(image, input_size=(640, 640))
    assert len(ours) == len(boxes) == 2  # the duplicate suppressed by both
    for face, box, points in zip(ours, boxes, keypoints, strict=True):
        assert face.score == pytest.approx(float(box[4]), abs=1e-5)
        assert np.abs(face.box - box[:4]).max() < 2.0
        assert np.abs(face.points5 - points).max() < 2.0
