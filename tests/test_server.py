"""The HTTP control plane against real streams (StreamManager running LivePipelines)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request

from facecast.config import StreamSettings
from facecast.errors import FacecastError
from facecast.serve.app import create_app, read_form
from facecast.serve.ingest import free_port
from facecast.serve.streams import StreamManager
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


def file_stream(manager: StreamManager, key: str, out, realtime: bool = True, clip=CLIP):
    settings = StreamSettings(
        source_image=FACE, input=str(clip), output=str(out), realtime=realtime
    )
    return manager.start(key, settings)


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory) -> Path:
    """The first 6 s of the test clip (about 150 frames; remuxed, not re-encoded): a paced
    file stream that runs long enough to be looked at while it runs, and then ends."""
    path = tmp_path_factory.mktemp("short") / "short.mp4"
    cmd = [live_helpers.FFMPEG, "-v", "error", "-i", str(CLIP), "-t", "6", "-c", "copy"]
    subprocess.run([*cmd, str(path)], check=True, capture_output=True, timeout=30)
    return path


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
    status = client.get("/api/streams/cam1", headers=AUTH).json()
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


def test_metrics_can_label_streams_by_a_keyed_hash(manager, tmp_path, monkeypatch):
    """/metrics is open (scrapers send no token), so keys that are secrets can be hashed
    there: FACECAST_METRICS_KEYS=hash. The token holder finds each stream's label in
    /api/streams."""
    idle_stream(manager, "secret-key", tmp_path / "s.ts")
    monkeypatch.setenv("FACECAST_METRICS_KEYS", "hash")
    client = TestClient(create_app(manager, TOKEN))
    text = client.get("/metrics").text
    assert "secret-key" not in text
    label = client.get("/api/streams/secret-key", headers=AUTH).json()["metrics_label"]
    assert f'stream="{label}"' in text
    listed = client.get("/api/streams", headers=AUTH).json()["streams"]
    assert [s["metrics_label"] for s in listed] == [label]
    # stable while the token is (a restart keeps the series); another token, another label
    assert f'stream="{label}"' in TestClient(create_app(manager, TOKEN)).get("/metrics").text
    other = TestClient(create_app(manager, "another-token", metrics_keys="hash"))
    assert label not in other.get("/metrics").text
    # the default is the key itself
    plain = TestClient(create_app(manager, TOKEN, metrics_keys="key")).get("/metrics").text
    assert 'stream="secret-key"' in plain
    with pytest.raises(FacecastError, match="FACECAST_METRICS_KEYS='names': use one of key, hash"):
        create_app(manager, TOKEN, metrics_keys="names")


# ---------------------------------------------------------------------------- readiness


def test_readyz_follows_the_input(live_procs, manager, tmp_path):
    # (the manager is set up last so it stops first: its input still flowing, the reader
    # ends at once instead of waiting out a read timeout)
    udp_in = f"udp://127.0.0.1:{free_port()}"
    settings = StreamSettings(
        source_image=FACE, input=udp_in, output=str(tmp_path / "out.ts"), stall_timeout=2
    )
    manager.start("cam", settings)
    client = TestClient(create_app(manager, TOKEN), headers=AUTH)
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
    from facecast.serve.app import bind_host

    assert bind_host("0.0.0.0", None) == "127.0.0.1"
    assert "FACECAST_API_TOKEN" in caplog.text
    assert bind_host("0.0.0.0", TOKEN) == "0.0.0.0"


# ---------------------------------------------------------------------------- status over time


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """``(name, sorted label items) -> value`` of a Prometheus exposition."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def utc(text: str) -> float:
    """An ISO-8601 time from the API as epoch seconds; it must say it is UTC."""
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() == timedelta(0), text
    return moment.timestamp()


def idle_stream(manager: StreamManager, key: str, out, **settings) -> None:
    """A stream whose input is never up: it runs (input down) until stopped. The input is
    an RTMP server that refuses the connection, so the reader waits between attempts, where
    a stop reaches it at once (a UDP input would listen out its 5 s open timeout first)."""
    manager.start(
        key,
        StreamSettings(
            source_image=FACE, input="rtmp://127.0.0.1:1/live/nobody", output=str(out), **settings
        ),
    )


