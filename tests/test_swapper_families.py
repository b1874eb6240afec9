"""The learned swapper families FaceFusion users own, on stand-ins with their real signatures.

No weights exist here, so each family is checked against its written conventions: the table
below is copied by hand from FaceFusion's face swapper (facefusion/processors/modules/
face_swapper/core.py and facefusion/face_helper.py, read at commit 33cc6b40), the code the
users' files were exported for, and every expectation is computed here in numpy, apart from
facecast's adapters: the crop's template, its input scaling, the output's range, and the
source input (the unit ArcFace embedding, the raw one through the converter, or a crop).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facecast.errors import FacecastError
from facecast.faces.align import five_points, named_template
from facecast.models import user as usermodels
from facecast.models.choice import ModelChoice, load_models
from facecast.swap.conventions import convention_for
from facecast.swap.learned import LearnedSwapper

from .conftest import MEDIA, load
from .onnx_helpers import arcface_model, converter_model, swapper_model
from .test_cli import assert_ok, decode_frames, facecast, numbered_face_video, summary
from .test_inswapper import face_mask, lstsq_similarity, outside_box

POOL = 8
POOLED = 3 * (112 // POOL) ** 2

# FaceFusion's templates (face_helper.py WARP_TEMPLATE_SET), in units of the crop
TEMPLATES = {
    "arcface_112_v1": [[0.35473214, 0.45658929], [0.64526786, 0.45658929],
                       [0.50000000, 0.61154464], [0.37913393, 0.77687500],
                       [0.62086607, 0.77687500]],
    "arcface_112_v2": [[0.34191607, 0.46157411], [0.65653393, 0.45983393],
                       [0.50022500, 0.64050536], [0.37097589, 0.82469196],
                       [0.63151696, 0.82325089]],
    "arcface_128": [[0.36167656, 0.40387734], [0.63696719, 0.40235469],
                    [0.50019687, 0.56044219], [0.38710391, 0.72160547],
                    [0.61507734, 0.72034453]],
    "ffhq_512": [[0.37691676, 0.46864664], [0.62285697, 0.46912813],
                 [0.50123859, 0.61331904], [0.39308822, 0.72541100],
                 [0.61150205, 0.72490465]],
    "mtcnn_512": [[0.36562865, 0.46733799], [0.63305391, 0.46585885],
                  [0.50019127, 0.61942959], [0.39032951, 0.77598822],
                  [0.61178945, 0.77476328]],
}  # fmt: skip

HALF, ZERO, ONE = (0.5,) * 3, (0.0,) * 3, (1.0,) * 3
# file: (type, template, size, mean, standard deviation, output scaled back by them,
#        source: "unit" ArcFace embedding / "converted" raw through the converter /
#        "converted unit" (made unit length after) / "crop TEMPLATE SIZE")
# FaceFusion's model table, prepare_source_embedding, prepare_source_frame,
# normalize_crop_frame (scaled back: ghost, hififace, hyperswap, uniface).
REFERENCE = {
    "hyperswap_1a_256": ("hyperswap", "arcface_128", 256, HALF, HALF, True, "unit"),
    "simswap_256": ("simswap", "arcface_112_v1", 256, (0.485, 0.456, 0.406),
                    (0.229, 0.224, 0.225), False, "converted unit"),
    "simswap_unofficial_512": ("simswap", "arcface_112_v1", 512, ZERO, ONE, False,
                               "converted unit"),
    "ghost_2_256": ("ghost", "arcface_112_v1", 256, HALF, HALF, True, "converted"),
    "hififace_unofficial_256": ("hififace", "mtcnn_512", 256, HALF, HALF, True,
                                "converted unit"),
    "blendswap_256": ("blendswap", "ffhq_512", 256, ZERO, ONE, False,
                      "crop arcface_112_v2 112"),
    "uniface_256": ("uniface", "ffhq_512", 256, HALF, HALF, True, "crop ffhq_512 256"),
}  # fmt: skip
CONVERTED = {"simswap", "ghost", "hififace"}


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(21)
    return {
        "arcface": (rng.normal(size=(POOLED, 512)) / np.sqrt(POOLED), rng.normal(size=512) * 0.3),
        # a bias as large as the product: a unit input gives another direction than a raw one
        "converter": (rng.normal(size=(512, 512)) / np.sqrt(512), rng.normal(size=512)),
    }


@pytest.fixture(scope="module")
def photos(analyser):
    out = {}
    for name in ("obama.jpg", "alex-lacamoire.png"):
        image = load(name)
        out[name] = (image, analyser.analyse(image)[0])
    return out


def aligned(image, face, template: str, size: int) -> np.ndarray:
    """The crop, by this test's own fit (linear least squares) on the written template."""
    matrix = lstsq_similarity(five_points(face), np.array(TEMPLATES[template]) * size)
    return cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def raw_arcface(image, face, weights) -> np.ndarray:
    """The stand-in recogniser's raw output, redone: ArcFace's 112 crop, RGB, -1..1."""
    weight, bias = weights["arcface"]
    crop = aligned(image, face, "arcface_112_v2", 112).astype(np.float64)[:, :, ::-1]
    chw = ((crop - 127.5) / 127.5).transpose(2, 0, 1)
    pooled = chw.reshape(3, 112 // POOL, POOL, 112 // POOL, POOL).mean(axis=(2, 4))
    return pooled.reshape(-1) @ weight + bias


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def expected_source(file: str, image, face, weights) -> tuple[np.ndarray, float]:
    """The "source" input ``file``'s family should get, and the gate's tolerance."""
    source = REFERENCE[file][6]
    if source.startswith("crop"):
        _, template, size = source.split()
        crop = aligned(image, face, template, int(size)).astype(np.float64)[:, :, ::-1]
        return (crop / 255.0).transpose(2, 0, 1)[None], 3.5 / 255  # two fits: ~1 LSB apart
    raw = raw_arcface(image, face, weights)
    if source == "unit":
        return unit(raw)[None], 2e-3
    weight, bias = weights["converter"]
    converted = raw @ weight + bias
    return (unit(converted) if source.endswith("unit") else converted)[None], 2e-3


def body(file: str, flat_rgb: tuple[float, float, float] | None = None):
    """(keep, offset) so the family's documented scaling brings the crop back unchanged
    (or paints ``flat_rgb``): a unit output gives RGB directly, a scaled one is scaled back."""
    _, _, _, mean, std, scaled_back, _ = REFERENCE[file]
    mean, std = np.array(mean), np.array(std)
    if flat_rgb is not None:
        colour = np.array(flat_rgb)
        return np.zeros(3), (colour - mean) / std if scaled_back else colour
    return (np.ones(3), np.zeros(3)) if scaled_back else (std, mean)


def source_shape(file: str) -> list[int]:
    source = REFERENCE[file][6]
    if source.startswith("crop"):
        size = int(source.split()[2])
        return [1, 3, size, size]
    return [1, 512]


def models_folder(folder, file, weights, expected=None, flat_rgb=None, tolerance=1e-3):
    """``folder`` with ``file``'s stand-in, an ArcFace stand-in and its family's converter."""
    folder.mkdir(parents=True, exist_ok=True)
    family, _, size = REFERENCE[file][:3]
    keep, offset = body(file, flat_rgb)
    swapper_model(
        folder / f"{file}.onnx", size, source_shape(file), keep, offset, expected, tolerance,
        mask_output=family == "hyperswap",
    )  # fmt: skip
    arcface_model(folder / "arcface_w600k_r50.onnx", *weights["arcface"])
    if family in CONVERTED:
        converter_model(folder / f"crossface_{family}.onnx", *weights["converter"])
    return folder


@pytest.mark.parametrize("file", sorted(REFERENCE))
def test_each_family_follows_its_written_conventions(file):
    family, template, size, mean, std, scaled_back, source = REFERENCE[file]
    convention = convention_for(family, size)
    assert convention is not None
    assert convention.template == template
    assert np.allclose(named_template(template, size), np.array(TEMPLATES[template]) * size)
    assert np.allclose(convention.mean, mean) and np.allclose(convention.std, std)
    assert (convention.output == "scaled") == scaled_back
    kinds = {"unit": "embedding", "converted": "converted", "converted unit": "converted_unit"}
    if source.startswith("crop"):
        _, source_template, source_size = source.split()
        assert convention.source == "crop"
        assert convention.source_template == source_template
        assert convention.source_size == int(source_size)
    else:
        assert convention.source == kinds[source]

    # the blob and the way back, against the written scaling
    crop = np.random.default_rng(5).integers(0, 256, (size, size, 3), np.uint8)
    rgb = crop[:, :, ::-1] / 255.0
    want = ((rgb - np.array(mean)) / np.array(std)).transpose(2, 0, 1)[None]
    assert np.abs(convention.blob(crop) - want).max() < 1e-5
    output = want if scaled_back else rgb.transpose(2, 0, 1)[None]
    assert np.abs(convention.image(output).astype(int) - crop).max() <= 1


@pytest.mark.parametrize("file", sorted(REFERENCE))
def test_each_family_is_identified_and_gets_the_source_it_expects(tmp_path, file, weights, photos):
    """Loaded from a models folder by family name, each stand-in gets exactly the source
    input its family documents (else its gate paints a checkerboard over the face), and
    its scaled output comes back as the crop: an identity swap changes the face only a
    little and nothing outside it."""
    family = REFERENCE[file][0]
    image, face = photos["obama.jpg"]
    other_image, other_face = photos["alex-lacamoire.png"]
    source, tolerance = expected_source(file, other_image, other_face, weights)
    folder = models_folder(tmp_path / "models", file, weights, source, tolerance=tolerance)

    found = {m.file: m for m in usermodels.scan(folder)}
    swapper_file = found[f"{file}.onnx"]
    assert (swapper_file.kind, swapper_file.family) == ("swapper", family)
    # at 256 px with an embedding input only the name tells the family, and says so
    by_name = REFERENCE[file][2] == 256 and not REFERENCE[file][6].startswith("crop")
    assert swapper_file.identified_by == ("signature+name" if by_name else "signature")
    if family in CONVERTED:
        converter = found[f"crossface_{family}.onnx"]
        assert (converter.kind, converter.family) == ("converter", family)

    models = load_models(ModelChoice(models_dir=folder, swapper=family))
    swapper = models.swapper
    assert isinstance(swapper, LearnedSwapper) and swapper.family == family
    assert np.allclose(
        swapper.template, np.array(TEMPLATES[REFERENCE[file][1]]) * REFERENCE[file][2]
    )
    prepared = swapper.prepare(other_image, other_face)
    assert prepared.value.shape == source.shape
    gap = np.abs(prepared.value - source).max()
    print(f"{file}: source input off the written one by {gap:.2e} (gate opens at {tolerance})")
    assert gap < tolerance

    out = image.copy()
    assert swapper.swap(out, face, prepared)
    diff = np.abs(out.astype(int) - image.astype(int)).sum(axis=2)
    inside = face_mask(image, face, erode_px=3)
    print(f"{file}: identity swap, mean |diff| inside the face {diff[inside].mean() / 3:.2f}")
    assert 0 < diff[inside].mean() / 3 < 7.0  # pasted, and no checkerboard
    assert not diff[outside_box(image, face, 0.03)].any()

    # another person's source opens the gate: the family does read its source input
    wrong = image.copy()
    assert swapper.swap(wrong, face, swapper.prepare(image, face))
    assert np.abs(wrong.astype(int) - image.astype(int)).sum(axis=2)[inside].mean() / 3 > 20


def test_a_family_the_signature_cannot_tell_needs_its_name_and_converters_theirs(tmp_path, weights):
    folder = tmp_path / "models"
    folder.mkdir()
    keep, offset = body("ghost_2_256")
    swapper_model(folder / "my_swapper.onnx", 256, [1, 512], keep, offset)
    converter_model(folder / "converter.onnx", *weights["converter"])
    found = {m.file: m for m in usermodels.scan(folder)}
    assert found["my_swapper.onnx"].kind is None
    assert "rename the file to start with its family" in str(found["my_swapper.onnx"].reason)
    assert found["converter.onnx"].kind is None
    assert "crossface_ghost.onnx" in str(found["converter.onnx"].reason)

    # named, the ghost file loads only with its converter beside it
    (folder / "my_swapper.onnx").rename(folder / "ghost_1_256.onnx")
    arcface_model(folder / "w600k_r50.onnx", *weights["arcface"])
    with pytest.raises(FacecastError, match="no converter ghost"):
        load_models(ModelChoice(models_dir=folder, swapper="ghost"))
    (folder / "converter.onnx").rename(folder / "crossface_ghost.onnx")
    assert load_models(ModelChoice(models_dir=folder, swapper="ghost")).swapper.family == "ghost"


def test_a_larger_swap_size_works_for_a_256_family(tmp_path, weights, photos):
    folder = models_folder(tmp_path / "models", "uniface_256", weights)
    swapper = load_models(ModelChoice(models_dir=folder, swapper="uniface", swap_size=512)).swapper
    assert swapper.passes == 2 and swapper.crop_size == 512
    image, face = photos["obama.jpg"]
    crop = np.random.default_rng(3).integers(0, 256, (512, 512, 3), np.uint8)
    source = swapper.prepare(image, face).value
    assert np.abs(swapper.redraw(crop, source).astype(int) - crop).max() <= 1
    # the default (128) and the model's own size both mean one run
    plain = load_models(ModelChoice(models_dir=folder, swapper="uniface")).swapper
    assert plain.passes == 1 and plain.crop_size == 256


FLAT_RGB = (0.2, 0.6, 0.3)


@pytest.mark.slow
@pytest.mark.parametrize("file", sorted(REFERENCE))
def test_the_cli_swaps_an_image_and_a_video_with_each_family(tmp_path, file, weights):
    """As a user runs it: `facecast models` names the file's family, and `facecast swap
    --swapper FAMILY` paints the stand-in's flat colour (matched to the skin's) over the
    face of a photo, nowhere else, and of every frame of a video."""
    family = REFERENCE[file][0]
    folder = models_folder(tmp_path / "models", file, weights, flat_rgb=FLAT_RGB)
    listing = facecast("models", "--models-dir", folder)
    assert listing.returncode == 0, listing.stderr
    assert any(f"{file}.onnx" in line and family in line for line in listing.stdout.splitlines())

    flags = ["--models-dir", folder, "--swapper", family, "--no-label"]
    out = tmp_path / "out.png"
    done = facecast("swap", "-s", MEDIA / "alex-lacamoire.png", "-t", MEDIA / "obama.jpg",
                    "-o", out, *flags)  # fmt: skip
    assert_ok(done, out)
    target = load("obama.jpg")
    result = cv2.imread(str(out))
    moved = np.abs(result.astype(int) - target.astype(int)).max(axis=2) > 30
    assert 0.005 < moved.mean() < 0.2  # the face (about 5 % of the photo), nothing else

    video, boxes = numbered_face_video(tmp_path / "face.mp4", frames=12)
    out_video = tmp_path / "out.mp4"
    done = facecast("swap", "-s", MEDIA / "alex-lacamoire.png", "-t", video,
                    "-o", out_video, *flags, timeout=120)  # fmt: skip
    assert_ok(done, out_video)
    assert summary(done) == (12, 12, 0)  # frames, faces swapped, frames without one
    before, after = decode_frames(video), decode_frames(out_video)
    assert len(after) == len(before) == 12
    for i, (a, b, box) in enumerate(zip(before, after, boxes, strict=True)):
        x0, y0, x1, y1 = (round(float(v)) for v in box)
        face_diff = np.abs(a[y0:y1, x0:x1].astype(np.int16) - b[y0:y1, x0:x1]).mean()
        assert face_diff > 8, f"frame {i}: face not changed (mean diff {face_diff:.1f})"
