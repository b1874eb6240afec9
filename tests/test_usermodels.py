"""The models folder: each stand-in is identified by its signature, a verified sha256 wins
over the signature, bad files are reported without stopping the scan, and ``require`` and
``models_dir`` fail with errors a user can act on."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto

from facecast.errors import FacecastError, ModelError
from facecast.models import user as usermodels
from facecast.models.user import describe, models_dir, require, scan

from .conftest import REPO
from .onnx_helpers import constant_model, identity_model, scaled_by_input_model


def zeros(*shape):
    return np.zeros(shape, np.float32)


def build_folder(root):
    """One stand-in per supported family (the real models' names and shapes), plus files
    that must not be recognised. Returns {file: (kind, family)} for the recognisable ones."""
    sub = root / "insightface"
    sub.mkdir()
    constant_model(
        root / "inswapper_128.onnx",
        {"target": [1, 3, 128, 128], "source": [1, 512]},
        {"output": zeros(1, 3, 128, 128)},
    )
    # w600k_r50: a dynamic batch
    constant_model(
        sub / "w600k_r50.onnx", {"input.1": ["None", 3, 112, 112]}, {"683": zeros(1, 512)}
    )
    # SCRFD with keypoints: scores, boxes, keypoints for strides 8, 16, 32; dynamic size
    anchors = (200, 50, 12)
    scrfd_outs = {
        **{f"score_{i}": zeros(n, 1) for i, n in enumerate(anchors)},
        **{f"bbox_{i}": zeros(n, 4) for i, n in enumerate(anchors)},
        **{f"kps_{i}": zeros(n, 10) for i, n in enumerate(anchors)},
    }
    constant_model(sub / "det_10g.onnx", {"input.1": [1, 3, "?", "?"]}, scrfd_outs)
    # the same, exported with every output size symbolic (the adapter reads them at run time)
    constant_model(
        root / "scrfd_symbolic.onnx", {"input.1": [1, 3, 640, 640]}, scrfd_outs,
        symbolic_outputs=True,
    )  # fmt: skip
    # SCRFD without keypoints (6 outputs), batched layout [1, N, c], static size
    constant_model(
        root / "scrfd_500m.onnx",
        {"input.1": [1, 3, 640, 640]},
        {
            **{f"s{i}": zeros(1, n, 1) for i, n in enumerate(anchors)},
            **{f"b{i}": zeros(1, n, 4) for i, n in enumerate(anchors)},
        },
    )
    constant_model(
        root / "retinaface_10g.onnx",
        {"input": [1, 3, 640, 640]},
        {"loc": zeros(1, 100, 4), "conf": zeros(1, 100, 2), "landms": zeros(1, 100, 10)},
    )
    constant_model(
        root / "yoloface_8n.onnx", {"images": [1, 3, 640, 640]}, {"output0": zeros(1, 20, 8400)}
    )
    identity_model(root / "gfpgan_1.4.onnx", "input", "output", [1, 3, 512, 512])
    scaled_by_input_model(
        root / "codeformer.onnx", "input", "weight", "output", [1, 3, 512, 512], TensorProto.DOUBLE
    )
    # not recognisable
    identity_model(root / "unrelated.onnx", "x", "y", [1, 10])
    (root / "garbage.onnx").write_bytes(b"\x08\x07this is not an onnx model\xff\xfe" * 10)
    (root / "empty.onnx").write_bytes(b"")
    (root / "README.txt").write_text("a non-onnx file is not listed\n")
    deep = sub / "deeper"
    deep.mkdir()
    identity_model(deep / "too_deep.onnx", "input", "output", [1, 3, 512, 512])
    return {
        "inswapper_128.onnx": ("swapper", "inswapper"),
        "insightface/w600k_r50.onnx": ("recogniser", "arcface"),
        "insightface/det_10g.onnx": ("detector", "scrfd"),
        "scrfd_500m.onnx": ("detector", "scrfd"),
        "scrfd_symbolic.onnx": ("detector", "scrfd"),
        "retinaface_10g.onnx": ("detector", "retinaface"),
        "yoloface_8n.onnx": ("detector", "yoloface"),
        "gfpgan_1.4.onnx": ("enhancer", "gfpgan"),
        "codeformer.onnx": ("enhancer", "gfpgan"),
    }


@pytest.fixture()
def folder(tmp_path):
    expected = build_folder(tmp_path)
    return tmp_path, expected


def by_file(found):
    return {m.file: m for m in found}


def test_each_family_is_identified_by_its_signature(folder):
    root, expected = folder
    found = by_file(scan(root))
    assert set(found) == {*expected, "unrelated.onnx", "garbage.onnx", "empty.onnx"}
    for file, (kind, family) in expected.items():
        m = found[file]
        assert (m.kind, m.family, m.identified_by) == (kind, family, "signature"), file
        assert m.name == file.rsplit("/", 1)[-1].removesuffix(".onnx")
        assert m.path == root / file and m.reason is None
    # the signature is read from the graph: names and static/dynamic sizes survive
    inswapper = found["inswapper_128.onnx"]
    assert {(t.name, t.shape) for t in inswapper.inputs} == {
        ("target", (1, 3, 128, 128)),
        ("source", (1, 512)),
    }
    assert found["insightface/w600k_r50.onnx"].inputs[0].shape == ("None", 3, 112, 112)
    assert found["insightface/det_10g.onnx"].inputs[0].shape == (1, 3, "?", "?")
    assert len(found["insightface/det_10g.onnx"].outputs) == 9
    weight = [t for t in found["codeformer.onnx"].inputs if t.name == "weight"]
    assert weight and weight[0].dtype == "DOUBLE" and weight[0].shape == (1,)


def test_near_misses_are_not_recognised(tmp_path):
    """Each family's signature with one thing wrong is not taken for that family."""
    constant_model(  # inswapper's shapes, wrong input names
        tmp_path / "a.onnx",
        {"img": [1, 3, 128, 128], "emb": [1, 512]},
        {"output": zeros(1, 3, 128, 128)},
    )
    constant_model(tmp_path / "b.onnx", {"x": [1, 3, 112, 112]}, {"y": zeros(1, 128)})  # 128-D
    constant_model(  # 9 outputs but no keypoint triplet
        tmp_path / "c.onnx",
        {"x": [1, 3, 640, 640]},
        {f"o{i}": zeros(5, d) for i, d in enumerate([1, 1, 1, 4, 4, 4, 2, 2, 2])},
    )
    constant_model(  # 9 outputs, keypoints and boxes but two-class scores
        tmp_path / "c2.onnx",
        {"x": [1, 3, 640, 640]},
        {f"o{i}": zeros(5, d) for i, d in enumerate([2, 2, 2, 4, 4, 4, 10, 10, 10])},
    )
    constant_model(tmp_path / "d.onnx", {"x": [1, 3, 640, 640]}, {"y": zeros(1, 21, 8400)})
    identity_model(tmp_path / "e.onnx", "input", "output", [1, 3, 300, 300])  # not a face size
    constant_model(  # image to image, but a 4-channel input
        tmp_path / "f.onnx", {"input": [1, 4, 512, 512]}, {"output": zeros(1, 3, 512, 512)}
    )
    found = scan(tmp_path)
    assert len(found) == 7
    for m in found:
        assert m.kind is None and m.identified_by is None, m
        assert "matches no supported model" in m.reason and m.outputs


def test_sha256_is_hashlibs_and_a_known_hash_wins_over_the_signature(folder, monkeypatch):
    root, _ = folder
    for m in scan(root):
        assert m.sha256 == hashlib.sha256(m.path.read_bytes()).hexdigest()

    unrelated = (root / "unrelated.onnx").read_bytes()
    gfpgan = (root / "gfpgan_1.4.onnx").read_bytes()
    monkeypatch.setattr(
        usermodels,
        "KNOWN_SHA256",
        {
            hashlib.sha256(unrelated).hexdigest(): ("detector", "scrfd", "scrfd_2.5g"),
            # its signature says enhancer; the verified hash says otherwise, and wins
            hashlib.sha256(gfpgan).hexdigest(): ("recogniser", "arcface", "w600k_r50"),
        },
    )
    found = by_file(scan(root))
    m = found["unrelated.onnx"]
    assert (m.kind, m.family, m.name, m.identified_by) == (
        "detector",
        "scrfd",
        "scrfd_2.5g",
        "sha256",
    )
    assert m.reason is None and m.inputs  # the signature is still read, for display
    m = found["gfpgan_1.4.onnx"]
    assert (m.kind, m.family, m.name, m.identified_by) == (
        "recogniser",
        "arcface",
        "w600k_r50",
        "sha256",
    )
    # a file known by sha256 is preferred over one identified by signature
    arcface = require(list(found.values()), "recogniser")
    assert arcface.file == "gfpgan_1.4.onnx"
    assert require(list(found.values()), "recogniser", name="w600k_r50").identified_by == "sha256"


def test_the_shipped_table_holds_only_well_formed_entries():
    for digest, (kind, family, name) in usermodels.KNOWN_SHA256.items():
        assert re.fullmatch(r"[0-9a-f]{64}", digest)
        assert family in usermodels.FAMILIES[kind] and name


def test_bad_files_are_reported_with_a_readable_reason(folder):
    root, _ = folder
    found = by_file(scan(root))
    garbage = found["garbage.onnx"]
    assert garbage.kind is None and garbage.identified_by is None
    assert "ONNX" in garbage.reason and str(root) not in garbage.reason
    assert garbage.sha256 == hashlib.sha256((root / "garbage.onnx").read_bytes()).hexdigest()
    assert found["empty.onnx"].reason == "empty file"
    rows = {r["file"]: r for r in describe(list(found.values()))}
    assert rows["garbage.onnx"]["note"].startswith("not recognised: ")
    assert rows["garbage.onnx"]["kind"] == "-"
    assert rows["unrelated.onnx"]["inputs"] == "x 1x10" and rows["unrelated.onnx"]["outputs"]


def test_describe_rows(folder):
    root, _ = folder
    rows = {r["file"]: r for r in describe(scan(root))}
    row = rows["inswapper_128.onnx"]
    digest = hashlib.sha256((root / "inswapper_128.onnx").read_bytes()).hexdigest()
    assert set(usermodels.COLUMNS) <= set(row)
    assert row["kind"] == "swapper" and row["family"] == "inswapper"
    assert row["identified_by"] == "signature" and row["note"] == ""
    assert row["sha256"] == digest[:16] and row["sha256_full"] == digest
    assert row["inputs"] == "target 1x3x128x128, source 1x512"
    assert row["outputs"] == "output 1x3x128x128"
    assert "weight 1 double" in rows["codeformer.onnx"]["inputs"]
    assert rows["insightface/det_10g.onnx"]["inputs"] == "input.1 1x3x?x?"
    assert all(isinstance(v, str) for r in rows.values() for v in r.values())


def test_require_picks_or_explains(folder):
    root, _ = folder
    found = scan(root)
    assert require(found, "swapper").file == "inswapper_128.onnx"
    assert require(found, "detector", "retinaface").file == "retinaface_10g.onnx"
    assert require(found, "detector", "scrfd", name="det_10g").file == "insightface/det_10g.onnx"
    assert require(found, "detector", "scrfd", name="scrfd_500m.onnx").file == "scrfd_500m.onnx"

    without = [m for m in found if m.kind != "swapper"]
    with pytest.raises(ModelError) as err:
        require(without, "swapper", "inswapper")
    text = str(err.value)
    assert "no swapper inswapper" in text
    assert "w600k_r50.onnx (recogniser arcface)" in text
    assert "garbage.onnx (not recognised:" in text
    assert "never downloads" in text and "--models-dir" in text

    with pytest.raises(ModelError, match=r"named 'det_2\.5g'"):
        require(found, "detector", name="det_2.5g")
    with pytest.raises(ModelError, match=r"holds no \.onnx files"):
        require([], "enhancer")
    with pytest.raises(FacecastError, match="swapper, recogniser, detector, enhancer"):
        require(found, "upscaler")
    with pytest.raises(FacecastError, match="scrfd, retinaface, yoloface"):
        require(found, "detector", "mtcnn")


def test_models_dir_from_flag_env_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(usermodels.ENV_VAR, raising=False)
    assert models_dir(None) is None
    assert models_dir(tmp_path) == tmp_path

    monkeypatch.setenv(usermodels.ENV_VAR, str(tmp_path))
    assert models_dir(None) == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert models_dir(other) == other  # the flag wins over the environment

    missing = tmp_path / "missing"
    monkeypatch.setenv(usermodels.ENV_VAR, str(missing))
    with pytest.raises(FacecastError, match=f"{re.escape(str(missing))}.*FACECAST_MODELS_DIR"):
        models_dir(None)
    with pytest.raises(FacecastError, match=r"--models-dir.*does not exist"):
        models_dir(missing)
    a_file = tmp_path / "file.onnx"
    a_file.write_bytes(b"x")
    with pytest.raises(FacecastError, match="not a folder"):
        models_dir(a_file)
    with pytest.raises(FacecastError, match="not a folder"):
        scan(a_file)


def test_bench_models_times_every_recognised_file_and_says_when_it_fell_back(tmp_path):
    """``facecast bench models`` on the stand-in folder, as a user runs it: every recognised
    file gets a row per provider asked for; CUDA, absent here, falls back to the CPU and the
    row says so; nothing unrecognised is timed."""
    models = tmp_path / "models"
    models.mkdir()
    expected = build_folder(models)
    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "facecast.cli", "bench", "models", "--models-dir", str(models),
         "--execution-provider", "cpu", "--execution-provider", "cuda", "--iterations", "3",
         "--results", str(results)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((results / "models-latest.json").read_text())["rows"]
    assert sorted({r["file"] for r in rows}) == sorted(expected)
    for row in rows:
        assert row["ms_mean"] > 0 and row["iterations"] == 3
        assert row["ran_on"] == "CPUExecutionProvider"
        assert row["fell_back"] == (row["asked"] == "cuda")
    swapper = next(r for r in rows if r["kind"] == "swapper" and r["asked"] == "cpu")
    per_face = swapper["ms_per_face_by_swap_size"]
    assert per_face["256"] == pytest.approx(4 * per_face["128"])

    empty = tmp_path / "empty"
    empty.mkdir()
    none = subprocess.run(
        [sys.executable, "-m", "facecast.cli", "bench", "models", "--models-dir", str(empty)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert none.returncode == 2 and "no model facecast recognises" in none.stderr
