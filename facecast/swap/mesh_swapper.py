"""The embedded swapper: geometric, built on the 468-point mesh, no learned swap model.

Per source (once): an upright texture of the face and its mesh points in that texture.
Per target face (every frame):
1. new geometry: the target mesh moved toward the source's proportions (shape.py);
2. one rasterisation of that geometry (mesh triangles, plus a ring of triangles out to a
   fixed border) drives two remaps: the source texture onto the new face, and the target's
   own pixels onto the new geometry, so its jaw line, mouth interior and eyes follow the new
   shape and no ghost of the old outline is left outside the new one;
3. colour transfer on skin, then feather (or Poisson) blending inside the face's box.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from facecast.faces.face import Face
from facecast.faces.landmarks import Roi, roi_from_mesh
from facecast.faces.topology import MeshTopology, mesh_topology
from facecast.swap import blend
from facecast.swap.shape import transfer_shape
from facecast.swap.warp import rasterise_ids, remap, sample_maps, triangle_affines
from facecast.timing import StageClock

TEXTURE_SIZE = 320
# Cheek and forehead vertices: where skin colour is sampled (rarely covered by hair or beard).
SKIN_SAMPLE_POINTS = np.array([50, 280, 101, 330, 36, 266, 205, 425, 151, 108, 337, 117, 346])
RING_SCALE = 1.45
# Colour distance (in skin-spreads) past which a target pixel may be an occluder: a shadow on
# the target must still be swapped over, while a microphone is far from any skin sample.
TARGET_OCCLUDER_DISTANCE = 5.0
# Texture, relative to the face's own skin, above which a non-skin region is hair (a beard,
# a moustache, a fringe) and is swapped over, and below which it is a smooth object in front
# of the face (a microphone, a cup, a sleeve) and stays. Measured on the people photos: beards
# 1.9-2.9x the skin's texture, a jacket held over a cheek 0.6x.
OCCLUDER_SMOOTH, OCCLUDER_TEXTURED = 1.0, 1.6
OCCLUDER_FACE_PX = 112  # face width the occluder mask is worked out at
# The pasted face fades out over this fraction of its width at its outline.
OVAL_FEATHER = 0.045
# The band along the face's outline, as a fraction of its width, where only the source's skin
# is pasted (its background or collar may lie there); inside it the source is pasted whole.
SOURCE_EDGE = 0.15


@dataclass(frozen=True)
class SourceFace:
    """Everything per-frame work needs from the source photo, computed once."""

    # BGRA uint8, the upright face, pasted whole (beard, brows, shadows); alpha: where the
    # source shows bare skin, for colour matching only (one remap carries both)
    texture: np.ndarray
    points: np.ndarray  # (468, 2) mesh points in the texture
    mesh: np.ndarray  # (468, 3) mesh as detected, for the shape transfer
    embedding: np.ndarray | None = None


@dataclass(frozen=True)
class SwapOptions:
    blend: blend.BlendMode = "feather"
    keep_mouth: bool = True  # the target's mouth opening (teeth, tongue) stays
    keep_eyes: bool = True  # the target's eyes (gaze, blinks) stay
    shape_strength: float = 1.0  # 0: target outline, 1: source outline
    shading: float = 0.2  # low-frequency lighting carry, sigma as a fraction of face width
    keep_occluders: bool = True  # what covers the target's face (hand, mic) stays in front


# Corners of the openings the mesh leaves as holes: each splits its loop into two lid (or
# lip) lines. The mouth's are on the inner lip line.
INNER_MOUTH_CORNERS = (78, 308)
RIGHT_EYE_CORNERS = (33, 133)
LEFT_EYE_CORNERS = (362, 263)


def opening_triangles(loop_points: np.ndarray, corners: tuple[int, int]) -> np.ndarray:
    """A strip of triangles across an opening the mesh leaves as a hole (the mouth, each eye),
    so what is inside it is warped with the face: without them, the source's eyes and mouth
    were sampled off its texture's edge (a flat fill) and the target's stayed where they
    were, not where the new geometry puts them."""
    loop = [int(i) for i in loop_points]
    a, b = loop.index(corners[0]), loop.index(corners[1])
    rolled = loop[a:] + loop[:a]
    b = (b - a) % len(loop)
    # both lines run corner to corner; the strip pairs their k-th points
    upper, lower = rolled[: b + 1], [rolled[0], *reversed(rolled[b:])]
    if len(upper) != len(lower):
        raise ValueError(f"opening {corners}: lines of {len(upper)} and {len(lower)} points")
    tris = []
    for k in range(len(upper) - 1):
        tris += [(upper[k], upper[k + 1], lower[k]), (upper[k + 1], lower[k + 1], lower[k])]
    return np.array(tris, dtype=np.int32)


def ring_triangles(oval: np.ndarray, first_border: int) -> np.ndarray:
    """Triangles joining each outline edge to the matching edge of the fixed border."""
    n = len(oval)
    tris = []
    for k in range(n):
        o0, o1 = int(oval[k]), int(oval[(k + 1) % n])
        b0, b1 = first_border + k, first_border + (k + 1) % n
        tris += [(o0, o1, b0), (o1, b1, b0)]
    return np.array(tris, dtype=np.int32)


class MeshSwapper:
    def __init__(self, options: SwapOptions | None = None) -> None:
        self.options = options or SwapOptions()
        self.topology: MeshTopology = mesh_topology()
        n_points = 468
        self.ring = ring_triangles(self.topology.face_oval, n_points)
        # mesh first (ids < len(face_triangles) index the source texture), ring last
        topo = self.topology
        self.face_triangles = np.vstack(
            [
                topo.triangles,
                opening_triangles(topo.inner_lips, INNER_MOUTH_CORNERS),
                opening_triangles(topo.right_eye, RIGHT_EYE_CORNERS),
                opening_triangles(topo.left_eye, LEFT_EYE_CORNERS),
            ]
        )
        self.all_triangles = np.vstack([self.face_triangles, self.ring])

    def prepare(
        self, image: np.ndarray, face: Face, embedding: np.ndarray | None = None
    ) -> SourceFace:
        if face.mesh is None:
            raise ValueError("source face has no mesh: run FaceMesh.annotate first")
        roi: Roi = roi_from_mesh(face.mesh)
        roi = Roi(roi.cx, roi.cy, roi.size * 0.95, roi.angle)
        to_texture = roi.to_crop(TEXTURE_SIZE)
        texture = cv2.warpAffine(
            image,
            to_texture,
            (TEXTURE_SIZE, TEXTURE_SIZE),
            flags=cv2.INTER_CUBIC,
            borderMode=cv2.BORDER_REPLICATE,
        )
        points = (face.mesh[:, :2] @ to_texture[:, :2].T + to_texture[:, 2]).astype(np.float32)
        # No occluder mask on the source: its beard, moustache, brows and shadows are its
        # identity. Dropping them by colour let the target show through exactly there. Its
        # bare skin is still found: colour is matched on skin that is bare in both faces.
        skin = (self.skin_mask(texture, points) * 255 + 0.5).astype(np.uint8)
        return SourceFace(np.dstack([texture, skin]), points, face.mesh.copy(), embedding)

    def feature_polygons(self, points: np.ndarray) -> list[np.ndarray]:
        """Lips, eyes and brows: not skin-coloured, yet part of the face."""
        topo = self.topology
        polygons = [points[topo.outer_lips], points[topo.right_eye], points[topo.left_eye]]
        polygons += [
            cv2.convexHull(points[b].astype(np.float32)).reshape(-1, 2)
            for b in (topo.right_brow, topo.left_brow)
        ]
        return polygons

    def skin_mask(
        self,
        image: np.ndarray,
        points: np.ndarray,
        max_distance: float = 3.0,
        grow_features: bool = True,
    ) -> np.ndarray:
        """Skin probability over ``image`` with the facial features counted as skin, grown a
        little past their outline unless ``grow_features`` is off."""
        lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_BGR2LAB)
        face_width = float(np.ptp(points[self.topology.face_oval, 0]))
        samples = blend.sample_colours(
            lab, points[SKIN_SAMPLE_POINTS], max(1, int(face_width / 40))
        )
        skin = blend.skin_probability(lab, samples, max_distance)
        features = blend.polygon_mask(image.shape[:2], self.feature_polygons(points))
        if grow_features:
            features = cv2.dilate(
                features, np.ones((3, 3), np.uint8), iterations=max(1, int(face_width / 60))
            )
        return np.maximum(skin, features.astype(np.float32) / 255.0)

    def occluder_mask(self, image: np.ndarray, points: np.ndarray) -> np.ndarray:
        """See ``_occluder_mask``; computed with the face at most ``OCCLUDER_FACE_PX`` wide
        (its decisions are per region, so nothing is lost) and scaled back."""
        face_width = float(np.ptp(points[self.topology.face_oval, 0]))
        scale = min(1.0, OCCLUDER_FACE_PX / max(face_width, 1.0))
        if scale > 0.9:
            return self._occluder_mask(image, points)
        h, w = image.shape[:2]
        small = cv2.resize(
            image,
            (max(1, round(w * scale)), max(1, round(h * scale))),
            interpolation=cv2.INTER_AREA,
        )
        mask = self._occluder_mask(small, points * scale)
        return cv2.resize(mask, (w, h), interpolation=cv2.INTER_LINEAR)

    def _occluder_mask(self, image: np.ndarray, points: np.ndarray) -> np.ndarray:
        """0..1 per pixel: something in front of the face (kept from the target). Colour
        alone cannot tell a microphone from a beard, so each connected region far from the
        skin's colour is judged whole by its texture: hair is textured, a microphone, a cup
        or a sleeve is smooth. Whole regions, because a smooth object's own edge is as sharp
        as hair and would otherwise be painted over in a band around it."""
        # features exactly to their outline: an object held next to the lips is not lips
        not_skin = 1.0 - self.skin_mask(image, points, TARGET_OCCLUDER_DISTANCE, False)
        # judged inside the face only: outside, an object would join the hair and the
        # background into one region and be judged by their texture instead of its own
        oval = blend.polygon_mask(image.shape[:2], [points[self.topology.face_oval]]) > 127
        candidates = ((not_skin > 0.25) & oval).astype(np.uint8)
        count, labels = cv2.connectedComponents(candidates, connectivity=8)
        if count < 2:
            return np.zeros(image.shape[:2], np.float32)
        face_width = float(np.ptp(points[self.topology.face_oval, 0]))
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)
        detail = np.abs(grey - cv2.GaussianBlur(grey, (0, 0), max(1.0, face_width / 200)))
        texture = cv2.GaussianBlur(detail, (0, 0), max(1.0, face_width / 100))
        skin = (candidates == 0) & oval  # the face's own bare skin, not the background
        skin_texture = float(np.median(texture[skin])) if skin.any() else 1.0
        ratio = blend.component_medians(labels, texture, count) / max(skin_texture, 0.5)
        smooth = 1.0 - blend.ramp(ratio - OCCLUDER_SMOOTH, OCCLUDER_TEXTURED - OCCLUDER_SMOOTH)
        smooth[0] = 0.0  # label 0: the skin itself
        # full strength from halfway off-skin: a soft edge would let the new face's colour
        # bleed into the rim of what stands in front of it
        strength = np.clip((not_skin - 0.25) / 0.5, 0.0, 1.0)
        return (strength * smooth[labels]).astype(np.float32)

    def swap(
        self,
        frame: np.ndarray,
        target: Face,
        source: SourceFace,
        clock: StageClock | None = None,
        settle_colour: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> bool:
        """Replace ``target`` in ``frame`` (BGR, modified in place) with ``source``.
        Returns False when the face is too small or off-frame to swap. ``settle_colour``:
        the face's temporal colour filter (see ``blend.transfer_colour``)."""
        clock = clock or StageClock()
        topo, opts = self.topology, self.options
        if target.mesh is None:
            return False
        with clock.stage("swap"):
            tgt = target.mesh[:, :2].astype(np.float64)
            new = transfer_shape(target.mesh, source.mesh, topo, opts.shape_strength)
            oval_t = tgt[topo.face_oval]
            centre = oval_t.mean(0)
            border = centre + RING_SCALE * (oval_t - centre)
            geometry = np.vstack([new, border])  # where things go
            from_target = np.vstack([tgt, border])  # where the target's pixels come from

            h, w = frame.shape[:2]
            x0, y0 = np.floor(geometry.min(0)).astype(int)
            x1, y1 = np.ceil(geometry.max(0)).astype(int) + 1
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
            if x1 - x0 < 8 or y1 - y0 < 8:
                return False
            origin = np.array([x0, y0], dtype=np.float64)
            local = geometry - origin
            shape = (y1 - y0, x1 - x0)

            # far triangles first: where a turned face folds over itself the near side wins
            depth = target.mesh[self.face_triangles, 2].mean(1)
            n_mesh = len(self.face_triangles)
            order = np.concatenate([np.arange(n_mesh, len(self.all_triangles)), np.argsort(-depth)])
            ids = rasterise_ids(local, self.all_triangles, shape, order)

            target_maps = sample_maps(
                ids, triangle_affines(local, from_target, self.all_triangles), origin=(x0, y0)
            )
            background = remap(frame, target_maps)
            source_maps = sample_maps(
                ids, triangle_affines(local[:468], source.points, self.face_triangles)
            )
            warped = remap(source.texture, source_maps)
            face_px = np.ascontiguousarray(warped[:, :, :3])
            source_skin = warped[:, :, 3].astype(np.float32) / 255.0

        with clock.stage("blend"):
            face_width = float(np.ptp(local[topo.face_oval, 0]))
            oval = blend.polygon_mask(shape, [local[topo.face_oval]])
            keep = [
                local[p]
                for p, on in (
                    (topo.inner_lips, opts.keep_mouth),
                    (topo.right_eye, opts.keep_eyes),
                    (topo.left_eye, opts.keep_eyes),
                )
                if on
            ]
            holes = (
                blend.soft_holes(blend.polygon_mask(shape, keep), 0.012 * face_width)
                if keep
                else np.zeros(shape, np.float32)
            )
            # The source is pasted whole inside; near its outline only where it shows skin:
            # there the mesh can overlap the source photo's background, or the far side of a
            # turned target reaches the source's edge (a curtain, a collar, a tie).
            depth = blend.inside_distance(oval)  # one distance map, every feather from it
            edge = blend.ramp(depth, OVAL_FEATHER * face_width)
            whole = np.maximum(source_skin, blend.ramp(depth, SOURCE_EDGE * face_width))
            alpha = edge * (1.0 - holes) * whole

            not_skin = cv2.dilate(
                blend.polygon_mask(shape, self.feature_polygons(local)),
                np.ones((5, 5), np.uint8),
                iterations=2,
            )
            # skin bare in both faces: the source's beard or brows must not read as a
            # shadow to be lifted, nor the target's as one to be cast
            skin = edge * (not_skin < 128) * source_skin
            coloured = blend.transfer_colour(
                face_px,
                background,
                skin,
                shading_sigma=opts.shading * face_width,
                settle_stats=settle_colour,
            )
            if opts.blend == "poisson":
                out = blend.poisson_blend(coloured, background, alpha)
            else:
                out = blend.alpha_blend(coloured, background, alpha)
            if opts.keep_occluders:
                # occluders come from the original, unwarped frame: the reshaped jaw must
                # not drag a hand or a microphone along with it
                original = frame[y0:y1, x0:x1]
                target_local = tgt - origin
                inside = blend.feathered(
                    blend.polygon_mask(shape, [target_local[topo.face_oval]]), 0.03 * face_width
                )
                occluder = self.occluder_mask(original, target_local)
                out = blend.alpha_blend(original, out, occluder * inside)
            frame[y0:y1, x0:x1] = out
        return True
