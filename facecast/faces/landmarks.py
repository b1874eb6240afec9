"""The 468-point face mesh (MediaPipe's face_landmark.tflite) on a rotated face ROI.

The model wants an upright face filling a 192x192 crop. The ROI comes either from a
detection (box, rotated so the eyes are level, enlarged 1.5x) or from the previous frame's
mesh, which lets a tracker skip detection; the crop is one affine warp and the 468 points
map back through its inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from facecast.faces.align import square_crop
from facecast.faces.face import LEFT_EYE, RIGHT_EYE, Face
from facecast.faces.litert import TFLiteModel
from facecast.models.registry import model_path

# Mesh indices of the outer eye corners (subject's right, subject's left): the rotation
# reference when the ROI is built from a previous mesh.
MESH_RIGHT_EYE_CORNER, MESH_LEFT_EYE_CORNER = 33, 263
ROI_SCALE = 1.5


@dataclass(frozen=True)
class Roi:
    """A rotated square in image pixels: centre, side and rotation (radians)."""

    cx: float
    cy: float
    size: float
    angle: float

    def to_crop(self, crop: int) -> np.ndarray:
        """2x3 affine taking image pixels into the crop x crop model input."""
        scale = crop / self.size
        c, s = np.cos(self.angle) * scale, np.sin(self.angle) * scale
        # rotate by -angle around the ROI centre so the face becomes upright
        return np.array(
            [
                [c, s, crop / 2 - c * self.cx - s * self.cy],
                [-s, c, crop / 2 + s * self.cx - c * self.cy],
            ],
            dtype=np.float64,
        )


def eye_angle(right_eye: np.ndarray, left_eye: np.ndarray) -> float:
    """Roll of the face: 0 when the subject's right eye is level left of the left eye."""
    return float(np.arctan2(left_eye[1] - right_eye[1], left_eye[0] - right_eye[0]))


def roi_from_detection(face: Face) -> Roi:
    angle = eye_angle(face.keypoints[RIGHT_EYE], face.keypoints[LEFT_EYE])
    cx, cy = face.center
    size = max(face.width, face.height) * ROI_SCALE
    return Roi(float(cx), float(cy), float(size), angle)


def roi_from_mesh(mesh: np.ndarray) -> Roi:
    """The ROI the next frame's mesh runs on: the mesh's extent in its own upright frame."""
    angle = eye_angle(mesh[MESH_RIGHT_EYE_CORNER, :2], mesh[MESH_LEFT_EYE_CORNER, :2])
    c, s = np.cos(-angle), np.sin(-angle)
    upright = mesh[:, :2] @ np.array([[c, s], [-s, c]])
    lo, hi = upright.min(0), upright.max(0)
    centre_upright = (lo + hi) / 2
    cx, cy = centre_upright @ np.array([[c, -s], [s, c]])
    size = float(max(hi - lo)) * ROI_SCALE
    return Roi(float(cx), float(cy), size, angle)


class FaceMesh:
    """468 landmarks per face. ``mesh_score`` is the model's face-presence probability:
    below ``min_presence`` the ROI holds no face (a detector false positive, or a tracked
    face that left)."""

    input_size = 192

    def __init__(self, min_presence: float = 0.5) -> None:
        self.model = TFLiteModel(model_path("face_mesh"))
        self.min_presence = min_presence

    def run(self, image: np.ndarray, roi: Roi) -> tuple[np.ndarray, float]:
        """Mesh points (468, 3) in image pixels and the presence score for one ROI."""
        n = self.input_size
        to_crop = roi.to_crop(n)
        crop = square_crop(image, to_crop, n)
        tensor = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        raw, presence_logit = self.model.run(tensor)
        points = raw.reshape(-1, 3)
        back = cv2.invertAffineTransform(to_crop)
        xy = points[:, :2] @ back[:, :2].T + back[:, 2]
        z = points[:, 2:3] * (roi.size / n)
        presence = float(1.0 / (1.0 + np.exp(-np.clip(presence_logit.item(), -80, 80))))
        return np.hstack([xy, z]).astype(np.float32), presence

    def annotate(self, image: np.ndarray, faces: list[Face]) -> list[Face]:
        """Add a mesh to each detected face; drop those the mesh model says are not faces."""
        kept = []
        for face in faces:
            face.mesh, face.mesh_score = self.run(image, roi_from_detection(face))
            if face.mesh_score >= self.min_presence:
                kept.append(face)
        return kept
