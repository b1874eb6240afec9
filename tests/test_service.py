"""`facecast serve` in one process: real nginx-rtmp, real ffmpeg publishers, the HTTP plane."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from facecast.errors import FacecastError
from facecast.live.pipeline import build_pipeline
from facecast.media.image_io import read_image
from facecast.serve.app import MAX_UPLOAD_BYTES
from facecast.serve.ingest import free_ports, port_accepts
from facecast.serve.service import Service, load_profiles
from tests import live_helpers
from tests.live_helpers import in_parallel, publish, stop_process, wait_for_stream, wait_until

from .conftest import MEDIA, REPO
from .media_helpers import identity_distances
from .test_live_stream import grab_face_frames

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
    profiles = load_profiles(write_profiles(tmp_path, {"alice": "obama.jpg", "bob": "biden.jpg"}))
    svc = service_on_free_ports(tmp_path, profiles, token=TOKEN, state_dir=tmp_path / "state")
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
    swapped = {key: service.ingest.rtmp_url("swapped", key) for key in ("alice", "bob")}
    for url in swapped.values():
        wait_for_stream(url, timeout=40)

    def distances(*keys: str) -> list[dict[str, float]]:
        """Per key, in order: its output's distances to the faces (its frames grabbed at
        the same time as the other keys')."""
        grabs = (partial(grab_face_frames, swapped[key], analyser, 12, 40) for key in keys)
        return [identity_distances(analyser, embedder, f, faces) for f in in_parallel(*grabs)]

    alice, bob = distances("alice") + distances("bob")
    print("alice", alice, "bob", bob)
    assert alice["obama.jpg"] < alice["biden.jpg"]
    assert bob["biden.jpg"] < bob["obama.jpg"]

    base = f"http://127.0.0.1:{service.http_port}"
    photo = (MEDIA / "alex-lacamoire.png").read_bytes()
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"}
    reply = httpx.post(f"{base}/api/streams/bob/source", content=photo, headers=auth, timeout=30)
    assert reply.status_code == 200, reply.text
    time.sleep(1.0)
    bob_after, alice_after = distances("bob", "alice")
    print("after: alice", alice_after, "bob", bob_after)
    assert bob_after["alex-lacamoire.png"] < bob_after["biden.jpg"]
    assert bob_after["alex-lacamoire.png"] < bob["alex-lacamoire.png"]
    assert alice_after["obama.jpg"] < alice_after["alex-lacamoire.png"]  # alice kept her face

    status = httpx.get(f"{base}/api/streams", headers=AUTH, timeout=10).json()["streams"]
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
    listed = httpx.get(f"{base}/api/profiles", headers=auth, timeout=10).json()
    assert listed["carol"]["faces"] == "largest"

    live_procs.add(publish(service.ingest.rtmp_url("live", "carol"), CLIP, loop=True))
    wait_for_stream(service.ingest.rtmp_url("swapped", "carol"), timeout=40)
    assert [h.key for h in service.manager.handles()] == ["carol"]


def start_serve(tmp_path, live_procs, *flags: str) -> tuple[subprocess.Popen, Path, dict]:
    """``facecast serve`` as a process with dave's profile and the API token, ready (its
    /readyz answers 200): the process, its log and its ports."""
    ports = dict(zip(("http", "rtmp", "hls"), free_ports(3), strict=True))
    profiles = write_profiles(tmp_path, {"dave": "obama.jpg"})
    cmd = [sys.executable, "-m", "facecast.cli", "serve", "--profiles", str(profiles), *flags]
    cmd += ["--http-port", str(ports["http"]), "--rtmp-port", str(ports["rtmp"])]
    cmd += ["--hls-port", str(ports["hls"]), "--state-dir", str(tmp_path / "state")]
    env = {**os.environ, "FACECAST_API_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    live_procs.add(proc)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{ports['http']}/readyz", timeout=2).status_code == 200:
                return proc, log_path, ports
        except httpx.HTTPError:
            time.sleep(0.3)
    pytest.fail(log_path.read_text()[-3000:])


