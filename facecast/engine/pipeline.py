"""Wires the stages: frame → faces → swap → label.

``SwapEngine`` is the per-frame work, shared by every mode; the file runners below feed it
every frame in order (nothing dropped). Live modes reuse the same engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facecast import __version__
from facecast.engine.timing import StageClock
from facecast.errors import NoFaceError
from facecast.faces.analyse import FaceAnalyser
from facecast.faces.face import Face
from facecast.faces.select import Selection
from facecast.faces.temporal import TemporalFaces
from facecast.media.frame import Frame
from facecast.media.mark import make_mark
from facecast.media.overlay import draw_label
from facecast.media.planes import Box
from facecast.models.choice import ModelChoice, load_models
from facecast.swap.mesh_swapper import SwapOptions
from facecast.swap.sources import SourceSet, expression_vector

log = logging.getLogger(__name__)


INDEX_WARNING_EVERY = 60.0  # seconds between "index:N chooses no face" log lines


@dataclass(frozen=True)
class EngineOptions:
    selection: Selection = field(default_factory=Selection)
    swap: SwapOptions = field(default_factory=SwapOptions)
    label: bool = True
    label_text: str = "AI-generated"
    tiles: bool = False  # tiled detection: slower, finds small faces (used for still images)
    detect_every: int = 1  # video: detect every N frames, follow meshes in between
    temporal: bool = False  # video: reset on cuts, track ids, smooth meshes (faces/temporal.py)
    fps: float = 30.0  # the video's frame rate, for the smoothing's time base
    # reference mode: the largest identity distance at which a face counts as a reference's
    # person; None takes the recogniser's own (dlib 0.5 Euclidean, ArcFace 0.6 cosine)
    reference_distance: float | None = None
    # (reference photo, source photo) pairs: swap only these people, each with that face
    references: tuple[tuple[Path, Path], ...] = ()
    # which model does each job (embedded defaults, or the user's ONNX files)
    models: ModelChoice = field(default_factory=ModelChoice)
    # log "index:N chooses no face" now and then (streams, the web page); the file runners
    # count such frames and report them once instead
    log_index_misses: bool = True


@dataclass
class PlannedSwap:
    """One face to swap in a frame, with what the swap needs from the analysis."""

    face: Face
    reference: int | None  # which reference's person (None: the one source face)
    source: Any  # the prepared source face it gets
    colour: Callable[[np.ndarray], np.ndarray] | None  # its track's colour smoothing


@dataclass
class FramePlan:
    """What ``SwapEngine.analyse`` decided for one frame, for ``SwapEngine.render``."""

    faces: int = 0  # faces found
    swaps: list[PlannedSwap] = field(default_factory=list)


@dataclass
class FrameResult:
    faces: int = 0
    chosen: int = 0  # faces the selection picked (all, largest, index:N, references)
    swapped: int = 0
    # the boxes of the image the stages changed (swaps, restorations, the label): the rest
    # is as it came, so a frame's planes need only these converted back (media/planes.py)
    changed: list[Box] = field(default_factory=list)


class SwapEngine:
    """The source face and the models, applied frame by frame. One per stream: it owns its
    model sessions, so several engines can run in one process."""

    def __init__(self, options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions()
        self.models = load_models(self.options.models, self.options.swap)
        self.analyser = FaceAnalyser(
            tiles=self.options.tiles,
            detect_every=self.options.detect_every,
            detector=self.models.detector,
        )
        self.swapper = self.models.swapper
        self.source: Any = None  # what swapper.prepare() made of the source photo
        self.source_set: SourceSet | None = None  # several source photos, see load_sources
        self._index_warned = -INDEX_WARNING_EVERY  # when index:N last chose no face (log)
        self.temporal = TemporalFaces(self.options.fps) if self.options.temporal else None
        self.last_faces: list[Face] = []
        # reference mode: (the person to swap, the face they get), see add_reference()
        self.references: list[tuple[np.ndarray, Any]] = []
        self.last_swaps: list[tuple[Face, int | None]] = []  # (face, reference index)

    def close(self) -> None:
        """The stream or file is done: free what the models hold (see ``Models.release``)."""
        self.models.release()

    def photo_faces(self, image: np.ndarray) -> list[Face]:
        """Faces in a still photo (a source or a reference), largest first."""
        # A photo gets its own tiled analyser: small faces are found, the cost is paid once,
        # and the stream analyser's frame-to-frame state is not disturbed.
        return FaceAnalyser(tiles=True, detector=self.models.detector).analyse(image)

    def load_source(self, image: np.ndarray, name: str = "source image") -> Any:
        """Prepare the source face (the largest, if the photo shows several). Replaces a
        set of several photos (``load_sources``), if there was one."""
        self.source = self.swapper.prepare(image, self._source_face(image, name))
        self.source_set = None
        return self.source

    def load_sources(self, photos: list[tuple[np.ndarray, str]]) -> None:
        """Several photos of the source person: each target face gets the one nearest its
        expression and pose (``swap/sources.py``). One photo is ``load_source``."""
        if len(photos) == 1:
            self.load_source(*photos[0])
            return
        prepared, vectors = [], []
        for image, name in photos:
            face = self._source_face(image, name)
            if face.mesh is None:  # a detector without a mesh: no expression to compare
                raise NoFaceError(f"{name}: no face mesh, so several sources cannot be used")
            prepared.append(self.swapper.prepare(image, face))
            vectors.append(expression_vector(face.mesh))
        names = [name for _, name in photos]
        self.source_set = SourceSet(prepared, np.array(vectors), names)
        self.source = prepared[0]
        log.info("%d source photos: each face gets the nearest in expression", len(photos))

    def _source_face(self, image: np.ndarray, name: str) -> Face:
        faces = self.photo_faces(image)
        if not faces:
            raise NoFaceError(f"no face found in {name}: use a photo with one clearly visible face")
        if len(faces) > 1:
            log.warning("%s shows %d faces; using the largest", name, len(faces))
        return faces[0]

    def _source_for(self, face: Face) -> Any:
        if self.source_set is None or face.mesh is None:
            return self.source
        return self.source_set.pick(face.mesh, face.track_id)

    def add_reference(
        self, reference: np.ndarray, source: np.ndarray | None = None, name: str = "reference photo"
    ) -> int:
        """From now on only the person in ``reference`` is swapped, with the face in
        ``source`` (None: the engine's source face, also after ``load_source`` changes it);
        call again for more people (person A -> face X, person B -> face Y). Faces that
        match no reference are left untouched. Video and live only: identity is decided
        per track."""
        faces = self.photo_faces(reference)
        if not faces:
            raise NoFaceError(f"no face found in {name}: use a photo with one clearly visible face")
        recogniser = self.models.recogniser
        embedding = recogniser.embed(reference, faces[0])
        own_face = None
        if source is not None:
            source_faces = self.photo_faces(source)
            if not source_faces:
                raise NoFaceError(f"no face found in the source for {name}")
            own_face = self.swapper.prepare(source, source_faces[0])
        elif self.source is None:
            raise RuntimeError("load_source() before a reference without its own face")
        self.references.append((embedding, own_face))
        if self.temporal is None or self.temporal.embed is None:
            self.temporal = TemporalFaces(self.options.fps, recogniser=recogniser)
        self.source = self.source or own_face
        return len(self.references) - 1

    def process(
        self, image: np.ndarray, clock: StageClock | None = None, seconds: float | None = None
    ) -> FrameResult:
        """Swap the selected faces of ``image`` in place and label it. ``seconds``: the
        frame's timestamp, the time base of the smoothing (else frames count at ``fps``)."""
        return self.render(image, self.analyse(image, clock, seconds), clock)

    def analyse(
        self, image: np.ndarray, clock: StageClock | None = None, seconds: float | None = None
    ) -> FramePlan:
        """The first half of ``process``: find, follow and choose the faces of ``image``
        (read only). Frames must come in order; ``render`` may run a frame or more behind
        on another thread (the file runner does), since the plan holds everything it needs
        from this frame's analysis."""
        if self.source is None:
            raise RuntimeError("load_source() or add_reference() first")
        clock = clock or StageClock()
        if self.temporal is not None and self.temporal.begin(image):
            self.analyser.reset()  # a new shot: nothing to follow from the last one
        faces = self.analyser.analyse(image, clock)
        if self.temporal is not None:
            with clock.stage("track"):
                faces = self.temporal.settle(image, faces, seconds)
        self.last_faces = faces
        if self.source_set is not None:
            self.source_set.forget({f.track_id for f in faces if f.track_id is not None})
        chosen = self._chosen(image, faces, clock)
        if (
            faces
            and not chosen
            and self.options.selection.mode == "index"
            and self.options.log_index_misses
        ):
            self._warn_index_missed(len(faces))
        plan = FramePlan(faces=len(faces))
        for face, ref in chosen:
            own_face = None if ref is None else self.references[ref][1]
            colour = self.temporal.colour_settler(face) if self.temporal is not None else None
            plan.swaps.append(PlannedSwap(face, ref, own_face or self._source_for(face), colour))
        return plan

    def render(
        self, image: np.ndarray, plan: FramePlan, clock: StageClock | None = None
    ) -> FrameResult:
        """The second half of ``process``: swap the planned faces into ``image`` in place,
        restore them (an enhancer) and draw the label. Call in frame order."""
        clock = clock or StageClock()
        result = FrameResult(faces=plan.faces, chosen=len(plan.swaps))
        swaps = []
        for planned in plan.swaps:
            face = planned.face
            box = self.swapper.swap(image, face, planned.source, clock, planned.colour)
            if box is None:
                continue
            result.swapped += 1
            result.changed.append(box)
            swaps.append((face, planned.reference))
            if self.models.enhancer is not None:
                with clock.stage("enhance"):
                    restored = self.models.enhancer.enhance(image, face)
                if restored is not None:
                    result.changed.append(restored)
        self.last_swaps = swaps
        if self.options.label:
            with clock.stage("label"):
                label = draw_label(image, self.options.label_text)
            if label is not None:
                result.changed.append(label)
        return result

    def process_frame(
        self, frame: Frame, clock: StageClock | None = None, seconds: float | None = None
    ) -> FrameResult:
        """``process`` on a ``Frame`` (see ``render_frame``)."""
        return self.render_frame(frame, self.analyse(frame.image, clock, seconds), clock)

    def render_frame(
        self, frame: Frame, plan: FramePlan, clock: StageClock | None = None
    ) -> FrameResult:
        """``render`` on a ``Frame``'s picture, and the frame told which boxes changed, so
        only those go back into its planes (``Frame.planes``)."""
        result = self.render(frame.image, plan, clock)
        frame.changed = result.changed
        return result

    def _warn_index_missed(self, count: int) -> None:
        """``index:N`` past the faces in view: said in the log (at most every
        ``INDEX_WARNING_EVERY`` seconds, a stream may run for hours), never silently."""
        now = time.monotonic()
        if now - self._index_warned < INDEX_WARNING_EVERY:
            return
        self._index_warned = now
        log.warning(
            "--faces %s chooses no face: %d in view (index:0 to index:%d)",
            self.options.selection,
            count,
            count - 1,
        )

    def _chosen(
        self, image: np.ndarray, faces: list[Face], clock: StageClock
    ) -> list[tuple[Face, int | None]]:
        """The faces to swap, each with its reference (None: the one source face)."""
        if not self.references:
            order = self.temporal.order if self.temporal is not None else None
            return [(face, None) for face in self.options.selection.choose(faces, order)]
        assert self.temporal is not None
        embeddings = [embedding for embedding, _ in self.references]
        threshold = self.options.reference_distance
        if threshold is None:
            threshold = self.models.recogniser.same_person
        chosen = []
        with clock.stage("identify"):
            for face in faces:
                ref = self.temporal.identify(image, face, embeddings, threshold)
                if ref is not None:
                    chosen.append((face, ref))
        return chosen


def output_mark(source: Path | str | list[Path], options: EngineOptions) -> dict[str, str]:
    """The machine-readable provenance written into every output file."""
    names = [Path(p).name for p in source] if isinstance(source, list) else [Path(source).name]
    return make_mark(
        generator=f"facecast {__version__}",
        source_face=", ".join(names),
        swapper=options.models.swapper,
        faces=str(options.selection),
        visible_label=options.label,
    )
