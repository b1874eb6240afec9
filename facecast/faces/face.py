"""The one thing the face stages pass on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# BlazeFace keypoint order. "Right"/"left" are the subject's: the right eye is on the image's left.
RIGHT_EYE, LEFT_EYE, NOSE_TIP, MOUTH, RIGHT_EAR, LEFT_EAR = range(6)


@dataclass
class Face:
    """A face found in one image.

    ``box`` is (x0, y0, x1, y1) in image pixels; ``keypoints`` the detector's six points
    (x, y); ``mesh`` the 468 face-mesh points (x, y in image pixels, z in the same scale,
    smaller z nearer the camera) once the landmark stage ran; ``embedding`` the 128-D dlib
    descriptor once computed (only for sources and new tracks: it costs ~100 ms); ``points5``
    a detector's own five alignment points, when it gives them.
    """

    box: np.ndarray
    score: float
    keypoints: np.ndarray
    mesh: np.ndarray | None = None
    mesh_score: float = 0.0
    embedding: np.ndarray | None = None
    track_id: int | None = None
    # five alignment points (eyes, nose tip, mouth corners; image order) from detectors
    # that give them (SCRFD, RetinaFace, YOLO-face); see faces/align.py
    points5: np.ndarray | None = None

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> np.ndarray:
        return np.array([(self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2])
