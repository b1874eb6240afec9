"""Expression and head pose read off the 468-point face mesh: mouth and eye openings in % of
the inter-ocular distance, yaw/pitch/roll in degrees. Pure functions over the mesh.

Used by the engine (the source photo nearest a target face's expression, ``swap/sources.py``)
and by the quality bench (``quality/expression.py``, which adds gaze from the iris model).
The mesh indices and the pose frame are explained there.
"""

from __future__ import annotations

import numpy as np

UPPER_LIP, LOWER_LIP = 13, 14
RIGHT_LIDS, LEFT_LIDS = (159, 145), (386, 374)
# each eye's corners in image order (left, right) for an upright face
RIGHT_CORNERS, LEFT_CORNERS = (33, 133), (362, 263)
EYE_CORNERS = (RIGHT_CORNERS, LEFT_CORNERS)  # subject's right eye first, as everywhere
SYMMETRIC_PAIRS = ((33, 263), (133, 362), (234, 454), (127, 356))  # (subject's right, left)
FACE_PLANE = (10, 151, 109, 338, 33, 133, 362, 263, 234, 454, 127, 356)
# Those points' best plane leans back against the camera axis even in a level portrait (the
# forehead and the ear-side oval lie behind the eye corners): 49.5 degrees on average over
# the 16 portraits in tests/media (spread 4). Removing it makes a level face read about 0.
PITCH_LEAN = -50.0


def eye_frame(corner_a: np.ndarray, corner_b: np.ndarray) -> tuple[np.ndarray, ...]:
    """An eye's own 2-D frame from its two corners: origin (their midpoint), unit axes along
    the eye and across it, and its width. Gaze (iris) and eye opening (shape transfer) are
    both measured in it."""
    a, b = np.asarray(corner_a, np.float64)[:2], np.asarray(corner_b, np.float64)[:2]
    width = max(float(np.linalg.norm(b - a)), 1e-9)
    along = (b - a) / width
    across = np.array([-along[1], along[0]])
    return (a + b) / 2, along, across, np.float64(width)


def _eye_centres(mesh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return mesh[list(RIGHT_CORNERS)].mean(0), mesh[list(LEFT_CORNERS)].mean(0)


def inter_ocular(mesh: np.ndarray) -> float:
    """3-D distance between the eye centres, in pixels."""
    right, left = _eye_centres(mesh)
    return float(np.linalg.norm(left - right))


def _gap(mesh: np.ndarray, a: int, b: int) -> float:
    return float(np.linalg.norm(mesh[a] - mesh[b]))


def openings(mesh: np.ndarray) -> dict[str, float]:
    """Mouth and eye openings in % of the inter-ocular distance."""
    iod = inter_ocular(mesh)
    return {
        "mouth_open": 100.0 * _gap(mesh, UPPER_LIP, LOWER_LIP) / iod,
        "eye_open_right": 100.0 * _gap(mesh, *RIGHT_LIDS) / iod,
        "eye_open_left": 100.0 * _gap(mesh, *LEFT_LIDS) / iod,
    }


def head_pose(mesh: np.ndarray) -> dict[str, float]:
    """Yaw, pitch and roll in degrees from the mesh's own 3-D points.

    Image axes: x right, y down, z away from the camera. Yaw > 0 when the nose points to the
    image's right, pitch > 0 when it points up, roll > 0 when the face turns clockwise on
    screen (the subject's left eye, on the image's right, lower). Pitch keeps a few degrees
    that depend on the face's shape (the forehead's slope): compare it, do not read it alone.
    """
    pts = mesh.astype(np.float64)
    x_axis = _unit(sum(_unit(pts[left] - pts[right]) for right, left in SYMMETRIC_PAIRS))
    plane = pts[list(FACE_PLANE)]
    # the face plane's normal: the least-spread direction of its points
    normal = np.linalg.svd(plane - plane.mean(0))[2][2]
    if normal[2] < 0:  # orient it away from the camera, like the back of the head
        normal = -normal
    y_axis = _unit(np.cross(normal, x_axis))
    z_axis = np.cross(x_axis, y_axis)
    # the face's frame in camera axes, its lean taken out (a rotation about its own x axis)
    # so that a level face looking at the camera is the identity
    lean = np.radians(PITCH_LEAN)
    c, s = np.cos(lean), np.sin(lean)
    rot = np.column_stack([x_axis, y_axis, z_axis]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    # Euler angles of rot = Ry(yaw') Rx(pitch') Rz(roll), signs turned to the ones above
    yaw = np.degrees(np.arctan2(-rot[0, 2], rot[2, 2]))
    pitch = np.degrees(np.arcsin(np.clip(rot[1, 2], -1.0, 1.0)))
    roll = np.degrees(np.arctan2(rot[1, 0], rot[1, 1]))
    return {"yaw": float(yaw), "pitch": float(pitch), "roll": float(roll)}


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)
