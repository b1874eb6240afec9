"""A user-supplied learned swapper (inswapper, hyperswap, simswap, ghost, blendswap, uniface,
hififace) behind the MeshSwapper interface.

The model redraws an aligned crop of the target with the source's identity, keeping the
target's pose, expression and lighting. Each family's crop, input scaling, output range and
source input are in ``swap/conventions.py``. The identity input is, per family: inswapper's
latent (the normalised ArcFace embedding times the model's embedding map, a 512x512 matrix
stored as the graph's last initializer, normalised again); the unit ArcFace embedding
(hyperswap); the raw embedding through a converter model the user supplies beside it (ghost,
simswap, hififace); or an aligned crop of the source photo (blendswap, uniface).

Per source (once): that identity input. Per target face (every frame):
1. the target aligned to the family's template (``faces/align.py``), at the swap size;
2. the model run on that crop (k x k times on its sub-pixel samplings at a larger swap size);
3. in crop space, the project's own masks (the face oval from the target's mesh, feathered;
   a feathered box when there is no mesh), the target's mouth opening and occluders kept,
   colour matched to the target's skin;
4. the crop warped back and blended into the frame inside the mask's footprint only.

Of ``SwapOptions``: ``blend`` (feather or Poisson), ``keep_mouth`` (the models keep the
expression, so the opening is where the target's is, and their teeth are their weakest part:
the target's own are sharper) and ``keep_occluders`` (the embedded swapper's colour rule, in
crop space) apply. ``keep_eyes`` does not: the eyes carry much of the identity the model was
asked to draw. ``shape_strength`` and ``shading`` do not either: the model draws the outline
and the lighting itself.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facecast.engine.timing import StageClock
from facecast.errors import FacecastError
from facecast.faces.align import align_crop, five_points, named_template
from facecast.faces.face import Face
from facecast.faces.recognise import ArcFaceRecogniser, normalise
from facecast.media.planes import Box
from facecast.models.runtime import ModelFileError, OnnxModel, fixed_dim, load_onnx
from facecast.swap import blend
from facecast.swap.conventions import (
    FAMILIES,
    Convention,
    convention_for,
    families_for,
    rgb_blob,
    sizes_of,
)
from facecast.swap.mesh_swapper import MeshSwapper, SwapOptions

log = logging.getLogger(__name__)

LATENT_SIZE = 512  # inswapper's latent, when the file leaves it unnamed
# Mask geometry, in fractions of the face's width in the crop (as MeshSwapper's, which are in
# fractions of the face's width in the frame: the same look at any scale).
OVAL_FEATHER = 0.09
SKIN_FEATHER = 0.06
MOUTH_SOFTEN = 0.012
# Without a mesh: boxes in fractions of the crop (x0, y0, x1, y1). The templates put the eyes
# at about 0.35-0.65 across and 0.40-0.47 down, the mouth at 0.72-0.78 down: the face spans
# about 0.2-0.8 across and reaches the crop's bottom; the corners are hair, ears and
# background.
FACE_BOX = (0.14, 0.12, 0.86, 0.96)
BOX_FEATHER = 0.1
SKIN_BOX = (0.28, 0.46, 0.72, 0.8)  # colour statistics: cheeks, nose, mouth; not the eyes


@dataclass(frozen=True)
class SourceInput:
    """What the swap needs from the source photo, computed once."""

    value: np.ndarray  # the model's "source" input (an identity vector or an image blob)
    embedding: np.ndarray | None  # the unit ArcFace embedding behind it, if any


def latent_from_embedding(embedding: np.ndarray, emap: np.ndarray) -> np.ndarray:
    """inswapper's identity input: normalise(normalise(embedding) @ emap), shape (1, N)."""
    projected = normalise(np.ravel(embedding)).astype(np.float64) @ emap.astype(np.float64)
    return normalise(projected).astype(np.float32)[None]


