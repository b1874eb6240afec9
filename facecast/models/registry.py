"""The one registry of model files facecast uses.

Every model ships inside a registry package: the mediapipe 0.10.21 wheel (unpacked by
``scripts/setup``) and ``face-recognition-models`` (installed by pip). Nothing here or
anywhere else in facecast downloads a file; a missing or altered file is reported with the
command that restores it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from facecast.errors import ModelError

SETUP_FIX = "run scripts/setup to install it"


@dataclass(frozen=True)
class ModelFile:
    name: str
    filename: str
    package: str
    sha256: str
    licence: str
    input_size: str
    purpose: str

    @property
    def path(self) -> Path:
        return _package_dir(self.package) / self.filename


MEDIAPIPE = "mediapipe==0.10.21"
DLIB_MODELS = "face-recognition-models==0.3.0"

REGISTRY: dict[str, ModelFile] = {
    m.name: m
    for m in (
        ModelFile(
            "blazeface_short",
            "face_detection_short_range.tflite",
            MEDIAPIPE,
            "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
            "Apache-2.0",
            "128x128 RGB",
            "face detection, near faces",
        ),
        ModelFile(
            "blazeface_full",
            "face_detection_full_range_sparse.tflite",
            MEDIAPIPE,
            "2c3728e6da56f21e21a320433396fb06d40d9088f2247c05e5635a688d45dfe1",
            "Apache-2.0",
            "192x192 RGB",
            "face detection, farther faces",
        ),
        ModelFile(
            "face_mesh",
            "face_landmark.tflite",
            MEDIAPIPE,
            "1055cb9d4a9ca8b8c688902a3a5194311138ba256bcc94e336d8373a5f30c814",
            "Apache-2.0",
            "192x192 RGB",
            "468-point face mesh",
        ),
        ModelFile(
            "face_mesh_topology",
            "face_mesh_connections.py",
            MEDIAPIPE,
            "cc7171e44d0612db38720cb2fd2516c395992cdd7457efe341543be6f3c22d87",
            "Apache-2.0",
            "-",
            "mesh triangles and feature contours (data only, parsed, never imported)",
        ),
        ModelFile(
            "iris_landmark",
            "iris_landmark.tflite",
            MEDIAPIPE,
            "d1744d2a09c25f501d39eba4faff47e53ecca8852c5ce19bce8eeac39357521f",
            "Apache-2.0",
            "64x64 RGB eye crop",
            "iris centre per eye (gaze fidelity in the quality bench)",
        ),
        ModelFile(
            "dlib_shape5",
            "shape_predictor_5_face_landmarks.dat",
            DLIB_MODELS,
            "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
            "CC0-1.0",
            "face box",
            "5-point alignment",
        ),
        ModelFile(
            "dlib_resnet",
            "dlib_face_recognition_resnet_model_v1.dat",
            DLIB_MODELS,
            "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
            "CC0-1.0",
            "150x150 aligned chip",
            "128-D identity embedding",
        ),
        ModelFile(
            "dlib_shape68",
            "shape_predictor_68_face_landmarks.dat",
            DLIB_MODELS,
            "fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f",
            # dlib: trained on iBUG 300-W, whose terms exclude commercial use
            "300-W terms, non-commercial",
            "face box",
            "68-point landmarks (the textbook reference swap in the quality bench)",
        ),
    )
}


def embedded_model_dir() -> Path:
    """Where scripts/setup unpacks the mediapipe files (override: FACECAST_EMBEDDED_MODELS)."""
    override = os.environ.get("FACECAST_EMBEDDED_MODELS")
    return Path(override) if override else Path(sys.prefix) / "share" / "facecast" / "models"


def _package_dir(package: str) -> Path:
    if package == MEDIAPIPE:
        return embedded_model_dir()
    import face_recognition_models  # the package is only a folder of .dat files

    return Path(face_recognition_models.__file__).parent / "models"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check(model: ModelFile) -> str | None:
    """None when the file is present and intact, else one line naming the file and the fix."""
    path = model.path
    if not path.is_file():
        return f"model {model.name}: {path} is missing — {SETUP_FIX}"
    if sha256_of(path) != model.sha256:
        return f"model {model.name}: {path} is corrupt (sha256 mismatch) — {SETUP_FIX}"
    return None


@cache
def model_path(name: str) -> Path:
    """The verified path of a registered model; raises ModelError with the fix otherwise."""
    model = REGISTRY[name]
    problem = check(model)
    if problem:
        raise ModelError(problem)
    return model.path
