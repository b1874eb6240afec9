"""Detection and mesh together: the face analysis every frame goes through."""

from __future__ import annotations

import numpy as np

from facecast.faces.detect import FaceDetector
from facecast.faces.face import Face
from facecast.faces.landmarks import FaceMesh
from facecast.timing import StageClock


class FaceAnalyser:
    """Faces with meshes, largest first. ``tiles`` trades time for small faces (photos)."""

    def __init__(self, tiles: bool = False, min_score: float = 0.5) -> None:
        self.detector = FaceDetector("full", min_score=min_score, tiles=tiles)
        self.mesh = FaceMesh()

    def analyse(self, image: np.ndarray, clock: StageClock | None = None) -> list[Face]:
        clock = clock or StageClock()
        with clock.stage("detect"):
            faces = self.detector.detect(image)
        with clock.stage("mesh"):
            faces = self.mesh.annotate(image, faces)
        return sorted(faces, key=lambda f: -f.area)
