"""Identity: dlib's 5-point alignment and its 128-D ResNet descriptor.

Two photos of one person are nearer than 0.6 (Euclidean); the descriptor costs ~100 ms on
this class of CPU, so it runs once per source face and per new track, never per frame.
"""

from __future__ import annotations

import threading

import cv2
import dlib
import numpy as np

from facecast.faces.face import Face
from facecast.models.registry import model_path

SAME_PERSON_DISTANCE = 0.6


def face_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))


class FaceEmbedder:
    """The embedded recogniser (the ``faces.recognise.Recogniser`` protocol)."""

    # Reference mode and re-identification: stricter than dlib's 0.6, because a false match
    # swaps a bystander while a miss only waits for the next look (on our photos the same
    # person is 0.3-0.45 apart, different people 0.6 and up).
    same_person = 0.5

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        return face_distance(a, b)

    def __init__(self) -> None:
        self.shape_predictor = dlib.shape_predictor(str(model_path("dlib_shape5")))
        self.recogniser = dlib.face_recognition_model_v1(str(model_path("dlib_resnet")))
        self._lock = threading.Lock()  # dlib's net keeps per-call buffers

    def align5(self, image: np.ndarray, box: np.ndarray) -> dlib.full_object_detection:
        rgb = np.ascontiguousarray(image[:, :, ::-1])
        x0, y0, x1, y1 = (round(v) for v in box)
        return self.shape_predictor(rgb, dlib.rectangle(x0, y0, x1, y1))

    def five_points(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        """dlib's five points (two per eye corner pair, one under the nose), (5, 2)."""
        shape = self.align5(image, box)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)

    def embed(self, image: np.ndarray, face: Face | np.ndarray) -> np.ndarray:
        """128-D descriptor of the face in ``box`` (a Face or an x0,y0,x1,y1 array)."""
        box = face.box if isinstance(face, Face) else face
        rgb = np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        with self._lock:
            x0, y0, x1, y1 = (round(v) for v in box)
            shape = self.shape_predictor(rgb, dlib.rectangle(x0, y0, x1, y1))
            descriptor = self.recogniser.compute_face_descriptor(rgb, shape)
        return np.asarray(descriptor, dtype=np.float32)
