"""Wires the stages: frame → faces → swap → label.

``SwapEngine`` is the per-frame work, shared by every mode; the file runners below feed it
every frame in order (nothing dropped). Live modes reuse the same engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facecast import __version__
from facecast.errors import NoFaceError
from facecast.faces.analyse import FaceAnalyser
from facecast.faces.select import Selection
from facecast.media.overlay import draw_label
from facecast.swap.mesh_swapper import MeshSwapper, SourceFace, SwapOptions
from facecast.timing import StageClock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    selection: Selection = field(default_factory=Selection)
    swap: SwapOptions = field(default_factory=SwapOptions)
    label: bool = True
    label_text: str = "AI-generated"
    tiles: bool = False  # tiled detection: slower, finds small faces (used for still images)


@dataclass
class FrameResult:
    faces: int = 0
    swapped: int = 0


@dataclass
class RunStats:
    """What a run did, frame by frame, for logs, metrics and the bench."""

    frames: int = 0
    frames_swapped: int = 0
    frames_without_face: int = 0
    faces_swapped: int = 0
    clock: StageClock = field(default_factory=StageClock)

    def count(self, result: FrameResult) -> None:
        self.frames += 1
        self.faces_swapped += result.swapped
        if result.swapped:
            self.frames_swapped += 1
        elif result.faces == 0:
            self.frames_without_face += 1


class SwapEngine:
    """The source face and the models, applied frame by frame. One per stream: it owns its
    model sessions, so several engines can run in one process."""

    def __init__(self, options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions()
        self.analyser = FaceAnalyser(tiles=self.options.tiles)
        self.swapper = MeshSwapper(self.options.swap)
        self.source: SourceFace | None = None

    def load_source(self, image: np.ndarray, name: str = "source image") -> SourceFace:
        """Prepare the source face (the largest, if the photo shows several)."""
        # Sources are photos: always use tiled detection, the cost is paid once.
        faces = (
            FaceAnalyser(tiles=True).analyse(image)
            if not self.options.tiles
            else self.analyser.analyse(image)
        )
        if not faces:
            raise NoFaceError(f"no face found in {name}: use a photo with one clearly visible face")
        if len(faces) > 1:
            log.warning("%s shows %d faces; using the largest", name, len(faces))
        self.source = self.swapper.prepare(image, faces[0])
        return self.source

    def process(self, image: np.ndarray, clock: StageClock | None = None) -> FrameResult:
        """Swap the selected faces of ``image`` in place and label it."""
        if self.source is None:
            raise RuntimeError("load_source() first")
        clock = clock or StageClock()
        faces = self.analyser.analyse(image, clock)
        result = FrameResult(faces=len(faces))
        for face in self.options.selection.choose(faces):
            result.swapped += self.swapper.swap(image, face, self.source, clock)
        if self.options.label:
            with clock.stage("label"):
                draw_label(image, self.options.label_text)
        return result


def output_mark(source: Path | str, options: EngineOptions) -> dict[str, str]:
    """The machine-readable provenance written into every output file."""
    from facecast.media.mark import make_mark

    return make_mark(
        generator=f"facecast {__version__}",
        source_face=Path(source).name,
        swapper="mesh",
        faces=str(options.selection),
        visible_label=options.label,
    )
