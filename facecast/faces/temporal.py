"""Face state across the frames of one video or stream: cuts, track ids, steady meshes
and steady colour.

``TemporalFaces`` wires ``SceneCutDetector``, ``FaceTracker`` and, per track, one
``OneEuroFilter`` for the mesh and one for the colour statistics the swap matches. The
engine asks it at the start of each frame whether the shot changed (then the analyser
forgets its followed meshes too), and hands it the frame's faces to be given track ids and
smoothed meshes. Still images never go through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from facecast.faces.embed import face_distance
from facecast.faces.face import Face
from facecast.faces.recognise import Recogniser
from facecast.faces.smooth import OneEuroFilter
from facecast.faces.track import Embed, FaceTracker
from facecast.media.scene import SceneCutDetector


def mesh_filter() -> OneEuroFilter:
    """A track's mesh: steady at rest (1 Hz cut-off), and quick to follow a moving head
    (beta 0.3): with 0.05 the pasted face lagged the head and slid on it, 1.55x the real
    face's frame-to-frame change after aligning the head's motion (0.3: 1.36x; ``facecast
    bench quality``'s motion-aligned flicker on the sample clip)."""
    return OneEuroFilter(min_cutoff=1.0, beta=0.3)


def colour_filter() -> OneEuroFilter:
    """For the skin colour statistics (8-bit LAB means and spreads). Real light changes
    over seconds; what changes from one frame to the next is the skin sample shifting with
    the mesh and the sensor noise, so rest is smoothed hard (0.5 Hz) and a sustained change
    of ~50 levels/s opens the filter to ~1.5 Hz."""
    return OneEuroFilter(min_cutoff=0.5, beta=0.02)


class TemporalFaces:
    """``fps`` is the time base for frames without a timestamp. ``smooth`` / ``smooth_colour``
    switch the mesh and colour filters (both on; off only to measure what they do)."""

    def __init__(
        self,
        fps: float = 30.0,
        embed: Embed | None = None,
        smooth: bool = True,
        smooth_colour: bool = True,
        recogniser: Recogniser | None = None,
    ):
        self.fps = fps
        self.scene = SceneCutDetector()
        # identity: a recogniser brings its own distance and same-person threshold;
        # a bare ``embed`` is the embedded dlib descriptor's
        if recogniser is not None:
            embed = recogniser.embed
            self.distance: Callable[[np.ndarray, np.ndarray], float] = recogniser.distance
            self.tracker = FaceTracker(
                embed=embed, distance=recogniser.distance, reid_distance=recogniser.same_person
            )
        else:
            self.distance = face_distance
            self.tracker = FaceTracker(embed=embed)
        self.smooth = smooth
        self.smooth_colour = smooth_colour
        self.filters: dict[int, OneEuroFilter] = {}
        self.colour_filters: dict[int, OneEuroFilter] = {}
        self.frames = 0
        self.time = 0.0  # of the frame being settled, seconds
        self._time_offset = 0.0  # added to frame timestamps, see _frame_time()
        self.cuts = 0
        self.embed = embed
        # track id -> x where it was first seen: index:N counts people in that order
        self.first_x: dict[int, float] = {}
        # track id -> index of the reference it matched, or None (checked again later)
        self.identities: dict[int, int | None] = {}
        self._identity_checks: dict[int, int] = {}

    def begin(self, image: np.ndarray) -> bool:
        """Call first for every frame; True on a scene cut (all state is reset)."""
        cut = self.scene.is_cut(image)
        if cut:
            self.cuts += 1
            self.tracker.reset()
            self.filters.clear()
            self.colour_filters.clear()
            self.first_x.clear()
            self.identities.clear()
            self._identity_checks.clear()
        return cut

    def settle(
        self, image: np.ndarray, faces: list[Face], seconds: float | None = None
    ) -> list[Face]:
        """Track ids for ``faces`` (set on them) and, per track, a copy with a smoothed mesh
        for the swap. The originals keep the raw mesh: the analyser follows them to the next
        frame, and following a lagging mesh would lag more. ``seconds`` is the frame's
        timestamp; live frames are dropped under load, so counting frames would misjudge
        speed (and so the filter's cut-off)."""
        self.time = self._frame_time(seconds)
        self.frames += 1
        self.tracker.update(image, faces)
        settled = []
        for face in faces:
            assert face.track_id is not None
            self.first_x.setdefault(face.track_id, float(face.center[0]))
            if self.smooth and face.mesh is not None:
                smoother = self.filters.setdefault(face.track_id, mesh_filter())
                face = replace(face, mesh=smoother(face.mesh, self.time).astype(face.mesh.dtype))
            settled.append(face)
        known = {track.id for track in self.tracker.tracks}
        self.filters = {k: f for k, f in self.filters.items() if k in known}
        self.colour_filters = {k: f for k, f in self.colour_filters.items() if k in known}
        self.identities = {k: v for k, v in self.identities.items() if k in known}
        self.first_x = {k: v for k, v in self.first_x.items() if k in known}
        return settled

    def _frame_time(self, seconds: float | None) -> float:
        """A steady clock for the filters from the frames' timestamps. A live input that
        reconnects may start its timestamps again (or jump ahead): a step back or a gap of
        over a second continues one frame after the last time instead."""
        step = 1.0 / self.fps
        if seconds is None:
            return self.time + step if self.frames else 0.0
        if self.frames:
            t = seconds + self._time_offset
            if not 0 < t - self.time <= 1.0:
                self._time_offset = self.time + step - seconds
        else:
            self._time_offset = 0.0
        return seconds + self._time_offset

    def colour_settler(self, face: Face) -> Callable[[np.ndarray], np.ndarray] | None:
        """For the swap of ``face`` this frame: smooths its track's colour statistics."""
        if not self.smooth_colour or face.track_id is None:
            return None
        smoother = self.colour_filters.setdefault(face.track_id, colour_filter())
        # this frame's time, not the analyser's by the time the swap runs (a file's swap
        # runs a frame behind the analysis, on its own thread)
        now = self.time
        return lambda stats: smoother(stats, now)

    def order(self, face: Face) -> float:
        """Rank for ``index:N``: where the face's track was first seen (left to right)."""
        if face.track_id is None:
            return float(face.center[0])
        return self.first_x.get(face.track_id, float(face.center[0]))

    def identify(
        self,
        image: np.ndarray,
        face: Face,
        references: list[np.ndarray],
        threshold: float,
        recheck_every: int = 5,
        max_checks: int = 6,
    ) -> int | None:
        """Which reference person ``face`` is (index), or None. Decided once per track; a
        track that matched nobody is looked at again a few times (it may have turned
        towards the camera), then left alone."""
        assert self.embed is not None and face.track_id is not None
        key = face.track_id
        known = self.identities.get(key)
        if known is not None:
            return known
        checks = self._identity_checks.get(key, 0)
        if key in self.identities and (checks >= max_checks or self.frames % recheck_every):
            return None
        self._identity_checks[key] = checks + 1
        embedding = face.embedding if face.embedding is not None else self.embed(image, face)
        face.embedding = embedding
        distances = [self.distance(embedding, r) for r in references]
        best = int(np.argmin(distances))
        match = best if distances[best] <= threshold else None
        self.identities[key] = match
        return match