def test_serve_as_a_process_stops_everything_on_sigterm(tmp_path, live_procs):
    proc, log_path, ports = start_serve(tmp_path, live_procs)
    http_port, rtmp_port = ports["http"], ports["rtmp"]
    base = f"http://127.0.0.1:{http_port}"
    live_procs.add(publish(f"rtmp://127.0.0.1:{rtmp_port}/live/dave", CLIP, loop=True))
    # serve listens on 0.0.0.0 (a token is set): viewers need dave's play token
    play = httpx.get(f"{base}/api/play/dave", headers={"Authorization": f"Bearer {TOKEN}"})
    assert play.status_code == 200, play.text
    wait_for_stream(play.json()["rtmp"], timeout=40)

    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(20)
    print(f"serve stopped in {time.monotonic() - started:.1f} s")
    assert code == 0, log_path.read_text()[-3000:]
    assert not port_accepts(rtmp_port) and not port_accepts(http_port)  # nginx and HTTP gone
    assert "Traceback" not in log_path.read_text()
    assert (tmp_path / "state" / "faces").is_dir()  # --state-dir reached the service


# ---------------------------------------------------------------------------- references
# Reference mode in profiles: from the YAML file and through the API. The API is driven
# through the ASGI app of a Service that is never started (no nginx, no HTTP server).


