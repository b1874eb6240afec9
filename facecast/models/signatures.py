"""What an ONNX file is, from its graph alone: its inputs and outputs (names, static
shapes, element types) against each supported family's signature. ``models/user.py`` asks
here for every file a sha256 does not name."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from facecast.models.runtime import ModelFileError, fixed_dim, load_onnx
from facecast.swap.conventions import CONVERTED, families_for
from facecast.swap.conventions import FAMILIES as SWAPPER_FAMILIES

Kind = Literal["swapper", "recogniser", "detector", "enhancer", "converter"]
Dim = int | str | None  # a static size, a named dynamic size, or an unnamed dynamic size
# square input sizes accepted as face enhancers (GPEN-BFR also comes in 256 and 1024)
ENHANCER_SIZES = (256, 512, 1024)
SUPPORTED = (
    f"swappers {', '.join(SWAPPER_FAMILIES)}; their embedding converters; arcface; scrfd, "
    "retinaface, yoloface; GFPGAN-class enhancers"
)


@dataclass(frozen=True)
class Tensor:
    """One graph input or output: its name, shape (None when the rank is unknown) and ONNX
    element type name (FLOAT, DOUBLE, FLOAT16, ...)."""

    name: str
    shape: tuple[Dim, ...] | None
    dtype: str = "FLOAT"

    def text(self) -> str:
        if self.shape is None:
            return f"{self.name} ?"
        dims = "x".join(str(d) if d is not None else "?" for d in self.shape)
        suffix = "" if self.dtype == "FLOAT" else f" {self.dtype.lower()}"
        return f"{self.name} {dims or 'scalar'}{suffix}"


def read_signature(path: Path) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """The graph's inputs (initializers are weights, not inputs) and outputs; a
    ModelFileError for a file that is empty or not an ONNX model."""
    if path.is_file() and path.stat().st_size == 0:
        raise ModelFileError(f"{path}: empty file")
    model = load_onnx(path)
    graph = model.graph
    # protobuf reads some non-ONNX bytes as an empty message: no outputs means no model
    if not model.HasField("graph") or not graph.output:
        raise ModelFileError(f"{path}: not an ONNX model (no graph outputs)")
    weights = {init.name for init in graph.initializer}
    inputs = tuple(_tensor(v) for v in graph.input if v.name not in weights)
    return inputs, tuple(_tensor(v) for v in graph.output)


def _tensor(info: Any) -> Tensor:
    """A Tensor from an ONNX ValueInfoProto."""
    import onnx

    kind = info.type.WhichOneof("value")
    if kind != "tensor_type":  # sequences and maps: listed, never matched
        return Tensor(info.name, None, kind or "?")
    tt = info.type.tensor_type
    dtype = onnx.TensorProto.DataType.Name(tt.elem_type)
    if not tt.HasField("shape"):
        return Tensor(info.name, None, dtype)
    dims: list[Dim] = [
        d.dim_value if d.WhichOneof("value") == "dim_value" else (d.dim_param or None)
        for d in tt.shape.dim
    ]
    return Tensor(info.name, tuple(dims), dtype)


def is_static(dim: Dim) -> bool:
    return fixed_dim(dim) is not None


ANY = None  # a pattern entry that matches any size


def fits(tensor: Tensor | None, *pattern: int | None) -> bool:
    """``tensor`` has the pattern's rank, and the pattern's size wherever the pattern gives
    an int (ANY accepts a static or a dynamic size)."""
    if tensor is None or tensor.shape is None or len(tensor.shape) != len(pattern):
        return False
    return all(want is None or dim == want for dim, want in zip(tensor.shape, pattern, strict=True))


def is_scalar(tensor: Tensor) -> bool:
    """A single number: CodeFormer's fidelity "weight" ([1] or [], float or double)."""
    return tensor.shape in ((), (1,)) and tensor.dtype in ("FLOAT", "DOUBLE", "FLOAT16")


def _batch_ok(tensor: Tensor) -> bool:
    assert tensor.shape  # callers check the rank first
    return tensor.shape[0] == 1 or not is_static(tensor.shape[0])


def _last_dims(tensors: Sequence[Tensor]) -> Counter:
    return Counter(t.shape[-1] if t.shape else None for t in tensors)


def _swapper_family(ins: Sequence[Tensor], outs: Sequence[Tensor], stem: str) -> str | None:
    """A learned swapper's family: "target" [N,3,S,S] and "source" (an identity vector
    [N,512] or a face crop [N,3,s,s]) in, the redrawn [N,3,S,S] first out. The inputs tell
    inswapper (128), blendswap (a 112 px source crop), uniface (a 256 px one) and simswap's
    512 export apart; at 256 px with a vector, hyperswap, simswap, ghost and hififace look
    alike, and the file's name says which (FaceFusion's names start with the family).
    Returns "" for such a file whose name does not."""
    named = {t.name: t for t in ins}
    target, source = named.get("target"), named.get("source")
    if len(ins) != 2 or not outs or not fits(target, ANY, 3, ANY, ANY):
        return None
    assert target is not None and target.shape is not None
    size = target.shape[2]
    if not is_static(size) or target.shape[3] != size or not fits(outs[0], ANY, 3, size, size):
        return None
    if source is None or source.shape is None:
        return None
    if len(source.shape) == 4 and not fits(source, ANY, 3, ANY, ANY):
        return None
    if len(source.shape) == 2 and not fits(source, ANY, 512):
        return None
    families = families_for(size, source.shape)
    if len(families) > 1:
        return _family_in_name(stem, families) or ""
    if families == ("inswapper",) and len(outs) != 1:
        return None
    return families[0] if families else None


