"""Optional face restoration with a user-supplied GFPGAN-class model (GFPGAN, GPEN-BFR,
RestoreFormer, CodeFormer): run after the swap to sharpen the face.

These models take an aligned square face crop (512 for most; the size is read from the
model) as RGB scaled to -1..1, NCHW, and return the restored crop in the same range. The
crop is framed as each family was trained and run by its authors: FFHQ's alignment for
GFPGAN, CodeFormer and RestoreFormer; GPEN's own, looser one for GPEN-BFR (256, 512, 1024;
see ``faces.align.gpen_template``). FaceFusion frames GPEN-BFR-256 with a 128-px ArcFace
template instead, and GPEN-BFR-512 with FFHQ's: neither is what GPEN's code does. The
result is pasted back through a feathered ellipse over the face, mixed with the frame by
``blend``, so the hair and background the model also redraws never replace the frame's own.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

from facecast.errors import FacecastError
from facecast.faces.align import (
    align_crop,
    ffhq_template,
    five_points,
    gpen_template,
)
from facecast.faces.face import Face
from facecast.media.planes import Box
from facecast.models.runtime import ModelFileError, OnnxModel, fixed_dim
from facecast.swap.blend import paste_crop

DEFAULT_SIZE = 512
# CodeFormer's fidelity weight (0: strongest restoration, 1: closest to the input). 0.5 is
# the middle its authors suggest for general use; the other restorers have no such input.
CODEFORMER_WEIGHT = 0.5


def face_mask(size: int, template: np.ndarray) -> np.ndarray:
    """float32 0..1, ``size`` x ``size``: 1 over the face of a crop aligned to ``template``
    (an ellipse from brow to chin and cheek to cheek, placed and sized by the template's
    eyes), falling smoothly to 0 well inside the crop's edge, so the square crop never
    shows in the frame. On an FFHQ crop: centred at (0.5, 0.54), axes 0.31 x 0.35 of it."""
    eyes = template[:2]
    span = float(np.linalg.norm(eyes[1] - eyes[0]))  # 0.246 of an FFHQ crop
    middle = eyes.mean(0)
    centre = (round(float(middle[0])), round(float(middle[1]) + 0.29 * span))
    axes = (round(1.26 * span), round(1.42 * span))
    mask = np.zeros((size, size), np.float32)
    cv2.ellipse(mask, centre, axes, 0.0, 0.0, 360.0, 1.0, thickness=-1, lineType=cv2.LINE_AA)
    return cv2.GaussianBlur(mask, (0, 0), 0.122 * span)


Framing = Literal["ffhq", "gpen"]


def framing_for(name: str) -> Framing:
    """How a restorer's crop is framed, by its model's name: GPEN-BFR models (any size) as
    GPEN's own code frames them, every other (GFPGAN, CodeFormer, RestoreFormer) as FFHQ."""
    return "gpen" if "gpen" in name.lower() else "ffhq"


class FaceEnhancer:
    """One enhancer model; ``enhance`` restores one face of a frame in place."""

    def __init__(self, model: OnnxModel, blend: float = 0.8, framing: Framing = "ffhq") -> None:
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
        self.framing = framing
        template = gpen_template if framing == "gpen" else ffhq_template
        self.template = template(self.size)
        self.mask = face_mask(self.size, self.template) * np.float32(self.blend)

    def enhance(self, frame: np.ndarray, face: Face) -> Box | None:
        """Restore ``face`` in ``frame`` (BGR uint8) in place; returns the box it changed.
        None when nothing was done: the face is too small to align, or falls outside the
        frame."""
        points = five_points(face)
        if np.linalg.norm(points[1] - points[0]) < 2.0:
            return None
        crop, matrix = align_crop(frame, points, self.template, self.size)
        restored = self.restore(crop)
        # linear: a restorer's crop is as large as the face or larger, nothing to enlarge
        return paste_crop(frame, restored, matrix, self.mask, interpolation=cv2.INTER_LINEAR)

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
