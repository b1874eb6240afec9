"""Face state across the frames of one video or stream: cuts, track ids, steady meshes.

``TemporalFaces`` wires ``SceneCutDetector``, ``FaceTracker`` and one ``OneEuroFilter``
per track. The engine asks it at the start of each frame whether the shot changed (then the
analyser forgets its followed meshes too), and hands it the frame's faces to be given track
ids and smoothed meshes. Still images never go through it.
"""

from __future__ import annotations

import numpy as np

from facecast.faces.embed import face_distance
from facecast.faces.face import Face
from facecast.faces.smooth import OneEuroFilter
from facecast.faces.track import Embed, FaceTracker
from facecast.media.scene import SceneCutDetector


class TemporalFaces:
    def __init__(self, fps: float = 30.0, embed: Embed | None = None, smooth: bool = True):
        self.fps = fps
        self.scene = SceneCutDetector()
        self.tracker = FaceTracker(embed=embed)
        self.smooth = smooth
        self.filters: dict[int, OneEuroFilter] = {}
        self.frames = 0
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
            self.first_x.clear()
            self.identities.clear()
            self._identity_checks.clear()
        return cut

    def settle(self, image: np.ndarray, faces: list[Face]) -> list[Face]:
        """Track ids for ``faces`` and, per track, a smoothed mesh."""
        t = self.frames / self.fps
        self.frames += 1
        self.tracker.update(image, faces)
        for face in faces:
            assert face.track_id is not None
            self.first_x.setdefault(face.track_id, float(face.center[0]))
            if self.smooth and face.mesh is not None:
                smoother = self.filters.setdefault(face.track_id, OneEuroFilter())
                face.mesh = smoother(face.mesh, t).astype(face.mesh.dtype)
        known = {track.id for track in self.tracker.tracks}
        self.filters = {k: f for k, f in self.filters.items() if k in known}
        self.identities = {k: v for k, v in self.identities.items() if k in known}
        self.first_x = {k: v for k, v in self.first_x.items() if k in known}
        return faces

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
        distances = [face_distance(embedding, r) for r in references]
        best = int(np.argmin(distances))
        match = best if distances[best] <= threshold else None
        self.identities[key] = match
        return match
