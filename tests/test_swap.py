"""The embedded swapper on real photo pairs: identity carried, target kept where it should be."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facecast.faces.embed import face_distance
from facecast.faces.iris import gaze_in_eyes, iris_centres
from facecast.swap.mesh_swapper import MeshSwapper, SwapOptions
from facecast.swap.shape import eye_with_opening, fit_source_to_target, transfer_shape

from .conftest import load

PAIRS = [
    ("obama.jpg", "biden.jpg"),
    ("biden.jpg", "obama.jpg"),
    ("lin-manuel-miranda.png", "alex-lacamoire.png"),
    ("alex-lacamoire.png", "lin-manuel-miranda.png"),
    ("obama.jpg", "lin-manuel-miranda.png"),
    ("biden.jpg", "alex-lacamoire.png"),
    ("lin-manuel-miranda.png", "obama-720p.jpg"),
    ("alex-lacamoire.png", "two_people.jpg"),
]


@pytest.fixture(scope="module")
def swapper():
    return MeshSwapper()


def swap_pair(analyser, swapper, source_name, target_name):
    source_img, target_img = load(source_name), load(target_name)
    source_face = analyser.analyse(source_img)[0]
    target_face = analyser.analyse(target_img)[0]
    out = target_img.copy()
    assert swapper.swap(out, target_face, swapper.prepare(source_img, source_face))
    return source_img, source_face, target_img, target_face, out


def face_crop(image, face, margin=0.35):
    x0, y0, x1, y1 = face.box.astype(int)
    m = int(margin * (x1 - x0))
    h, w = image.shape[:2]
    return cv2.resize(
        image[max(0, y0 - m) : min(h, y1 + m), max(0, x0 - m) : min(w, x1 + m)], (220, 220)
    )


def test_swap_carries_the_source_identity(analyser, embedder, swapper, artifacts):
    rows, report = [], []
    for source_name, target_name in PAIRS:
        src_img, src_face, tgt_img, tgt_face, out = swap_pair(
            analyser, swapper, source_name, target_name
        )
        out_face = analyser.analyse(out)[0]
        e_src = embedder.embed(src_img, src_face)
        e_tgt = embedder.embed(tgt_img, tgt_face)
        e_out = embedder.embed(out, out_face)
        d_src, d_tgt = face_distance(e_out, e_src), face_distance(e_out, e_tgt)
        report.append((source_name, target_name, d_src, d_tgt))
        rows.append(
            np.hstack(
                [
                    face_crop(src_img, src_face),
                    face_crop(tgt_img, tgt_face),
                    face_crop(out, tgt_face),
                ]
            )
        )
    cv2.imwrite(
        str(artifacts / "swap_contact_sheet.png"),
        np.vstack([np.hstack(rows[i : i + 2]) for i in range(0, len(rows), 2)]),
    )
    for s, t, d_src, d_tgt in report:
        print(f"{s:>24} -> {t:<24} d(out,src)={d_src:.3f} d(out,tgt)={d_tgt:.3f}")
    print(
        f"mean d(out,src)={np.mean([r[2] for r in report]):.3f} "
        f"mean d(out,tgt)={np.mean([r[3] for r in report]):.3f}"
    )
    failures = [r for r in report if not r[2] < r[3]]
    assert not failures, failures


def test_only_the_face_region_is_touched(analyser, swapper):
    _, _, target, target_face, out = swap_pair(analyser, swapper, "obama.jpg", "two_people.jpg")
    changed = np.any(out != target, axis=2)
    ys, xs = np.nonzero(changed)
    assert len(xs) > 0.2 * target_face.area  # the face really changed
    # nothing outside a generous box around the swapped face; the other person untouched
    x0, y0, x1, y1 = target_face.box
    w, h = x1 - x0, y1 - y0
    assert xs.min() >= x0 - w and xs.max() <= x1 + w
    assert ys.min() >= y0 - h and ys.max() <= y1 + h


def test_target_mouth_opening_is_kept(analyser):
    """Obama smiles with his teeth showing; Biden's mouth is closed. With the default the
    output shows the target's teeth, not the source's lips stretched over them."""
    # occluder keeping off: teeth are not skin-coloured and would be kept by it as well
    kept = MeshSwapper(SwapOptions(keep_mouth=True, keep_occluders=False))
    pasted = MeshSwapper(SwapOptions(keep_mouth=False, keep_occluders=False))
    *_, target, _target_face, out_kept = swap_pair(analyser, kept, "biden.jpg", "obama.jpg")
    *_, _, _, out_pasted = swap_pair(analyser, pasted, "biden.jpg", "obama.jpg")
    topo = kept.topology
    # the mouth opening where it ends up after the shape transfer, found on the output
    mouth = np.zeros(target.shape[:2], np.uint8)
    new_mesh = analyser.analyse(out_kept)[0].mesh
    cv2.fillPoly(mouth, [new_mesh[topo.inner_lips, :2].round().astype(np.int32)], 1)
    mouth = cv2.erode(mouth, np.ones((5, 5), np.uint8))
    assert mouth.sum() > 200
    teeth_brightness_target = target[mouth.astype(bool)].mean()
    kept_mean = out_kept[mouth.astype(bool)].mean()
    pasted_mean = out_pasted[mouth.astype(bool)].mean()
    print(
        f"mouth opening mean: target {teeth_brightness_target:.0f}, kept {kept_mean:.0f}, "
        f"pasted {pasted_mean:.0f}"
    )
    assert kept_mean > pasted_mean + 15  # white teeth stay; the pasted source lips are darker


def test_occluder_in_front_of_the_target_stays(analyser):
    """A real object (a piece of his dark jacket from the same photo, standing in for a
    microphone) held in front of Obama's cheek stays in front after the swap, while the face
    around it is swapped."""
    target = load("obama.jpg")
    face = analyser.analyse(target)[0]
    chips = load("obama.jpg")[930:990, 350:400]  # his navy jacket
    occluded = target.copy()
    x0, y0, x1, y1 = face.box.astype(int)
    oy, ox = y0 + (y1 - y0) // 2, x0 + (x1 - x0) // 6  # on the cheek, clear of the lips
    occluded[oy : oy + chips.shape[0], ox : ox + chips.shape[1]] = chips
    region = (slice(oy + 3, oy + chips.shape[0] - 3), slice(ox + 3, ox + chips.shape[1] - 3))

    source = load("biden.jpg")
    changes = {}
    for keep in (True, False):
        swapper = MeshSwapper(SwapOptions(keep_occluders=keep))
        src = swapper.prepare(source, analyser.analyse(source)[0])
        out = occluded.copy()
        assert swapper.swap(out, analyser.analyse(occluded)[0], src)
        changes[keep] = np.abs(out[region].astype(int) - occluded[region].astype(int)).mean()
        face_change = np.abs(out[y0:y1, x0:x1].astype(int) - occluded[y0:y1, x0:x1].astype(int))
        assert face_change.mean() > 8  # the face itself was swapped
    print(f"mean change over the occluder: kept {changes[True]:.1f}, painted {changes[False]:.1f}")
    assert changes[True] < 6 and changes[False] > 3 * changes[True]


def test_feather_leaves_no_seam(analyser):
    """The edge of the pasted face: gradient across the outline no stronger than a hard paste's."""
    source, target = load("obama.jpg"), load("biden.jpg")
    s_face, t_face = analyser.analyse(source)[0], analyser.analyse(target)[0]
    outs = {}
    for mode in ("feather", "poisson"):
        swapper = MeshSwapper(SwapOptions(blend=mode))
        out = target.copy()
        swapper.swap(out, t_face, swapper.prepare(source, s_face))
        outs[mode] = out
    topo = MeshSwapper().topology
    new_mesh = analyser.analyse(outs["feather"])[0].mesh
    band = np.zeros(target.shape[:2], np.uint8)
    cv2.polylines(band, [new_mesh[topo.face_oval, :2].round().astype(np.int32)], True, 1, 5)

    def edge_strength(img):
        gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float32)
        return np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))[
            band > 0
        ].mean()

    print(
        {k: round(edge_strength(v), 1) for k, v in outs.items()},
        "target",
        round(edge_strength(target), 1),
    )
    for mode, out in outs.items():
        assert edge_strength(out) < 1.5 * edge_strength(target), mode


