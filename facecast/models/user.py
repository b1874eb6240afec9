"""The user's models folder: which ONNX files are there and what each one is.

facecast never downloads a model. A user who holds the rights to a learned model (a face
swapper, a recogniser, a detector, a face enhancer) puts the ``.onnx`` file in a folder named
by ``--models-dir`` or ``FACECAST_MODELS_DIR``. ``scan`` lists every ``*.onnx`` file in that
folder and in its direct subfolders (one level, so ``models/insightface/w600k_r50.onnx`` is
found; deeper trees and hidden files or folders are not searched, so a project checked out
inside the folder does not drag in its own test graphs), and says what each one is:

1. by sha256, against ``KNOWN_SHA256`` (files a maintainer verified), else
2. by its signature: the graph's inputs (initializers excluded) and outputs, their names and
   static shapes (``models/signatures.py``).

A file that cannot be read, or that matches nothing, is listed too with the reason; one bad
file never stops a scan. ``require`` picks the file an engine stage needs, or raises an error
that says what was found and what is missing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from facecast.errors import FacecastError, ModelError
from facecast.models.registry import sha256_of
from facecast.models.runtime import ModelFileError
from facecast.models.signatures import SUPPORTED, Kind, Tensor, match_signature, read_signature
from facecast.swap.conventions import CONVERTED
from facecast.swap.conventions import FAMILIES as SWAPPER_FAMILIES

log = logging.getLogger(__name__)

# "signature+name": the signature gives the kind, the file's name the family (see
# _swapper_family)
IdentifiedBy = Literal["sha256", "signature", "signature+name"]

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
    def swapper_size(self) -> int:
        """A swapper's crop size, from its "target" input (128, inswapper's, when the file
        leaves it open)."""
        target = next((t for t in self.inputs if t.name == "target"), None)
        size = target.shape[-1] if target is not None and target.shape else None
        return size if isinstance(size, int) and size > 0 else 128

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