def test_profiles_file_references_in_both_forms_relative_to_the_file(tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    for name in ("obama.jpg", "biden.jpg", "lin-manuel-miranda.png", "alex-lacamoire.png"):
        shutil.copy(MEDIA / name, faces / name)
    path = tmp_path / "profiles.yaml"
    path.write_text(
        "cam1:\n"
        "  source: faces/obama.jpg\n"
        "  references:\n"
        "    - faces/lin-manuel-miranda.png\n"
        "    - photo: faces/alex-lacamoire.png\n"
        "      face: faces/biden.jpg\n"
        "    - photo: faces/biden.jpg\n"
        f"cam2:\n  source: {MEDIA / 'obama.jpg'}\n  references: []\n"
        f"cam3:\n  source: {MEDIA / 'obama.jpg'}\n"
    )
    profiles = load_profiles(path)
    assert profiles["cam1"].references == (
        (faces / "lin-manuel-miranda.png", None),
        (faces / "alex-lacamoire.png", faces / "biden.jpg"),
        (faces / "biden.jpg", None),
    )
    assert profiles["cam2"].references == profiles["cam3"].references == ()


@pytest.mark.parametrize(
    ("references", "error"),
    [
        ("lin.png", "references must be a list"),
        ("[42]", r"references\[0\]: expected PHOTO or"),
        ("[{face: lin.png}]", r"references\[0\]: needs `photo: PHOTO`"),
        ("[{photo: lin.png, source: obama.jpg}]", r"references\[0\]: unknown fields source"),
        ("[{photo: 12}]", r"references\[0\]: photo must be a photo's path"),
        ("[{photo: lin.png, face: [a]}]", r"references\[0\]: face must be"),
        ("[lin.png, missing.jpg]", r"references\[1\]: photo \S*missing.jpg not found"),
        ("[{photo: lin.png, face: gone.jpg}]", r"references\[0\]: face \S*gone.jpg not found"),
    ],
)
def test_profiles_file_reference_errors_name_the_file_key_and_item(tmp_path, references, error):
    shutil.copy(MEDIA / "lin-manuel-miranda.png", tmp_path / "lin.png")
    path = tmp_path / "profiles.yaml"
    path.write_text(f"cam1:\n  source: {MEDIA / 'obama.jpg'}\n  references: {references}\n")
    with pytest.raises(FacecastError, match=error) as caught:
        load_profiles(path)
    assert str(caught.value).startswith(f"{path}: profile 'cam1': ")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(image) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def make_service(tmp_path, profiles_file, state, **options) -> Service:
    """A Service on free ports, not started; ``state``: its state folder, or None;
    ``options``: other Service arguments (the token is TOKEN unless given)."""
    options.setdefault("token", TOKEN)
    return service_on_free_ports(tmp_path, load_profiles(profiles_file), state_dir=state, **options)


def service_on_free_ports(tmp_path, profiles: dict, **options) -> Service:
    """A Service on free loopback ports, its nginx under ``tmp_path``, not started;
    ``options``: the other Service arguments (token, state_dir, store...)."""
    http_port, rtmp_port, hls_port = free_ports(3)
    return Service(
        profiles,
        http_port=http_port,
        rtmp_port=rtmp_port,
        hls_port=hls_port,
        prefix=tmp_path / "ingest",
        **options,
    )


@pytest.fixture
def api(tmp_path):
    """A Service never started, with its app under a test client: alice has no references,
    bob one from the YAML file."""
    path = tmp_path / "profiles.yaml"
    path.write_text(
        f"alice:\n  source: {MEDIA / 'obama.jpg'}\n"
        f"bob:\n  source: {MEDIA / 'biden.jpg'}\n"
        f"  references: [{MEDIA / 'lin-manuel-miranda.png'}]\n"
    )
    svc = make_service(tmp_path, path, state=None)
    yield svc, TestClient(svc.app)
    svc.stop()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_references_are_added_listed_and_cleared_through_the_api(api):
    svc, client = api
    url = "/api/profiles/alice/references"
    photo = b64((MEDIA / "lin-manuel-miranda.png").read_bytes())
    face = b64((MEDIA / "alex-lacamoire.png").read_bytes())

    assert client.post(url, json={"photo": photo}).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.post(url, json={"photo": photo}, headers=wrong).status_code == 401
    assert client.delete(url).status_code == 401
    missing = "/api/profiles/mallory/references"
    assert client.post(missing, json={"photo": photo}, headers=AUTH).status_code == 404
    assert client.delete(missing, headers=AUTH).status_code == 404

    first = client.post(url, json={"photo": photo}, headers=AUTH)
    assert first.status_code == 200, first.text
    assert [r["face"] for r in first.json()["references"]] == [None]
    second = client.post(url, json={"photo": photo, "face": face}, headers=AUTH)
    assert second.status_code == 200, second.text
    listed = client.get("/api/profiles", headers=AUTH).json()
    assert listed["alice"]["references"] == second.json()["references"]
    assert len(listed["alice"]["references"]) == 2
    assert listed["bob"]["references"] == [{"photo": "lin-manuel-miranda.png", "face": None}]
    (photo_1, none), (photo_2, face_2) = svc.profiles["alice"].references
    assert none is None
    lin, alex = (read_image(MEDIA / n) for n in ("lin-manuel-miranda.png", "alex-lacamoire.png"))
    for stored, original in ((photo_1, lin), (photo_2, lin), (face_2, alex)):
        assert stored.parent == svc._uploads and stored.suffix == ".png"  # named by us
        assert np.array_equal(read_image(stored), original)
    assert svc.settings_for("alice").references == [(photo_1, None), (photo_2, face_2)]

    # a new face for the key keeps its references; clearing them leaves the face
    reply = client.put(
        "/api/profiles/alice", content=(MEDIA / "biden.jpg").read_bytes(), headers=AUTH
    )
    assert reply.status_code == 200, reply.text
    assert len(svc.profiles["alice"].references) == 2
    cleared = client.delete(url, headers=AUTH)
    assert cleared.status_code == 200, cleared.text
    assert client.get("/api/profiles", headers=AUTH).json()["alice"]["references"] == []
    assert svc.settings_for("alice").references == []
    assert svc.profiles["bob"].references == ((MEDIA / "lin-manuel-miranda.png", None),)


def test_reference_uploads_are_checked_and_nothing_bad_is_kept(api, analyser):
    svc, client = api
    url = "/api/profiles/alice/references"
    photo = b64((MEDIA / "lin-manuel-miranda.png").read_bytes())
    # a real photo region with no face in it: the card table below the players
    table = read_image(MEDIA / "group_t1.jpg")[600:, :400]
    assert analyser.analyse(table) == []
    faceless = b64(png(table))

    def post(body=None, **kwargs):
        return client.post(url, json=body, headers=AUTH, **kwargs)

    reply = post({"photo": faceless})
    assert reply.status_code == 422 and "reference photo" in reply.json()["detail"], reply.text
    assert "no face" in reply.json()["detail"]
    reply = post({"photo": photo, "face": faceless})
    assert reply.status_code == 422 and "reference face" in reply.json()["detail"], reply.text

    assert post({"photo": "not base64!"}).status_code == 422
    assert post({"photo": photo, "face": 7}).status_code == 422
    assert post({"face": photo}).status_code == 422
    assert post({"photo": photo, "colour": "red"}).status_code == 422
    assert post([photo]).status_code == 422
    assert post(content=b"\x89PNG not json").status_code == 422
    assert post({"photo": b64(b"plain text, no image")}).status_code == 415
    corrupt = (MEDIA / "obama.jpg").read_bytes()[:2000]  # a JPEG header, then nothing
    assert post({"photo": b64(corrupt)}).status_code in (415, 422)

    big = (MEDIA / "obama.jpg").read_bytes()
    big += b"\0" * (MAX_UPLOAD_BYTES + 1 - len(big))
    reply = post({"photo": photo, "face": b64(big)})
    assert reply.status_code == 413 and "face" in reply.json()["detail"], reply.text
    huge = post(content=b"x" * (3 * MAX_UPLOAD_BYTES + 1))  # refused by its length
    assert huge.status_code == 413

    # a data: URL, as a browser's FileReader gives it, with line breaks, is accepted
    wrapped = "\n".join(photo[i : i + 76] for i in range(0, len(photo), 76))
    reply = post({"photo": f"data:image/png;base64,{wrapped}"})
    assert reply.status_code == 200, reply.text
    assert len(svc.profiles["alice"].references) == 1
    assert len(list(svc._uploads.iterdir())) == 1  # refused uploads were never stored


def test_profile_references_reach_the_stream_pipeline(api):
    """YAML and API references end up in the key's StreamSettings and in its engine, one
    reference each; building the pipeline does not connect to the (unstarted) ingest."""
    svc, client = api
    body = {
        "photo": b64((MEDIA / "alex-lacamoire.png").read_bytes()),
        "face": b64((MEDIA / "obama.jpg").read_bytes()),
    }
    reply = client.post("/api/profiles/bob/references", json=body, headers=AUTH)
    assert reply.status_code == 200, reply.text
    settings = svc.settings_for("bob")
    assert settings.references[0] == (MEDIA / "lin-manuel-miranda.png", None)
    assert len(settings.references) == 2
    # facecast's own reader: the key's URL with this run's secret (the hook checks it)
    assert settings.input.startswith(svc.ingest.rtmp_url("live", "bob") + "?facecast=")

    pipeline = build_pipeline(settings, name="bob")
    assert len(pipeline.engine.references) == 2
    assert not pipeline.source.connected and pipeline.sink is None
    assert not port_accepts(svc.ingest.rtmp_port)  # nothing was started to connect to


def test_each_key_can_run_its_own_swapper(tmp_path):
    """One process, two keys: carol on the embedded swapper, dave on a user model from the
    models folder that serve was given (FACECAST_MODELS_DIR); unknown model jobs refused."""
    from facecast.config import StreamSettings

    from .test_modelset import make_models_folder

    folder = make_models_folder(tmp_path / "models")
    path = tmp_path / "profiles.yaml"
    path.write_text(
        f"carol:\n  source: {MEDIA / 'obama.jpg'}\n"
        f"dave:\n  source: {MEDIA / 'biden.jpg'}\n  swapper: inswapper\n  recogniser: arcface\n"
    )
    svc = make_service(tmp_path, path, None, token=None, base=StreamSettings(models_dir=folder))
    carol = build_pipeline(svc.settings_for("carol"), name="carol").engine
    dave = build_pipeline(svc.settings_for("dave"), name="dave").engine
    assert type(carol.swapper).__name__ == "MeshSwapper"
    assert type(dave.swapper).__name__ == "LearnedSwapper"
    assert dave.models.recogniser is dave.swapper.recogniser  # one ArcFace for both jobs

    path.write_text(f"erin:\n  source: {MEDIA / 'obama.jpg'}\n  upscaler: x\n")
    with pytest.raises(FacecastError, match="unknown fields upscaler"):
        load_profiles(path)


def test_serve_refuses_to_start_on_a_port_in_use(tmp_path):
    """A taken HTTP port is an error at start, not a service that only looks up."""
    import socket

    http_port, rtmp_port, hls_port = free_ports(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", http_port))
        taken.listen()
        svc = Service(
            {},
            token=None,
            http_port=http_port,
            rtmp_port=rtmp_port,
            hls_port=hls_port,
            prefix=tmp_path / "ingest",
        )
        with pytest.raises(FacecastError, match=f"did not start on 127.0.0.1:{http_port}"):
            svc.start()
    assert not port_accepts(rtmp_port)  # nginx was never started


# ---------------------------------------------------------------------------- stream life
# Real nginx and ffmpeg publishers on the `service` fixture (with a state folder).

AUTH_ONLY = {"Authorization": f"Bearer {TOKEN}"}


def api_url(service: Service, path: str) -> str:
    return f"http://127.0.0.1:{service.http_port}{path}"


def stream_status(service: Service, key: str) -> dict | None:
    reply = httpx.get(api_url(service, f"/api/streams/{key}"), headers=AUTH, timeout=10)
    return reply.json() if reply.status_code == 200 else None


def state_is(service: Service, key: str, state: str) -> bool:
    status = stream_status(service, key)
    return status is not None and status["state"] == state


def frame_counters(service: Service, key: str) -> dict[str, float]:
    text = httpx.get(api_url(service, "/metrics"), timeout=10).text
    return {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "facecast_frames_total" and sample.labels["stream"] == key
    }


def test_an_ended_stream_keeps_its_final_counts_in_the_api_and_metrics(service, live_procs):
    # a publisher that stops by itself after 12 s: nginx's publish_done ends the stream
    live_procs.add(publish(service.ingest.rtmp_url("live", "alice"), CLIP, duration=12))
    wait_for_stream(service.ingest.rtmp_url("swapped", "alice"), timeout=40)
    assert state_is(service, "alice", "running")
    assert wait_until(lambda: state_is(service, "alice", "ended"), 60), stream_status(
        service, "alice"
    )
    ended = stream_status(service, "alice")
    assert ended is not None and ended["frames"]["in"] > 0 and ended["ended"] is not None
    counters = frame_counters(service, "alice")
    print("ended", ended["frames"], "metrics", counters)
    assert counters == {r: ended["frames"][r] for r in ("swapped", "passed", "failed", "dropped")}
    assert counters["swapped"] > 0
    time.sleep(1.0)
    assert stream_status(service, "alice") == ended  # final values, and still listed
    assert frame_counters(service, "alice") == counters
    metrics = httpx.get(api_url(service, "/metrics"), timeout=10).text
    assert "facecast_streams_active 0.0" in metrics
    listed = httpx.get(api_url(service, "/api/streams"), headers=AUTH, timeout=10).json()["streams"]
    assert [(s["key"], s["state"]) for s in listed] == [("alice", "ended")]

    # a new publish on the key replaces the ended entry
    live_procs.add(publish(service.ingest.rtmp_url("live", "alice"), CLIP, loop=True))
    assert wait_until(lambda: state_is(service, "alice", "running"), 40)
    again = stream_status(service, "alice")
    assert again is not None and again["started"] > ended["started"]  # ISO UTC sorts as text
    assert again["ended"] is None


def test_a_face_changed_on_a_stream_survives_the_publishers_reconnect(
    service, live_procs, analyser, embedder, tmp_path
):
    faces = {n: embedding(analyser, embedder, n) for n in ("biden.jpg", "alex-lacamoire.png")}
    live_in, swapped = (service.ingest.rtmp_url(app, "bob") for app in ("live", "swapped"))
    first = live_procs.add(publish(live_in, CLIP, loop=True))
    wait_for_stream(swapped, timeout=40)
    photo = (MEDIA / "alex-lacamoire.png").read_bytes()
    reply = httpx.post(
        api_url(service, "/api/streams/bob/source"),
        files={"file": ("alex.png", photo, "image/png")},  # multipart, as curl -F sends it
        headers=AUTH_ONLY,
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["profile_updated"] is True
    profile = httpx.get(api_url(service, "/api/profiles"), headers=AUTH, timeout=10).json()["bob"]
    assert profile["source"] != "biden.jpg" and profile["faces"] == "all"

    stop_process(first)
    assert wait_until(lambda: state_is(service, "bob", "ended"), 30)
    live_procs.add(publish(live_in, CLIP, loop=True))
    assert wait_until(lambda: state_is(service, "bob", "running"), 40)
    wait_for_stream(swapped, timeout=40)
    frames = grab_face_frames(swapped, analyser, 12, 40)
    after = identity_distances(analyser, embedder, frames, faces)
    print("after the reconnect", after)
    assert after["alex-lacamoire.png"] < after["biden.jpg"]
    assert stream_status(service, "bob")["source_face"] == profile["source"]

    # and it is in the state: a service started on the same folder has it
    restarted = make_service(tmp_path / "again", tmp_path / "profiles.yaml", tmp_path / "state")
    try:
        assert restarted.profiles["bob"] == service.profiles["bob"]
        alex = read_image(MEDIA / "alex-lacamoire.png")
        assert np.array_equal(read_image(restarted.profiles["bob"].source), alex)
    finally:
        restarted.stop()


def test_deleting_a_profile_lets_its_stream_run_to_its_end_and_refuses_the_key_after(
    service, live_procs
):
    live_in = service.ingest.rtmp_url("live", "bob")
    publisher = live_procs.add(publish(live_in, CLIP, loop=True))
    wait_for_stream(service.ingest.rtmp_url("swapped", "bob"), timeout=40)
    url = api_url(service, "/api/profiles/bob")
    assert httpx.delete(url, timeout=10).status_code == 401
    assert (
        httpx.delete(api_url(service, "/api/profiles/mallory"), headers=AUTH_ONLY).status_code
        == 404
    )
    reply = httpx.delete(url, headers=AUTH_ONLY, timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"key": "bob", "deleted": True, "stream_running": True}
    assert (
        "bob" not in httpx.get(api_url(service, "/api/profiles"), headers=AUTH, timeout=10).json()
    )
    assert httpx.delete(url, headers=AUTH_ONLY, timeout=10).status_code == 404

    # the running stream goes on...
    before = stream_status(service, "bob")["frames"]["out"]
    assert wait_until(lambda: stream_status(service, "bob")["frames"]["out"] > before + 10, 20)
    assert state_is(service, "bob", "running")
    # ...until its publisher stops; then the key is refused like any unknown one
    stop_process(publisher)
    assert wait_until(lambda: state_is(service, "bob", "ended"), 30)
    ended = stream_status(service, "bob")
    refused = live_procs.add(publish(live_in, CLIP, loop=True))
    assert wait_until(lambda: refused.poll() is not None, 15), "nginx let a deleted key publish"
    assert refused.returncode != 0
    assert stream_status(service, "bob")["started"] == ended["started"]


# ---------------------------------------------------------------------------- persistence


def upload(name: str) -> dict:
    return {"file": (name, (MEDIA / name).read_bytes(), "application/octet-stream")}


def test_profile_changes_through_the_api_survive_a_restart(tmp_path):
    path = tmp_path / "profiles.yaml"
    state = tmp_path / "state"
    path.write_text(
        f"alice:\n  source: {MEDIA / 'obama.jpg'}\n"
        f"bob:\n  source: {MEDIA / 'biden.jpg'}\n"
        f"dave:\n  source: {MEDIA / 'obama.jpg'}\n"
    )
    svc = make_service(tmp_path, path, state)
    client = TestClient(svc.app)
    reply = client.put(
        "/api/profiles/carol",
        params={"faces": "largest", "blend": "poisson"},
        files=upload("alex-lacamoire.png"),
        headers=AUTH,
    )
    assert reply.status_code == 200, reply.text
    references = {
        "photo": ("lin.png", (MEDIA / "lin-manuel-miranda.png").read_bytes(), "image/png"),
        "face": ("alex.png", (MEDIA / "alex-lacamoire.png").read_bytes(), "image/png"),
    }
    reply = client.post("/api/profiles/alice/references", files=references, headers=AUTH)
    assert reply.status_code == 200, reply.text
    # a face that the next PUT replaces: stored in the state, then named by nothing
    first = client.put("/api/profiles/alice", files=upload("obama.jpg"), headers=AUTH)
    assert first.status_code == 200, first.text
    replaced_face = svc.profiles["alice"].source
    assert replaced_face.parent == state / "faces"
    reply = client.put(
        "/api/profiles/alice", content=(MEDIA / "biden.jpg").read_bytes(), headers=AUTH
    )
    assert reply.status_code == 200, reply.text
    assert client.delete("/api/profiles/bob", headers=AUTH).status_code == 200
    listed = client.get("/api/profiles", headers=AUTH).json()
    assert sorted(listed) == ["alice", "carol", "dave"]
    assert not list(state.rglob("*.tmp"))  # every write was moved into place whole
    svc.stop()
    saved = yaml.safe_load((state / "profiles.yaml").read_text())
    assert sorted(saved["profiles"]) == ["alice", "carol"] and saved["deleted"] == ["bob"]

    # meanwhile the operator edits the file: dave (never touched by the API) follows it;
    # alice was changed through the API, so the state's alice wins
    path.write_text(
        f"alice:\n  source: {MEDIA / 'obama.jpg'}\n  blend: poisson\n"
        f"bob:\n  source: {MEDIA / 'biden.jpg'}\n"
        f"dave:\n  source: {MEDIA / 'obama.jpg'}\n  blend: poisson\n"
    )
    again = make_service(tmp_path, path, state)
    try:
        relisted = TestClient(again.app).get("/api/profiles", headers=AUTH).json()
        assert sorted(relisted) == ["alice", "carol", "dave"]  # bob stays deleted
        assert relisted["carol"] == listed["carol"]
        assert relisted["carol"]["faces"] == "largest" and relisted["carol"]["blend"] == "poisson"
        assert relisted["alice"] == listed["alice"] and relisted["alice"]["blend"] == "feather"
        assert len(relisted["alice"]["references"]) == 1
        assert relisted["dave"]["blend"] == "poisson"
        settings = again.settings_for("alice")
        ((photo, face),) = settings.references
        assert np.array_equal(read_image(photo), read_image(MEDIA / "lin-manuel-miranda.png"))
        assert np.array_equal(read_image(face), read_image(MEDIA / "alex-lacamoire.png"))
        assert np.array_equal(read_image(settings.source_image), read_image(MEDIA / "biden.jpg"))
        assert not replaced_face.exists()  # no profile names it any more: removed at start

        # a deleted file key can be set again; a key only the API made can be deleted
        client = TestClient(again.app)
        assert (
            client.put("/api/profiles/bob", files=upload("obama.jpg"), headers=AUTH).status_code
            == 200
        )
        assert client.delete("/api/profiles/carol", headers=AUTH).status_code == 200
    finally:
        again.stop()
    third = make_service(tmp_path, path, state)
    try:
        assert sorted(third.profiles) == ["alice", "bob", "dave"]
        assert third.profiles["bob"].source.parent == state / "faces"
    finally:
        third.stop()
    assert yaml.safe_load((state / "profiles.yaml").read_text())["deleted"] == []


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("profiles: [1, 2]\n", "expected `profiles:`"),
        ("profiles: {}\ndeleted: 7\n", "expected `profiles:`"),
        ("profiles:\n  alice:\n    source: faces/gone.png\n", r"'alice'.*gone.png not found"),
        ("profiles: {alice: {source: x.png\n", "cannot read the profiles"),
    ],
)
def test_a_broken_state_is_an_error_that_names_the_file(tmp_path, content, error):
    path = write_profiles(tmp_path, {"alice": "obama.jpg"})
    state = tmp_path / "state"
    state.mkdir()
    (state / "profiles.yaml").write_text(content)
    with pytest.raises(FacecastError, match=error) as caught:
        make_service(tmp_path, path, state)
    assert str(state / "profiles.yaml") in str(caught.value)


def test_profile_and_reference_uploads_take_multipart_with_the_same_checks(api, analyser):
    svc, client = api
    table = read_image(MEDIA / "group_t1.jpg")[600:, :400]  # a real photo with no face
    assert analyser.analyse(table) == []
    faceless, text = png(table), b"plain text, no image"
    big = (MEDIA / "obama.jpg").read_bytes()
    big += b"\0" * (MAX_UPLOAD_BYTES + 1 - len(big))
    lin = (MEDIA / "lin-manuel-miranda.png").read_bytes()
    alex = (MEDIA / "alex-lacamoire.png").read_bytes()

    def put(data: bytes, field: str = "file"):
        return client.put("/api/profiles/erin", files={field: ("x", data)}, headers=AUTH)

    assert client.put("/api/profiles/erin", files={"file": ("x", alex)}).status_code == 401
    assert put(big).status_code == 413
    assert put(text).status_code == 415
    reply = put(faceless)
    assert reply.status_code == 422 and "no face" in reply.json()["detail"], reply.text
    reply = put(alex, field="photo")
    assert reply.status_code == 422 and "'photo'" in reply.json()["detail"], reply.text
    assert "erin" not in svc.profiles
    reply = put(alex)
    assert reply.status_code == 200, reply.text
    assert np.array_equal(
        read_image(svc.profiles["erin"].source), read_image(MEDIA / "alex-lacamoire.png")
    )

    url = "/api/profiles/alice/references"

    def post(**parts: bytes):
        files = {name: (f"{name}.img", data) for name, data in parts.items()}
        return client.post(url, files=files, headers=AUTH)

    assert post(photo=big).status_code == 413
    reply = post(photo=lin, face=big)
    assert reply.status_code == 413 and "face" in reply.json()["detail"], reply.text
    assert post(photo=text).status_code == 415
    assert post(photo=lin, face=text).status_code == 415
    reply = post(photo=faceless)
    assert reply.status_code == 422 and "reference photo" in reply.json()["detail"], reply.text
    reply = post(photo=lin, face=faceless)
    assert reply.status_code == 422 and "reference face" in reply.json()["detail"], reply.text
    reply = post(face=alex)
    assert reply.status_code == 422 and "photo" in reply.json()["detail"], reply.text
    reply = post(photo=lin, colour=b"red")
    assert reply.status_code == 422 and "'colour'" in reply.json()["detail"], reply.text
    assert svc.profiles["alice"].references == ()
    assert len(list(svc._uploads.iterdir())) == 1  # erin's face; nothing refused was kept

    assert post(photo=lin).status_code == 200
    reply = post(photo=lin, face=alex)
    assert reply.status_code == 200, reply.text
    assert [r["face"] is None for r in reply.json()["references"]] == [True, False]
    (_, none), (_, face) = svc.profiles["alice"].references
    assert none is None and np.array_equal(
        read_image(face), read_image(MEDIA / "alex-lacamoire.png")
    )


def test_the_default_state_folder_follows_xdg_and_an_unwritable_one_is_not_fatal(
    tmp_path, monkeypatch, caplog
):
    from facecast.serve.profiles import resolve_state_dir

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert resolve_state_dir(None) == tmp_path / "xdg" / "facecast"
    assert (tmp_path / "xdg" / "facecast").is_dir()
    assert resolve_state_dir(tmp_path / "mine") == tmp_path / "mine"  # asked for: as given
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_STATE_HOME", str(blocker))  # a read-only root fails the same way
    assert resolve_state_dir(None) is None
    assert "FACECAST_STATE_DIR" in caplog.text


def test_several_photos_through_the_api_become_the_profiles_source_folder(tmp_path):
    """Repeated `file` parts: the running stream takes all of them (each face gets the
    nearest in expression), and they are kept as the key's source, a folder in the state,
    across a restart."""
    from .test_server import idle_stream

    path = tmp_path / "profiles.yaml"
    path.write_text(f"alice:\n  source: {MEDIA / 'obama.jpg'}\n")
    state = tmp_path / "state"
    svc = make_service(tmp_path, path, state)
    try:
        idle_stream(svc.manager, "alice", tmp_path / "alice.ts")
        client = TestClient(svc.app)
        people = MEDIA / "people"
        files = [
            ("file", (n, (people / n).read_bytes(), "image/jpeg"))
            for n in ("jolie1.jpg", "jolie2.jpg")
        ]
        reply = client.post("/api/streams/alice/source", files=files, headers=AUTH)
        assert reply.status_code == 200, reply.text
        assert reply.json()["photos"] == 2 and reply.json()["profile_updated"]
        assert len(svc.manager.get("alice").pipeline.engine.source_set.names) == 2
        folder = svc.profiles["alice"].source
        assert folder.is_dir() and len(list(folder.glob("*.png"))) == 2
        # a single photo still needs exactly one part on the routes that take one image
        twice = client.put("/api/profiles/bob", files=files, headers=AUTH)
        assert twice.status_code == 422 and "twice" in twice.json()["detail"]
    finally:
        svc.manager.stop_all()
        svc.stop()
    again = make_service(tmp_path, path, state)
    try:
        assert again.profiles["alice"].source == folder
        assert (
            len(build_pipeline(again.settings_for("alice"), name="alice").engine.source_set.names)
            == 2
        )
    finally:
        again.stop()


def test_serve_on_loopback_can_still_ask_viewers_for_a_play_token(tmp_path, live_procs):
    """Viewer auth is off by default on loopback; ``--viewer-auth`` turns it on there too."""
    proc, log_path, ports = start_serve(
        tmp_path, live_procs, "--host", "127.0.0.1", "--viewer-auth"
    )
    plain = httpx.get(f"http://127.0.0.1:{ports['hls']}/hls/dave.m3u8", timeout=5)
    assert plain.status_code == 403  # without auth: 404 (nothing published yet)
    play = httpx.get(
        f"http://127.0.0.1:{ports['http']}/api/play/dave",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert play.status_code == 200 and "token=" in play.json()["rtmp"], play.text
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, log_path.read_text()[-3000:]