def test_source_eyes_are_warped_with_the_face(analyser):
    """The mesh leaves the eyes as holes. They need triangles of their own: without them the
    source's eye was sampled off its texture's edge, a flat fill that showed as a bright ring
    around every kept eye (and as the whole eye with ``keep_eyes`` off)."""
    swapper = MeshSwapper(SwapOptions(keep_eyes=False, keep_occluders=False))
    source, target = load("people/damon1.jpg"), load("people/musk1.jpg")
    source_face, target_face = analyser.analyse(source)[0], analyser.analyse(target)[0]
    out = target.copy()
    assert swapper.swap(out, target_face, swapper.prepare(source, source_face))
    # where the swapper puts the eyes: the target's mesh in the source's proportions
    new = transfer_shape(target_face.mesh, source_face.mesh, swapper.topology)
    grey = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY)
    for eye in (swapper.topology.right_eye, swapper.topology.left_eye):
        opening = np.zeros(grey.shape, np.uint8)
        cv2.fillPoly(opening, [new[eye].round().astype(np.int32)], 1)
        opening = cv2.erode(opening, np.ones((3, 3), np.uint8)).astype(bool)
        assert opening.sum() > 40
        spread = float(grey[opening].std())
        print(f"grey spread inside the eye opening: {spread:.1f}")
        assert spread > 20  # an iris on its white, not one flat colour


