"""The SCRFD, RetinaFace and YOLO-face adapters on stand-in graphs.

Each stand-in returns fixed raw outputs that encode two faces placed at chosen positions on a
real (non-square) photo. The raw values are computed here by inverting each family's
published decoding (insightface's distance2bbox/distance2kps, Pytorch_Retinaface's prior
boxes and variances, YOLOv8's centre-size boxes), through the letterbox convention the
adapters document (fit, keep aspect, top-left corner), so a wrong anchor layout, stride,
variance, output order or mapping back shows as a misplaced face.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from facecast.faces.detect_onnx import (
    RetinaFaceDetector,
    ScrfdDetector,
    YoloFaceDetector,
    detector_for,
    retinaface_priors,
    scrfd_anchor_centres,
)
from facecast.faces.face import LEFT_EAR, LEFT_EYE, MOUTH, NOSE_TIP, RIGHT_EAR, RIGHT_EYE, Face
from facecast.models.runtime import ModelFileError, OnnxModel
from tests.conftest import load
from tests.onnx_helpers import constant_model, identity_model, save_model

PHOTO = "two_people.jpg"  # 1126 x 661: the letterbox pads the bottom

# Two faces in image pixels (box; eye on the image's left, other eye, nose, mouth corners),
# each with the score the model gives it.
FACES = [
    (
        np.array([210.0, 140.0, 395.5, 372.25]),
        np.array([[262.5, 228.0], [341.0, 224.5], [301.25, 270.0], [270.0, 318.5], [333.75, 315]]),
        0.92,
    ),
    (
        np.array([705.0, 101.5, 833.0, 262.0]),
        np.array([[741.0, 160.5], [796.5, 163.0], [769.0, 195.0], [748.5, 226.0], [792.0, 228.5]]),
        0.81,
    ),
]
DUPLICATE_SHIFT = 4.0  # input pixels: a second, weaker detection of the first face


def fit_scale(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The letterbox's (x, y) scale: the long side fills, the short one is rounded."""
    h, w = image.shape[:2]
    s = min(width / w, height / h)
    return np.array([round(w * s) / w, round(h * s) / h])


def to_input(image: np.ndarray, size: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray]]:
    scale = fit_scale(image, *size)
    return [(box * np.tile(scale, 2), points * scale) for box, points, _ in FACES]


def check_faces(faces: list[Face]) -> None:
    assert len(faces) == len(FACES)
    for face, (box, points, score) in zip(faces, FACES, strict=True):  # best score first
        assert face.score == pytest.approx(score, abs=1e-5)
        np.testing.assert_allclose(face.box, box, atol=0.5)
        np.testing.assert_allclose(face.points5, points, atol=0.5)
        k = face.keypoints
        np.testing.assert_allclose(k[RIGHT_EYE], points[0], atol=0.5)  # image left eye
        np.testing.assert_allclose(k[LEFT_EYE], points[1], atol=0.5)
        np.testing.assert_allclose(k[NOSE_TIP], points[2], atol=0.5)
        np.testing.assert_allclose(k[MOUTH], (points[3] + points[4]) / 2, atol=0.5)
        across = points[1] - points[0]
        np.testing.assert_allclose(k[RIGHT_EAR], points[0] - 0.6 * across, atol=0.5)
        np.testing.assert_allclose(k[LEFT_EAR], points[1] + 0.6 * across, atol=0.5)
        assert k[RIGHT_EAR, 0] < k[RIGHT_EYE, 0] < k[LEFT_EYE, 0] < k[LEFT_EAR, 0]
        assert face.points5[0, 0] < face.points5[1, 0] and face.points5[3, 0] < face.points5[4, 0]


# -- SCRFD


