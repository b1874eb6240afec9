"""Face state across the frames of one video or stream: cuts, track ids, steady meshes.

``TemporalFaces`` wires ``SceneCutDetector``, ``FaceTracker`` and one ``OneEuroFilter``
per track. The engine asks it at the start of each frame whether the shot changed (then the
analyser forgets its followed meshes too), and hands it the frame's faces to be given track
ids and smoothed meshes. Still images never go through it.
"""

from __future__ import annotations

import numpy as np

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

    def begin(self, image: np.ndarray) -> bool:
        """Call first for every frame; True on a scene cut (all state is reset)."""
        cut = self.scene.is_cut(image)
        if cut:
            self.cuts += 1
            self.tracker.reset()
            self.filters.clear()
        return cut

    def settle(self, image: np.ndarray, faces: list[Face]) -> list[Face]:
        """Track ids for ``faces`` and, per track, a smoothed mesh."""
        t = self.frames / self.fps
        self.frames += 1
        self.tracker.update(image, faces)
        live = set()
        for face in faces:
            assert face.track_id is not None
            live.add(face.track_id)
            if self.smooth and face.mesh is not None:
                smoother = self.filters.setdefault(face.track_id, OneEuroFilter())
                face.mesh = smoother(face.mesh, t).astype(face.mesh.dtype)
        known = {track.id for track in self.tracker.tracks}
        self.filters = {k: f for k, f in self.filters.items() if k in known}
        return faces
