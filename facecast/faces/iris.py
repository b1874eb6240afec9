"""Iris centres from MediaPipe's iris model: where each eye looks.

The 468-point mesh has no iris. MediaPipe's iris model (``iris_landmark.tflite``, the same
wheel as the mesh, registered in facecast/models/registry.py) is run the way MediaPipe's own iris
graph (``iris_landmark_left_and_right_from_face_landmarks_cpu.pbtxt``) runs it: a 64x64 crop
rotated along the eye corners, 2.3x the corners' extent, the subject's left eye mirrored (the
model only knows the right one). About 0.6 ms an eye on one CPU core.

The swapper uses it to put the source's iris where the target looks; the quality bench to
measure gaze on the output.
"""

from __future__ import annotations

from functools import cache

import cv2
import numpy as np

from facecast.faces.align import square_crop
from facecast.faces.expression import EYE_CORNERS, eye_frame
from facecast.faces.landmarks import Roi
from facecast.faces.litert import TFLiteModel
from facecast.models.registry import model_path

IRIS_INPUT = 64
IRIS_ROI_SCALE = 2.3  # MediaPipe's iris graph: the crop is 2.3x the corners' extent


@cache
def _iris_model() -> TFLiteModel:
    return TFLiteModel(model_path("iris_landmark"))


def _eye_crop(mesh: np.ndarray, corners: tuple[int, int], mirror: bool) -> np.ndarray:
    """2x3 affine from image pixels into the iris model's 64x64 input, as MediaPipe builds
    it: centred between the corners, rotated along them, square on their longer extent."""
    a, b = mesh[corners[0], :2].astype(np.float64), mesh[corners[1], :2].astype(np.float64)
    centre = (a + b) / 2
    size = IRIS_ROI_SCALE * max(float(np.max(np.abs(b - a))), 1.0)
    angle = float(np.arctan2(b[1] - a[1], b[0] - a[0]))
    to_crop = Roi(float(centre[0]), float(centre[1]), size, angle).to_crop(IRIS_INPUT)
    if mirror:
        to_crop = np.array([[-1.0, 0.0, IRIS_INPUT], [0.0, 1.0, 0.0]]) @ np.vstack(
            [to_crop, [0.0, 0.0, 1.0]]
        )
    return to_crop


def iris_centres(image: np.ndarray, mesh: np.ndarray) -> np.ndarray:
    """(2, 2) image positions of the iris centres: subject's right eye, then left."""
    model = _iris_model()
    centres = []
    for corners, mirror in zip(EYE_CORNERS, (False, True), strict=True):
        to_crop = _eye_crop(mesh, corners, mirror)
        crop = square_crop(image, to_crop, IRIS_INPUT)
        tensor = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        iris = next(o for o in model.run(tensor) if o.size == 15).reshape(5, 3)
        back = cv2.invertAffineTransform(to_crop)
        centres.append(back[:, :2] @ iris[0, :2] + back[:, 2])  # point 0 is the centre
    return np.array(centres, dtype=np.float64)


def gaze_in_eyes(points: np.ndarray, irises: np.ndarray) -> np.ndarray:
    """(2, 2): each iris centre's offset from its eye's corner midpoint, in eye widths, along
    the eye (x, towards the image's right) and across it (y, downwards)."""
    out = np.empty((2, 2))
    for k, corners in enumerate(EYE_CORNERS):
        origin, along, across, width = eye_frame(points[corners[0]], points[corners[1]])
        offset = irises[k] - origin
        out[k] = (offset @ along / width, offset @ across / width)
    return out


def irises_at(points: np.ndarray, gaze: np.ndarray) -> np.ndarray:
    """The inverse of ``gaze_in_eyes``: where irises with this gaze sit in eyes at ``points``
    (another face's mesh, or the same face reshaped)."""
    out = np.empty((2, 2))
    for k, corners in enumerate(EYE_CORNERS):
        origin, along, across, width = eye_frame(points[corners[0]], points[corners[1]])
        out[k] = origin + width * (gaze[k, 0] * along + gaze[k, 1] * across)
    return out


class GazeReader:
    """Iris centres for a stream of frames at half the model's cost: a tracked face's iris is
    read on every other frame and, on the frames between, its last gaze (relative to the eye
    corners, so it follows the head) is placed in the new mesh. Half a frame of lag on the
    eyes at most; an untracked face (a still photo) is read every time."""

    MAX_TRACKS = 64  # tracks that ended right after a read leave an entry; this bounds them

    def __init__(self) -> None:
        self._held: dict[int, np.ndarray] = {}  # track id -> gaze read on its last frame

    def irises(self, image: np.ndarray, mesh: np.ndarray, track_id: int | None) -> np.ndarray:
        if track_id is not None and track_id in self._held:
            return irises_at(mesh, self._held.pop(track_id))
        irises = iris_centres(image, mesh)
        if track_id is not None:
            if len(self._held) >= self.MAX_TRACKS:
                self._held.pop(next(iter(self._held)))
            self._held[track_id] = gaze_in_eyes(mesh, irises)
        return irises
