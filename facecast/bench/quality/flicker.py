"""Video flicker for ``facecast bench quality``: frame-to-frame luma change inside the face
on the sample clip, in the original and in facecast's swap of it, raw and with the head's
motion taken out."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facecast.engine.pipeline import EngineOptions
from facecast.faces.analyse import FaceAnalyser
from facecast.faces.face import Face


def video_flicker(
    clip: Path, face_photo: Path, work: Path, max_frames: int | None = None
) -> dict[str, Any]:
    """Frame-to-frame luma change inside the face (the mesh hull of both frames, no scene cut
    between them), in the original clip and in facecast's swap of it.

    Raw: the plain difference, which motion dominates (and which grows with the contrast of
    what moves). Aligned: the previous frame first moved onto the current one by the head's
    motion (a similarity transform fitted to the original's face meshes), so what is left is
    expression, lighting and, in the swap, flicker; its ratio is the one to watch."""
    from facecast.engine.files import swap_video_file
    from facecast.media.scene import SceneCutDetector
    from facecast.media.source import VideoFileSource

    swapped = work / "swapped.mp4"
    swap_video_file(face_photo, clip, swapped, EngineOptions(label=False))
    analyser = FaceAnalyser()
    cuts = SceneCutDetector()
    raw: tuple[list[float], list[float]] = ([], [])
    aligned: tuple[list[float], list[float]] = ([], [])
    previous: tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray] | None = None
    with VideoFileSource(clip) as a, VideoFileSource(swapped) as b:
        for n, (fa, fb) in enumerate(zip(a.frames(), b.frames(), strict=False)):
            if max_frames is not None and n >= max_frames:
                break
            cut = cuts.is_cut(fa.image)
            faces = [f for f in analyser.analyse(fa.image) if f.mesh is not None]
            mask = _hulls_mask(faces, fa.image.shape[:2])
            mesh = max(faces, key=lambda f: f.area).mesh[:, :2] if faces else None
            luma = tuple(
                cv2.cvtColor(f.image, cv2.COLOR_BGR2GRAY).astype(np.float32) for f in (fa, fb)
            )
            if previous is not None and not cut:
                both = mask & previous[0]
                if both.sum() > 500:
                    for k in (0, 1):
                        raw[k].append(float(np.abs(luma[k] - previous[2 + k])[both].mean()))
                    motion = _head_motion(previous[1], mesh)
                    if motion is not None:
                        size = (luma[0].shape[1], luma[0].shape[0])
                        for k in (0, 1):
                            moved = cv2.warpAffine(previous[2 + k], motion, size)
                            aligned[k].append(float(np.abs(luma[k] - moved)[mask].mean()))
            previous = (mask, mesh, luma[0], luma[1])
    result: dict[str, Any] = {"clip": clip.name, "frame_pairs": len(raw[0])}
    for name, (original, ours) in (("raw", raw), ("aligned", aligned)):
        o, s = mean_or_none(original), mean_or_none(ours)
        result[name] = {"original": o, "swapped": s, "ratio": round(s / o, 3) if o and s else None}
    return result


def _head_motion(before: np.ndarray | None, after: np.ndarray | None) -> np.ndarray | None:
    """The similarity transform taking the previous frame's face mesh onto this one's."""
    if before is None or after is None:
        return None
    matrix, _ = cv2.estimateAffinePartial2D(before.astype(np.float32), after.astype(np.float32))
    return matrix


def _hulls_mask(faces: list[Face], shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for face in faces:
        hull = cv2.convexHull(face.mesh[:, :2].astype(np.int32))  # type: ignore[index]
        cv2.fillConvexPoly(mask, hull, 1)
    return mask.astype(bool)


# ---------------------------------------------------------------------------- report


def mean_or_none(values: Iterable[float | None]) -> float | None:
    """The mean to 4 places of the values that are numbers (not None, not NaN); None when
    there are none. The bench's summaries use it too."""
    items = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return round(statistics.fmean(items), 4) if items else None
