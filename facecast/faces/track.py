"""Track ids that stay with a person across frames.

Continuity comes from box overlap (IoU) with where each track was last seen: cheap, and
right whenever people do not overlap. The dlib embedding (~100 ms a face on a CPU) is taken
only when overlap cannot decide:
- a face that matches no track: a new person, or someone coming back;
- a face that overlaps several tracks: people crossing. That decision is then trusted for
  ``settle_frames`` frames: in between, each track simply follows the box it was given, which
  moves little from one frame to the next.
A lost track keeps its embedding for ``max_lost_frames``, so a person who leaves and comes
back gets the id they had.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from facecast.faces.embed import face_distance
from facecast.faces.face import Face

Embed = Callable[[np.ndarray, Face], np.ndarray]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclass
class Track:
    id: int
    box: np.ndarray
    embedding: np.ndarray | None = None
    misses: int = 0  # frames since last seen
    hits: int = 1
    # A new track started while others were lost may be one of them seen badly (half
    # hidden, turned away): its identity is checked again this many more times.
    recheck: int = 0


class FaceTracker:
    """``embed(image, face)`` gives the identity descriptor (``FaceEmbedder.embed``); without
    it, tracking is by overlap only and a returning person gets a new id."""

    def __init__(
        self,
        embed: Embed | None = None,
        iou_min: float = 0.3,
        reid_distance: float = 0.5,
        max_lost_frames: int = 300,
        rechecks: int = 6,
        recheck_every: int = 2,
        settle_frames: int = 4,
        distance: Callable[[np.ndarray, np.ndarray], float] = face_distance,
    ) -> None:
        self.embed = embed
        self.distance = distance
        self.iou_min = iou_min
        self.reid_distance = reid_distance
        self.max_lost_frames = max_lost_frames
        self.rechecks, self.recheck_every = rechecks, recheck_every
        self.settle_frames = settle_frames
        self.tracks: list[Track] = []
        self.embeddings_taken = 0
        self._next_id = 0
        self._frame = 0
        # the tracks a face overlapped -> the frame their identities last settled who is who
        self._settled: dict[frozenset[int], int] = {}

    def reset(self) -> None:
        """Forget every track (a scene cut: nobody on screen now is where anyone was)."""
        self.tracks = []
        self._settled = {}

    def update(self, image: np.ndarray, faces: list[Face]) -> list[Face]:
        """Give each face of this frame a ``track_id``; returns ``faces``."""
        self._frame += 1
        overlaps = np.array(
            [[iou(f.box, t.box) for t in self.tracks] for f in faces], dtype=np.float64
        ).reshape(len(faces), len(self.tracks))
        assigned: dict[int, Track] = {}
        used: set[int] = set()
        # Uncertain first: a face over several tracks is settled by identity.
        for fi, face in enumerate(faces):
            candidates = [ti for ti in range(len(self.tracks)) if overlaps[fi, ti] >= self.iou_min]
            if len(candidates) > 1 and self.embed is not None:
                among = frozenset(self.tracks[ti].id for ti in candidates)
                if self._frame - self._settled.get(among, -self.settle_frames) < self.settle_frames:
                    continue  # settled a moment ago: continuity below keeps it
                self._settled[among] = self._frame
                best = self._closest(image, face, [self.tracks[ti] for ti in candidates])
                if best is not None and best.id not in used:
                    assigned[fi] = best
                    used.add(best.id)
        # Then plain continuity: tracks seen in the last frame first (a lost track's box is
        # where someone was before they were hidden, often right where the person in front
        # of them is now), then the largest overlaps.
        close = np.argwhere(overlaps >= self.iou_min)
        pairs = sorted(
            ((self.tracks[ti].misses == 0, overlaps[fi, ti], fi, ti) for fi, ti in close),
            reverse=True,
        )
        for _, _, fi, ti in pairs:
            track = self.tracks[ti]
            if fi in assigned or track.id in used:
                continue
            assigned[fi] = track
            used.add(track.id)
        # New or returning people: identity against the tracks not seen in this frame.
        for fi, face in enumerate(faces):
            if fi in assigned:
                continue
            lost = [t for t in self.tracks if t.id not in used]
            track = self._closest(image, face, lost) if self.embed is not None else None
            if track is None:
                track = Track(self._next_id, face.box.copy(), face.embedding)
                track.recheck = self.rechecks if lost and self.embed is not None else 0
                self._next_id += 1
                self.tracks.append(track)
            assigned[fi] = track
            used.add(track.id)
        for fi, track in list(assigned.items()):
            if track.recheck and track.hits % self.recheck_every == 0:
                assigned[fi] = track = self._recheck(image, faces[fi], track, used)
        for fi, track in assigned.items():
            face = faces[fi]
            track.box, track.misses = face.box.copy(), 0
            track.hits += 1
            if track.embedding is None and face.embedding is not None:
                track.embedding = face.embedding
            face.track_id = track.id
        for track in self.tracks:
            if track.id not in used:
                track.misses += 1
        self.tracks = [t for t in self.tracks if t.misses <= self.max_lost_frames]
        stale = self._frame - self.settle_frames
        self._settled = {k: f for k, f in self._settled.items() if f > stale}
        return faces

    def _recheck(self, image: np.ndarray, face: Face, track: Track, used: set[int]) -> Track:
        """A young track's identity against the lost tracks, on a fresh view of the face:
        on a match the person gets their old id back and the young track is dropped."""
        track.recheck -= 1
        face.embedding = None  # this frame's view, not the one the track began with
        lost = [t for t in self.tracks if t.id not in used and t is not track]
        match = self._closest(image, face, lost)
        if match is None:
            return track
        self.tracks.remove(track)
        used.discard(track.id)
        used.add(match.id)
        match.embedding = match.embedding if match.embedding is not None else face.embedding
        match.hits += track.hits
        return match

    def _closest(self, image: np.ndarray, face: Face, tracks: list[Track]) -> Track | None:
        """The track whose identity is nearest ``face``'s, within ``reid_distance``."""
        assert self.embed is not None
        if face.embedding is None:
            face.embedding = self.embed(image, face)
            self.embeddings_taken += 1
        scored = [
            (self.distance(face.embedding, t.embedding), t)
            for t in tracks
            if t.embedding is not None
        ]
        if not scored:
            return None
        distance, track = min(scored, key=lambda pair: pair[0])
        return track if distance <= self.reid_distance else None
