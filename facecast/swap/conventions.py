"""How each learned swapper family wants its inputs and gives its output.

Every family takes an aligned crop of the target ("target", 1x3xSxS, RGB) and the source's
identity ("source"), and returns the redrawn crop (1x3xSxS, RGB). They differ in:

- the **template** the crop is aligned to and its size (``faces/align.py`` UNIT_TEMPLATES);
- the **input scaling**: RGB in 0..1, then ``(x - mean) / std`` per channel;
- the **output range**: 0..1 ("unit"), or the input's scaling to undo ("scaled");
- the **source**: inswapper's latent (the unit ArcFace embedding through the model's own
  embedding map), the unit ArcFace embedding itself, the raw ArcFace embedding through a
  separate converter model (used as is, or made unit length), or an aligned crop of the
  source photo (RGB 0..1, no other scaling).

The values are those the users' files were made for: FaceFusion's face swapper
(facefusion/processors/modules/face_swapper/core.py, its model table and
``prepare_source_embedding``, ``prepare_crop_frame``, ``normalize_crop_frame``), where
hyperswap_1a/1b/1c_256, simswap_256, simswap_unofficial_512, ghost_1/2/3_256,
blendswap_256, uniface_256 and hififace_unofficial_256 come from, and insightface for
inswapper_128. ``docs/models.md`` lists them with their sources; tests/test_swapper_families.py
checks this table against them, written out independently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

SourceKind = Literal["latent", "embedding", "converted", "converted_unit", "crop"]
OutputRange = Literal["unit", "scaled"]

HALF = (0.5, 0.5, 0.5)
ZERO = (0.0, 0.0, 0.0)
ONE = (1.0, 1.0, 1.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Convention:
    family: str
    size: int  # the model's crop, pixels a side
    template: str  # a key of faces.align.UNIT_TEMPLATES
    mean: tuple[float, float, float]  # RGB, on 0..1 values
    std: tuple[float, float, float]
    output: OutputRange
    source: SourceKind
    # for source == "crop": the source photo's own crop
    source_template: str | None = None
    source_size: int | None = None

    @property
    def needs_recogniser(self) -> bool:
        """Whether the source is an ArcFace embedding (all but the crop families)."""
        return self.source != "crop"

    @property
    def needs_converter(self) -> bool:
        return self.source in ("converted", "converted_unit")

    def blob(self, crop: np.ndarray) -> np.ndarray:
        """An aligned BGR uint8 crop as the model's "target": 1x3xSxS float32."""
        mean = np.float32(self.mean).reshape(1, 3, 1, 1)
        std = np.float32(self.std).reshape(1, 3, 1, 1)
        return np.ascontiguousarray((rgb_blob(crop) - mean) / std, np.float32)

    def image(self, output: np.ndarray) -> np.ndarray:
        """The model's 1x3xSxS output as a BGR uint8 image."""
        rgb = np.asarray(output, np.float32)[0].transpose(1, 2, 0)
        if self.output == "scaled":
            rgb = rgb * np.float32(self.std) + np.float32(self.mean)
        rgb = np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5
        return np.ascontiguousarray(rgb.astype(np.uint8)[:, :, ::-1])


def rgb_blob(crop: np.ndarray) -> np.ndarray:
    """A BGR uint8 crop as RGB 0..1, 1x3xSxS: blendswap's and uniface's "source" as it is,
    every family's "target" before its own scaling."""
    rgb = crop[:, :, ::-1].astype(np.float32) * np.float32(1 / 255)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)[None])


CONVENTIONS: tuple[Convention, ...] = (
    Convention("inswapper", 128, "arcface_128", ZERO, ONE, "unit", "latent"),
    Convention("hyperswap", 256, "arcface_128", HALF, HALF, "scaled", "embedding"),
    Convention(
        "simswap", 256, "arcface_112_v1", IMAGENET_MEAN, IMAGENET_STD, "unit", "converted_unit"
    ),
    # simswap_unofficial_512: another export, scaled like inswapper
    Convention("simswap", 512, "arcface_112_v1", ZERO, ONE, "unit", "converted_unit"),
    Convention("ghost", 256, "arcface_112_v1", HALF, HALF, "scaled", "converted"),
    Convention("hififace", 256, "mtcnn_512", HALF, HALF, "scaled", "converted_unit"),
    Convention("blendswap", 256, "ffhq_512", ZERO, ONE, "unit", "crop", "arcface_112_v2", 112),
    Convention("uniface", 256, "ffhq_512", HALF, HALF, "scaled", "crop", "ffhq_512", 256),
)

FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(c.family for c in CONVENTIONS))
# the families whose identity input goes through a separate converter model first
CONVERTED: tuple[str, ...] = tuple(
    dict.fromkeys(c.family for c in CONVENTIONS if c.needs_converter)
)


def convention_for(family: str, size: int) -> Convention | None:
    """The convention of ``family``'s model with a ``size`` crop, or None when facecast
    knows no such export."""
    for convention in CONVENTIONS:
        if convention.family == family and convention.size == size:
            return convention
    return None


def families_for(size: int, source_shape: Sequence[object]) -> tuple[str, ...]:
    """The families whose exports take a ``size`` px target and a "source" of this shape
    (a 4-D face crop, its size in ``source_shape[2]``, or a 2-D identity vector): one where
    the inputs tell the family, several where only the file's name can (at 256 px with a
    vector: hyperswap, simswap, ghost, hififace), none for a shape no family has."""
    crop = len(source_shape) == 4

    def takes(c: Convention) -> bool:
        if c.size != size or (c.source == "crop") != crop:
            return False
        return not crop or c.source_size == source_shape[2] == source_shape[3]

    if len(source_shape) not in (2, 4):
        return ()
    return tuple(dict.fromkeys(c.family for c in CONVENTIONS if takes(c)))


def sizes_of(family: str) -> tuple[int, ...]:
    return tuple(c.size for c in CONVENTIONS if c.family == family)
