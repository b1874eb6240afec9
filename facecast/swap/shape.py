"""Identity-shape transfer: the target face takes the source's proportions (outline, jaw,
nose, brows) while keeping its own pose and expression (mouth, eyes, jaw opening).

Both meshes are 3-D, so the source is fitted to the target with a 3-D similarity on points
that expression barely moves; projected, the fitted source carries the target's head pose.
"""

from __future__ import annotations

import numpy as np

from facecast.faces.expression import EYE_CORNERS, eye_frame
from facecast.faces.topology import MeshTopology

# Mesh vertices that expression barely moves: eye corners, nose bridge and tip, forehead,
# temples. The similarity fit uses only these, so a smile or an open mouth does not tilt it.
RIGID_POINTS = np.array(
    [33, 133, 362, 263, 6, 168, 197, 195, 5, 4, 1, 10, 151, 9, 127, 356, 234, 454, 116, 345]
)
UPPER_INNER_LIP, LOWER_INNER_LIP, CHIN, FOREHEAD = 13, 14, 152, 10


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity (scale, rotation, translation) with dst ≈ s R src + t."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(b.T @ a / len(src))
    d = np.ones(len(sig))
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1
    rotation = u @ np.diag(d) @ vt
    scale = float((sig * d).sum() / a.var(0).sum())
    return scale, rotation, mu_d - scale * rotation @ mu_s


def fit_source_to_target(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The source mesh (N, 3) posed like the target, by the rigid points."""
    scale, rotation, shift = umeyama(source[RIGID_POINTS], target[RIGID_POINTS])
    return source @ (scale * rotation).T + shift


def _falloff(points: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    d2 = ((points - centre) ** 2).sum(1)
    return np.exp(-d2 / (2 * radius**2))


def _across(eye: np.ndarray, corners: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Each eye point's offset across the eye (from the corners' line), the unit normal and
    the eye's width."""
    origin, _, normal, width = eye_frame(corners[0], corners[1])
    return (eye - origin) @ normal, normal, float(width)


def eye_opening(points: np.ndarray, eye: np.ndarray, corners: tuple[int, int]) -> float:
    """How open an eye is: its outline's extent across the eye over its width."""
    offsets, _, width = _across(points[eye, :2], points[list(corners), :2])
    return float(np.ptp(offsets)) / width


def eye_with_opening(
    source_eye: np.ndarray,
    target_eye: np.ndarray,
    source_corners: np.ndarray,
    target_corners: np.ndarray,
) -> np.ndarray:
    """The source's eye outline (posed on the target) opened exactly as far as the target's:
    the source's eye shape (corners, lid curves), the target's blink or wide eyes. (Matching
    the opening relative to each eye's width instead did no better on either judge.)"""
    s_off, normal, _ = _across(source_eye, source_corners)
    t_off, _, _ = _across(target_eye, target_corners)
    scale = float(np.ptp(t_off)) / max(float(np.ptp(s_off)), 1e-6)
    return source_eye + np.outer(s_off * (scale - 1.0), normal)


def transfer_shape(
    target: np.ndarray,
    source: np.ndarray,
    topology: MeshTopology,
    strength: float = 1.0,
    source_eyes: bool = False,
) -> np.ndarray:
    """New 2-D positions (N, 2) for the target mesh: source proportions, target expression."""
    posed = fit_source_to_target(source, target)[:, :2]
    tgt = target[:, :2]
    delta = posed - tgt

    # Keep the target's jaw opening: points below the mouth move with the source's jaw, minus
    # the difference between the two mouths' openings, so a talking target keeps talking.
    up = tgt[FOREHEAD] - tgt[CHIN]
    up /= np.linalg.norm(up) + 1e-9
    mouth_level = tgt[UPPER_INNER_LIP] @ up
    chin_level = tgt[CHIN] @ up
    below = np.clip((mouth_level - tgt @ up) / max(mouth_level - chin_level, 1e-6), 0, 1)
    opening_tgt = tgt[LOWER_INNER_LIP] - tgt[UPPER_INNER_LIP]
    opening_src = posed[LOWER_INNER_LIP] - posed[UPPER_INNER_LIP]
    delta += below[:, None] * (opening_tgt - opening_src)

    # Mouth (and, unless the eyes take the source's shape, eyes): keep the target's shape,
    # moved as a whole to the source's position, blending smoothly into the surrounding
    # skin's displacement.
    face_size = float(np.linalg.norm(tgt[FOREHEAD] - tgt[CHIN]))
    regions = [topology.lips_points]
    if source_eyes:
        for eye, corners in (
            (topology.right_eye, EYE_CORNERS[0]),
            (topology.left_eye, EYE_CORNERS[1]),
        ):
            delta[eye] = (
                eye_with_opening(posed[eye], tgt[eye], posed[list(corners)], tgt[list(corners)])
                - tgt[eye]
            )
    else:
        regions += [topology.right_eye, topology.left_eye]
    for region in regions:
        centre = tgt[region].mean(0)
        shift = delta[region].mean(0)
        radius = 0.6 * float(np.ptp(tgt[region], axis=0).max()) + 0.02 * face_size
        weight = _falloff(tgt, centre, radius)
        weight[region] = 1.0
        delta = (1 - weight[:, None]) * delta + weight[:, None] * shift
    return tgt + strength * delta