def test_status_times_are_utc_wall_clock_and_an_ended_stream_stays_listed(
    manager, tmp_path, short_clip
):
    handle = file_stream(manager, "cam", tmp_path / "cam.ts", clip=short_clip)  # paced: 6 s
    client = TestClient(create_app(manager, TOKEN), headers=AUTH)
    assert wait_until(lambda: client.get("/api/streams/cam").json()["input"]["up"], 30)
    status = client.get("/api/streams/cam").json()
    # what the monotonic stamp means on the wall clock, worked out here independently
    expected_since = time.time() - (time.monotonic() - handle.pipeline.source.state_since)
    assert status["state"] == "running" and status["ended"] is None
    assert abs(utc(status["started"]) - handle.started) < 0.002
    assert abs(utc(status["input"]["since"]) - expected_since) < 0.05
    assert utc(status["started"]) - 5 < utc(status["input"]["since"]) <= time.time()
    assert status["output"]["since"] is None or utc(status["output"]["since"]) <= time.time()

    assert wait_until(lambda: not handle.running, 90)  # the file ends
    ended = client.get("/api/streams/cam").json()
    stats = handle.pipeline.stats
    assert ended["state"] == "ended" and ended["running"] is False and ended["error"] is None
    assert utc(ended["started"]) < utc(ended["ended"]) <= time.time()
    assert not ended["input"]["up"] and not ended["output"]["up"]
    assert ended["frames"]["in"] == stats.frames_in > 100
    assert ended["frames"]["swapped"] == stats.frames_swapped
    time.sleep(0.5)
    assert client.get("/api/streams").json()["streams"] == [ended]  # final: nothing moves
    samples = metric_samples(client.get("/metrics").text)
    for result in ("swapped", "passed", "failed", "dropped"):
        labels = (("result", result), ("stream", "cam"))
        assert samples[("facecast_frames_total", labels)] == ended["frames"][result], result
    assert samples[("facecast_streams_active", ())] == 0
    assert samples[("facecast_stream_up", (("side", "input"), ("stream", "cam")))] == 0

    # an ended stream takes no more changes
    face = (MEDIA / "biden.jpg").read_bytes()
    assert client.post("/api/streams/cam/source", content=face, headers=AUTH).status_code == 409
    reply = client.post("/api/streams/cam/swapping", json={"enabled": False}, headers=AUTH)
    assert reply.status_code == 409 and "ended" in reply.json()["detail"]

    # a new start on the key replaces the ended entry
    again = file_stream(manager, "cam", tmp_path / "cam2.ts")
    replaced = client.get("/api/streams/cam").json()
    assert replaced["state"] == "running" and replaced["ended"] is None
    assert utc(replaced["started"]) > utc(ended["started"])
    assert manager.handles() == [again]


def test_a_failed_stream_is_listed_as_failed_until_it_expires(manager, tmp_path):
    idle_stream(manager, "ok", tmp_path / "ok.ts")
    file_stream(manager, "bad", tmp_path / "missing-folder" / "bad.ts")  # the output fails
    client = TestClient(create_app(manager, TOKEN), headers=AUTH)
    assert wait_until(lambda: client.get("/api/streams/bad").json()["state"] == "failed", 30)
    bad = client.get("/api/streams/bad").json()
    assert "missing-folder" in bad["error"] and bad["ended"] is not None
    assert client.get("/api/streams/ok").json()["state"] == "running"
    # while its publisher is there, a failed stream is a reason not to be ready...
    assert any("stream bad" in r for r in client.get("/readyz").json()["reasons"])
    manager.stop("bad")  # ...once stopped (the publisher left) it is only history
    assert not any("stream bad" in r for r in client.get("/readyz").json()["reasons"])
    assert client.get("/api/streams/bad").json()["state"] == "failed"
    samples = metric_samples(client.get("/metrics").text)
    assert samples[("facecast_streams_active", ())] == 1
    assert ("facecast_frames_total", (("result", "failed"), ("stream", "bad"))) in samples

    manager.retention = 0.2
    time.sleep(0.4)
    assert client.get("/api/streams/bad").status_code == 404
    assert [s["key"] for s in client.get("/api/streams").json()["streams"]] == ["ok"]
    assert 'stream="bad"' not in client.get("/metrics").text


