"""Detection and mesh together: the face analysis every frame goes through."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from facecast.engine.timing import StageClock
from facecast.faces.detect import FaceDetector
from facecast.faces.face import Face
from facecast.faces.landmarks import FaceMesh, roi_from_mesh


def box_from_mesh(mesh: np.ndarray) -> np.ndarray:
    return np.array([*mesh[:, :2].min(0), *mesh[:, :2].max(0)], dtype=np.float32)


class Detector(Protocol):
    def detect(self, image: np.ndarray) -> list[Face]: ...


class FaceAnalyser:
    """Faces with meshes, largest first.

    ``tiles`` trades time for small faces (photos). With ``detect_every`` > 1 (video), the
    detector runs only every N-th frame: in between, each face's mesh runs on the ROI of its
    previous mesh, and a face whose presence score drops (it left, or the scene cut) makes
    the next frame detect again. Not thread-safe: one analyser per stream.
    """

    def __init__(
        self,
        tiles: bool = False,
        min_score: float = 0.5,
        detect_every: int = 1,
        detector: Detector | None = None,
    ) -> None:
        # a user's ONNX detector (faces/detect_onnx.py) sees whole frames: no tiling
        self.detector = detector or FaceDetector("full", min_score=min_score, tiles=tiles)
        self.mesh = FaceMesh()
        self.detect_every = max(1, detect_every)
        self._previous: list[Face] = []
        self._since_detection = 0

    def reset(self) -> None:
        """Forget the faces of earlier frames (a new stream or a seek)."""
        self._previous = []

    def analyse(self, image: np.ndarray, clock: StageClock | None = None) -> list[Face]:
        clock = clock or StageClock()
        faces = self._follow(image, clock) if self._due_for_tracking() else None
        if faces is None:
            with clock.stage("detect"):
                detections = self.detector.detect(image)
            with clock.stage("mesh"):
                faces = self.mesh.annotate(image, detections)
            self._since_detection = 0
        self._since_detection += 1
        faces.sort(key=lambda f: -f.area)
        self._previous = faces if self.detect_every > 1 else []
        return faces

    def _due_for_tracking(self) -> bool:
        return bool(self._previous) and self._since_detection < self.detect_every

    def _follow(self, image: np.ndarray, clock: StageClock) -> list[Face] | None:
        """Meshes on the previous faces' ROIs, or None when any face was lost."""
        followed = []
        with clock.stage("mesh"):
            for prev in self._previous:
                assert prev.mesh is not None
                mesh, presence = self.mesh.run(image, roi_from_mesh(prev.mesh))
                if presence < self.mesh.min_presence:
                    return None
                followed.append(
                    Face(
                        box=box_from_mesh(mesh),
                        score=prev.score,
                        keypoints=prev.keypoints,
                        mesh=mesh,
                        mesh_score=presence,
                    )
                )
        return followed