def test_recolouring_never_clips_the_highlights():
    """A dark face recoloured onto a light one: its brightest pixels (the eyes' whites, the
    teeth) keep their gradations instead of clipping to one flat white."""
    from facecast.swap import blend

    ramp_row = np.linspace(90, 250, 200, dtype=np.float32)  # skin to sclera white
    source = np.repeat(ramp_row[None, :, None], 40, 0).repeat(3, 2)
    source = cv2.add(
        source.astype(np.uint8),
        np.random.default_rng(1).integers(0, 12, source.shape, dtype=np.uint8),
    )
    target = np.clip(source.astype(int) + 60, 0, 255).astype(np.uint8)  # a lighter face
    skin = np.zeros(source.shape[:2], np.float32)
    skin[:, :100] = 1.0
    out = blend.transfer_colour(source, target, skin)
    lightness = cv2.cvtColor(out, cv2.COLOR_BGR2LAB)[:, :, 0].mean(0)
    print(f"brightest columns: {lightness[-5:].round()}")
    assert lightness.max() < 255
    assert np.all(np.diff(lightness[100:]) > -1.5)  # still rising to the end, no plateau
    assert lightness[-1] - lightness[-40] > 2


def test_pasted_eyes_look_where_the_target_looks(analyser):
    """Aniston looks to her left in her photo, Jolie to her right in hers. The source's eyes
    are pasted (lids and irises are identity), but its irises go where the target's are: the
    output's gaze is near the target's, not the source photo's. Not exact: the fan warp
    squeezes the iris on the side it moves to, and the model reads a squeezed disc a little
    off its centre."""
    source, target = load("people/aniston1.jpg"), load("people/jolie1.jpg")
    source_face, target_face = analyser.analyse(source)[0], analyser.analyse(target)[0]
    target_gaze = gaze_in_eyes(target_face.mesh, iris_centres(target, target_face.mesh))
    errors = {}
    for follow in (True, False):
        swapper = MeshSwapper(SwapOptions(follow_gaze=follow))
        out = target.copy()
        assert swapper.swap(out, target_face, swapper.prepare(source, source_face))
        out_mesh = analyser.analyse(out)[0].mesh
        gaze = gaze_in_eyes(out_mesh, iris_centres(out, out_mesh))
        errors[follow] = float(np.abs(gaze - target_gaze)[:, 0].mean())  # along the eye
    print(f"gaze error (eye widths): following {errors[True]:.3f}, not {errors[False]:.3f}")
    assert errors[True] < 0.07  # eye widths
    assert errors[False] > 2 * errors[True]