# ---------------------------------------------------------------------------- multipart uploads


def test_multipart_source_uploads_get_the_same_checks(manager, tmp_path):
    idle_stream(manager, "cam1", tmp_path / "cam1.ts")
    limit = 2 * 1024 * 1024
    client = TestClient(create_app(manager, TOKEN, max_upload=limit))
    url = "/api/streams/cam1/source"
    face = (MEDIA / "biden.jpg").read_bytes()

    def post(files, headers=AUTH):
        return client.post(url, files=files, headers=headers)

    assert post({"file": ("face.jpg", face, "image/jpeg")}, headers={}).status_code == 401
    big = face + b"\0" * limit
    reply = post({"file": ("face.jpg", big, "image/jpeg")})
    assert reply.status_code == 413 and "MB" in reply.json()["detail"], reply.text
    # the part's type and name say JPEG; the bytes are a PDF
    reply = post({"file": ("face.jpg", b"%PDF-1.7\n" + b"x" * 500, "image/jpeg")})
    assert reply.status_code == 415, reply.text
    blank = np.full((300, 300, 3), 128, np.uint8)
    blank[::7] = 90
    reply = post({"file": ("blank.png", cv2.imencode(".png", blank)[1].tobytes(), "image/png")})
    assert reply.status_code == 422 and "no face" in reply.json()["detail"], reply.text
    reply = post({"photo": ("face.jpg", face, "image/jpeg")})
    assert reply.status_code == 422 and "'photo'" in reply.json()["detail"], reply.text
    # the part `file` repeated: several photos of the person, each checked, at most 8
    many = [("file", (f"{i}.jpg", face, "image/jpeg")) for i in range(9)]
    reply = post(many)
    assert reply.status_code == 422 and "at most 8" in reply.json()["detail"], reply.text
    bad_second = [many[0], ("file", ("b.jpg", b"%PDF-1.7\n" + b"x" * 500, "image/jpeg"))]
    assert post(bad_second).status_code == 415
    reply = post(many[:2])
    assert reply.status_code == 200 and reply.json()["photos"] == 2, reply.text
    assert manager.get("cam1").pipeline.engine.source_set is not None
    form = {**AUTH, "Content-Type": "multipart/form-data; boundary=xyz"}
    assert client.post(url, content=b"not a form", headers=form).status_code == 422
    cut = b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\n' + face[:5000]
    reply = client.post(url, content=cut, headers=form)  # no closing boundary
    assert reply.status_code == 422 and "ends" in reply.json()["detail"], reply.text
    no_boundary = {**AUTH, "Content-Type": "multipart/form-data"}
    assert client.post(url, content=face, headers=no_boundary).status_code == 422

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="f.jpg"\r\n\r\n'
        for _ in range(40):
            yield b"\0" * (256 * 1024)
        yield b"\r\n--xyz--\r\n"

    assert client.post(url, content=chunked(), headers=form).status_code == 413

    before = manager.get("cam1").pipeline.engine.source
    good = post({"file": ("face.jpg", face, "image/jpeg")})
    assert good.status_code == 200, good.text
    assert good.json()["profile_updated"] is False  # no service: no profile to keep it in
    assert manager.get("cam1").pipeline.engine.source is not before


def test_a_multipart_part_over_the_limit_is_refused_while_it_arrives():
    """The parser stops reading at the first part over the limit: the rest of a 64 MB body
    is never pulled from the connection, let alone held."""
    limit, chunk = 1024 * 1024, 64 * 1024
    pulled = 0
    head = b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'

    async def receive() -> dict:
        nonlocal pulled
        pulled += 1
        body = head if pulled == 1 else b"\xff" * chunk
        return {"type": "http.request", "body": body, "more_body": pulled < 1024}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-type", b"multipart/form-data; boundary=b0undary")],
    }
    with pytest.raises(HTTPException) as refused:
        asyncio.run(read_form(Request(scope, receive), limit, ("file",)))
    assert refused.value.status_code == 413
    assert pulled <= limit // chunk + 3, pulled
