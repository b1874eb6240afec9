"""Five-point face alignment: the crops learned models expect, and the way back.

Recognisers (ArcFace), swappers (inswapper) and enhancers (GFPGAN-class) were trained on
faces warped by a similarity transform (rotation, uniform scale, shift) that puts the eyes,
the nose tip and the mouth corners on a fixed template. The points are in image order: the
eye on the image's left first, then the other eye, the nose tip, the mouth corner on the
image's left, the other corner.
"""

from __future__ import annotations

import cv2
import numpy as np

from facecast.faces.face import LEFT_EYE, MOUTH, NOSE_TIP, RIGHT_EYE, Face

# The ArcFace template for a 112x112 crop (the insightface convention, public since 2018).
ARCFACE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
# FFHQ's alignment as a 5-point template, in units of the crop size (face restoration models).
FFHQ_UNIT = np.array(
    [
        [0.37691676, 0.46864664],
        [0.62285697, 0.46912813],
        [0.50123859, 0.61331904],
        [0.39308822, 0.72541100],
        [0.61150205, 0.72490465],
    ],
    dtype=np.float64,
)

# Face-mesh vertices for the five points: eye contours (averaged), the nose tip, the mouth
# corners. The first eye is the subject's right, which is on the image's left.
MESH_RIGHT_EYE = (33, 133, 159, 145)
MESH_LEFT_EYE = (263, 362, 386, 374)
MESH_NOSE_TIP = 4
MESH_MOUTH_CORNERS = (61, 291)


def arcface_template(size: int) -> np.ndarray:
    """The ArcFace template for a ``size`` crop. Multiples of 112 scale it; other sizes
    (128 for inswapper) scale by size/128 and shift right by 8 of those units, as the
    models were trained."""
    if size % 112 == 0:
        return ARCFACE_112 * (size / 112.0)
    ratio = size / 128.0
    template = ARCFACE_112 * ratio
    template[:, 0] += 8.0 * ratio
    return template


def ffhq_template(size: int) -> np.ndarray:
    return FFHQ_UNIT * float(size)


# Five-point templates of the learned swappers, in units of the crop size, by the names
# FaceFusion gives them (facefusion/face_helper.py, WARP_TEMPLATE_SET), which is where the
# users' swapper files come from: each model was trained on crops made with one of these.
# "arcface_112_v2" is the ArcFace template above; "arcface_128" is it shifted for inswapper's
# 128 crop (``arcface_template(128)``); "ffhq_512" is FFHQ's; "arcface_112_v1" (SimSwap,
# GHOST) and "mtcnn_512" (HiFiFace) frame the face lower and looser.
UNIT_TEMPLATES: dict[str, np.ndarray] = {
    "arcface_112_v1": np.array(
        [
            [0.35473214, 0.45658929],
            [0.64526786, 0.45658929],
            [0.50000000, 0.61154464],
            [0.37913393, 0.77687500],
            [0.62086607, 0.77687500],
        ]
    ),
    "arcface_112_v2": ARCFACE_112 / 112.0,
    "arcface_128": arcface_template(128) / 128.0,
    "ffhq_512": FFHQ_UNIT,
    "mtcnn_512": np.array(
        [
            [0.36562865, 0.46733799],
            [0.63305391, 0.46585885],
            [0.50019127, 0.61942959],
            [0.39032951, 0.77598822],
            [0.61178945, 0.77476328],
        ]
    ),
}


def named_template(name: str, size: int) -> np.ndarray:
    """The template ``name`` (a key of ``UNIT_TEMPLATES``) for a ``size`` crop."""
    return UNIT_TEMPLATES[name] * float(size)


# GPEN's own framing (yangxy/GPEN, face_enhancement.py and align_faces.py): the ArcFace
# points (the 96x112 MTCNN reference made square), padded by a quarter of the square on
# every side (inner_padding_factor 0.25: 112 + 2 x 28 = 168), scaled to the crop. Looser
# than FFHQ's: GPEN-BFR sees more of the head around the face.
GPEN_PADDING = 28.0
GPEN_SQUARE = 168.0


def gpen_template(size: int) -> np.ndarray:
    return (ARCFACE_112 + GPEN_PADDING) * (size / GPEN_SQUARE)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity matrix that maps ``src`` points onto ``dst`` in the least-squares
    sense (Umeyama, 1991), without reflection."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    variance = np.mean(np.sum(s**2, axis=1))
    scale = float(np.sum(sigma * sign) / variance) if variance > 0 else 1.0
    shift = mu_d - scale * rotation @ mu_s
    return np.hstack([scale * rotation, shift[:, None]])


def five_points(face: Face) -> np.ndarray:
    """The face's five alignment points (5x2, image pixels): from the mesh when there is
    one, else a detector's own five points, else BlazeFace's keypoints (its one mouth point
    stands in for both corners, spread by the eye distance).

    The mesh comes first because video has it on every frame, smoothed per track; a
    detector's points exist only on detection frames (every 3rd), and switching between
    the two sources would make the aligned crop jump."""
    if face.mesh is None and face.points5 is not None:
        return np.asarray(face.points5, np.float64)
    if face.mesh is not None:
        mesh = face.mesh[:, :2].astype(np.float64)
        return np.array(
            [
                mesh[list(MESH_RIGHT_EYE)].mean(0),
                mesh[list(MESH_LEFT_EYE)].mean(0),
                mesh[MESH_NOSE_TIP],
                mesh[MESH_MOUTH_CORNERS[0]],
                mesh[MESH_MOUTH_CORNERS[1]],
            ]
        )
    k = np.asarray(face.keypoints, np.float64)
    eyes = k[LEFT_EYE] - k[RIGHT_EYE]
    half_mouth = 0.4 * eyes
    return np.array(
        [k[RIGHT_EYE], k[LEFT_EYE], k[NOSE_TIP], k[MOUTH] - half_mouth, k[MOUTH] + half_mouth]
    )


def square_crop(
    image: np.ndarray, matrix: np.ndarray, size: int, interpolation: int = cv2.INTER_LINEAR
) -> np.ndarray:
    """The ``size`` x ``size`` crop ``matrix`` (2x3, image to crop) makes of ``image``, its
    edges continued past the image's (a face at the frame's edge keeps a plausible rim, not
    black): every model crop (detection ROI, mesh, iris, alignment) and the swap's texture."""
    return cv2.warpAffine(
        image, matrix, (size, size), flags=interpolation, borderMode=cv2.BORDER_REPLICATE
    )


def align_crop(
    image: np.ndarray, points: np.ndarray, template: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` x ``size`` crop with ``points`` on ``template``, and the 2x3 matrix from
    image to crop (invert it with ``cv2.invertAffineTransform`` to go back)."""
    matrix = similarity_transform(points, template)
    return square_crop(image, matrix, size), matrix