def test_a_squinting_source_eye_leaves_the_target_eye(analyser):
    """A source photo with a squint or a blink cannot stand in for an open eye: the target's
    eye stays; an eye about as open as the target's is pasted."""
    swapper = MeshSwapper()
    target = analyser.analyse(load("people/zuckerberg1.jpg"))[0].mesh
    source = analyser.analyse(load("people/damon1.jpg"))[0].mesh
    assert swapper.kept_eyes(target, source) == (0.0, 0.0)
    squint = source.copy()
    topo = swapper.topology
    for eye in (topo.right_eye, topo.left_eye):  # lids pulled to a third of their opening
        centre = squint[eye, 1].mean()
        squint[eye, 1] = centre + (squint[eye, 1] - centre) / 3
    assert swapper.kept_eyes(target, squint) == (1.0, 1.0)


def test_eye_outline_is_the_sources_opened_like_the_targets(analyser):
    """Pichai's eye (narrower) given Zuckerberg's opening: corners and lid curves stay the
    source's, the distance between the lids becomes the target's."""
    topo = MeshSwapper().topology
    target_mesh = analyser.analyse(load("people/zuckerberg1.jpg"))[0].mesh
    source_mesh = analyser.analyse(load("people/pichai1.jpg"))[0].mesh
    target = target_mesh[:, :2]
    source = fit_source_to_target(source_mesh, target_mesh)[:, :2]  # posed as the swap does
    eye, corners = topo.right_eye, [33, 133]
    moved = eye_with_opening(source[eye], target[eye], source[corners], target[corners])

    def lid_gap(outline: np.ndarray, ends: np.ndarray) -> float:
        along = (ends[1] - ends[0]) / np.linalg.norm(ends[1] - ends[0])
        return float(np.ptp((outline - ends.mean(0)) @ np.array([-along[1], along[0]])))

    assert lid_gap(source[eye], source[corners]) < 0.8 * lid_gap(target[eye], target[corners])
    assert lid_gap(moved, source[corners]) == pytest.approx(lid_gap(target[eye], target[corners]))
    corner_rows = [list(eye).index(c) for c in corners]
    np.testing.assert_allclose(moved[corner_rows], source[corners], atol=1e-6)


def test_a_source_beard_reaches_the_jaw_line(analyser):
    """Near its outline the source is pasted only where it shows skin (its collar or the
    photo's background may lie there), and hair from the nose down: Dorsey's beard must cover
    Musk's jaw to the outline, not stop a band short of it with Musk's bare chin below."""
    swapper = MeshSwapper()
    source, target = load("people/dorsey1.jpg"), load("people/musk1.jpg")
    source_face, target_face = analyser.analyse(source)[0], analyser.analyse(target)[0]
    out = target.copy()
    assert swapper.swap(out, target_face, swapper.prepare(source, source_face))
    new = transfer_shape(target_face.mesh, source_face.mesh, swapper.topology)
    oval = np.zeros(target.shape[:2], np.uint8)
    cv2.fillPoly(oval, [new[swapper.topology.face_oval].round().astype(np.int32)], 255)
    depth = cv2.distanceTransform(oval, cv2.DIST_L2, 3)
    width = float(np.ptp(new[swapper.topology.face_oval, 0]))
    ys = np.mgrid[0 : oval.shape[0], 0 : oval.shape[1]][0]
    # the jaw band: 3-12 % of the face's width inside the outline, below the mouth
    band = (depth > 0.03 * width) & (depth < 0.12 * width) & (ys > new[14, 1])
    grey_out = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY)[band].mean()
    grey_target = cv2.cvtColor(target, cv2.COLOR_BGR2GRAY)[band].mean()
    print(f"jaw band grey: target {grey_target:.0f}, output {grey_out:.0f}")
    assert grey_out < grey_target - 75  # dark beard to the outline (a band short: ~52 darker)