def box_masks(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(paste alpha, skin for colour statistics) for a face without a mesh."""

    def box(bounds: tuple[float, float, float, float]) -> np.ndarray:
        x0, y0, x1, y1 = (round(f * size) for f in bounds)
        mask = np.zeros((size, size), np.uint8)
        mask[y0:y1, x0:x1] = 255
        return mask

    face = box(FACE_BOX)
    face[[0, -1], :], face[:, [0, -1]] = 0, 0  # the feather runs out at the crop's edge
    return blend.feathered(face, BOX_FEATHER * size), box(SKIN_BOX).astype(np.float32) / 255.0


class LearnedSwapper:
    """A learned swapper: ``prepare`` once per source face, ``swap`` per target face."""

    def __init__(
        self,
        model: OnnxModel,
        recogniser: ArcFaceRecogniser | None,
        options: SwapOptions | None = None,
        swap_size: int | None = None,
        family: str | None = None,
        converter: OnnxModel | None = None,
    ) -> None:
        """``family``: the model's family (``models/user.py`` identifies it); None reads it from
        the signature where that is unambiguous. ``recogniser``: the ArcFace model for the
        families whose source is an embedding; ``converter``: the embedding converter for
        those that need one (ghost, simswap, hififace).

        ``swap_size``: the face's size in the swap, a multiple of the model's own: ``k =
        swap_size / size`` gives k x k passes, each on every k-th pixel of a ``swap_size``
        crop from a different sub-pixel start, interleaved back into one ``swap_size`` face
        (Rope's and VisoMaster's way to sharpen a swapper's output). A size at or below the
        model's own is the model's own."""
        self.model = model
        self.options = options or SwapOptions()
        self.size, source_shape, self.output_name = self._check_signature(model)
        family = family or self._family_from_signature(model, self.size, source_shape)
        convention = convention_for(family, self.size)
        if convention is None:
            known = ", ".join(map(str, sizes_of(family))) or "none"
            raise ModelFileError(
                f"{model.path.name}: a {family} model with a {self.size} px crop; facecast "
                f"knows {family} exports of {known} px (families: {', '.join(FAMILIES)})"
            )
        self.convention = convention
        self.recogniser = recogniser
        self.converter = converter
        self._check_source(model, convention, source_shape)
        self.emap = (
            self._embedding_map(model, fixed_dim(source_shape[1]) or LATENT_SIZE)
            if convention.source == "latent"
            else None
        )
        swap_size = max(swap_size or self.size, self.size)
        if swap_size % self.size:
            raise FacecastError(
                f"swap size {swap_size} is not a multiple of {model.path.name}'s {self.size}"
            )
        self.passes = swap_size // self.size  # per side: passes**2 model runs per face
        self.crop_size = swap_size
        self.template = named_template(convention.template, swap_size)
        if self.passes > 1:
            log.info(
                "%s at %d px: %d runs of the %d model per face",
                family,
                swap_size,
                self.passes**2,
                self.size,
            )
        # the embedded swapper's skin and feature masks: the same occluder rules for both
        self._masks = MeshSwapper(self.options)

    @property
    def family(self) -> str:
        return self.convention.family

    @staticmethod
    def _check_signature(model: OnnxModel) -> tuple[int, list, str]:
        """(crop size, the "source" input's shape, output name), or a ModelFileError saying
        what differs."""
        inputs = dict(model.inputs)
        name = model.path.name
        expected = 'inputs "target" [1,3,S,S] and "source" [1,512] or [1,3,S,S]'
        missing = [n for n in ("target", "source") if n not in inputs]
        if missing:
            raise ModelFileError(
                f"{name}: not a face swapper: no input {', '.join(map(repr, missing))}"
                f" (found {list(inputs)}; expected {expected})"
            )
        target, source = inputs["target"], inputs["source"]
        sizes = {fixed_dim(d) for d in target[2:]} - {None}
        channels = target[1] if len(target) == 4 and isinstance(target[1], int) else 3
        if len(target) != 4 or channels != 3 or len(sizes) > 1 or len(source) not in (2, 4):
            raise ModelFileError(
                f"{name}: inputs 'target' {target} and 'source' {source}; expected {expected}"
            )
        if not model.outputs:
            raise ModelFileError(f"{name}: the model has no output")
        out_name, out_shape = model.outputs[0]
        if len(out_shape) != 4:
            raise ModelFileError(
                f"{name}: output {out_name!r} has shape {out_shape}; expected [1,3,H,W]"
            )
        size = sizes.pop() if sizes else 128  # a fully dynamic export: inswapper's 128
        return size, list(source), out_name

    @staticmethod
    def _family_from_signature(model: OnnxModel, size: int, source: list) -> str:
        """The family where the inputs alone tell it; else an error asking for it."""
        families = families_for(size, source)
        if len(families) == 1:
            return families[0]
        if not families:
            raise ModelFileError(
                f"{model.path.name}: no swapper family takes a {size} px target with a "
                f"source of shape {source} (families: {', '.join(FAMILIES)})"
            )
        raise ModelFileError(
            f"{model.path.name}: a {size} px swapper with this source input: "
            f"{', '.join(families)} all look like this; name the family (a file name that "
            "starts with it, e.g. hyperswap_1a_256.onnx, or --swapper FAMILY)"
        )

    def _check_source(self, model: OnnxModel, convention: Convention, shape: list) -> None:
        name = model.path.name
        if convention.source == "crop":
            want = convention.source_size
            got = {fixed_dim(d) for d in shape[2:]} - {None}
            if len(shape) != 4 or (got and got != {want}):
                raise ModelFileError(
                    f"{name}: {convention.family}'s source is a {want} px face crop "
                    f"[1,3,{want},{want}]; this file's is {shape}"
                )
            return
        if len(shape) != 2:
            raise ModelFileError(
                f"{name}: {convention.family}'s source is an identity vector [1,512]; this "
                f"file's is {shape}"
            )
        if self.recogniser is None:
            raise FacecastError(
                f"{name}: {convention.family} takes an ArcFace embedding: it needs an ArcFace "
                "recogniser (w600k_r50) in the models folder"
            )
        if convention.needs_converter and self.converter is None:
            raise FacecastError(
                f"{name}: {convention.family} takes the ArcFace embedding through its "
                f"converter model (FaceFusion's crossface_{convention.family}.onnx): put it "
                "in the models folder"
            )

    @staticmethod
    def _embedding_map(model: OnnxModel, latent_size: int) -> np.ndarray:
        """The model's last initializer: the map from ArcFace embeddings to its latents."""
        stat = model.path.stat()
        emap = _last_initializer(model.path.resolve(), stat.st_mtime_ns, stat.st_size)
        if emap.ndim != 2 or emap.shape[1] != latent_size:
            raise ModelFileError(
                f"{model.path.name}: the last initializer (shape {list(emap.shape)}) is not "
                f"the {latent_size}-column embedding map an inswapper model ends with"
            )
        return emap

    def prepare(
        self, image: np.ndarray, face: Face, embedding: np.ndarray | None = None
    ) -> SourceInput:
        """The source face as the model's "source" input. ``embedding``: its unit ArcFace
        embedding from this swapper's recogniser, when already computed (not used by the
        converted families, whose converter takes the raw one)."""
        convention = self.convention
        if convention.source == "crop":
            size = int(convention.source_size or self.size)
            template = named_template(str(convention.source_template), size)
            crop, _ = align_crop(image, five_points(face), template, size)
            return SourceInput(rgb_blob(crop), None)
        recogniser = self.recogniser
        assert recogniser is not None  # checked at construction
        if convention.needs_converter:
            raw = recogniser.raw_embedding(image, face)
            converted = self._convert(raw)
            value = normalise(converted) if convention.source == "converted_unit" else converted
            return SourceInput(value.astype(np.float32)[None], normalise(raw))
        if embedding is None:
            embedding = recogniser.embed(image, face)
        embedding = normalise(np.ravel(embedding))
        if convention.source == "embedding":
            return SourceInput(embedding.astype(np.float32)[None], embedding)
        assert self.emap is not None
        if embedding.size != self.emap.shape[0]:
            raise ModelFileError(
                f"{recogniser.model.path.name} gives {embedding.size}-D embeddings but "
                f"{self.model.path.name} maps {self.emap.shape[0]}-D ones: use the recogniser "
                "the swap model was trained with (ArcFace w600k_r50 for inswapper_128)"
            )
        return SourceInput(latent_from_embedding(embedding, self.emap), embedding)

    def _convert(self, raw: np.ndarray) -> np.ndarray:
        """The raw ArcFace embedding through the family's converter, as a flat vector."""
        converter = self.converter
        assert converter is not None  # checked at construction
        (in_name, _), (out_name, _) = converter.inputs[0], converter.outputs[0]
        (out,) = converter.run({in_name: raw.reshape(1, -1).astype(np.float32)}, [out_name])
        return np.asarray(out, np.float32).reshape(-1)

    def swap(
        self,
        frame: np.ndarray,
        target: Face,
        source: SourceInput,
        clock: StageClock | None = None,
        settle_colour: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> Box | None:
        """Replace ``target`` in ``frame`` (BGR, modified in place) with ``source``.
        Returns the box of ``frame`` it changed, or None when the face is too small or
        off-frame to swap. ``settle_colour``:
        the face's temporal colour filter (see ``blend.transfer_colour``)."""
        clock = clock or StageClock()
        with clock.stage("swap"):
            points = five_points(target)
            if float(np.linalg.norm(points[1] - points[0])) < 4.0:
                return None  # eyes a few pixels apart: nothing the model could redraw
            h, w = frame.shape[:2]
            if not (points.max(0) > 0).all() or not (points.min(0) < (w, h)).all():
                return None  # all five points beyond one edge: no face in this frame
            crop, matrix = align_crop(frame, points, self.template, self.crop_size)
            swapped = self.redraw(crop, source.value)

        with clock.stage("blend"):
            alpha, skin = self.masks(crop, target, matrix)
            coloured = blend.transfer_colour(swapped, crop, skin, settle_stats=settle_colour)
            return blend.paste_crop(frame, coloured, matrix, alpha, self.options.blend)

    def redraw(self, crop: np.ndarray, source: np.ndarray) -> np.ndarray:
        """The model's face for an aligned ``crop_size`` crop: one run at the model's size,
        or k x k runs on the crop's k-strided samplings, each written back to the pixels
        it came from."""
        k, convention = self.passes, self.convention
        swapped = np.empty_like(crop)
        for dy in range(k):
            for dx in range(k):
                sample = np.ascontiguousarray(crop[dy::k, dx::k])
                (raw,) = self.model.run(
                    {"target": convention.blob(sample), "source": source}, [self.output_name]
                )
                face = convention.image(raw)
                if face.shape[:2] != sample.shape[:2]:
                    face = cv2.resize(face, sample.shape[1::-1], interpolation=cv2.INTER_AREA)
                swapped[dy::k, dx::k] = face
        return swapped

    def masks(
        self, crop: np.ndarray, target: Face, matrix: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(paste alpha, skin for the colour statistics), both crop-sized float32 0..1."""
        size = crop.shape[0]
        if target.mesh is None:
            return box_masks(size)
        opts, topo = self.options, self._masks.topology
        points = target.mesh[:, :2].astype(np.float64) @ matrix[:, :2].T + matrix[:, 2]
        face_width = float(np.ptp(points[topo.face_oval, 0]))
        oval = blend.polygon_mask((size, size), [points[topo.face_oval]])
        # the crop's edge counts as the oval's edge, so the feather also runs out there
        oval[[0, -1], :], oval[:, [0, -1]] = 0, 0
        alpha = blend.feathered(oval, OVAL_FEATHER * face_width)
        if opts.keep_mouth:
            mouth = blend.polygon_mask((size, size), [points[topo.inner_lips]])
            alpha *= 1.0 - blend.soft_holes(mouth, MOUTH_SOFTEN * face_width)
        if opts.keep_occluders:
            # a hand or microphone over the target's face is not skin-coloured: keep it
            alpha *= 1.0 - self._masks.occluder_mask(crop, points)
        features = cv2.dilate(
            blend.polygon_mask((size, size), self._masks.feature_polygons(points)),
            np.ones((3, 3), np.uint8),
            iterations=2,
        )
        skin = blend.feathered(oval, SKIN_FEATHER * face_width) * (features < 128)
        return alpha.astype(np.float32), skin.astype(np.float32)


@functools.lru_cache(maxsize=4)
def _last_initializer(path: Path, mtime_ns: int, size: int) -> np.ndarray:
    """Parsing the whole file (~550 MB for inswapper_128) for one 512x512 matrix is paid once
    per file version, not at every stream or web session start. Read-only: shared."""
    from onnx import numpy_helper

    graph = load_onnx(path).graph
    if not graph.initializer:
        raise ModelFileError(
            f"{path.name}: no initializers, so no embedding map: not an inswapper model"
        )
    emap = numpy_helper.to_array(graph.initializer[-1]).astype(np.float32)
    emap.setflags(write=False)
    return emap
