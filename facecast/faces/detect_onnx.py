"""Face detection with user-supplied ONNX detectors: SCRFD, RetinaFace and YOLO-face.

Each adapter has BlazeFace's interface (``detect(image BGR uint8) -> list[Face]``), so the
analyser and the mesh stage run on its faces unchanged. The three families share the
frame handling: the image is fitted into the model's input keeping its aspect and placed at
the top-left corner on black (insightface's and FaceFusion's convention), the raw outputs are
decoded to input pixels, thresholded, plainly suppressed (highest score wins, as insightface
does), and mapped back to the image.

The detectors give five points (two eyes, nose tip, two mouth corners). They are kept in the
model's own order, which is the order of the alignment templates: for an upright face, the
eye on the image's left first. That is ``Face.points5``. BlazeFace's six keypoints, which the
mesh stage needs for its ROI rotation, are derived from them (see ``blazeface_keypoints``).

``detector_for(model)`` picks the adapter from the model's input/output signature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from facecast.faces.detect import iou
from facecast.faces.face import Face
from facecast.models.runtime import ModelFileError, OnnxModel, fixed_dim

Shape = Sequence[int | str | None]

DEFAULT_SIZE = (640, 640)  # (width, height) for models whose input size is dynamic
# How far the ear points sit outside the eyes, in eye distances along the eye line.
EAR_SPREAD = 0.6

SCRFD_STRIDES = (8, 16, 32)
SCRFD_ANCHORS = 2  # anchors per cell in the 9-output (3 strides, keypoints) SCRFD models
RETINA_MIN_SIZES = ((16, 32), (64, 128), (256, 512))
RETINA_STEPS = (8, 16, 32)
RETINA_VARIANCES = (0.1, 0.2)
RETINA_MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)
YOLO_ROWS = 20  # box (4), score (1), five keypoints as (x, y, visibility)


# -- shared geometry


def input_size(shape: Shape, default: tuple[int, int] = DEFAULT_SIZE) -> tuple[int, int]:
    """(width, height) of an NCHW image input; ``default`` when either side is dynamic."""
    height, width = fixed_dim(shape[2]), fixed_dim(shape[3])
    if height is None or width is None:
        return default
    return width, height


def letterbox_corner(image: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The image fitted into width x height, aspect kept, at the top-left corner on black.

    Returns the canvas and the (x, y) scale from image to canvas. The two scales are the
    resized image's true ones (they differ by the rounding of the short side), so mapping
    back is exact on both axes.
    """
    h, w = image.shape[:2]
    scale = min(width / w, height / h)
    nw, nh = min(width, max(1, round(w * scale))), min(height, max(1, round(h * scale)))
    shrinking = nw < w
    resized = cv2.resize(
        image, (nw, nh), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    )
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas[:nh, :nw] = resized
    return canvas, np.array([nw / w, nh / h], dtype=np.float64)