def _family_in_name(stem: str, families: Sequence[str]) -> str | None:
    lowered = stem.lower()
    return next((f for f in families if f in lowered), None)


def _converter_family(ins: Sequence[Tensor], outs: Sequence[Tensor], stem: str) -> str | None:
    """An embedding converter ([N,512] in, [N,512] out), the family it serves read from its
    name (crossface_ghost.onnx); "" when the name names none."""
    if len(ins) != 1 or len(outs) != 1 or not fits(ins[0], ANY, 512):
        return None
    if not fits(outs[0], ANY, 512):
        return None
    return _family_in_name(stem, CONVERTED) or ""


def _arcface(ins: Sequence[Tensor], outs: Sequence[Tensor]) -> bool:
    return (
        len(ins) == 1
        and len(outs) == 1
        and fits(ins[0], ANY, 3, 112, 112)
        and fits(outs[0], ANY, 512)
    )


def _image_input(ins: Sequence[Tensor]) -> bool:
    return len(ins) == 1 and fits(ins[0], ANY, 3, ANY, ANY) and _batch_ok(ins[0])


def _yoloface(ins: Sequence[Tensor], outs: Sequence[Tensor]) -> bool:
    # 20 channels per anchor: box (4), face score (1), five keypoints as x, y, visibility (15)
    return _image_input(ins) and len(outs) == 1 and fits(outs[0], ANY, 20, ANY)


def _scrfd(ins: Sequence[Tensor], outs: Sequence[Tensor]) -> bool:
    # per stride (8, 16, 32): scores (last dim 1), box distances (4), and in the "_kps"
    # models five keypoints (10); the 6-output models are listed, and refused by the adapter
    # with the reason (no keypoints to align with). The adapter's own test, so that what it
    # loads is recognised: exports whose output sizes are all symbolic included (their roles
    # are read from the arrays at run time, as insightface goes by the outputs' count).
    from facecast.faces.detect_onnx import scrfd_signature

    if not _image_input(ins) or any(t.shape is None for t in outs):
        return False
    shapes = [(t.name, list(t.shape or ())) for t in outs]
    return scrfd_signature(shapes) or scrfd_signature(shapes, keypoints=False)


def _retinaface(ins: Sequence[Tensor], outs: Sequence[Tensor]) -> bool:
    # loc (4), conf (2: background, face), landms (10); the layout of the input varies
    return (
        len(ins) == 1
        and fits(ins[0], ANY, ANY, ANY, ANY)
        and len(outs) == 3
        and _last_dims(outs) == Counter({4: 1, 2: 1, 10: 1})
    )


def _enhancer(ins: Sequence[Tensor], outs: Sequence[Tensor]) -> bool:
    images = [t for t in ins if t.shape is not None and len(t.shape) == 4]
    extra = [t for t in ins if t not in images]
    if len(images) != 1 or len(extra) > 1 or not all(is_scalar(t) for t in extra):
        return False
    size = images[0].shape[-1]  # type: ignore[index]
    return (
        size in ENHANCER_SIZES
        and fits(images[0], ANY, 3, size, size)
        and _batch_ok(images[0])
        and len(outs) >= 1
        and fits(outs[0], ANY, 3, size, size)
    )


# checked in order; the signatures do not overlap, the order only makes that obvious
MATCHERS: tuple[tuple[Kind, str, Callable[[Sequence[Tensor], Sequence[Tensor]], bool]], ...] = (
    ("recogniser", "arcface", _arcface),
    ("detector", "yoloface", _yoloface),
    ("detector", "scrfd", _scrfd),
    ("detector", "retinaface", _retinaface),
    ("enhancer", "gfpgan", _enhancer),
)


def match_signature(
    inputs: Sequence[Tensor], outputs: Sequence[Tensor], stem: str = ""
) -> tuple[Kind, str] | str | None:
    """(kind, family) for a graph whose inputs and outputs match a supported model's; a
    reason (str) for one whose signature fits a kind but whose family only its file name
    ``stem`` could tell, and does not; None for anything else."""
    swapper = _swapper_family(inputs, outputs, stem)
    if swapper == "":
        return (
            "a 256 px swapper with an ArcFace input: hyperswap, simswap, ghost and hififace "
            "look alike; rename the file to start with its family (hyperswap_1a_256.onnx)"
        )
    if swapper:
        return "swapper", swapper
    converter = _converter_family(inputs, outputs, stem)
    if converter == "":
        return (
            "an embedding converter ([N,512] to [N,512]) for a family its name does not say: "
            f"rename it after its swapper family ({', '.join(CONVERTED)}), as crossface_ghost.onnx"
        )
    if converter:
        return "converter", converter
    for kind, family, matches in MATCHERS:
        if matches(inputs, outputs):
            return kind, family
    return None
