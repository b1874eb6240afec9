"""Which model does each job, per engine: the embedded defaults or the user's ONNX files.

``ModelChoice`` names a model per job (detector, recogniser, swapper, enhancer) and how
ONNX files run (``RuntimeOptions``). ``load_models`` turns it into live objects. Each
``SwapEngine`` loads its own set, so one process can run a stream on the embedded swapper
beside another on a user model.

A user model is named by its family (``inswapper``) or by its file (``inswapper_128`` or
``inswapper_128.onnx``) and is looked up in the models folder (``--models-dir`` or
``FACECAST_MODELS_DIR``) by ``models/user.py``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from facecast.errors import FacecastError
from facecast.models import user as usermodels
from facecast.models.runtime import OnnxModel, RuntimeOptions, parse_providers

if TYPE_CHECKING:
    from facecast.config import ModelSettings
    from facecast.faces.recognise import Recogniser
    from facecast.swap.enhance import FaceEnhancer
    from facecast.swap.mesh_swapper import SwapOptions

log = logging.getLogger(__name__)

EMBEDDED = {"detector": "blazeface", "recogniser": "dlib", "swapper": "mesh"}


@dataclass(frozen=True)
class ModelChoice:
    models_dir: Path | None = None
    detector: str = "blazeface"
    recogniser: str = "dlib"
    swapper: str = "mesh"
    enhancer: str | None = None
    swap_size: int = 128
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)

    @classmethod
    def from_settings(cls, settings: ModelSettings) -> ModelChoice:
        return cls(
            models_dir=settings.models_dir,
            detector=settings.detector,
            recogniser=settings.recogniser,
            swapper=settings.swapper,
            enhancer=settings.enhancer,
            swap_size=settings.swap_size,
            runtime=RuntimeOptions(
                providers=parse_providers(settings.execution_providers),
                fp16=settings.fp16,
                memory=settings.memory_strategy,  # type: ignore[arg-type]
            ),
        )

    @property
    def runs_onnx(self) -> bool:
        """Whether any job runs a user's ONNX file (the only models providers apply to)."""
        embedded = all(getattr(self, job) == name for job, name in EMBEDDED.items())
        return not embedded or self.enhancer is not None

    def ignored_runtime(self) -> str | None:
        """Why GPU settings do nothing here, or None: the embedded models always run on
        the CPU (LiteRT and dlib), so ``--execution-provider cuda`` alone would silently
        change nothing."""
        asked = [name for name in self.runtime.providers if name != "cpu"]
        if self.runs_onnx or not (asked or self.runtime.fp16):
            return None
        what = " ".join(f"--execution-provider {name}" for name in asked) or "--fp16"
        return (
            f"{what} has no effect: only the embedded models run, always on the CPU; GPU "
            "providers apply to ONNX models (--swapper, --detector, --recogniser, --enhancer "
            "with --models-dir)"
        )

    def describe(self) -> str:
        """For logs and the output's provenance mark."""
        parts = [f"{job}={getattr(self, job)}" for job in ("detector", "recogniser", "swapper")]
        if self.enhancer:
            parts.append(f"enhancer={self.enhancer}")
        return " ".join(parts)


@dataclass
class Models:
    """The loaded set. ``detector`` None means the embedded BlazeFace (FaceAnalyser's own);
    the recogniser is loaded on first use (only reference mode and re-identification need
    it, and dlib's costs a second to load)."""

    choice: ModelChoice
    detector: Any | None
    swapper: Any
    enhancer: FaceEnhancer | None
    _recogniser: Recogniser | None = None

    @property
    def recogniser(self) -> Recogniser:
        if self._recogniser is None:
            self._recogniser = load_recogniser(self.choice)
        return self._recogniser

    def release(self) -> None:
        """The stream is over: its ONNX sessions are freed (``moderate``), kept for the next
        stream (``tolerant``) or already gone (``strict``). The next call would reopen them."""
        parts = (self.detector, self.swapper, getattr(self.swapper, "recogniser", None))
        for part in (*parts, self.enhancer, self._recogniser):
            model = getattr(part, "model", None)
            if isinstance(model, OnnxModel):
                model.release()


