"""Piecewise-affine warping over a triangle mesh, as one remap per image.

Every destination pixel inside the mesh gets the id of the triangle covering it (one
rasterisation), then each source image is sampled through that triangle's affine map: the
face texture and the target's own surroundings share one rasterisation per frame.
"""

from __future__ import annotations

import cv2
import numpy as np


def triangle_affines(dst: np.ndarray, src: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(T, 2, 3) affine maps taking each destination triangle onto its source triangle.

    Closed form per triangle (edge vectors and a 2x2 inverse), vectorised: cheaper than a
    batched linear solve for ~1000 tiny systems."""
    d = dst[triangles].astype(np.float64)  # (T, 3, 2)
    s = src[triangles].astype(np.float64)
    d_edges = np.stack([d[:, 1] - d[:, 0], d[:, 2] - d[:, 0]], axis=2)  # columns e1, e2
    s_edges = np.stack([s[:, 1] - s[:, 0], s[:, 2] - s[:, 0]], axis=2)
    det = d_edges[:, 0, 0] * d_edges[:, 1, 1] - d_edges[:, 0, 1] * d_edges[:, 1, 0]
    degenerate = np.abs(det) < 1e-9  # zero-area triangles cover no pixel anyway
    det = np.where(degenerate, 1.0, det)
    inv = np.empty_like(d_edges)
    inv[:, 0, 0], inv[:, 1, 1] = d_edges[:, 1, 1] / det, d_edges[:, 0, 0] / det
    inv[:, 0, 1], inv[:, 1, 0] = -d_edges[:, 0, 1] / det, -d_edges[:, 1, 0] / det
    linear = s_edges @ inv  # (T, 2, 2): maps destination offsets to source offsets
    linear[degenerate] = np.eye(2)
    shift = s[:, 0] - np.einsum("tij,tj->ti", linear, d[:, 0])
    return np.concatenate([linear, shift[:, :, None]], axis=2)


def rasterise_ids(
    dst: np.ndarray, triangles: np.ndarray, shape: tuple[int, int], order: np.ndarray | None = None
) -> np.ndarray:
    """int32 image of the triangle id covering each pixel (-1 outside). ``order`` draws
    triangles back to front so that, where a turned face folds, the nearer surface wins."""
    ids = np.full(shape, -1, dtype=np.int32)
    if order is None:
        order = np.arange(len(triangles))
    # 4 bits of sub-pixel precision. ~1000 tiny triangles cost their calls, not their pixels:
    # the polygons and ids unpacked to Python objects up front and the arguments positional
    # take a third off
    polygons = list(np.round(dst[triangles[order]] * 16).astype(np.int32))
    fill = cv2.fillConvexPoly
    for polygon, t in zip(polygons, order.tolist(), strict=True):
        fill(ids, polygon, t, cv2.LINE_8, 4)
    return ids


def sample_maps(
    ids: np.ndarray, affines: np.ndarray, origin: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """remap() coordinate maps for the pixels covered by ``ids`` (ids outside
    0..len(affines)-1 count as uncovered). Uncovered pixels map to themselves offset by
    ``origin`` (so a crop keeps its pixels), or to -1 when no origin is given."""
    h, w = ids.shape
    n = len(affines)
    # one extra table row for "uncovered": identity plus origin, or a constant -1
    extra = (
        np.array([[1, 0, origin[0]], [0, 1, origin[1]]], dtype=np.float32)
        if origin is not None
        else np.array([[0, 0, -1], [0, 0, -1]], dtype=np.float32)
    )
    table = np.concatenate([affines.astype(np.float32), extra[None]]).reshape(n + 1, 6)
    index = np.where((ids >= 0) & (ids < n), ids, n)
    xs = np.arange(w, dtype=np.float32)[None, :]
    ys = np.arange(h, dtype=np.float32)[:, None]
    # gathering six coefficient planes is far cheaper than a (pixels, 2, 3) gather
    c = [np.take(table[:, k], index) for k in range(6)]
    map_x = c[0] * xs + c[1] * ys + c[2]
    map_y = c[3] * xs + c[4] * ys + c[5]
    return map_x, map_y


def remap(image: np.ndarray, maps: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return cv2.remap(
        image, maps[0], maps[1], interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
