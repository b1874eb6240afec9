"""The ArcFace recogniser and the inswapper adapter, on real photos and ONNX stand-ins.

The stand-ins have the real models' signatures and arithmetic simple enough to redo here in
numpy: every expectation below is computed independently of the adapters' own code (its
own alignment by linear least squares, its own pooling and projection, its own latent).
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
from onnx import helper

from facecast.engine.timing import StageClock
from facecast.errors import FacecastError
from facecast.faces.align import align_crop, arcface_template, five_points
from facecast.faces.recognise import ArcFaceRecogniser, Recogniser
from facecast.faces.topology import mesh_topology
from facecast.models.runtime import ModelFileError, OnnxModel
from facecast.swap.blend import paste_crop as paste_face
from facecast.swap.learned import LearnedSwapper
from facecast.swap.mesh_swapper import SwapOptions

from .conftest import load
from .onnx_helpers import arcface_model, identity_model, inswapper_model, save_model

POOL = 8
POOLED = 3 * (112 // POOL) ** 2
PHOTOS = ("alex-lacamoire.png", "two_people.jpg", "obama.jpg")


@pytest.fixture(scope="module")
def faces(analyser):
    out = {}
    for name in PHOTOS:
        image = load(name)
        found = analyser.analyse(image)
        assert found, name
        out[name] = (image, found[0])
    return out


@pytest.fixture(scope="module")
def projection():
    rng = np.random.default_rng(7)
    return rng.normal(size=(POOLED, 512)) / np.sqrt(POOLED), rng.normal(size=512) * 0.3


@pytest.fixture(scope="module")
def recogniser(tmp_path_factory, projection):
    weight, bias = projection
    path = arcface_model(tmp_path_factory.mktemp("arcface") / "w600k_r50.onnx", weight, bias)
    return ArcFaceRecogniser(OnnxModel(path))


@pytest.fixture(scope="module")
def emaps():
    rng = np.random.default_rng(11)
    # a decoy of the same shape goes first: only the last initializer is the map
    return rng.normal(size=(512, 512)), rng.normal(size=(512, 512))


def swapper_for(
    tmp_path, recogniser, emaps, options=None, swap_size=None, **model_args
) -> LearnedSwapper:
    decoy, emap = emaps
    path = tmp_path / f"inswapper_{len(list(tmp_path.iterdir()))}.onnx"
    inswapper_model(path, emap, leading={"decoy": decoy}, **model_args)
    return LearnedSwapper(OnnxModel(path), recogniser, options, swap_size=swap_size)


# -- independent arithmetic


def lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The similarity transform as a linear least-squares fit of (a, b, tx, ty) in
    [[a, -b, tx], [b, a, ty]]: a different route to the Umeyama optimum."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        rows += [[x, -y, 1.0, 0.0], [y, x, 0.0, 1.0]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64).ravel()
    return v / np.linalg.norm(v)


def expected_embedding(image, face, projection, rgb=True, scale="arcface") -> np.ndarray:
    """The stand-in recogniser's embedding, redone: own alignment, own normalisation."""
    weight, bias = projection
    matrix = lstsq_similarity(five_points(face), arcface_template(112))
    crop = cv2.warpAffine(
        image, matrix, (112, 112), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    ).astype(np.float64)
    if rgb:
        crop = crop[:, :, ::-1]
    x = (crop - 127.5) / 127.5 if scale == "arcface" else crop / 255.0
    chw = x.transpose(2, 0, 1)
    pooled = chw.reshape(3, 112 // POOL, POOL, 112 // POOL, POOL).mean(axis=(2, 4))
    return unit(pooled.reshape(-1) @ weight + bias)


def face_mask(image, face, erode_px=0) -> np.ndarray:
    """The mesh's convex hull, optionally shrunk: "inside the face"."""
    mask = np.zeros(image.shape[:2], np.uint8)
    hull = cv2.convexHull(face.mesh[:, :2].astype(np.float32)).round().astype(np.int32)
    cv2.fillPoly(mask, [hull], 1)
    if erode_px:
        mask = cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=erode_px)
    return mask.astype(bool)