def plain_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Indices of the boxes kept, best first: each kept box removes those overlapping it by
    more than ``iou_threshold``."""
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    while len(order):
        best = int(order[0])
        kept.append(best)
        rest = order[1:]
        order = rest[iou(boxes[best], boxes[rest]) <= iou_threshold]
    return kept


def blazeface_keypoints(points5: np.ndarray) -> np.ndarray:
    """BlazeFace's six keypoints from five detector points (eye on the image's left, other
    eye, nose tip, mouth corners in the same order).

    The first eye is the subject's right (BlazeFace's RIGHT_EYE); MOUTH is the midpoint of
    the corners; each ear is its eye pushed outwards along the eye line by ``EAR_SPREAD``
    eye distances: the detectors give no ear points, and only the eyes (the ROI's rotation)
    and the box matter downstream.
    """
    p = np.asarray(points5, dtype=np.float32)
    right_eye, left_eye = p[0], p[1]
    across = left_eye - right_eye
    return np.stack(
        [
            right_eye,
            left_eye,
            p[2],
            (p[3] + p[4]) / 2,
            right_eye - EAR_SPREAD * across,
            left_eye + EAR_SPREAD * across,
        ]
    ).astype(np.float32)


def drop_batch(array: np.ndarray) -> np.ndarray:
    """(1, N, C) -> (N, C); (N, C) unchanged."""
    return array[0] if array.ndim == 3 else array


def describe(model: OnnxModel) -> str:
    def fmt(items: list[tuple[str, list[int | str | None]]]) -> str:
        return ", ".join(f"{name} {list(shape)}" for name, shape in items)

    return f"inputs {fmt(model.inputs)}; outputs {fmt(model.outputs)}"


def is_image_input(shape: Shape) -> bool:
    return len(shape) == 4 and fixed_dim(shape[1]) in (3, None)


# -- the adapters


class OnnxFaceDetector:
    """What the three families share: the frame in, faces out. Subclasses say how the
    canvas becomes a tensor and how the outputs become boxes, points and scores."""

    family = "onnx"
    expected_outputs = "outputs"  # in words, for the error when ``outputs_fit`` says no

    @staticmethod
    def outputs_fit(outputs: list[tuple[str, list]]) -> bool:
        return True

    def __init__(self, model: OnnxModel, min_score: float = 0.5, nms_iou: float = 0.4) -> None:
        if not self.outputs_fit(model.outputs):
            raise ModelFileError(
                f"{model.path.name}: a {self.family} detector has {self.expected_outputs}; "
                f"this model has {describe(model)}"
            )
        self.model = model
        self.min_score = min_score
        self.nms_iou = nms_iou
        inputs = model.inputs
        if len(inputs) != 1 or not is_image_input(inputs[0][1]):
            raise ModelFileError(
                f"{model.path.name}: a {self.family} detector takes one NCHW image input "
                f"[1, 3, H, W]; this model has {describe(model)}"
            )
        self.input_name = inputs[0][0]
        self.width, self.height = input_size(inputs[0][1])

    def detect(self, image: np.ndarray) -> list[Face]:
        canvas, scale = letterbox_corner(image, self.width, self.height)
        outputs = self.model.run({self.input_name: self.prepare(canvas)})
        boxes, points, scores = self.decode([np.asarray(o, np.float32) for o in outputs])
        keep = scores >= self.min_score
        boxes, points, scores = boxes[keep], points[keep], scores[keep]
        faces = []
        for i in plain_nms(boxes, scores, self.nms_iou):
            points5 = (points[i] / scale).astype(np.float32)
            faces.append(
                Face(
                    box=(boxes[i] / np.tile(scale, 2)).astype(np.float32),
                    score=float(scores[i]),
                    keypoints=blazeface_keypoints(points5),
                    points5=points5,
                )
            )
        return faces

    def prepare(self, canvas: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def decode(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw outputs -> boxes (N, 4: x0 y0 x1 y1), points (N, 5, 2), scores (N,), in
        input pixels."""
        raise NotImplementedError

    def _bad_outputs(self, what: str) -> ModelFileError:
        return ModelFileError(
            f"{self.model.path.name}: {what}; expected a {self.family} detector "
            f"({describe(self.model)})"
        )


def scrfd_anchor_centres(
    width: int, height: int, stride: int, anchors: int = SCRFD_ANCHORS
) -> np.ndarray:
    """SCRFD's anchor centres (N, 2) for one stride: (x * stride, y * stride) over the grid,
    row by row, each repeated ``anchors`` times in a row."""
    ys, xs = np.mgrid[: height // stride, : width // stride]
    centres = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(centres, anchors, axis=0)


class ScrfdDetector(OnnxFaceDetector):
    """insightface's SCRFD (det_500m, det_2.5g, det_10g, scrfd_*_kps; FaceFusion's
    retinaface_10g is one too): nine outputs, scores/boxes/keypoints for strides 8, 16, 32,
    two anchors per cell, distances and offsets in stride units, scores already sigmoid.

    The outputs are matched to their role by their last dimension (1, 4, 10) and to their
    stride by their length, so a graph that lists them in another order still decodes.
    """

    family = "SCRFD"

    def __init__(self, model: OnnxModel, min_score: float = 0.5, nms_iou: float = 0.4) -> None:
        outputs = model.outputs
        if len(outputs) == 6:
            raise ModelFileError(
                f"{model.path.name}: this SCRFD model has no keypoint outputs (6 outputs: "
                "scores and boxes only); face swapping aligns faces on 5 keypoints, so use a "
                "keypoint model (det_500m, det_2.5g, det_10g or scrfd_*_kps: 9 outputs)"
            )
        if len(outputs) != 9:
            raise ModelFileError(
                f"{model.path.name}: an SCRFD detector has 9 outputs (scores, boxes and "
                f"keypoints for strides 8, 16, 32); this model has {describe(model)}"
            )
        super().__init__(model, min_score, nms_iou)
        self.centres = [scrfd_anchor_centres(self.width, self.height, s) for s in SCRFD_STRIDES]

    def prepare(self, canvas: np.ndarray) -> np.ndarray:
        rgb = canvas[:, :, ::-1].astype(np.float32)
        return ((rgb - 127.5) / 128.0).transpose(2, 0, 1)[None].copy()

    def decode(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        arrays = [drop_batch(o) for o in outputs]
        by_role: dict[int, list[np.ndarray]] = {1: [], 4: [], 10: []}
        for array in arrays:
            if array.ndim != 2 or array.shape[1] not in by_role:
                raise self._bad_outputs(f"an output of shape {list(array.shape)}")
            by_role[array.shape[1]].append(array)
        boxes, points, scores = [], [], []
        for role in by_role.values():
            role.sort(key=len, reverse=True)  # stride 8 has the most anchors
        for k, (stride, centres) in enumerate(zip(SCRFD_STRIDES, self.centres, strict=True)):
            score, dist, offsets = by_role[1][k], by_role[4][k], by_role[10][k]
            if not len(score) == len(dist) == len(offsets) == len(centres):
                raise self._bad_outputs(
                    f"stride {stride} outputs have {len(score)}/{len(dist)}/{len(offsets)} "
                    f"rows where a {self.width}x{self.height} input gives {len(centres)}"
                )
            dist = dist * stride
            boxes.append(np.concatenate([centres - dist[:, :2], centres + dist[:, 2:]], axis=1))
            points.append(centres[:, None, :] + offsets.reshape(-1, 5, 2) * stride)
            scores.append(score[:, 0])
        return np.concatenate(boxes), np.concatenate(points), np.concatenate(scores)


def retinaface_priors(width: int, height: int) -> np.ndarray:
    """Pytorch_Retinaface's prior boxes (N, 4: cx, cy, w, h), normalised to the input: per
    step, cell by cell row by row, one prior per min size; not clipped."""
    priors = []
    for step, sizes in zip(RETINA_STEPS, RETINA_MIN_SIZES, strict=True):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        ys, xs = np.mgrid[:rows, :cols]
        centres = np.stack([(xs + 0.5) * step / width, (ys + 0.5) * step / height], axis=-1)
        centres = np.repeat(centres.reshape(-1, 2), len(sizes), axis=0)
        wh = np.tile([[s / width, s / height] for s in sizes], (rows * cols, 1))
        priors.append(np.concatenate([centres, wh], axis=1))
    return np.concatenate(priors).astype(np.float32)


class RetinaFaceDetector(OnnxFaceDetector):
    """biubug6's Pytorch_Retinaface (mobilenet0.25, resnet50) as exported to ONNX: outputs
    loc [1, N, 4], conf [1, N, 2] (softmax applied; column 1 is the face), landms
    [1, N, 10], matched by their last dimension; BGR minus the mean as input."""

    family = "RetinaFace"
    expected_outputs = "3 outputs, loc [1, N, 4], conf [1, N, 2] and landms [1, N, 10]"

    @staticmethod
    def outputs_fit(outputs: list[tuple[str, list]]) -> bool:
        return retinaface_signature(outputs)  # defined below, with the other signatures

    def __init__(self, model: OnnxModel, min_score: float = 0.5, nms_iou: float = 0.4) -> None:
        super().__init__(model, min_score, nms_iou)
        self.priors = retinaface_priors(self.width, self.height)

    def prepare(self, canvas: np.ndarray) -> np.ndarray:
        return (canvas.astype(np.float32) - RETINA_MEAN_BGR).transpose(2, 0, 1)[None].copy()

    def decode(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        by_width = {drop_batch(o).shape[-1]: drop_batch(o) for o in outputs}
        if sorted(by_width) != [2, 4, 10]:
            raise self._bad_outputs(f"outputs of widths {sorted(by_width)}")
        loc, conf, landms = by_width[4], by_width[2], by_width[10]
        if not len(loc) == len(conf) == len(landms) == len(self.priors):
            raise self._bad_outputs(
                f"{len(loc)} rows where a {self.width}x{self.height} input gives "
                f"{len(self.priors)} priors"
            )
        centre, wh = self.priors[:, :2], self.priors[:, 2:]
        near, far = RETINA_VARIANCES
        box_centre = centre + loc[:, :2] * near * wh
        box_wh = wh * np.exp(loc[:, 2:] * far)
        size = np.array([self.width, self.height], dtype=np.float32)
        boxes = np.concatenate([box_centre - box_wh / 2, box_centre + box_wh / 2], axis=1)
        points = centre[:, None, :] + landms.reshape(-1, 5, 2) * near * wh[:, None, :]
        return boxes * np.tile(size, 2), points * size, conf[:, 1]


class YoloFaceDetector(OnnxFaceDetector):
    """yolov8n-face as FaceFusion ships it (yoloface_8n.onnx): input images [1, 3, 640, 640]
    RGB / 255; one output [1, 20, 8400]: box centre and size in input pixels, the score, then
    five (x, y, visibility) keypoints. A transposed [1, 8400, 20] export decodes as well."""

    family = "YOLO-face"
    expected_outputs = "one output [1, 20, N]"

    @staticmethod
    def outputs_fit(outputs: list[tuple[str, list]]) -> bool:
        return yolo_signature(outputs)  # defined below, with the other signatures

    def prepare(self, canvas: np.ndarray) -> np.ndarray:
        rgb = canvas[:, :, ::-1].astype(np.float32) / 255.0
        return rgb.transpose(2, 0, 1)[None].copy()

    def decode(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = drop_batch(outputs[0])
        if rows.ndim != 2 or YOLO_ROWS not in rows.shape:
            raise self._bad_outputs(f"an output of shape {list(outputs[0].shape)}")
        if rows.shape[0] == YOLO_ROWS:
            rows = rows.T  # (N, 20): one candidate per row
        cx, cy, w, h = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        points = rows[:, 5:20].reshape(-1, 5, 3)[:, :, :2]
        return boxes, points, rows[:, 4]


# -- choosing by signature


def _last_dims(outputs: list[tuple[str, list[int | str | None]]]) -> list[int | None]:
    return [fixed_dim(shape[-1]) if shape else None for _, shape in outputs]


def retinaface_signature(outputs: list[tuple[str, list[int | str | None]]]) -> bool:
    return len(outputs) == 3 and sorted(d or 0 for d in _last_dims(outputs)) == [2, 4, 10]


def yolo_signature(outputs: list[tuple[str, list[int | str | None]]]) -> bool:
    if len(outputs) != 1:
        return False
    shape = outputs[0][1]
    return len(shape) == 3 and YOLO_ROWS in (fixed_dim(shape[1]), fixed_dim(shape[2]))


def scrfd_signature(
    outputs: list[tuple[str, list[int | str | None]]], keypoints: bool = True
) -> bool:
    """Three outputs per role (scores, boxes, and keypoints when asked) whose known last
    dimensions are 1, 4 and 10: nine outputs, or six for the models without keypoints."""
    roles = (1, 4, 10) if keypoints else (1, 4)
    if len(outputs) != 3 * len(roles):
        return False
    known = [d for d in _last_dims(outputs) if d is not None]
    return set(known) <= set(roles) and all(known.count(d) <= 3 for d in roles)


def detector_for(
    model: OnnxModel, min_score: float = 0.5, nms_iou: float = 0.4, family: str | None = None
) -> OnnxFaceDetector:
    """The adapter for a detector model: by ``family`` when the models folder already
    identified the file (by its sha256 or signature, see models/user.py), else chosen here by
    its input/output signature."""
    adapters = {
        "scrfd": ScrfdDetector,
        "retinaface": RetinaFaceDetector,
        "yoloface": YoloFaceDetector,
    }
    if family in adapters:
        return adapters[family](model, min_score, nms_iou)
    inputs, outputs = model.inputs, model.outputs
    if len(inputs) == 1 and is_image_input(inputs[0][1]):
        if scrfd_signature(outputs) or scrfd_signature(outputs, keypoints=False):
            # six outputs: SCRFD without keypoints, which the constructor refuses by name
            return ScrfdDetector(model, min_score, nms_iou)
        if retinaface_signature(outputs):
            return RetinaFaceDetector(model, min_score, nms_iou)
        if yolo_signature(outputs):
            return YoloFaceDetector(model, min_score, nms_iou)
    raise ModelFileError(
        f"{model.path.name}: not a face detector facecast can run. Expected one NCHW image "
        "input [1, 3, H, W] and either SCRFD's 9 outputs (scores [N, 1], boxes [N, 4], "
        "keypoints [N, 10] for strides 8, 16, 32), RetinaFace's loc [1, N, 4], conf [1, N, 2] "
        f"and landms [1, N, 10], or YOLO-face's one output [1, 20, N]; this model has "
        f"{describe(model)}"
    )