def scrfd_outputs(
    image: np.ndarray, size: tuple[int, int], batched: bool
) -> list[tuple[str, np.ndarray]]:
    width, height = size
    rng = np.random.default_rng(1)
    strides = (8, 16, 32)
    cells = [(width // s) * (height // s) * 2 for s in strides]
    scores = [rng.uniform(0.0, 0.45, (n, 1)) for n in cells]
    dists = [rng.uniform(0.5, 3.0, (n, 4)) for n in cells]
    kps = [rng.uniform(-2.0, 2.0, (n, 10)) for n in cells]

    def place(level: int, anchor: int, box: np.ndarray, points: np.ndarray, score: float) -> None:
        stride = strides[level]
        gx, gy = round((box[0] + box[2]) / 2 / stride), round((box[1] + box[3]) / 2 / stride)
        row = (gy * (width // stride) + gx) * 2 + anchor
        centre = np.array([gx * stride, gy * stride], dtype=np.float64)
        scores[level][row] = score
        dists[level][row] = np.concatenate([centre - box[:2], box[2:] - centre]) / stride
        kps[level][row] = ((points - centre) / stride).reshape(-1)

    (box_a, points_a), (box_b, points_b) = to_input(image, size)
    place(1, 0, box_a, points_a, FACES[0][2])
    place(1, 1, box_a + DUPLICATE_SHIFT, points_a + DUPLICATE_SHIFT, 0.7)
    place(0, 1, box_b, points_b, FACES[1][2])
    arrays = [*scores, *dists, *kps]  # insightface's order: scores, boxes, keypoints
    if batched:
        arrays = [a[None] for a in arrays]
    return [(f"out{i}", a) for i, a in enumerate(arrays)]


@pytest.mark.parametrize(
    ("input_shape", "size", "batched"),
    [
        ([1, 3, 640, 640], (640, 640), False),
        ([1, 3, "?", "?"], (640, 640), True),  # det_10g style dynamic input: 640 x 640
        ([1, 3, 480, 640], (640, 480), False),  # a fixed non-square input
    ],
)
def test_scrfd_finds_the_two_faces(tmp_path: Path, input_shape, size, batched) -> None:
    image = load(PHOTO)
    outputs = dict(scrfd_outputs(image, size, batched))
    path = constant_model(tmp_path / "det_10g.onnx", {"input.1": input_shape}, outputs)
    detector = detector_for(OnnxModel(path))
    assert isinstance(detector, ScrfdDetector)
    assert (detector.width, detector.height) == size
    check_faces(detector.detect(image))


def test_scrfd_anchor_grid() -> None:
    counts = [len(scrfd_anchor_centres(640, 640, s)) for s in (8, 16, 32)]
    assert counts == [12800, 3200, 800]
    centres = scrfd_anchor_centres(640, 640, 8)
    x, y = 5, 3
    for anchor in (0, 1):
        np.testing.assert_array_equal(centres[(y * 80 + x) * 2 + anchor], [x * 8, y * 8])
    assert len(scrfd_anchor_centres(640, 480, 32)) == 20 * 15 * 2


# -- RetinaFace


def retinaface_outputs(image: np.ndarray, size: tuple[int, int]) -> dict[str, np.ndarray]:
    width, height = size
    steps, min_sizes = (8, 16, 32), ((16, 32), (64, 128), (256, 512))
    blocks = [math.ceil(height / s) * math.ceil(width / s) * 2 for s in steps]
    total = sum(blocks)
    rng = np.random.default_rng(2)
    face = rng.uniform(0.0, 0.45, total)
    loc = rng.uniform(-1.0, 1.0, (total, 4))
    landms = rng.uniform(-1.0, 1.0, (total, 10))
    dims = np.array([width, height], dtype=np.float64)

    def place(level: int, k: int, box: np.ndarray, points: np.ndarray, score: float) -> None:
        step, cols = steps[level], math.ceil(width / steps[level])
        centre = (box[:2] + box[2:]) / 2
        gx, gy = int(centre[0] // step), int(centre[1] // step)
        row = sum(blocks[:level]) + (gy * cols + gx) * 2 + k
        prior_c = np.array([(gx + 0.5) * step, (gy + 0.5) * step]) / dims
        prior_wh = min_sizes[level][k] / dims
        face[row] = score
        loc[row, :2] = (centre / dims - prior_c) / (0.1 * prior_wh)
        loc[row, 2:] = np.log((box[2:] - box[:2]) / dims / prior_wh) / 0.2
        landms[row] = ((points / dims - prior_c) / (0.1 * prior_wh)).reshape(-1)

    (box_a, points_a), (box_b, points_b) = to_input(image, size)
    place(1, 1, box_a, points_a, FACES[0][2])  # 128-pixel prior
    place(1, 0, box_a + DUPLICATE_SHIFT, points_a + DUPLICATE_SHIFT, 0.7)
    place(1, 0, box_b, points_b, FACES[1][2])  # 64-pixel prior
    conf = np.stack([1.0 - face, face], axis=1)
    return {"loc": loc[None], "conf": conf[None], "landms": landms[None]}


def test_retinaface_finds_the_two_faces(tmp_path: Path) -> None:
    image = load(PHOTO)
    outputs = retinaface_outputs(image, (640, 640))
    path = constant_model(tmp_path / "retinaface.onnx", {"input": [1, 3, 640, 640]}, outputs)
    detector = detector_for(OnnxModel(path))
    assert isinstance(detector, RetinaFaceDetector)
    check_faces(detector.detect(image))


def test_retinaface_priors() -> None:
    priors = retinaface_priors(640, 640)
    assert priors.shape == (16800, 4)
    # stride 16 block starts after 80*80*2; cell (x=7, y=2), second min size (128)
    np.testing.assert_allclose(
        priors[12800 + (2 * 40 + 7) * 2 + 1], [7.5 * 16 / 640, 2.5 * 16 / 640, 0.2, 0.2]
    )


# -- YOLO-face


def yolo_outputs(image: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    n = 80 * 80 + 40 * 40 + 20 * 20
    rows = np.zeros((20, n))
    rows[0:2] = rng.uniform(0, 640, (2, n))
    rows[2:4] = rng.uniform(5, 80, (2, n))
    rows[4] = rng.uniform(0.0, 0.45, n)
    rows[5:] = rng.uniform(0, 640, (15, n))

    def place(column: int, box: np.ndarray, points: np.ndarray, score: float) -> None:
        rows[0:2, column] = (box[:2] + box[2:]) / 2
        rows[2:4, column] = box[2:] - box[:2]
        rows[4, column] = score
        rows[5:, column] = np.concatenate([points, np.full((5, 1), 0.9)], axis=1).reshape(-1)

    (box_a, points_a), (box_b, points_b) = to_input(image, (640, 640))
    place(1234, box_a, points_a, FACES[0][2])
    place(1235, box_a + DUPLICATE_SHIFT, points_a + DUPLICATE_SHIFT, 0.7)
    place(7000, box_b, points_b, FACES[1][2])
    return {"output0": rows[None]}


def test_yoloface_finds_the_two_faces(tmp_path: Path) -> None:
    image = load(PHOTO)
    path = constant_model(
        tmp_path / "yoloface_8n.onnx", {"images": [1, 3, 640, 640]}, yolo_outputs(image)
    )
    detector = detector_for(OnnxModel(path))
    assert isinstance(detector, YoloFaceDetector)
    check_faces(detector.detect(image))


# -- preprocessing: the tensor each family is fed


class Recording(OnnxModel):
    """Keeps the last feeds, so the test sees exactly what the adapter gave onnxruntime."""

    def run(self, feeds, outputs=None):
        self.fed = dict(feeds)
        return super().run(feeds, outputs)


def test_each_family_gets_its_own_normalisation(tmp_path: Path) -> None:
    import cv2

    image = load(PHOTO)
    h, w = image.shape[:2]
    nw, nh = (fit_scale(image, 640, 640) * [w, h]).round().astype(int)
    # any reasonable resampling is fine: compare with bilinear, allowing a few grey levels
    resized = cv2.resize(image, (int(nw), int(nh)), interpolation=cv2.INTER_LINEAR)
    b, g, r = (resized[..., c].astype(np.float64) for c in range(3))
    cases = [
        (
            "det.onnx",
            "input.1",
            dict(scrfd_outputs(image, (640, 640), False)),
            [(r - 127.5) / 128, (g - 127.5) / 128, (b - 127.5) / 128],
            [-127.5 / 128] * 3,
            1 / 128,
        ),
        (
            "retina.onnx",
            "input",
            retinaface_outputs(image, (640, 640)),
            [b - 104, g - 117, r - 123],
            [-104, -117, -123],
            1.0,
        ),
        (
            "yolo.onnx",
            "images",
            yolo_outputs(image),
            [r / 255, g / 255, b / 255],
            [0, 0, 0],
            1 / 255,
        ),
    ]
    for name, input_name, outputs, channels, pad, unit in cases:
        path = constant_model(tmp_path / name, {input_name: [1, 3, 640, 640]}, outputs)
        model = Recording(path)
        detector_for(model).detect(image)
        tensor = model.fed[input_name]
        assert tensor.shape == (1, 3, 640, 640) and tensor.dtype == np.float32
        for c in range(3):
            plane = tensor[0, c]
            assert np.abs(plane[:nh, :nw] - channels[c]).mean() < 3 * unit, (name, c)
            np.testing.assert_allclose(plane[nh:], pad[c], atol=1e-6)  # bottom padding
            np.testing.assert_allclose(plane[:, nw:], pad[c], atol=1e-6)  # none on the right
        # the channel order matters: the swapped order is far off on this photo
        assert np.abs(tensor[0, 0, :nh, :nw] - channels[2]).mean() > 10 * unit


# -- choosing by signature


def test_detector_for_picks_by_signature(tmp_path: Path) -> None:
    from onnx import helper, numpy_helper

    # SCRFD with symbolic output shapes, as det_10g declares them
    names = [f"o{i}" for i in range(9)]
    nodes = [
        helper.make_node(
            "Constant", [], [n], value=numpy_helper.from_array(np.zeros((2, d), np.float32))
        )
        for n, d in zip(names, [1, 1, 1, 4, 4, 4, 10, 10, 10], strict=True)
    ]
    outputs = {n: ["?", d] for n, d in zip(names, [1, 1, 1, 4, 4, 4, 10, 10, 10], strict=True)}
    path = save_model(tmp_path / "det_2.5g.onnx", nodes, {"input.1": [1, 3, "?", "?"]}, outputs)
    detector = detector_for(OnnxModel(path), min_score=0.6, nms_iou=0.3)
    assert isinstance(detector, ScrfdDetector)
    assert (detector.min_score, detector.nms_iou) == (0.6, 0.3)

    small = {
        "loc": np.zeros((1, 5, 4)),
        "conf": np.zeros((1, 5, 2)),
        "landms": np.zeros((1, 5, 10)),
    }
    path = constant_model(tmp_path / "r.onnx", {"input": [1, 3, 640, 640]}, small)
    assert isinstance(detector_for(OnnxModel(path)), RetinaFaceDetector)
    path = constant_model(
        tmp_path / "y.onnx", {"images": [1, 3, 640, 640]}, {"output0": np.zeros((1, 20, 8))}
    )
    assert isinstance(detector_for(OnnxModel(path)), YoloFaceDetector)


def test_detector_for_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    six = {f"o{i}": np.zeros((8, d)) for i, d in enumerate([1, 1, 1, 4, 4, 4])}
    path = constant_model(
        tmp_path / "scrfd_500m_bnkps_nokps.onnx", {"input.1": [1, 3, 64, 64]}, six
    )
    with pytest.raises(ModelFileError, match=r"scrfd_500m_bnkps_nokps\.onnx.*no keypoint"):
        detector_for(OnnxModel(path))
    with pytest.raises(ModelFileError, match="no keypoint"):
        ScrfdDetector(OnnxModel(path))

    path = identity_model(tmp_path / "arcface.onnx", "data", "fc1", [1, 3, 112, 112])
    with pytest.raises(ModelFileError) as refused:
        detector_for(OnnxModel(path))
    message = str(refused.value)
    for part in ("arcface.onnx", "SCRFD", "RetinaFace", "YOLO-face", "fc1 [1, 3, 112, 112]"):
        assert part in message