def low_pass_error(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """|a - b| in the detail a crop at ``scale`` (crop pixels per frame pixel) can hold."""
    sigma = 1.0 / scale

    def blur(x):
        return cv2.GaussianBlur(x.astype(np.float32), (0, 0), sigma)

    return np.abs(blur(a) - blur(b)).mean(axis=2)


def outside_box(image, face, grow: float) -> np.ndarray:
    """Beyond the face's extent (its box and its mesh, which reaches a little higher and
    lower), grown by ``grow`` of its width."""
    x0, y0 = np.minimum(face.box[:2], face.mesh[:, :2].min(0))
    x1, y1 = np.maximum(face.box[2:], face.mesh[:, :2].max(0))
    m = grow * (x1 - x0)
    ys, xs = np.mgrid[: image.shape[0], : image.shape[1]]
    return (xs < x0 - m) | (xs > x1 + m) | (ys < y0 - m) | (ys > y1 + m)


# -- alignment


@pytest.mark.parametrize("name", ["obama.jpg", "two_people.jpg"])
def test_alignment_round_trip_on_real_faces(faces, name):
    image, face = faces[name]
    points = five_points(face)
    template = arcface_template(128)
    crop, matrix = align_crop(image, points, template, 128)
    inverse = cv2.invertAffineTransform(matrix)
    ys, xs = np.mgrid[: image.shape[0], : image.shape[1]]
    for point, spot in zip(points, template, strict=True):
        # a bright blob at the point, carried through the very same warp: its centroid in
        # the crop, mapped back with the inverse, must land where it started
        blob = np.exp(-((xs - point[0]) ** 2 + (ys - point[1]) ** 2) / (2 * 5.0**2))
        warped, _ = align_crop(blob.astype(np.float32), points, template, 128)
        weight = warped / warped.sum()
        cy, cx = (weight * np.mgrid[:128, :128]).sum(axis=(1, 2))
        back = inverse @ np.array([cx, cy, 1.0])
        assert np.linalg.norm(back - point) < 1.0
        # and the crop really is aligned: the point sits near its template place
        assert np.linalg.norm(np.array([cx, cy]) - spot) < 8.0

    # a crop pasted back with a full mask reproduces the face it came from
    frame = image.copy()
    region = paste_face(frame, crop, matrix, np.ones((128, 128), np.float32))
    assert region is not None
    inside = face_mask(image, face, erode_px=3)
    error = np.abs(frame.astype(int) - image.astype(int))
    scale = np.sqrt(np.linalg.det(matrix[:, :2]))
    coarse = low_pass_error(frame, image, scale)
    print(
        f"{name}: crop/face scale {scale:.2f}, mean |error| inside {error[inside].mean():.2f}, "
        f"above the crop's resolution {coarse[inside].mean():.2f}"
    )
    # detail finer than the crop's pixels is lost (obama's face is 3x the crop); what the
    # crop can hold comes back in place: a one-pixel shift would double the coarse error
    assert error[inside].mean() < 7.0
    assert coarse[inside].mean() < 1.4
    untouched = np.ones(image.shape[:2], bool)
    x0, y0, x1, y1 = region
    untouched[y0:y1, x0:x1] = False
    assert not error[untouched].any()


# -- ArcFace


@pytest.mark.parametrize("input_name", ["input.1", "data"])
def test_arcface_preprocessing_matches_numpy(tmp_path, faces, projection, input_name):
    weight, bias = projection
    model = arcface_model(tmp_path / "arc.onnx", weight, bias, input_name=input_name)
    recogniser = ArcFaceRecogniser(OnnxModel(model))
    assert isinstance(recogniser, Recogniser)
    for name in ("alex-lacamoire.png", "obama.jpg"):
        image, face = faces[name]
        got = recogniser.embed(image, face)
        want = expected_embedding(image, face, projection)
        assert got.shape == (512,) and got.dtype == np.float32
        assert abs(np.linalg.norm(got) - 1.0) < 1e-5
        assert np.abs(got - want).max() < 1e-4, name
        # the check can tell the conventions apart: BGR order or 0..1 scaling miss by far
        assert np.abs(got - expected_embedding(image, face, projection, rgb=False)).max() > 1e-2
        assert np.abs(got - expected_embedding(image, face, projection, scale="01")).max() > 1e-2


def test_an_arcface_that_normalises_inside_its_graph_gets_raw_pixels(tmp_path, faces, projection):
    """MXNet-converted ArcFace exports scale their input themselves (first nodes ``_minus0``
    and ``_mul0``, as insightface looks for them): fed 0..255 they give the same embedding as
    the plain export fed -1..1. Normalised twice, identity was garbage."""
    weight, bias = projection
    inside = arcface_model(tmp_path / "mx.onnx", weight, bias, normalises_inside=True)
    recogniser = ArcFaceRecogniser(OnnxModel(inside))
    assert (recogniser.mean, recogniser.std) == (0.0, 1.0)
    for name in ("alex-lacamoire.png", "obama.jpg"):
        image, face = faces[name]
        got = recogniser.embed(image, face)
        assert np.abs(got - expected_embedding(image, face, projection)).max() < 1e-4, name
    plain = ArcFaceRecogniser(OnnxModel(arcface_model(tmp_path / "plain.onnx", weight, bias)))
    assert (plain.mean, plain.std) == (127.5, 127.5)


def test_cosine_distance(recogniser, faces):
    e = recogniser.embed(*faces["obama.jpg"])
    rng = np.random.default_rng(3)
    other = rng.normal(size=512)
    orthogonal = other - (other @ e) * e
    assert recogniser.distance(e, e) == pytest.approx(0.0, abs=1e-6)
    assert recogniser.distance(e, 3.0 * e) == pytest.approx(0.0, abs=1e-6)  # length-free
    assert recogniser.distance(e, -e) == pytest.approx(2.0, abs=1e-6)
    assert recogniser.distance(e, orthogonal) == pytest.approx(1.0, abs=1e-6)
    a, b = unit(rng.normal(size=512)), unit(rng.normal(size=512))
    assert recogniser.distance(a, b) == pytest.approx(1.0 - float(a @ b), abs=1e-6)
    assert 0.0 < recogniser.same_person < 1.0


# -- the latent


def test_latent_is_the_normalised_embedding_through_the_last_initializer(
    tmp_path, faces, recogniser, projection, emaps
):
    decoy, emap = emaps
    source_img, source_face = faces["obama.jpg"]
    embedding = expected_embedding(source_img, source_face, projection)
    want = unit(embedding @ emap)
    source = swapper_for(tmp_path, recogniser, emaps).prepare(source_img, source_face)
    assert source.value.shape == (1, 512) and source.value.dtype == np.float32
    assert np.abs(source.value[0] - want).max() < 1e-5
    assert np.abs(unit(embedding @ decoy) - want).max() > 0.05  # the decoy would be caught

    # what the model is fed: the stand-in adds a checkerboard of 10 * sum|fed - expected|
    target_img, target_face = faces["two_people.jpg"]
    inside = face_mask(target_img, target_face, erode_px=5)

    def swapped(expected: np.ndarray | None) -> np.ndarray:
        swapper = swapper_for(tmp_path, recogniser, emaps, expected_latent=expected)
        frame = target_img.copy()
        assert swapper.swap(frame, target_face, swapper.prepare(source_img, source_face))
        return frame.astype(int)

    plain, gated = swapped(None), swapped(want[None])
    assert np.abs(gated - plain)[inside].mean() < 0.05
    # the gate opens for any other latent: the decoy map, the map transposed, no map, or
    # the projection left unnormalised
    for wrong in (
        unit(embedding @ decoy),
        unit(embedding @ emap.T),
        embedding,
        embedding @ emap,
    ):
        assert np.abs(swapped(wrong[None]) - plain)[inside].mean() > 20


# -- the swap


def test_identity_swap_changes_only_the_face_and_only_slightly(
    tmp_path, faces, recogniser, emaps, artifacts
):
    swapper = swapper_for(tmp_path, recogniser, emaps)  # output = target
    flat = swapper_for(tmp_path, recogniser, emaps, flat_colour=(0.1, 0.8, 0.2))
    flat_plain = swapper_for(
        tmp_path,
        recogniser,
        emaps,
        SwapOptions(keep_mouth=False, keep_occluders=False),
        flat_colour=(0.1, 0.8, 0.2),
    )
    rows = []
    for name in PHOTOS:
        image, face = faces[name]
        clock = StageClock()
        same = image.copy()
        assert swapper.swap(same, face, swapper.prepare(image, face), clock)
        assert clock.calls["swap"] == 1 and clock.calls["blend"] == 1
        diff = np.abs(same.astype(int) - image.astype(int)).sum(axis=2)
        inside = face_mask(image, face, erode_px=3)
        scale = np.sqrt(
            np.linalg.det(lstsq_similarity(five_points(face), arcface_template(128))[:, :2])
        )
        coarse = low_pass_error(same, image, scale)[inside].mean()
        print(
            f"{name}: identity swap, mean |diff| inside the face {diff[inside].mean() / 3:.2f}, "
            f"above the crop's resolution {coarse:.2f}"
        )
        assert diff[inside].mean() / 3 < 7.0
        assert coarse < 1.5
        assert diff[inside].mean() > 0  # it did paste something
        assert not diff[outside_box(image, face, 0.03)].any()

        # a flat colour: the face is replaced (then colour-matched to the skin), the rest kept
        results = []
        for variant in (flat, flat_plain):
            out = image.copy()
            assert variant.swap(out, face, variant.prepare(image, face))
            far = outside_box(image, face, 0.03)
            assert np.array_equal(out[far], image[far])
            results.append(out)
        core = face_mask(image, face, erode_px=int(0.12 * face.width))
        before, after = image[core].astype(float), results[1][core].astype(float)
        print(
            f"{name}: flat swap, spread inside {before.std(0).mean():.1f} -> "
            f"{after.std(0).mean():.1f}; mean colour {before.mean(0).round()} -> "
            f"{after.mean(0).round()}"
        )
        assert after.std(0).max() < 0.25 * before.std(0).mean()  # uniform now
        # colour-matched to the skin, not the stand-in's green (BGR 51, 204, 25)
        assert np.abs(after.mean(0) - before.mean(0)).max() < 30

        # without a mesh: the feathered box; still nothing outside the face's box
        no_mesh = dataclasses.replace(face, mesh=None)
        boxed = image.copy()
        assert flat.swap(boxed, no_mesh, flat.prepare(image, face))
        changed = np.abs(boxed.astype(int) - image.astype(int)).sum(axis=2)
        assert changed[face_mask(image, face, erode_px=int(0.2 * face.width))].mean() > 10
        assert not changed[outside_box(image, face, 0.15)].any()

        amplified = np.clip(diff * 4, 0, 255).astype(np.uint8)  # the identity swap's change
        rows.append(
            np.hstack(
                [
                    sheet_tile(image, face),
                    sheet_tile(same, face),
                    sheet_tile(cv2.cvtColor(amplified, cv2.COLOR_GRAY2BGR), face),
                    sheet_tile(results[0], face),
                    sheet_tile(results[1], face),
                    sheet_tile(boxed, face),
                ]
            )
        )
    cv2.imwrite(str(artifacts / "inswapper_sheet.png"), np.vstack(rows))


@pytest.mark.parametrize("swap_size", [256, 384])
def test_a_larger_swap_size_interleaves_shifted_runs_into_a_sharper_face(
    tmp_path, faces, recogniser, emaps, swap_size
):
    """With the identity stand-in, each of the k x k runs must come back to the very
    pixels it sampled: the interleaved face is then the crop itself, and the swapped frame
    keeps detail a single 128 run loses (a misplaced run would scramble the face)."""
    k = swap_size // 128
    single = swapper_for(tmp_path, recogniser, emaps)
    interleaved = swapper_for(tmp_path, recogniser, emaps, swap_size=swap_size)
    assert interleaved.passes == k and interleaved.crop_size == swap_size
    image, face = faces["obama.jpg"]
    crop = np.random.default_rng(3).integers(0, 256, (swap_size, swap_size, 3), np.uint8)
    latent = interleaved.prepare(image, face).value
    assert np.abs(interleaved.redraw(crop, latent).astype(int) - crop).max() <= 1
    clock = StageClock()
    errors = {}
    for name, swapper in (("128", single), (str(swap_size), interleaved)):
        out = image.copy()
        assert swapper.swap(out, face, swapper.prepare(image, face), clock)
        inside = face_mask(image, face, erode_px=3)
        errors[name] = np.abs(out.astype(int) - image.astype(int)).sum(axis=2)[inside].mean()
    print("mean |identity swap - original| inside the face", errors)
    assert errors[str(swap_size)] < 0.8 * errors["128"]


def test_a_swap_size_that_is_not_a_multiple_of_the_model_is_refused(tmp_path, recogniser, emaps):
    with pytest.raises(FacecastError, match="not a multiple"):
        swapper_for(tmp_path, recogniser, emaps, swap_size=200)


def test_target_mouth_opening_is_kept(tmp_path, faces, recogniser, emaps):
    """Obama shows his teeth: with keep_mouth they stay through a flat-colour swap."""
    image, face = faces["obama.jpg"]
    opening = np.zeros(image.shape[:2], np.uint8)
    cv2.fillPoly(opening, [face.mesh[mesh_topology().inner_lips, :2].round().astype(np.int32)], 1)
    opening = cv2.erode(opening, np.ones((3, 3), np.uint8), iterations=4).astype(bool)
    assert opening.sum() > 500
    change = {}
    for keep in (True, False):
        options = SwapOptions(keep_mouth=keep, keep_occluders=False)
        swapper = swapper_for(tmp_path, recogniser, emaps, options, flat_colour=(0.1, 0.8, 0.2))
        out = image.copy()
        assert swapper.swap(out, face, swapper.prepare(image, face))
        change[keep] = np.abs(out.astype(int) - image.astype(int))[opening].mean()
    print(f"mouth opening change: kept {change[True]:.1f}, painted over {change[False]:.1f}")
    assert change[True] < 3.0
    assert change[False] > 30.0


def test_poisson_blend_and_faces_off_frame(tmp_path, faces, recogniser, emaps):
    image, face = faces["two_people.jpg"]
    swapper = swapper_for(tmp_path, recogniser, emaps, SwapOptions(blend="poisson"))
    source = swapper.prepare(image, face)
    out = image.copy()
    assert swapper.swap(out, face, source)
    diff = np.abs(out.astype(int) - image.astype(int))
    assert diff[face_mask(image, face, erode_px=3)].mean() < 4.0
    assert not diff[outside_box(image, face, 0.03)].any()

    # a face moved off the frame is declined, and the frame left alone
    gone = dataclasses.replace(
        face, mesh=face.mesh + np.array([5000.0, 0.0, 0.0]), box=face.box + 5000
    )
    frame = image.copy()
    assert not swapper.swap(frame, gone, source)
    assert np.array_equal(frame, image)


def sheet_tile(image: np.ndarray, face, margin: float = 0.35, size: int = 200) -> np.ndarray:
    x0, y0, x1, y1 = face.box.astype(int)
    m = int(margin * (x1 - x0))
    h, w = image.shape[:2]
    crop = image[max(0, y0 - m) : min(h, y1 + m), max(0, x0 - m) : min(w, x1 + m)]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


# -- bad files


def test_model_signature_errors(tmp_path, recogniser, emaps, faces, projection):
    no_source = identity_model(tmp_path / "no_source.onnx", "target", "output", [1, 3, 128, 128])
    with pytest.raises(ModelFileError, match="source"):
        LearnedSwapper(OnnxModel(no_source), recogniser)

    # the right inputs, but the graph ends with something that is not a 512-column map
    nodes = [
        helper.make_node("Mul", ["target", "keep"], ["output"]),
        helper.make_node("ReduceSum", ["source"], ["unused"], keepdims=1),
    ]
    no_map = save_model(
        tmp_path / "no_map.onnx",
        nodes,
        {"target": [1, 3, 128, 128], "source": [1, 512]},
        {"output": [1, 3, 128, 128], "unused": [1, 1]},
        {"emap": emaps[1], "keep": np.array(1.0, np.float32)},
    )
    with pytest.raises(ModelFileError, match="last initializer"):
        LearnedSwapper(OnnxModel(no_map), recogniser)

    gray = identity_model(tmp_path / "gray.onnx", "input.1", "683", [1, 1, 112, 112])
    with pytest.raises(ModelFileError, match="ArcFace"):
        ArcFaceRecogniser(OnnxModel(gray))

    # a recogniser whose embeddings the swap model's map cannot take
    weight, bias = projection
    small = arcface_model(tmp_path / "r128.onnx", weight[:, :128], bias[:128])
    swapper = swapper_for(tmp_path, ArcFaceRecogniser(OnnxModel(small)), emaps)
    with pytest.raises(ModelFileError, match="128-D"):
        swapper.prepare(*faces["obama.jpg"])
