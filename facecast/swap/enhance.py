"""Optional face restoration with a user-supplied GFPGAN-class model (GFPGAN, GPEN-BFR,
RestoreFormer, CodeFormer): run after the swap to sharpen the face.

These models take an FFHQ-aligned square face crop (512 for most; the size is read from the
model) as RGB scaled to -1..1, NCHW, and return the restored crop in the same range. The
result is pasted back through a feathered ellipse over the face, mixed with the frame by
``blend``, so the hair and background the model also redraws never replace the frame's own.
"""

from __future__ import annotations

import cv2
import numpy as np

from facecast.errors import FacecastError
from facecast.faces.align import align_crop, ffhq_template, five_points, paste_back
from facecast.faces.face import Face
from facecast.onnx_runtime import ModelFileError, OnnxModel, fixed_dim

DEFAULT_SIZE = 512
# CodeFormer's fidelity weight (0: strongest restoration, 1: closest to the input). 0.5 is
# the middle its authors suggest for general use; the other restorers have no such input.
CODEFORMER_WEIGHT = 0.5


def face_mask(size: int) -> np.ndarray:
    """float32 0..1, ``size`` x ``size``: 1 over the face of an FFHQ-aligned crop (an
    ellipse from brow to chin and cheek to cheek), falling smoothly to 0 well inside the
    crop's edge, so the square crop never shows in the frame."""
    mask = np.zeros((size, size), np.float32)
    centre = (round(0.5 * size), round(0.54 * size))
    axes = (round(0.31 * size), round(0.35 * size))
    cv2.ellipse(mask, centre, axes, 0.0, 0.0, 360.0, 1.0, thickness=-1, lineType=cv2.LINE_AA)
    sigma = 0.03 * size
    return cv2.GaussianBlur(mask, (0, 0), sigma)


class FaceEnhancer:
    """One enhancer model; ``enhance`` restores one face of a frame in place."""

    def __init__(self, model: OnnxModel, blend: float = 0.8) -> None:
        if not 0.0 <= blend <= 1.0:
            raise FacecastError(f"enhancer blend {blend} is outside 0..1")
        self.model = model
        self.blend = float(blend)
        images = [(n, s) for n, s in model.inputs if len(s) == 4]
        others = [(n, s) for n, s in model.inputs if len(s) != 4]
        if len(images) != 1 or len(others) > 1 or any(len(s) > 1 for _, s in others):
            raise ModelFileError(
                f"{model.path.name}: not a face enhancer (inputs "
                f"{', '.join(f'{n} {s}' for n, s in model.inputs)}; expected one 1x3xSxS image "
                "and at most one scalar weight)"
            )
        self.image_input, shape = images[0]
        self.size = fixed_dim(shape[-1]) or DEFAULT_SIZE
        self.weight: dict[str, np.ndarray] = {}
        if others:
            name, shape = others[0]
            dims = tuple(1 for _ in shape)  # [1] or a scalar; a dynamic size gets 1
            # float32 here; OnnxModel.run casts it to the declared type (double in some exports)
            self.weight[name] = np.full(dims, CODEFORMER_WEIGHT, dtype=np.float32)
        self.template = ffhq_template(self.size)
        self.mask = face_mask(self.size) * np.float32(self.blend)

    def enhance(self, frame: np.ndarray, face: Face) -> bool:
        """Restore ``face`` in ``frame`` (BGR uint8) in place. False when nothing was done:
        the face is too small to align, or falls outside the frame."""
        points = five_points(face)
        if np.linalg.norm(points[1] - points[0]) < 2.0:
            return False
        crop, matrix = align_crop(frame, points, self.template, self.size)
        restored = self.restore(crop)
        return paste_back(frame, restored, matrix, self.mask) is not None

    def restore(self, crop: np.ndarray) -> np.ndarray:
        """The model's restoration of an aligned BGR uint8 crop, as BGR uint8."""
        rgb = crop[:, :, ::-1].astype(np.float32) / 255.0
        blob = np.ascontiguousarray(((rgb - 0.5) / 0.5).transpose(2, 0, 1)[None])
        out = self.model.run({self.image_input: blob, **self.weight})[0]
        image = np.asarray(out, np.float32).reshape(out.shape[-3:]).transpose(1, 2, 0)
        image = (np.clip(image, -1.0, 1.0) + 1.0) * 127.5
        bgr = np.ascontiguousarray((image + 0.5).astype(np.uint8)[:, :, ::-1])
        if bgr.shape[:2] != (self.size, self.size):  # a model that returns another size
            bgr = cv2.resize(bgr, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return bgr
