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


# Modules whose tests run live pipelines, servers and real-time publishers and readers. Under
# pytest-xdist (scripts/test runs two workers) they all run on one worker, one at a time, as
# they always did: each needs about a core in real time, and two of them side by side on a
# 2-core box starve each other's pipelines. The rest (CPU-bound unit tests) spread over both.
LIVE_MODULES = frozenset(
    {
        "test_adaptive_rate",
        "test_bench_capacity",
        "test_cluster",
        "test_gst",
        "test_hostile_network",
        "test_ingest",
        "test_ingest_security",
        "test_live_media",
        "test_live_pipeline",
        "test_live_stream",
        "test_lost_data",
        "test_reconnect",
        "test_server",
        "test_service",
        "test_srt_listener",
        "test_web_page",
        "test_webrtc",
        "test_whip",
        "test_whip_listen",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in LIVE_MODULES:
            item.add_marker(pytest.mark.xdist_group("live"))
