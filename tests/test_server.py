"""The HTTP control plane against real streams (StreamManager running LivePipelines)."""

from __future__ import annotations

import shutil
import subprocess

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from facecast.config import StreamSettings
from facecast.ingest import free_port
from facecast.server import create_app
from facecast.streams import StreamManager
from tests import live_helpers
from tests.live_helpers import publish, stop_process, wait_until

from .conftest import MEDIA, REPO

live_procs = live_helpers.live_procs

CLIP = MEDIA / "short_hamilton_clip.mp4"
FACE = REPO / "examples" / "obama.jpg"
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def manager():
    manager = StreamManager()
    yield manager
    manager.stop_all()


def file_stream(manager: StreamManager, key: str, out, realtime: bool = True):
    settings = StreamSettings(
        source_image=FACE, input=str(CLIP), output=str(out), realtime=realtime
    )
    return manager.start(key, settings)


# ---------------------------------------------------------------------------- security


def test_control_routes_need_the_token_and_check_uploads(manager, tmp_path):
    file_stream(manager, "cam1", tmp_path / "cam1.ts")
    client = TestClient(create_app(manager, TOKEN, max_upload=2 * 1024 * 1024))
    url = "/api/streams/cam1/source"
    face = (MEDIA / "biden.jpg").read_bytes()
    jpeg = {"Content-Type": "image/jpeg"}

    assert client.post(url, content=face, headers=jpeg).status_code == 401
    wrong = {**jpeg, "Authorization": "Bearer nope"}
    assert client.post(url, content=face, headers=wrong).status_code == 401
    assert client.post("/api/streams/cam1/swapping", json={"enabled": False}).status_code == 401

    big = face + b"\0" * (3 * 1024 * 1024)
    assert client.post(url, content=big, headers={**jpeg, **AUTH}).status_code == 413
    not_image = client.post(url, content=b"%PDF-1.7\n" + b"x" * 500, headers={**jpeg, **AUTH})
    assert not_image.status_code == 415, not_image.text

    # a real photo with no face in it: a patch of the clip's background, as a PNG
    blank = np.full((300, 300, 3), 128, np.uint8)
    blank[::7] = 90
    ok, png = cv2.imencode(".png", blank)
    assert ok
    no_face = client.post(url, content=png.tobytes(), headers={**AUTH, "Content-Type": "x"})
    assert no_face.status_code == 422 and "no face" in no_face.json()["detail"], no_face.text

    # a header that claims a huge picture is refused before decoding
    bomb = bytearray(png.tobytes())
    bomb[16:24] = (100_000).to_bytes(4, "big") * 2
    assert client.post(url, content=bytes(bomb), headers=AUTH).status_code == 422

    before = manager.get("cam1").pipeline.engine.source
    good = client.post(url, content=face, headers={**jpeg, **AUTH})
    assert good.status_code == 200, good.text
    assert manager.get("cam1").pipeline.engine.source is not before
    assert client.post("/api/streams/nobody/source", content=face, headers=AUTH).status_code == 404

    off = client.post("/api/streams/cam1/swapping", json={"enabled": False}, headers=AUTH)
    assert off.status_code == 200 and manager.get("cam1").pipeline.swapping is False
    status = client.get("/api/streams/cam1").json()
    assert status["swapping"] is False and status["source_face"] == "upload for cam1"


# ---------------------------------------------------------------------------- metrics


def test_metrics_match_what_the_stream_did_and_pass_promtool(manager, tmp_path):
    # the clip flat out (lossless): every frame goes through, then the stream ends
    handle = file_stream(manager, "clip", tmp_path / "clip.ts", realtime=False)
    assert wait_until(lambda: not handle.running, 120)
    client = TestClient(create_app(manager, TOKEN))
    text = client.get("/metrics").text

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def frames(result: str) -> float:
        return samples[("facecast_frames_total", (("result", result), ("stream", "clip")))]

    stats = handle.pipeline.stats
    assert frames("swapped") == stats.frames_swapped > 200
    assert frames("passed") == stats.frames_passed
    assert frames("failed") == 0 and frames("dropped") == 0
    assert frames("swapped") + frames("passed") == stats.frames_in == stats.frames_out
    latency_count = samples[("facecast_latency_seconds_count", (("stream", "clip"),))]
    assert latency_count == stats.frames_out
    stage = samples[("facecast_stage_seconds_count", (("stage", "process"), ("stream", "clip")))]
    assert stage == stats.frames_in
    assert samples[("facecast_streams_active", ())] == 0  # the file ended

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool missing: scripts/setup installs Debian's prometheus package")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


# ---------------------------------------------------------------------------- readiness


def test_readyz_follows_the_input(manager, live_procs, tmp_path):
    udp_in = f"udp://127.0.0.1:{free_port()}"
    settings = StreamSettings(
        source_image=FACE, input=udp_in, output=str(tmp_path / "out.ts"), stall_timeout=2
    )
    manager.start("cam", settings)
    client = TestClient(create_app(manager, TOKEN))
    assert client.get("/healthz").json() == {"status": "ok"}

    def ready() -> bool:
        return client.get("/readyz").status_code == 200

    assert not ready()
    assert "input down" in " ".join(client.get("/readyz").json()["reasons"])
    publisher = live_procs.add(publish(udp_in, CLIP, loop=True))
    assert wait_until(ready, 20), client.get("/readyz").json()
    stop_process(publisher)
    assert wait_until(lambda: not ready(), 15)
    live_procs.add(publish(udp_in, CLIP, loop=True))
    assert wait_until(ready, 25), client.get("/readyz").json()
    status = client.get("/api/streams").json()["streams"][0]
    assert status["input"]["up"] and status["input"]["reconnects"] >= 1
    assert status["frames"]["in"] > 0


def test_without_a_token_the_server_binds_to_loopback(caplog):
    from facecast.server import bind_host

    assert bind_host("0.0.0.0", None) == "127.0.0.1"
    assert "FACECAST_API_TOKEN" in caplog.text
    assert bind_host("0.0.0.0", TOKEN) == "0.0.0.0"
