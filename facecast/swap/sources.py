"""Several photos of the source person: each target face gets the one whose expression and
pose are nearest its own.

A source photo carries its expression into the swap: a smiling photo pastes smile folds and
crow's feet onto a face that is talking. With several photos of the person (``--source``
repeated, or a folder), each target face, in each frame, is swapped with the photo nearest
to what that face is doing: mouth opening, smile width, eye openness, yaw and pitch. In video
the choice is per track and changes only when another photo has been clearly nearer for a
few frames in a row (hysteresis), so a face does not flicker between photos.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facecast.errors import MediaError
from facecast.faces.expression import head_pose, inter_ocular, openings

MOUTH_CORNERS = (61, 291)  # outer lip corners (MediaPipe numbering): the smile's width
# Each measure divided by about its spread between expressions, so that one unit means as
# much in each: mouth opening and smile width in % of the inter-ocular distance, eye
# openness likewise, yaw and pitch in degrees.
SCALES = np.array([10.0, 10.0, 5.0, 10.0, 10.0])
# Another photo takes over only when it is nearer by this much (in scaled units)...
SWITCH_MARGIN = 0.5
# ... for this many frames in a row.
SWITCH_FRAMES = 4
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


def expression_vector(mesh: np.ndarray) -> np.ndarray:
    """What a face is doing, as one scaled vector: mouth opening, smile width, eye
    openness, yaw, pitch."""
    shape = openings(mesh)
    pose = head_pose(mesh)
    a, b = MOUTH_CORNERS
    smile = 100.0 * float(np.linalg.norm(mesh[a] - mesh[b])) / inter_ocular(mesh)
    eyes = (shape["eye_open_right"] + shape["eye_open_left"]) / 2
    raw = np.array([shape["mouth_open"], smile, eyes, pose["yaw"], pose["pitch"]])
    return raw / SCALES


def source_photos(paths: list[Path]) -> list[Path]:
    """The photos named, a folder standing for the JPEG and PNG files in it (sorted)."""
    photos: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
            if not found:
                raise MediaError(f"{path}: a directory with no .jpg or .png photo in it")
            photos += found
        else:
            photos.append(path)
    return photos


@dataclass
class SourceSet:
    """The prepared photos of one source person, each with its expression vector."""

    prepared: list[Any]
    vectors: np.ndarray  # (N, 5)
    names: list[str]
    # per track: (chosen index, candidate index, frames the candidate has been nearer)
    _tracks: dict[int, tuple[int, int, int]] = field(default_factory=dict)

    def pick(self, mesh: np.ndarray, track_id: int | None = None) -> Any:
        """The prepared source for a target face with this mesh. Without a track id (a
        still image) simply the nearest; with one, the previous choice unless another has
        been nearer by ``SWITCH_MARGIN`` for ``SWITCH_FRAMES`` frames."""
        distances = np.linalg.norm(self.vectors - expression_vector(mesh), axis=1)
        best = int(np.argmin(distances))
        if track_id is None:
            return self.prepared[best]
        if track_id not in self._tracks:
            self._tracks[track_id] = (best, best, 0)
            return self.prepared[best]
        chosen, candidate, frames = self._tracks[track_id]
        if best != chosen and distances[chosen] - distances[best] > SWITCH_MARGIN:
            frames = frames + 1 if best == candidate else 1
            if frames >= SWITCH_FRAMES:
                chosen, frames = best, 0
            candidate = best
        else:
            candidate, frames = chosen, 0
        self._tracks[track_id] = (chosen, candidate, frames)
        return self.prepared[chosen]

    def forget(self, live_tracks: set[int]) -> None:
        """Drop the state of tracks that have ended."""
        for track in [t for t in self._tracks if t not in live_tracks]:
            del self._tracks[track]
