"""The user's models folder: which ONNX files are there and what each one is.

facecast never downloads a model. A user who holds the rights to a learned model (a face
swapper, a recogniser, a detector, a face enhancer) puts the ``.onnx`` file in a folder named
by ``--models-dir`` or ``FACECAST_MODELS_DIR``. ``scan`` lists every ``*.onnx`` file in that
folder and in its direct subfolders (one level, so ``models/insightface/w600k_r50.onnx`` is
found; deeper trees and hidden files or folders are not searched, so a project checked out
inside the folder does not drag in its own test graphs), and says what each one is:

1. by sha256, against ``KNOWN_SHA256`` (files a maintainer verified), else
2. by its signature: the graph's inputs (initializers excluded) and outputs, their names and
   static shapes.

A file that cannot be read, or that matches nothing, is listed too with the reason; one bad
file never stops a scan. ``require`` picks the file an engine stage needs, or raises an error
that says what was found and what is missing.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from facecast.errors import FacecastError, ModelError
from facecast.models.registry import sha256_of
from facecast.models.runtime import ModelFileError, fixed_dim, load_onnx
from facecast.swap.conventions import CONVERTED
from facecast.swap.conventions import FAMILIES as SWAPPER_FAMILIES

log = logging.getLogger(__name__)

Kind = Literal["swapper", "recogniser", "detector", "enhancer", "converter"]
# "signature+name": the signature gives the kind, the file's name the family (see
# _swapper_family)
IdentifiedBy = Literal["sha256", "signature", "signature+name"]
Dim = int | str | None  # a static size, a named dynamic size, or an unnamed dynamic size

# Each kind and the families facecast has adapters for. "gfpgan" stands for the 512x512 face
# restorers in general (GFPGAN, GPEN-BFR, RestoreFormer, CodeFormer with its "weight" input).
# A "converter" maps ArcFace embeddings into the identity space a swapper family was trained
# on (FaceFusion's crossface_ghost, crossface_simswap, crossface_hififace).
FAMILIES: dict[str, tuple[str, ...]] = {
    "swapper": SWAPPER_FAMILIES,
    "recogniser": ("arcface",),
    "detector": ("scrfd", "retinaface", "yoloface"),
    "enhancer": ("gfpgan",),
    "converter": CONVERTED,
}

# sha256 -> (kind, family, name) of known files. A hash match wins over the signature, so a
# known file keeps its name even when its signature is ambiguous; any other copy of a model
# (re-exported, converted) is still identified by its signature. Sources, none of them
# computed here (no weights are downloaded):
# - the hashes the VisoMaster project publishes for the copies it distributes
#   (visomaster/VisoMaster, app/processors/models_data.py): every entry but one;
# - insightface's fp32 inswapper_128.onnx (554,253,681 bytes): the hash several unrelated
#   projects check their downloads against, from different mirrors (HuggingFace
#   ezioruan/inswapper_128.onnx, deepinsight/inswapper, civitai), each listing det_10g and
#   w600k_r50 with the same hashes as VisoMaster's.
# Add others from `facecast models --models-dir DIR`, which prints each file's full sha256.
KNOWN_SHA256: dict[str, tuple[Kind, str, str]] = {
    "5838f7fe053675b1c7a08b633df49e7af5495cee0493c7dcf6697200b85b5b91": (
        "detector",
        "scrfd",
        "det_10g",
    ),
    "bc24bb349491481c3ca793cf89306723162c280cb284c5a5e49df3760bf5c2ce": (
        "detector",
        "scrfd",
        "scrfd_2.5g_bnkps",
    ),
    "84d5bb985b0ea75fc851d7454483897b1494c71c211759b4fec3a22ac196d206": (
        "detector",
        "yoloface",
        "yoloface_8n",
    ),
    "4c06341c33c2ca1f86781dab0e829f88ad5b64be9fba56e56bc9ebdefc619e43": (
        "recogniser",
        "arcface",
        "w600k_r50",
    ),
    "6d51a9278a1f650cffefc18ba53f38bf2769bf4bbff89267822cf72945f8a38b": (
        "swapper",
        "inswapper",
        "inswapper_128.fp16",
    ),
    "e4a3f08c753cb72d04e10aa0f7dbe3deebbf39567d4ead6dce08e98aa49e16af": (
        "swapper",
        "inswapper",
        "inswapper_128",
    ),
    "aa5bd3ab238640a378c59e4a560f7a7150627944cf2129e6311ae4720e833271": (
        "enhancer",
        "gfpgan",
        "GPEN-BFR-256",
    ),
    "cec8892093d7b99828acde97bf231fb0964d3fb11b43f3b0951e36ef1e192a3e": (
        "enhancer",
        "gfpgan",
        "GPEN-BFR-1024",
    ),
    "6548e54cbcf248af385248f0c1193b359c37a0f98b836282b09cf48af4fd2b73": (
        "enhancer",
        "gfpgan",
        "GFPGANv1.4",
    ),
    "0960f836488735444d508b588e44fb5dfd19c68fde9163ad7878aa24d1d5115e": (
        "enhancer",
        "gfpgan",
        "GPEN-BFR-512",
    ),
    "9c3ae2ce2de616815815628f966cdef5d9466722434a1be00c0785ec92e2a94f": (
        "enhancer",
        "gfpgan",
        "codeformer_fp16",
    ),
}

ENV_VAR = "FACECAST_MODELS_DIR"
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


@dataclass(frozen=True)
class FoundModel:
    """One ``.onnx`` file in the models folder and what it was identified as.

    ``kind`` is None for a file that is unreadable or matches nothing; ``reason`` then says
    why. ``name`` is the table's name for a file known by sha256, else the file's stem.
    ``file`` is the path relative to the models folder (for display)."""

    path: Path
    file: str
    sha256: str
    kind: Kind | None = None
    family: str | None = None
    name: str | None = None
    identified_by: IdentifiedBy | None = None
    inputs: tuple[Tensor, ...] = ()
    outputs: tuple[Tensor, ...] = ()
    reason: str | None = None

    @property
    def recognised(self) -> bool:
        return self.kind is not None

    def label(self) -> str:
        if self.kind is None:
            return f"{self.file} (not recognised: {self.reason})"
        return f"{self.file} ({self.kind} {self.family})"


# -- the models folder


def models_dir(value: Path | None) -> Path | None:
    """The models folder: ``value`` (``--models-dir``), else ``$FACECAST_MODELS_DIR``, else
    None (no user models). A named folder that is missing or not a folder is an error."""
    origin = "--models-dir"
    if value is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if not env:
            return None
        value, origin = Path(env), ENV_VAR
    path = Path(value).expanduser()
    if not path.exists():
        raise FacecastError(
            f"models folder {path} (from {origin}) does not exist: create it and put your "
            ".onnx files there, or point {origin} at the folder that holds them"
        )
    if not path.is_dir():
        raise FacecastError(f"models folder {path} (from {origin}) is a file, not a folder")
    return path


def model_files(folder: Path) -> list[Path]:
    """``*.onnx`` in ``folder`` and its direct subfolders, hidden ones skipped, in path
    order (top-level files first)."""
    if not folder.is_dir():
        raise FacecastError(f"models folder {folder} is not a folder")

    def onnx_in(where: Path) -> list[Path]:
        return sorted(
            p
            for p in where.iterdir()
            if p.suffix.lower() == ".onnx" and not p.name.startswith(".") and p.is_file()
        )

    found = onnx_in(folder)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            found += onnx_in(sub)
        except OSError as exc:  # an unreadable subfolder is skipped, not fatal
            log.warning("models folder: cannot list %s (%s)", sub, exc)
    return found


def scan(folder: Path) -> list[FoundModel]:
    """Every ``.onnx`` file under ``folder`` (see ``model_files``), identified by sha256
    first, else by signature. Never raises on a bad file: it is returned with kind None."""
    return [identify(path, path.relative_to(folder).as_posix()) for path in model_files(folder)]


def identify(path: Path, file: str | None = None) -> FoundModel:
    """What one ``.onnx`` file is (see the module docstring)."""
    file = file or path.name
    try:
        digest = sha256_of(path)
    except OSError as exc:
        return FoundModel(path, file, "", reason=f"cannot read the file ({exc.strerror or exc})")
    found = FoundModel(path, file, digest, name=path.stem)
    known = KNOWN_SHA256.get(digest)
    if known:
        kind, family, name = known
        found = replace(found, kind=kind, family=family, name=name, identified_by="sha256")
    try:
        inputs, outputs = read_signature(path)
    except ModelFileError as exc:
        # for a file known by sha256 this is only a note: the hash says what it is
        return replace(found, reason=str(exc).removeprefix(f"{path}: "))
    found = replace(found, inputs=inputs, outputs=outputs)
    if known:
        return found
    match = match_signature(inputs, outputs, path.stem)
    if isinstance(match, str):
        return replace(found, reason=match)
    if match is None:
        return replace(
            found,
            reason=f"unknown sha256, and its signature matches no supported model ({SUPPORTED})",
        )
    by_name = match_signature(inputs, outputs) != match  # without the name, another answer
    return replace(
        found,
        kind=match[0],
        family=match[1],
        identified_by="signature+name" if by_name else "signature",
    )


# -- signatures


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
    if fits(source, ANY, 3, 112, 112) and size == 256:
        return "blendswap"
    if fits(source, ANY, 3, 256, 256) and size == 256:
        return "uniface"
    if not fits(source, ANY, 512):
        return None
    if size == 128:
        return "inswapper" if len(outs) == 1 else None
    if size == 512:
        return "simswap"
    if size == 256:
        return _family_in_name(stem, ("hyperswap", "simswap", "ghost", "hififace")) or ""
    return None


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


# -- picking a model, and listing them


def require(
    found: Sequence[FoundModel], kind: str, family: str | None = None, name: str | None = None
) -> FoundModel:
    """The model of ``kind`` (and ``family``, and ``name``: a known name, a file stem or a
    file name) among ``found``. Files known by sha256 come first, then by path. Raises a
    ModelError naming what was asked for and listing what the folder holds."""
    if kind not in FAMILIES:
        raise FacecastError(f"unknown model kind {kind!r}: use one of {', '.join(FAMILIES)}")
    if family is not None and family not in FAMILIES[kind]:
        raise FacecastError(
            f"unknown {kind} family {family!r}: facecast has adapters for "
            f"{', '.join(FAMILIES[kind])}"
        )
    wanted_name = name.lower() if name else None

    def wanted(m: FoundModel) -> bool:
        if m.kind != kind or (family is not None and m.family != family):
            return False
        names = {(m.name or "").lower(), m.path.stem.lower(), m.path.name.lower()}
        return wanted_name is None or wanted_name in names

    matches = sorted(
        (m for m in found if wanted(m)), key=lambda m: m.identified_by != "sha256"
    )  # stable: path order within each group
    if matches:
        if len(matches) > 1:
            log.info(
                "%s: using %s (also found: %s)",
                kind,
                matches[0].file,
                ", ".join(m.file for m in matches[1:]),
            )
        return matches[0]

    asked = " ".join(part for part in (kind, family) if part)
    if name:
        asked += f" named {name!r}"
    held = "; ".join(m.label() for m in found) if found else "no .onnx files"
    raise ModelError(
        f"no {asked} in the models folder (it holds {held}). Put the .onnx file there "
        "(facecast never downloads models); `facecast models --models-dir DIR` shows what "
        "each file was recognised as"
    )


# the order the CLI prints describe()'s keys in
COLUMNS = ("file", "kind", "family", "identified_by", "sha256", "inputs", "outputs", "note")


def describe(found: Sequence[FoundModel]) -> list[dict[str, str]]:
    """One row of strings per file for ``facecast models --models-dir``: the keys in
    ``COLUMNS`` plus ``sha256_full`` (to add a verified file to ``KNOWN_SHA256``) and
    ``name``. ``sha256`` is the first 16 hex digits."""
    rows = []
    for m in found:
        note = f"not recognised: {m.reason}" if m.kind is None else (m.reason or "")
        rows.append(
            {
                "file": m.file,
                "kind": m.kind or "-",
                "family": m.family or "-",
                "name": m.name or "-",
                "identified_by": m.identified_by or "-",
                "sha256": m.sha256[:16],
                "sha256_full": m.sha256,
                "inputs": ", ".join(t.text() for t in m.inputs),
                "outputs": ", ".join(t.text() for t in m.outputs),
                "note": note,
            }
        )
    return rows
