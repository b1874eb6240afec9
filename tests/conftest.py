"""Shared fixtures: the project's own test media (tests/media) and the models, loaded once."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO / "tests" / "media"  # the project's own copy, so a bare clone can run the tests
ARTIFACTS = REPO / "test-artifacts"


def pytest_configure(config: pytest.Config) -> None:
    if not MEDIA.is_dir():
        raise pytest.UsageError(f"test media not found at {MEDIA}: the clone is incomplete")
    ARTIFACTS.mkdir(exist_ok=True)


@pytest.fixture(scope="session")
def media() -> Path:
    return MEDIA


@pytest.fixture(scope="session")
def artifacts() -> Path:
    return ARTIFACTS


def load(name: str) -> np.ndarray:
    image = cv2.imread(str(MEDIA / name), cv2.IMREAD_COLOR)
    assert image is not None, f"cannot read {MEDIA / name}"
    return image


@pytest.fixture(scope="session")
def analyser():
    from facecast.faces.analyse import FaceAnalyser

    return FaceAnalyser(tiles=True)


@pytest.fixture(scope="session")
def embedder():
    from facecast.faces.embed import FaceEmbedder

    return FaceEmbedder()
