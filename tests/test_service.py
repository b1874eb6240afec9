"""`facecast serve` in one process: real nginx-rtmp, real ffmpeg publishers, the HTTP plane."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from facecast.errors import FacecastError
from facecast.ingest import free_ports, port_accepts
from facecast.media.image_io import read_image
from facecast.service import Service, load_profiles
from tests import live_helpers
from tests.live_helpers import publish, wait_for_stream

from .conftest import MEDIA, REPO
from .test_live_stream import face_distances_to_sources, grab_face_frames

live_procs = live_helpers.live_procs

CLIP = MEDIA / "short_hamilton_clip.mp4"
TOKEN = "service-token"


def embedding(analyser, embedder, name: str):
    photo = read_image(MEDIA / name)  # composites a PNG's transparency as the swap does
    return embedder.embed(photo, analyser.analyse(photo)[0])


def write_profiles(folder, entries: dict[str, str]):
    lines = [
        # all faces: the distance check measures the largest face the checker finds, and on
        # an overloaded machine the stream's own "largest" can be the other person in a shot
        f"{key}:\n  source: {MEDIA / photo}\n  faces: all\n"
        for key, photo in entries.items()
    ]
    path = folder / "profiles.yaml"
    path.write_text("".join(lines))
    return path


@pytest.fixture
def service(tmp_path):
    http_port, rtmp_port, hls_port = free_ports(3)
    profiles = load_profiles(write_profiles(tmp_path, {"alice": "obama.jpg", "bob": "biden.jpg"}))
    svc = Service(
        profiles,
        token=TOKEN,
        host="127.0.0.1",
        http_port=http_port,
        rtmp_port=rtmp_port,
        hls_port=hls_port,
        prefix=tmp_path / "ingest",
    )
    svc.start()
    yield svc
    svc.stop()


def test_two_keys_each_get_their_own_face_and_the_api_changes_only_one(
    service, live_procs, analyser, embedder
):
    names = ("obama.jpg", "biden.jpg", "alex-lacamoire.png")
    faces = {n: embedding(analyser, embedder, n) for n in names}
    for key in ("alice", "bob"):
        live_procs.add(publish(service.ingest.rtmp_url("live", key), CLIP, loop=True))
    for key in ("alice", "bob"):
        wait_for_stream(service.ingest.rtmp_url("swapped", key), timeout=40)

    def distances(key: str) -> dict[str, float]:
        frames = grab_face_frames(service.ingest.rtmp_url("swapped", key), analyser, 12, 40)
        return face_distances_to_sources(analyser, embedder, frames, faces)

    alice, bob = distances("alice"), distances("bob")
    print("alice", alice, "bob", bob)
    assert alice["obama.jpg"] < alice["biden.jpg"]
    assert bob["biden.jpg"] < bob["obama.jpg"]

    base = f"http://127.0.0.1:{service.http_port}"
    photo = (MEDIA / "alex-lacamoire.png").read_bytes()
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"}
    reply = httpx.post(f"{base}/api/streams/bob/source", content=photo, headers=auth, timeout=30)
    assert reply.status_code == 200, reply.text
    time.sleep(1.0)
    bob_after, alice_after = distances("bob"), distances("alice")
    print("after: alice", alice_after, "bob", bob_after)
    assert bob_after["alex-lacamoire.png"] < bob_after["biden.jpg"]
    assert bob_after["alex-lacamoire.png"] < bob["alex-lacamoire.png"]
    assert alice_after["obama.jpg"] < alice_after["alex-lacamoire.png"]  # alice kept her face

    status = httpx.get(f"{base}/api/streams", timeout=10).json()["streams"]
    assert sorted(s["key"] for s in status) == ["alice", "bob"]
    assert all(s["input"]["up"] and s["output"]["up"] for s in status), status
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    assert "facecast_streams_active 2.0" in metrics


def test_an_unknown_key_is_refused_at_publish(service, live_procs):
    proc = live_procs.add(publish(service.ingest.rtmp_url("live", "mallory"), CLIP, loop=True))
    deadline = time.monotonic() + 15
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is not None, "nginx let an unknown key publish"
    assert proc.returncode != 0
    assert service.manager.handles() == []


def test_profiles_file_errors_name_the_key(tmp_path):
    path = tmp_path / "profiles.yaml"
    path.write_text(f"cam1:\n  source: {MEDIA / 'obama.jpg'}\n  faces: most\n")
    with pytest.raises(FacecastError, match="cam1"):
        load_profiles(path)
    path.write_text("cam2:\n  source: missing.jpg\n")
    with pytest.raises(FacecastError, match=r"cam2.*not found"):
        load_profiles(path)
    path.write_text(f"cam3:\n  source: {MEDIA / 'obama.jpg'}\n  colour: red\n")
    with pytest.raises(FacecastError, match="unknown fields colour"):
        load_profiles(path)


def test_a_profile_added_through_the_api_lets_its_key_publish(service, live_procs):
    base = f"http://127.0.0.1:{service.http_port}"
    photo = (MEDIA / "alex-lacamoire.png").read_bytes()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = f"{base}/api/profiles/carol"
    assert httpx.put(url, content=photo, timeout=30).status_code == 401
    bad_key = httpx.put(f"{base}/api/profiles/..%2Fetc", content=photo, headers=auth, timeout=30)
    assert bad_key.status_code in (404, 422)
    bad = httpx.put(url, params={"faces": "most"}, content=photo, headers=auth, timeout=30)
    assert bad.status_code == 422
    ok = httpx.put(url, params={"faces": "largest"}, content=photo, headers=auth, timeout=30)
    assert ok.status_code == 200, ok.text
    assert httpx.get(f"{base}/api/profiles", timeout=10).json()["carol"]["faces"] == "largest"

    live_procs.add(publish(service.ingest.rtmp_url("live", "carol"), CLIP, loop=True))
    wait_for_stream(service.ingest.rtmp_url("swapped", "carol"), timeout=40)
    assert [h.key for h in service.manager.handles()] == ["carol"]


def test_serve_as_a_process_stops_everything_on_sigterm(tmp_path, live_procs):
    http_port, rtmp_port, hls_port = free_ports(3)
    profiles = write_profiles(tmp_path, {"dave": "obama.jpg"})
    cmd = [sys.executable, "-m", "facecast.cli", "serve", "--profiles", str(profiles)]
    cmd += ["--http-port", str(http_port), "--rtmp-port", str(rtmp_port)]
    cmd += ["--hls-port", str(hls_port)]
    env = {**os.environ, "FACECAST_API_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    live_procs.add(proc)
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        pytest.fail(log_path.read_text()[-3000:])
    live_procs.add(publish(f"rtmp://127.0.0.1:{rtmp_port}/live/dave", CLIP, loop=True))
    wait_for_stream(f"rtmp://127.0.0.1:{rtmp_port}/swapped/dave", timeout=40)

    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(20)
    print(f"serve stopped in {time.monotonic() - started:.1f} s")
    assert code == 0, log_path.read_text()[-3000:]
    assert not port_accepts(rtmp_port) and not port_accepts(http_port)  # nginx and HTTP gone
    assert "Traceback" not in log_path.read_text()
