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

import logging
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from facecast.engine.timing import StageClock
from facecast.errors import ModelError
from facecast.faces.align import square_crop
from facecast.faces.expression import EYE_CORNERS
from facecast.faces.face import Face
from facecast.faces.iris import GazeReader, gaze_in_eyes, irises_at
from facecast.faces.landmarks import Roi, roi_from_mesh
from facecast.faces.topology import MeshTopology, mesh_topology
from facecast.media.planes import Box
from facecast.swap import blend
from facecast.swap.shape import eye_opening, transfer_shape
from facecast.swap.warp import rasterise_ids, remap, sample_maps, triangle_affines

log = logging.getLogger(__name__)

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
# A source eye opened less than SQUINT_RATIO times as wide as the target's (each relative to
# its width) gives way to the target's eye opening, fully at CLOSED_RATIO.
SQUINT_RATIO, CLOSED_RATIO = 0.6, 0.45
# The pasted face fades out over this fraction of its width at its outline. Narrower fades
# score better with both identity judges (less of the target's cheeks shows through) but
# leave a visible seam where the lighting differs: 0.015 does on damon onto musk.
OVAL_FEATHER = 0.045
# The band along the face's outline, as a fraction of its width, where only the source's skin
# is pasted (its background or collar may lie there); inside it the source is pasted whole.
SOURCE_EDGE = 0.15


@dataclass(frozen=True)
class SourceFace:
    """Everything per-frame work needs from the source photo, computed once."""

    # uint8, 5 channels, the upright face pasted whole (beard, brows, shadows): BGR; where
    # the source shows bare skin (colour is matched there); where it shows skin or hair (a
    # beard, stubble, the hairline: pasted up to its outline). One remap carries all five.
    texture: np.ndarray
    points: np.ndarray  # (468, 2) mesh points in the texture
    mesh: np.ndarray  # (468, 3) mesh as detected, for the shape transfer
    embedding: np.ndarray | None = None
    # (2, 2) iris centres in the texture (subject's right eye, then left); None: not read
    irises: np.ndarray | None = None


@dataclass(frozen=True)
class SwapOptions:
    blend: blend.BlendMode = "feather"
    keep_mouth: bool = True  # the target's mouth opening (teeth, tongue) stays
    # the target's whole eye openings stay; off (the default), the source's eyes and lids
    # are pasted, their irises moved to where the target looks (see follow_gaze)
    keep_eyes: bool = False
    source_eye_shape: bool = True  # the eyes' outlines: the source's, opened like the target's
    follow_gaze: bool = True  # the source's irises go where the target's are (iris model)
    shape_strength: float = 1.0  # 0: target outline, 1: source outline
    # low-frequency lighting carry, sigma as a fraction of face width: wide enough to carry
    # the light's direction, not the target's own cheekbones and folds (0.2 carried some:
    # both judges, both halves of bench quality put the output nearer the source at 0.3)
    shading: float = 0.3
    keep_occluders: bool = True  # what covers the target's face (hand, mic) stays in front


# Corners of the openings the mesh leaves as holes: each splits its loop into two lid (or
# lip) lines. The mouth's are on the inner lip line.
INNER_MOUTH_CORNERS = (78, 308)


def opening_triangles(loop_points: np.ndarray, corners: tuple[int, int]) -> np.ndarray:
    """A strip of triangles across an opening the mesh leaves as a hole (the mouth), so what
    is inside it is warped with the face: without them, the source's mouth is sampled off its
    texture's edge (a flat fill) and the target's stays where it was, not where the new
    geometry puts it."""
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


def fan_triangles(loop_points: np.ndarray, centre: int) -> np.ndarray:
    """Triangles from each edge of an opening's outline to one point inside it (an eye, fanned
    around its iris centre): moving that point moves the iris, and the eye's white stretches
    around it, so the source's eye can look where the target's looks."""
    loop = [int(i) for i in loop_points]
    return np.array(
        [(loop[k], loop[(k + 1) % len(loop)], centre) for k in range(len(loop))], dtype=np.int32
    )


