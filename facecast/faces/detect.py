"""Face detection with the embedded BlazeFace models (short and full range).

BlazeFace is an SSD: the model returns, per anchor, a score logit and 16 regressed numbers
(box centre and size, then six keypoints), all relative to the anchor and in input pixels.
Decoding (anchors, sigmoid, weighted NMS) follows MediaPipe's published graph options,
written here over numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from facecast.faces.face import Face
from facecast.faces.litert import TFLiteModel
from facecast.models.registry import model_path

DetectorName = Literal["short", "full", "auto"]


@dataclass(frozen=True)
class AnchorSpec:
    input_size: int
    strides: tuple[int, ...]
    anchors_per_layer: int


# MediaPipe's SSD anchor options for the two models: short range has four layers (strides
# 8,16,16,16) with two anchors each; full range one 48x48 layer with one anchor per cell.
SHORT_RANGE = AnchorSpec(128, (8, 16, 16, 16), 2)
FULL_RANGE = AnchorSpec(192, (4,), 1)


def ssd_anchors(spec: AnchorSpec) -> np.ndarray:
    """Anchor centres (N, 2), normalised to [0, 1]; layers of equal stride share a grid."""
    centres: list[np.ndarray] = []
    i = 0
    while i < len(spec.strides):
        stride = spec.strides[i]
        same = 0
        while i < len(spec.strides) and spec.strides[i] == stride:
            same += 1
            i += 1
        cells = int(np.ceil(spec.input_size / stride))
        ys, xs = np.mgrid[0:cells, 0:cells]
        grid = np.stack([(xs + 0.5) / cells, (ys + 0.5) / cells], axis=-1).reshape(-1, 1, 2)
        centres.append(np.repeat(grid, same * spec.anchors_per_layer, axis=1).reshape(-1, 2))
    return np.concatenate(centres).astype(np.float32)


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Fit the image into a size x size square keeping its aspect; returns the square, the
    scale from image to square and the (x, y) padding, so boxes can be mapped back."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    # Halve with bilinear (an exact 2x2 average) until near the size, then INTER_AREA: the
    # same result as one INTER_AREA resize from 720p, at a fraction of its cost.
    while image.shape[1] >= 2 * nw and image.shape[0] >= 2 * nh:
        half = (image.shape[1] // 2, image.shape[0] // 2)
        image = cv2.resize(image, half, interpolation=cv2.INTER_LINEAR)
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    pad_x, pad_y = (size - nw) // 2, (size - nh) // 2
    square = cv2.copyMakeBorder(
        resized, pad_y, size - nh - pad_y, pad_x, size - nw - pad_x, cv2.BORDER_CONSTANT
    )
    return square, scale, (pad_x, pad_y)


def decode(
    raw_boxes: np.ndarray, raw_scores: np.ndarray, anchors: np.ndarray, input_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model outputs → boxes (N, 4: x0 y0 x1 y1), keypoints (N, 6, 2), scores (N,), all in
    normalised input coordinates."""
    logits = np.clip(raw_scores.reshape(-1).astype(np.float64), -80.0, 80.0)
    scores = 1.0 / (1.0 + np.exp(-logits))
    reg = raw_boxes.reshape(len(anchors), -1) / input_size
    cx, cy = reg[:, 0] + anchors[:, 0], reg[:, 1] + anchors[:, 1]
    w, h = reg[:, 2], reg[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    keypoints = reg[:, 4:16].reshape(-1, 6, 2) + anchors[:, None, :]
    return boxes, keypoints, scores


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def weighted_nms(
    boxes: np.ndarray,
    keypoints: np.ndarray,
    scores: np.ndarray,
    iou_threshold: float = 0.3,
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """MediaPipe's "weighted" suppression: each kept face is the score-weighted mean of the
    boxes it suppresses, which is steadier frame to frame than plain NMS."""
    order = np.argsort(-scores)
    boxes, keypoints, scores = boxes[order], keypoints[order], scores[order]
    remaining = np.ones(len(scores), dtype=bool)
    kept = []
    for i in range(len(scores)):
        if not remaining[i]:
            continue
        overlap = remaining & (iou(boxes[i], boxes) > iou_threshold)
        overlap[i] = True
        weights = scores[overlap][:, None]
        box = (boxes[overlap] * weights).sum(0) / weights.sum()
        kps = (keypoints[overlap] * weights[:, :, None]).sum(0) / weights.sum()
        kept.append((box, kps, float(scores[i])))
        remaining &= ~overlap
    return kept


class BlazeFaceDetector:
    """One BlazeFace model (short range: faces filling much of the frame, e.g. a webcam;
    full range: faces down to ~1/20 of the frame)."""

    def __init__(self, model: Literal["short", "full"] = "full", min_score: float = 0.5) -> None:
        self.spec = SHORT_RANGE if model == "short" else FULL_RANGE
        name = "blazeface_short" if model == "short" else "blazeface_full"
        self.model = TFLiteModel(model_path(name))
        self.anchors = ssd_anchors(self.spec)
        self.min_score = min_score

    def detect(self, image: np.ndarray) -> list[Face]:
        size = self.spec.input_size
        square, scale, (pad_x, pad_y) = letterbox(image, size)
        tensor = cv2.cvtColor(square, cv2.COLOR_BGR2RGB).astype(np.float32) / 127.5 - 1.0
        outputs = self.model.run(tensor)
        raw_boxes = next(o for o in outputs if o.shape[-1] == 16)
        raw_scores = next(o for o in outputs if o.shape[-1] == 1)
        boxes, keypoints, scores = decode(raw_boxes, raw_scores, self.anchors, size)
        keep = scores >= self.min_score
        faces = []
        offset = np.array([pad_x, pad_y], dtype=np.float32)
        for box, kps, score in weighted_nms(boxes[keep], keypoints[keep], scores[keep]):
            box_px = (box.reshape(2, 2) * size - offset) / scale
            kps_px = (kps * size - offset) / scale
            faces.append(Face(box=box_px.reshape(4), score=score, keypoints=kps_px))
        return faces


def square_tiles(width: int, height: int, overlap: float = 0.25) -> list[tuple[int, int, int]]:
    """Overlapping square tiles (x, y, side) covering a wide or tall image, so a small face
    is seen at a larger scale than in the whole-image letterbox."""
    side = min(width, height)
    long_side = max(width, height)
    if long_side <= side * 1.2:
        return []
    count = int(np.ceil((long_side - side) / (side * (1 - overlap)))) + 1
    starts = np.linspace(0, long_side - side, count).round().astype(int)
    if width >= height:
        return [(int(x), 0, side) for x in starts]
    return [(0, int(y), side) for y in starts]


class FaceDetector:
    """Detection as the pipeline uses it: BlazeFace full range on the whole frame, plus
    overlapping square tiles when asked (still images: the full-range letterbox of a wide
    group photo makes distant faces too small to find). Results from the whole image and
    the tiles are merged by the same weighted suppression."""

    def __init__(
        self, model: Literal["short", "full"] = "full", min_score: float = 0.5, tiles: bool = False
    ) -> None:
        self.blazeface = BlazeFaceDetector(model, min_score)
        self.tiles = tiles

    def detect(self, image: np.ndarray) -> list[Face]:
        faces = self.blazeface.detect(image)
        if not self.tiles:
            return faces
        h, w = image.shape[:2]
        for x, y, side in square_tiles(w, h):
            offset = np.array([x, y], dtype=np.float32)
            for face in self.blazeface.detect(image[y : y + side, x : x + side]):
                face.box = face.box + np.tile(offset, 2)
                face.keypoints = face.keypoints + offset
                faces.append(face)
        if not faces:
            return []
        merged = weighted_nms(
            np.stack([f.box for f in faces]),
            np.stack([f.keypoints for f in faces]),
            np.array([f.score for f in faces]),
        )
        return [Face(box=b, score=s, keypoints=k) for b, k, s in merged]
