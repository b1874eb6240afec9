"""The textbook face swap: the reference row every quality run shows beside facecast.

The classic recipe, kept plain on purpose so the bench shows what facecast adds over it:
dlib's HOG detector and 68-point landmarks, a Delaunay triangulation of the target's points,
each source triangle warped affinely onto the target's (all in one remap), a LAB colour
transfer (mean and spread per channel, each measured inside its own image's face hull), and
a feathered convex-hull alpha blend.

No forehead points are extrapolated from the brows: the textbook hull ends at the brows, and
pushed-up brow points land on fringes and hairlines (tests/media/people/aniston*), which
smears hair into the face and skews the colour statistics. The mouth and eyes are warped
like any other triangle: whatever the source's mouth holds (teeth, closed lips) is painted
into the target's mouth, the failure the expression measures (quality/expression.py) show.
"""

from __future__ import annotations

from functools import cache

import cv2
import dlib
import numpy as np

from facecast.models.registry import model_path

FEATHER = 0.06  # feather width, as a share of the target face's size (sqrt of hull area)


class TextbookSwapper:
    """Loads dlib's detector and 68-point predictor once; ``swap`` is deterministic."""

    def __init__(self) -> None:
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(model_path("dlib_shape68")))

    def landmarks(self, image: np.ndarray) -> np.ndarray | None:
        """(68, 2) points of the largest face, or None when dlib finds no face."""
        rgb = np.ascontiguousarray(image[:, :, ::-1])
        rects = list(self.detector(rgb, 0))
        if not rects and max(image.shape[:2]) < 1000:  # small faces: one upsampling pass
            rects = list(self.detector(rgb, 1))
        if not rects:
            return None
        rect = max(rects, key=lambda r: r.width() * r.height())
        shape = self.predictor(rgb, rect)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)

    def swap(self, source: np.ndarray, target: np.ndarray) -> np.ndarray | None:
        """The source's face on the target image (same size as the target), or None."""
        src_pts, dst_pts = self.landmarks(source), self.landmarks(target)
        if src_pts is None or dst_pts is None:
            return None
        h, w = target.shape[:2]
        dst_pts = np.clip(dst_pts, 0, [w - 1, h - 1])
        triangles = delaunay(dst_pts, (w, h))
        warped = warp_triangles(source, src_pts, dst_pts, triangles, (w, h))
        src_hull = hull_mask(src_pts, source.shape[:2])
        dst_hull = hull_mask(dst_pts, (h, w))
        recoloured = lab_transfer(warped, source, src_hull, target, dst_hull)
        alpha = feathered(dst_hull)[:, :, None]
        out = target.astype(np.float32) * (1 - alpha) + recoloured * alpha
        result = np.clip(np.rint(out), 0, 255).astype(np.uint8)
        result[alpha[:, :, 0] == 0] = target[alpha[:, :, 0] == 0]  # untouched, bit for bit
        return result


def delaunay(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(T, 3) index triples of the Delaunay triangulation of ``points`` (inside ``size``)."""
    subdiv = cv2.Subdiv2D((0, 0, size[0] + 1, size[1] + 1))
    for x, y in points:
        subdiv.insert((float(x), float(y)))
    corners = subdiv.getTriangleList().reshape(-1, 3, 2)
    triangles = set()
    for tri in corners:
        # Subdiv2D gives coordinates, not indices: each corner is its nearest landmark;
        # a triangle left with fewer than 3 distinct ones (duplicated points) is dropped
        idx = np.linalg.norm(points[None] - tri[:, None], axis=2).argmin(1)
        if len(set(idx.tolist())) == 3:
            triangles.add(tuple(sorted(idx.tolist())))
    return np.array(sorted(triangles), dtype=np.int32)


def warp_triangles(
    source: np.ndarray,
    src_pts: np.ndarray,
    dst_pts: np.ndarray,
    triangles: np.ndarray,
    size: tuple[int, int],
) -> np.ndarray:
    """The source's pixels in the target's geometry, by one remap: each target pixel takes
    its triangle's inverse affine (target -> source); pixels outside every triangle are 0."""
    w, h = size
    label = np.full((h, w), -1, dtype=np.int32)
    for i, tri in enumerate(triangles):
        cv2.fillConvexPoly(label, np.rint(dst_pts[tri]).astype(np.int32), int(i))
    affines = np.array(
        [
            cv2.getAffineTransform(dst_pts[tri].astype(np.float32), src_pts[tri].astype(np.float32))
            for tri in triangles
        ]
    )  # (T, 2, 3)
    ys, xs = np.nonzero(label >= 0)
    a = affines[label[ys, xs]]
    map_x = np.full((h, w), -1.0, dtype=np.float32)
    map_y = np.full((h, w), -1.0, dtype=np.float32)
    map_x[ys, xs] = a[:, 0, 0] * xs + a[:, 0, 1] * ys + a[:, 0, 2]
    map_y[ys, xs] = a[:, 1, 0] * xs + a[:, 1, 1] * ys + a[:, 1, 2]
    return cv2.remap(source, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def hull_mask(points: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(shape[:2], dtype=np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.rint(points).astype(np.int32)), 255)
    return mask


def lab_transfer(
    warped: np.ndarray,
    source: np.ndarray,
    src_hull: np.ndarray,
    target: np.ndarray,
    dst_hull: np.ndarray,
) -> np.ndarray:
    """``warped`` (BGR) recoloured so the source face's LAB mean and spread become the
    target face's; float LAB, so no channel is quantised twice. Returns float BGR 0-255."""
    src_lab = cv2.cvtColor(source.astype(np.float32) / 255, cv2.COLOR_BGR2LAB)
    dst_lab = cv2.cvtColor(target.astype(np.float32) / 255, cv2.COLOR_BGR2LAB)
    s, d = src_lab[src_hull > 0], dst_lab[dst_hull > 0]
    gain = d.std(0) / np.maximum(s.std(0), 1e-6)
    lab = cv2.cvtColor(warped.astype(np.float32) / 255, cv2.COLOR_BGR2LAB)
    lab = (lab - s.mean(0)) * gain + d.mean(0)
    lab[:, :, 0] = np.clip(lab[:, :, 0], 0, 100)
    return cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2BGR) * 255


def feathered(hull: np.ndarray) -> np.ndarray:
    """Alpha 0-1: the hull eroded by a (2r+1) square, then blurred with a (2r+1) kernel,
    whose support is that same square: the blur never reaches past the hull's own edge, so
    everything outside it stays exactly 0."""
    r = max(1, round(FEATHER * np.sqrt(np.count_nonzero(hull))))
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * r + 1, 2 * r + 1))
    inner = cv2.erode(hull, kernel).astype(np.float32) / 255
    return cv2.GaussianBlur(inner, (2 * r + 1, 2 * r + 1), r / 2)


@cache
def _swapper() -> TextbookSwapper:
    return TextbookSwapper()


def textbook_swap(source_bgr: np.ndarray, target_bgr: np.ndarray) -> np.ndarray | None:
    """The largest source face on the largest target face; None when either has no face."""
    return _swapper().swap(source_bgr, target_bgr)
