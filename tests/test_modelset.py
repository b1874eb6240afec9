"""Choosing models per engine: the embedded defaults beside user ONNX files (stand-ins with
the real models' signatures), provider fallback, clear errors, and the CLI flags."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from facecast.engine.pipeline import EngineOptions, SwapEngine
from facecast.errors import FacecastError
from facecast.models.choice import ModelChoice
from facecast.models.runtime import OnnxModel, RuntimeOptions

from .conftest import MEDIA, load
from .onnx_helpers import arcface_model, inswapper_model
from .test_cli import facecast

FLAT_RGB = (0.2, 0.6, 0.3)  # what the inswapper stand-in paints over the aligned face


def make_models_folder(folder):
    """Stand-ins for w600k_r50 (ArcFace) and inswapper_128 (paints FLAT_RGB) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(6)
    weight = rng.normal(0, 0.05, (3 * 14 * 14, 512))
    arcface_model(folder / "w600k_r50.onnx", weight, rng.normal(0, 0.01, 512))
    emap = rng.normal(0, 1 / np.sqrt(512), (512, 512))
    inswapper_model(folder / "inswapper_128.onnx", emap, flat_colour=FLAT_RGB)
    return folder


@pytest.fixture(scope="module")
def models_folder(tmp_path_factory):
    return make_models_folder(tmp_path_factory.mktemp("models"))