def inside_opening(point: np.ndarray, outline: np.ndarray) -> np.ndarray:
    """``point`` if it lies inside ``outline`` with a little room, else moved towards the
    outline's centroid until it does: an iris read on a closed or half-closed eye must not
    fold the eye's triangles over."""
    centroid = outline.mean(0)
    contour = outline.astype(np.float32).reshape(-1, 1, 2)
    margin = 0.05 * float(np.ptp(outline[:, 0]))
    for t in (1.0, 0.75, 0.5, 0.25):
        candidate = centroid + t * (point - centroid)
        if cv2.pointPolygonTest(contour, candidate.astype(np.float32).tolist(), True) > margin:
            return candidate
    return centroid


def ring_triangles(oval: np.ndarray, first_border: int) -> np.ndarray:
    """Triangles joining each outline edge to the matching edge of the fixed border."""
    n = len(oval)
    tris = []
    for k in range(n):
        o0, o1 = int(oval[k]), int(oval[(k + 1) % n])
        b0, b1 = first_border + k, first_border + (k + 1) % n
        tris += [(o0, o1, b0), (o1, b1, b0)]
    return np.array(tris, dtype=np.int32)


NOSE_TIP, UPPER_LIP = 4, 0


def below_nose(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """0..1 over an image of the face at ``points``: 0 above the nose tip, rising to 1 at the
    upper lip, along the face's own down direction (a tilted head tilts it too)."""
    nose, lip = points[NOSE_TIP].astype(np.float32), points[UPPER_LIP].astype(np.float32)
    down = lip - nose
    length2 = float(down @ down)
    if length2 < 1e-6:
        return np.ones(shape, np.float32)
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    along = ((xs - nose[0]) * down[0] + (ys - nose[1]) * down[1]) / np.float32(length2)
    return blend.ramp(along, 1.0)


class MeshSwapper:
    def __init__(self, options: SwapOptions | None = None) -> None:
        self.options = options or SwapOptions()
        self._iris_warned = False
        self._gaze = GazeReader()
        self.topology: MeshTopology = mesh_topology()
        n_points = 468
        # mesh first (ids < len(face_triangles) index the source texture), ring last
        topo = self.topology
        # vertices: the 468 mesh points, one centre per eye (its iris), then the border
        self.eye_centres = (n_points, n_points + 1)
        self.n_face_points = n_points + 2
        self.ring = ring_triangles(topo.face_oval, self.n_face_points)
        self.face_triangles = np.vstack(
            [
                topo.triangles,
                opening_triangles(topo.inner_lips, INNER_MOUTH_CORNERS),
                fan_triangles(topo.right_eye, self.eye_centres[0]),
                fan_triangles(topo.left_eye, self.eye_centres[1]),
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
        texture = square_crop(image, to_texture, TEXTURE_SIZE, cv2.INTER_CUBIC)
        points = (face.mesh[:, :2] @ to_texture[:, :2].T + to_texture[:, 2]).astype(np.float32)
        irises = self.read_irises(image, face.mesh)
        if irises is not None:
            irises = irises @ to_texture[:, :2].T + to_texture[:, 2]
        # No occluder mask on the source: its beard, moustache, brows and shadows are its
        # identity. Dropping them by colour let the target show through exactly there. Its
        # bare skin is still found: colour is matched on skin that is bare in both faces.
        skin = self.skin_mask(texture, points)
        # hair only from the nose down (a beard, stubble, a moustache): higher up, the hair
        # at the outline is a temple or sideburn that would end as a dark smudge on a cheek
        beard = self.hair_mask(texture, points, skin) * below_nose(points, texture.shape[:2])
        face_like = np.maximum(skin, beard)
        channels = [texture, *((m * 255 + 0.5).astype(np.uint8) for m in (skin, face_like))]
        return SourceFace(np.dstack(channels), points, face.mesh.copy(), embedding, irises)

    def hair_mask(self, image: np.ndarray, points: np.ndarray, skin: np.ndarray) -> np.ndarray:
        """0..1: off-skin and textured like hair (a beard, stubble, a hairline), measured
        against the texture of the face's own skin. A collar, a shadowed neck or a plain
        background is smooth and scores 0."""
        face_width = float(np.ptp(points[self.topology.face_oval, 0]))
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)
        texture = blend.local_texture(grey, face_width)
        bare = skin > 0.75
        reference = float(np.median(texture[bare])) if bare.any() else 1.0
        ratio = texture / max(reference, 0.5)
        return blend.ramp(ratio - OCCLUDER_SMOOTH, OCCLUDER_TEXTURED - OCCLUDER_SMOOTH) * (1 - skin)

    def read_irises(
        self, image: np.ndarray, mesh: np.ndarray, track_id: int | None = None
    ) -> np.ndarray | None:
        """Iris centres (2, 2) when eyes are pasted and should follow the gaze, else None."""
        if self.options.keep_eyes or not self.options.follow_gaze:
            return None
        try:
            return self._gaze.irises(image, mesh, track_id)
        except ModelError as error:  # an install without the iris model: eyes keep their gaze
            if not self._iris_warned:
                log.warning("eyes will not follow the target's gaze: %s", error)
                self._iris_warned = True
            return None

    def kept_eyes(self, target: np.ndarray, source: np.ndarray) -> tuple[float, float]:
        """Per eye, 0..1: how much of the target's eye opening stays. All of it with
        ``keep_eyes``; otherwise only where the source's eye is much less open than the
        target's (a squint or a blink in the source photo): stretched that far, its lids and
        the glint on its iris smear across the target's open eye."""
        if self.options.keep_eyes:
            return 1.0, 1.0
        topo = self.topology
        kept = []
        for eye, corners in (
            (topo.right_eye, EYE_CORNERS[0]),
            (topo.left_eye, EYE_CORNERS[1]),
        ):
            ratio = eye_opening(source[:, :2], eye, corners) / max(
                eye_opening(target[:, :2], eye, corners), 1e-6
            )
            kept.append(
                float(blend.ramp(np.float64(SQUINT_RATIO - ratio), SQUINT_RATIO - CLOSED_RATIO))
            )
        return kept[0], kept[1]

    def eye_centres_for(self, points: np.ndarray, irises: np.ndarray | None) -> np.ndarray:
        """(2, 2) the fan centre of each eye: its iris, kept inside the opening, or the
        opening's centroid when no iris was read."""
        topo = self.topology
        centres = []
        for k, loop in enumerate((topo.right_eye, topo.left_eye)):
            outline = points[loop, :2].astype(np.float64)
            point = outline.mean(0) if irises is None else irises[k]
            centres.append(inside_opening(np.asarray(point, np.float64), outline))
        return np.array(centres)

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
        texture = blend.local_texture(grey, face_width)
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
    ) -> Box | None:
        """Replace ``target`` in ``frame`` (BGR, modified in place) with ``source``.
        Returns the box of ``frame`` it changed, or None when the face is too small or
        off-frame to swap. ``settle_colour``:
        the face's temporal colour filter (see ``blend.transfer_colour``)."""
        clock = clock or StageClock()
        topo, opts = self.topology, self.options
        if target.mesh is None:
            return None
        with clock.stage("swap"):
            tgt = target.mesh[:, :2].astype(np.float64)
            new = transfer_shape(
                target.mesh, source.mesh, topo, opts.shape_strength, opts.source_eye_shape
            )
            oval_t = tgt[topo.face_oval]
            centre = oval_t.mean(0)
            border = centre + RING_SCALE * (oval_t - centre)
            # the eyes' fan centres: the target's irises, carried into the new eyes at the
            # same place relative to their corners (the gaze), so the source's iris moves there
            target_irises = (
                self.read_irises(frame, target.mesh, target.track_id)
                if source.irises is not None
                else None
            )
            target_eyes = self.eye_centres_for(tgt, target_irises)
            new_eyes = self.eye_centres_for(
                new,
                None if target_irises is None else irises_at(new, gaze_in_eyes(tgt, target_eyes)),
            )
            source_eyes = self.eye_centres_for(source.points, source.irises)
            geometry = np.vstack([new, new_eyes, border])  # where things go
            from_target = np.vstack(
                [tgt, target_eyes, border]
            )  # where the target's pixels come from

            h, w = frame.shape[:2]
            x0, y0 = np.floor(geometry.min(0)).astype(int)
            x1, y1 = np.ceil(geometry.max(0)).astype(int) + 1
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
            if x1 - x0 < 8 or y1 - y0 < 8:
                return None
            origin = np.array([x0, y0], dtype=np.float64)
            local = geometry - origin
            shape = (y1 - y0, x1 - x0)

            # far triangles first: where a turned face folds over itself the near side wins
            z = target.mesh[:, 2]
            z_eyes = [z[topo.right_eye].mean(), z[topo.left_eye].mean()]
            depth = np.concatenate([z, z_eyes])[self.face_triangles].mean(1)
            n_mesh = len(self.face_triangles)
            order = np.concatenate([np.arange(n_mesh, len(self.all_triangles)), np.argsort(-depth)])
            ids = rasterise_ids(local, self.all_triangles, shape, order)

            target_maps = sample_maps(
                ids, triangle_affines(local, from_target, self.all_triangles), origin=(x0, y0)
            )
            background = remap(frame, target_maps)
            source_points = np.vstack([source.points, source_eyes])
            source_maps = sample_maps(
                ids,
                triangle_affines(local[: self.n_face_points], source_points, self.face_triangles),
            )
            warped = remap(source.texture, source_maps)
            face_px = np.ascontiguousarray(warped[:, :, :3])
            source_skin = warped[:, :, 3].astype(np.float32) / 255.0
            source_face_like = warped[:, :, 4].astype(np.float32) / 255.0

        with clock.stage("blend"):
            face_width = float(np.ptp(local[topo.face_oval, 0]))
            oval = blend.polygon_mask(shape, [local[topo.face_oval]])
            # what stays of the target inside the face: its mouth opening, and each eye the
            # source's cannot stand in for (see kept_eyes)
            eye_keep = self.kept_eyes(target.mesh, source.mesh)
            held = np.zeros(shape, np.uint8)
            if opts.keep_mouth:
                held = blend.polygon_mask(shape, [local[topo.inner_lips]])
            eye_masks = [
                blend.polygon_mask(shape, [local[e]]) for e in (topo.right_eye, topo.left_eye)
            ]
            for mask, weight in zip(eye_masks, eye_keep, strict=True):
                if weight > 0:
                    held = np.maximum(held, (mask * weight).astype(np.uint8))
            holes = blend.soft_holes(held, 0.012 * face_width)
            # The source is pasted whole inside; near its outline only where it shows skin:
            # there the mesh can overlap the source photo's background, or the far side of a
            # turned target reaches the source's edge (a curtain, a collar, a tie).
            depth = blend.inside_distance(oval)  # one distance map, every feather from it
            edge = blend.ramp(depth, OVAL_FEATHER * face_width)
            whole = np.maximum(source_face_like, blend.ramp(depth, SOURCE_EDGE * face_width))
            alpha = edge * (1.0 - holes) * whole

            not_skin = cv2.dilate(
                blend.polygon_mask(shape, self.feature_polygons(local)),
                np.ones((5, 5), np.uint8),
                iterations=2,
            )
            # skin bare in both faces: the source's beard or brows must not read as a
            # shadow to be lifted, nor the target's as one to be cast
            skin = edge * (not_skin < 128) * source_skin
            # the pasted eyes keep their own contrast and hue (see transfer_colour)
            pasted_eyes = [
                m if k == 0 else (m * (1.0 - k)).astype(np.uint8)
                for m, k in zip(eye_masks, eye_keep, strict=True)
            ]
            eyes = blend.soft_mask(
                cv2.max(*pasted_eyes).astype(np.float32) * np.float32(1 / 255), 0.005 * face_width
            )
            coloured = blend.transfer_colour(
                face_px,
                background,
                skin,
                shading_sigma=opts.shading * face_width,
                settle_stats=settle_colour,
                features=eyes,
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
                occluder = self.occluder_mask(original, target_local)
                if occluder.max() > 0:  # most frames have none: skip the feather and blend
                    inside = blend.feathered(
                        blend.polygon_mask(shape, [target_local[topo.face_oval]]),
                        0.03 * face_width,
                    )
                    out = blend.alpha_blend(original, out, occluder * inside)
            frame[y0:y1, x0:x1] = out
        return int(x0), int(y0), int(x1), int(y1)
