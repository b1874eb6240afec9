"""Piecewise-affine warping against OpenCV's own per-triangle transforms."""

import cv2
import numpy as np

from facecast.faces.detect import letterbox
from facecast.swap.warp import rasterise_ids, remap, sample_maps, triangle_affines

from .conftest import load


def test_triangle_affines_match_opencv():
    rng = np.random.default_rng(7)
    dst, src = rng.uniform(0, 200, (30, 2)), rng.uniform(0, 200, (30, 2))
    triangles = rng.choice(30, size=(40, 3), replace=True)
    triangles = triangles[[len(set(t)) == 3 for t in triangles]]
    affines = triangle_affines(dst, src, triangles)
    for t, tri in enumerate(triangles):
        expected = cv2.getAffineTransform(dst[tri].astype(np.float32), src[tri].astype(np.float32))
        np.testing.assert_allclose(affines[t], expected, atol=2e-2 * np.abs(expected).max())


def test_warp_of_a_real_photo_equals_warp_affine_inside_each_triangle():
    """Two triangles covering a square, mapped by one global affine: the piecewise result
    must equal cv2.warpAffine of the whole image."""
    image = load("obama.jpg")[100:400, 300:600]
    dst = np.array([[10, 10], [250, 20], [240, 260], [20, 250]], dtype=np.float64)
    global_map = np.array([[0.9, 0.1, 15.0], [-0.05, 1.1, 5.0]])
    src = dst @ global_map[:, :2].T + global_map[:, 2]
    triangles = np.array([[0, 1, 2], [0, 2, 3]])
    ids = rasterise_ids(dst, triangles, (270, 270))
    out = remap(image, sample_maps(ids, triangle_affines(dst, src, triangles)))
    expected = cv2.warpAffine(
        image, global_map, (270, 270), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    )
    inside = cv2.erode((ids >= 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    assert inside.sum() > 40000
    diff = np.abs(out.astype(int) - expected.astype(int))[inside]
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 3


def test_uncovered_pixels_keep_their_place_with_an_origin():
    ids = np.full((5, 7), -1, dtype=np.int32)
    map_x, map_y = sample_maps(ids, np.zeros((0, 2, 3)), origin=(100, 50))
    assert map_x[2, 3] == 103 and map_y[2, 3] == 52


def test_fast_letterbox_matches_a_single_area_resize():
    image = cv2.resize(load("obama-720p.jpg"), (1280, 720))
    square, scale, pad = letterbox(image, 192)
    assert scale == 0.15
    reference = cv2.resize(image, (192, 108), interpolation=cv2.INTER_AREA)
    assert square.shape == (192, 192, 3) and pad == (0, 42)
    assert np.abs(square[42:150].astype(int) - reference.astype(int)).mean() < 1.5
