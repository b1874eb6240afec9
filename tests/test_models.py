import shutil
import subprocess
import sys

import pytest

from facecast.errors import ModelError
from facecast.models import registry as models


def test_every_registered_model_is_present_and_intact():
    for model in models.REGISTRY.values():
        assert models.check(model) is None, models.check(model)
        assert model.licence and model.package and len(model.sha256) == 64


def _copy_models(tmp_path):
    for model in models.REGISTRY.values():
        if model.package == models.MEDIAPIPE:
            shutil.copy(model.path, tmp_path / model.filename)


def test_corrupt_and_missing_files_are_named_with_the_fix(tmp_path, monkeypatch):
    _copy_models(tmp_path)
    monkeypatch.setenv("FACECAST_EMBEDDED_MODELS", str(tmp_path))
    mesh = models.REGISTRY["face_mesh"]
    with open(tmp_path / mesh.filename, "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00garbage\x00")
    problem = models.check(mesh)
    assert problem is not None
    assert mesh.filename in problem and "corrupt" in problem and "scripts/setup" in problem

    (tmp_path / models.REGISTRY["blazeface_full"].filename).unlink()
    problem = models.check(models.REGISTRY["blazeface_full"])
    assert "missing" in problem and "scripts/setup" in problem

    models.model_path.cache_clear()
    try:
        with pytest.raises(ModelError, match=r"face_landmark\.tflite"):
            models.model_path("face_mesh")
    finally:
        models.model_path.cache_clear()


def test_models_command_lists_and_fails_on_a_bad_file(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "facecast.cli", "models", "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "blazeface_short" in ok.stdout and "dlib_resnet" in ok.stdout

    _copy_models(tmp_path)
    (tmp_path / models.REGISTRY["face_mesh_topology"].filename).write_text("# emptied\n")
    bad = subprocess.run(
        [sys.executable, "-m", "facecast.cli", "models", "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"FACECAST_EMBEDDED_MODELS": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert bad.returncode == 2
    assert "face_mesh_connections.py" in bad.stderr and "scripts/setup" in bad.stderr