def load_models(choice: ModelChoice, swap_options: SwapOptions | None = None) -> Models:
    """Every model ``choice`` names, loaded now so a missing or broken file fails at start,
    not at the first face."""
    from facecast.swap.mesh_swapper import MeshSwapper

    detector = None
    if choice.detector != EMBEDDED["detector"]:
        from facecast.faces.detect_onnx import detector_for

        model, found = open_model(choice, "detector", choice.detector)
        family = found.family
        detector = detector_for(model, family=family)
    recogniser = None
    if choice.swapper == EMBEDDED["swapper"]:
        swapper: Any = MeshSwapper(swap_options)
        if choice.swap_size != 128:
            log.warning(
                "swap size %d applies to the learned swappers; the embedded one already works at "
                "the face's own size",
                choice.swap_size,
            )
    else:
        swapper = load_learned_swapper(choice, swap_options)
        recogniser = swapper.recogniser if choice.recogniser != EMBEDDED["recogniser"] else None
    enhancer = None
    if choice.enhancer:
        from facecast.swap.enhance import FaceEnhancer, framing_for

        model, found = open_model(choice, "enhancer", choice.enhancer)
        enhancer = FaceEnhancer(model, framing=framing_for(found.name or found.path.stem))
    if choice != ModelChoice(runtime=choice.runtime):
        log.info("models: %s", choice.describe())
    return Models(choice, detector, swapper, enhancer, recogniser)


def load_learned_swapper(choice: ModelChoice, swap_options: SwapOptions | None) -> Any:
    """The user's swapper file, with what its family takes the source through: the ArcFace
    recogniser (all but blendswap and uniface, which take a crop of the source photo) and,
    for ghost, simswap and hififace, the family's embedding converter."""
    from facecast.swap.conventions import convention_for
    from facecast.swap.learned import LearnedSwapper

    model, found = open_model(choice, "swapper", choice.swapper)
    family = found.family
    convention = convention_for(family or "", found.swapper_size)
    arcface = None
    if convention is None or convention.needs_recogniser:
        # the identity input is an ArcFace embedding, whatever recognises identities
        arcface = load_recogniser(choice, require_arcface=True)
    converter = None
    if convention is not None and convention.needs_converter:
        converter, _ = open_model(choice, "converter", convention.family)
    return LearnedSwapper(
        model,
        arcface,  # type: ignore[arg-type]
        swap_options,
        swap_size=choice.swap_size,
        family=family,
        converter=converter,
    )


def load_recogniser(choice: ModelChoice, require_arcface: bool = False) -> Recogniser:
    """The identity model: dlib (embedded) or ArcFace from the models folder. The learned
    swappers that take an embedding need ArcFace even when identities are told apart by dlib."""
    name = choice.recogniser
    if name == EMBEDDED["recogniser"]:
        if not require_arcface:
            from facecast.faces.embed import FaceEmbedder

            return FaceEmbedder()
        name = "arcface"
    from facecast.faces.recognise import ArcFaceRecogniser

    return ArcFaceRecogniser(open_model(choice, "recogniser", name)[0])


def open_model(
    choice: ModelChoice, kind: str, wanted: str
) -> tuple[OnnxModel, usermodels.FoundModel]:
    """The ONNX file for ``kind`` named ``wanted`` (a family or a file name), opened, and
    what it was identified as (family; name, known by sha256 or the file's stem)."""
    folder = usermodels.models_dir(choice.models_dir)
    if folder is None:
        raise FacecastError(
            f"the {kind} {wanted!r} is a model file you supply: put it in a folder and name "
            "that folder with --models-dir (or FACECAST_MODELS_DIR)"
        )
    family = wanted if wanted in usermodels.FAMILIES.get(kind, ()) else None
    found = usermodels.require(
        scan_folder(folder), kind, family=family, name=None if family else wanted
    )
    log.info("%s: %s (%s, by %s)", kind, found.file, found.family, found.identified_by)
    return OnnxModel(found.path, choice.runtime), found


def scan_folder(folder: Path) -> list[usermodels.FoundModel]:
    """``usermodels.scan``, remembered while the folder's files are unchanged: every stream
    that starts would otherwise hash every model again (about a second per large file)."""
    listing = tuple(
        (str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in usermodels.model_files(folder)
    )
    return _scan(folder, listing)


@functools.lru_cache(maxsize=8)
def _scan(folder: Path, listing: tuple) -> list[usermodels.FoundModel]:
    return usermodels.scan(folder)
