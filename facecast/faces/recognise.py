"""Identity from a user-supplied ArcFace model (insightface's w600k_r50 and its kin).

The model takes faces aligned to the ArcFace five-point template at 112x112, RGB, scaled to
-1..1, and returns one 512-D vector per face. Directions, not lengths, carry identity, so
embeddings are L2-normalised and compared by cosine distance.

``Recogniser`` is the small protocol the engine needs from any identity model, so it can
pick this one or the embedded dlib descriptor (``faces/embed.py``) without caring which.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from facecast.faces.align import align_crop, arcface_template, five_points
from facecast.faces.face import Face
from facecast.models.runtime import ModelFileError, OnnxModel, fixed_dim, load_onnx

ARCFACE_SIZE = 112
# Cosine distance (1 - cosine similarity) below which two ArcFace embeddings are taken as one
# person. Different people score near 0 similarity (distance ~1) with a narrow spread, the
# same person in different photos mostly 0.5-0.8 (distance 0.2-0.5), and one person across
# the frames of a video higher still; 0.6 (similarity 0.4) sits in the usual 0.3-0.4
# similarity cut, on the strict side: a false match swaps a bystander, a miss only leaves a
# face as it was for the frames until the next identity check.
ARCFACE_SAME_PERSON = 0.6


@runtime_checkable
class Recogniser(Protocol):
    """What the engine asks of an identity model. ``distance`` is in the model's own units:
    compare it with ``same_person`` of the same recogniser, never across recognisers."""

    @property
    def same_person(self) -> float: ...

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray: ...

    def distance(self, a: np.ndarray, b: np.ndarray) -> float: ...


def normalise(vector: np.ndarray) -> np.ndarray:
    """``vector`` scaled to unit length (a zero vector stays zero)."""
    vector = np.asarray(vector, np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1 - cosine similarity: 0 for one direction, 1 for orthogonal, 2 for opposite."""
    return 1.0 - float(np.dot(normalise(np.ravel(a)), normalise(np.ravel(b))))


def arcface_blob(crop: np.ndarray, mean: float = 127.5, std: float = 127.5) -> np.ndarray:
    """An aligned BGR uint8 crop as the model's input: RGB, (x - mean) / std, 1x3xHxW."""
    rgb = crop[:, :, ::-1].astype(np.float32)
    return np.ascontiguousarray(((rgb - mean) / std).transpose(2, 0, 1)[None])


# How many of a graph's first nodes are looked at for its own input normalisation.
NORMALISATION_NODES = 8


def input_normalisation(path: Path) -> tuple[float, float]:
    """(mean, std) the graph at ``path`` wants its 0..255 RGB input scaled by. ArcFace
    exports converted from MXNet subtract and scale inside the graph (their first nodes are
    named ``_minus…``/``Sub…`` and ``_mul…``/``Mul…``) and take raw pixels: (0, 1). The rest
    take (127.5, 127.5). This is insightface's own test (``ArcFaceONNX``), by node names
    among the first eight, so both read a file alike."""
    stat = path.stat()
    return _input_normalisation(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _input_normalisation(path: Path, mtime_ns: int, size: int) -> tuple[float, float]:
    """Parsing the whole file (~170 MB for w600k_r50) for its first nodes is paid once per
    file version, not at every stream or web session start."""
    graph = load_onnx(path).graph
    names = [node.name for node in graph.node[:NORMALISATION_NODES]]
    subtracts = any(n.startswith(("Sub", "_minus")) for n in names)
    scales = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if subtracts and scales else (127.5, 127.5)


class ArcFaceRecogniser:
    """512-D ArcFace embeddings from an ONNX model ([N,3,112,112] in, [N,512] out)."""

    same_person: float = ARCFACE_SAME_PERSON

    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        inputs, outputs = model.inputs, model.outputs
        if len(inputs) != 1 or not outputs:
            raise ModelFileError(
                f"{model.path.name}: not an ArcFace recogniser: expected one image input and "
                f"an embedding output, found inputs {[n for n, _ in inputs]}"
            )
        self.input_name, shape = inputs[0]
        if len(shape) != 4 or fixed_dim(shape[1]) not in (3, None):
            raise ModelFileError(
                f"{model.path.name}: not an ArcFace recogniser: input {self.input_name!r} has "
                f"shape {shape}, expected [N, 3, 112, 112]"
            )
        # the crop size the model was exported for (112 for every public ArcFace)
        sizes = {fixed_dim(shape[2]), fixed_dim(shape[3])} - {None}
        if len(sizes) > 1:
            raise ModelFileError(f"{model.path.name}: non-square ArcFace input {shape}")
        self.size = sizes.pop() if sizes else ARCFACE_SIZE
        self.template = arcface_template(self.size)
        out_shape = outputs[0][1]
        self.dim = fixed_dim(out_shape[-1]) if out_shape else None  # None: known after a run
        # normalised twice, an in-graph-normalising export gives garbage identity
        self.mean, self.std = input_normalisation(model.path)

    def crop(self, image: np.ndarray, face: Face) -> np.ndarray:
        """The aligned face the model sees (BGR)."""
        crop, _ = align_crop(image, five_points(face), self.template, self.size)
        return crop

    def embed_crop(self, crop: np.ndarray) -> np.ndarray:
        """The normalised embedding of an already aligned crop."""
        return normalise(self.raw_embedding_of_crop(crop))

    def raw_embedding_of_crop(self, crop: np.ndarray) -> np.ndarray:
        """The model's own output for an aligned crop, not normalised: the embedding
        converters of some swappers (ghost, simswap, hififace) were trained on it."""
        blob = arcface_blob(crop, self.mean, self.std)
        (raw,) = self.model.run({self.input_name: blob}, [self.model.outputs[0][0]])
        raw = np.asarray(raw, np.float32).reshape(-1)
        if self.dim is not None and raw.size != self.dim:
            raise ModelFileError(
                f"{self.model.path.name}: returned {raw.size} values, expected {self.dim}"
            )
        return raw

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        """Unit-length embedding of ``face`` in ``image`` (BGR)."""
        return self.embed_crop(self.crop(image, face))

    def raw_embedding(self, image: np.ndarray, face: Face) -> np.ndarray:
        """The model's own output for ``face`` (see ``raw_embedding_of_crop``)."""
        return self.raw_embedding_of_crop(self.crop(image, face))

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        return cosine_distance(a, b)