def face_core_spread(engine: SwapEngine, image: np.ndarray) -> float:
    """Spread of the pixels in the middle of the first swapped face (a flat paint: ~0)."""
    face = engine.last_swaps[0][0]
    x0, y0, x1, y1 = face.box.astype(int)
    w, h = x1 - x0, y1 - y0
    core = image[y0 + h * 3 // 10 : y1 - h * 4 // 10, x0 + w * 3 // 10 : x1 - w * 3 // 10]
    return float(core.reshape(-1, 3).astype(np.float64).std(axis=0).mean())


def swapped(engine: SwapEngine, target: np.ndarray) -> np.ndarray:
    image = target.copy()
    assert engine.process(image).swapped == 1
    return image


def test_two_engines_in_one_process_run_different_swappers(models_folder):
    """One stream on the embedded swapper, one on a user model: each engine loads its own."""
    source, target = load("alex-lacamoire.png"), load("obama.jpg")
    user = SwapEngine(
        EngineOptions(
            label=False, models=ModelChoice(models_dir=models_folder, swapper="inswapper")
        )
    )
    embedded = SwapEngine(EngineOptions(label=False))
    for engine in (user, embedded):
        engine.load_source(source)
    user_out, embedded_out = swapped(user, target), swapped(embedded, target)
    original = face_core_spread(embedded, target)
    mesh_spread = face_core_spread(embedded, embedded_out)
    user_spread = face_core_spread(user, user_out)
    print(
        f"face core spread: {original:.1f} before, {mesh_spread:.1f} mesh, {user_spread:.1f} user"
    )
    assert face_core_spread(user, user_out) < 3.0  # the stand-in's flat paint, colour matched
    assert face_core_spread(embedded, embedded_out) > 10.0  # a real face's texture
    assert user.models.swapper is not embedded.models.swapper


def test_a_provider_that_is_missing_falls_back_with_one_log_line(models_folder, caplog):
    runtime = RuntimeOptions(providers=("tensorrt", "cuda", "cpu"), fp16=True)
    with caplog.at_level(logging.WARNING, logger="facecast.models.runtime"):
        model = OnnxModel(models_folder / "w600k_r50.onnx", runtime)
    assert model.providers == ["CPUExecutionProvider"]
    lines = [r.getMessage() for r in caplog.records]
    assert len([line for line in lines if "tensorrt is not available" in line]) == 1, lines
    assert len([line for line in lines if "cuda is not available" in line]) == 1, lines
    embedding = model.run({"input.1": np.zeros((1, 3, 112, 112), np.float32)})[0]
    assert embedding.shape == (1, 512)


@pytest.mark.parametrize(
    "memory, kept", [("strict", False), ("moderate", True), ("tolerant", True)]
)
def test_the_memory_strategy_decides_whether_a_session_stays(models_folder, memory, kept):
    model = OnnxModel(models_folder / "w600k_r50.onnx", RuntimeOptions(memory=memory))
    model.run({"input.1": np.zeros((1, 3, 112, 112), np.float32)})
    assert (model._session is not None) == kept
    model.release()
    assert model.run({"input.1": np.zeros((1, 3, 112, 112), np.float32)})[0].shape == (1, 512)


def test_user_models_need_a_folder_and_a_matching_file(tmp_path, models_folder):
    with pytest.raises(FacecastError, match="--models-dir"):
        SwapEngine(EngineOptions(models=ModelChoice(swapper="inswapper")))
    with pytest.raises(FacecastError, match=r"no swapper inswapper in the models folder"):
        SwapEngine(EngineOptions(models=ModelChoice(models_dir=tmp_path, swapper="inswapper")))
    (tmp_path / "inswapper_128.onnx").write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(FacecastError, match=r"inswapper_128.onnx \(not recognised"):
        SwapEngine(EngineOptions(models=ModelChoice(models_dir=tmp_path, swapper="inswapper")))
    with pytest.raises(FacecastError, match=r"does not exist|not found|not a folder"):
        SwapEngine(EngineOptions(models=ModelChoice(models_dir=tmp_path / "nope", swapper="x")))


def test_reference_mode_with_arcface_uses_its_own_threshold(models_folder):
    """Identity by a user ArcFace: the cosine threshold comes with the recogniser, not the
    dlib-tuned one. The stand-in is no real recogniser, but the same photo is distance 0."""
    engine = SwapEngine(
        EngineOptions(
            label=False,
            models=ModelChoice(models_dir=models_folder, recogniser="arcface"),
        )
    )
    photo = load("obama.jpg")
    engine.load_source(load("alex-lacamoire.png"))
    engine.add_reference(photo, name="obama")
    assert engine.models.recogniser.same_person == pytest.approx(0.6)
    image = photo.copy()
    engine.process(image)
    assert [ref for _, ref in engine.last_swaps] == [0]


def test_the_cli_swaps_with_user_models_and_lists_the_folder(tmp_path, models_folder):
    out = tmp_path / "out.png"
    done = facecast(
        "swap", "-s", MEDIA / "alex-lacamoire.png", "-t", MEDIA / "obama.jpg", "-o", out,
        "--models-dir", models_folder, "--swapper", "inswapper", "--recogniser", "arcface",
        "--execution-provider", "cuda", "--execution-provider", "cpu", "--memory-strategy",
        "tolerant", "--no-label", "--swap-size", "256",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "inswapper at 256 px: 4 runs of the 128 model per face" in done.stderr
    assert "cuda is not available" in done.stderr
    changed = np.abs(load_output(out) - load("obama.jpg").astype(np.int16)).max(axis=2) > 30
    assert 0.005 < changed.mean() < 0.2  # the face (about 5 % of the photo), nothing else

    listing = facecast("models", "--models-dir", models_folder)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert any("inswapper_128.onnx" in line and "inswapper" in line for line in lines)
    assert any("w600k_r50.onnx" in line and "arcface" in line for line in lines)

    bad = facecast(
        "swap", "-s", MEDIA / "alex-lacamoire.png", "-t", MEDIA / "obama.jpg", "-o", out,
        "--swapper", "inswapper", "--memory-strategy", "lazy",
    )  # fmt: skip
    assert bad.returncode == 2 and "memory strategy 'lazy'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr  # pydantic's, in one line
    odd = facecast("swap", "-s", MEDIA / "obama.jpg", "-t", MEDIA / "obama.jpg", "-o", out,
                   "--swap-size", "200")  # fmt: skip
    assert odd.returncode == 2 and "swap size 200: use one of 128, 256, 384, 512" in odd.stderr


def load_output(path) -> np.ndarray:
    import cv2

    return cv2.imread(str(path)).astype(np.int16)


def test_a_user_detector_feeds_the_mesh_and_the_swap(tmp_path):
    """A YOLO-face stand-in reports the two faces of two_people.jpg (where the embedded
    analyser finds them, boxes 15 % larger as these detectors draw them): the mesh stage
    takes its faces, and both are swapped."""
    from facecast.faces.align import five_points
    from facecast.faces.analyse import FaceAnalyser

    from .onnx_helpers import constant_model
    from .test_detect_onnx import fit_scale

    photo = load("two_people.jpg")
    truth = FaceAnalyser(tiles=True).analyse(photo)
    assert len(truth) == 2
    scale = fit_scale(photo, 640, 640)
    rows = np.zeros((20, 8400))
    for column, face in zip((100, 5000), truth, strict=True):
        centre = (face.box[:2] + face.box[2:]) / 2 * scale
        rows[0:2, column] = centre
        rows[2:4, column] = (face.box[2:] - face.box[:2]) * 1.15 * scale
        rows[4, column] = 0.9
        points = five_points(face) * scale
        rows[5:, column] = np.concatenate([points, np.full((5, 1), 0.9)], axis=1).reshape(-1)
    constant_model(tmp_path / "yoloface_8n.onnx", {"images": [1, 3, 640, 640]}, {"out": rows[None]})

    engine = SwapEngine(
        EngineOptions(label=False, models=ModelChoice(models_dir=tmp_path, detector="yoloface"))
    )
    engine.load_source(photo)  # the stand-in sees the same two faces in any image
    image = photo.copy()
    result = engine.process(image)
    assert (result.faces, result.swapped) == (2, 2)
    for found, expected in zip(
        sorted(engine.last_faces, key=lambda f: f.center[0]),
        sorted(truth, key=lambda f: f.center[0]),
        strict=True,
    ):
        assert found.mesh is not None and found.mesh_score > 0.5
        assert np.abs(found.center - expected.center).max() < 0.1 * expected.width


def test_stream_takes_the_model_flags(tmp_path, models_folder):
    """`facecast stream` with a user swapper on a file input: the engine loads it (its log
    line says which file) and every frame comes out."""
    from .media_helpers import make_still_face_video

    clip = make_still_face_video(tmp_path / "still.mp4", frames=10, audio=False)
    out = tmp_path / "out.mp4"
    done = facecast(
        "stream", "-s", MEDIA / "alex-lacamoire.png", "-i", clip, "-o", out, "--no-label",
        "--models-dir", models_folder, "--swapper", "inswapper", timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "swapper: inswapper_128.onnx" in done.stderr
    import av

    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 10


def test_tolerant_sessions_outlive_a_stream_and_moderate_ones_do_not(models_folder):
    """tolerant: one session per file for the process, reused by the next stream; moderate:
    each stream's own, freed when it ends (SwapEngine.close)."""
    kept = [
        SwapEngine(
            EngineOptions(
                models=ModelChoice(
                    models_dir=models_folder,
                    swapper="inswapper",
                    runtime=RuntimeOptions(memory=memory),
                )
            )
        )
        for memory in ("tolerant", "tolerant", "moderate")
    ]
    first, second, own = (engine.swapper.model for engine in kept)
    assert first._session is second._session  # shared by two streams
    assert own._session is not first._session
    for engine in kept:
        engine.close()
    assert own._session is None and first._session is None
    again = SwapEngine(
        EngineOptions(
            models=ModelChoice(
                models_dir=models_folder,
                swapper="inswapper",
                runtime=RuntimeOptions(memory="tolerant"),
            )
        )
    )
    assert again.swapper.model._ensure() is second._ensure()  # still in the process cache
