"""Consent, moderation and the audit log of face changes (`serve --require-consent`,
`--moderation-url`, `--audit-log`; `facecast consent`).

Real HTTP throughout: the service's app on uvicorn (no nginx: no stream here needs a
publisher), a real moderation webhook on a thread, real running streams read from a file,
and the real command line in subprocesses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from fastapi.testclient import TestClient

from facecast.bench.handoff import RedisServer
from facecast.config import StreamSettings
from facecast.errors import FacecastError
from facecast.media.image_io import decode_image_bytes
from facecast.safety.audit import AuditLog, image_sha256, read_audit, token_id
from facecast.safety.consent import ConsentRegistry
from facecast.serve.app import ThreadedServer
from facecast.serve.ingest import free_port
from facecast.serve.profiles import Profile
from facecast.serve.service import Service
from facecast.serve.store import ClusterStore
from facecast.serve.worker import Worker

from .conftest import MEDIA, REPO
from .test_service import service_on_free_ports

TOKEN = "consent-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PEOPLE = MEDIA / "people"
CLIP = MEDIA / "short_hamilton_clip.mp4"
ANISTON = "Jennifer Aniston"


def photo(name: str) -> bytes:
    return (PEOPLE / name).read_bytes()


def decoded(name: str) -> np.ndarray:
    return decode_image_bytes(photo(name), name)


def make_service(tmp_path: Path, profiles: dict | None = None, **options) -> Service:
    if "store" not in options:
        options["state_dir"] = tmp_path / "state"
    return service_on_free_ports(tmp_path, profiles or {}, token=TOKEN, **options)


@contextlib.contextmanager
def serving(svc: Service) -> Iterator[httpx.Client]:
    """The service's HTTP plane alone on a real port (nginx is not needed here)."""
    server = ThreadedServer(svc.app, "127.0.0.1", svc.http_port)
    server.start()
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{svc.http_port}", headers=AUTH, timeout=30
        ) as client:
            yield client
    finally:
        svc.stop()  # closes web sessions on the server's loop, so while it still runs
        server.stop()


def start_stream(svc: Service | Worker, key: str, source: Path, tmp_path: Path):
    """A running stream on ``key``, read from the clip at its pace (looping: it must still
    run when the test changes its face)."""
    settings = StreamSettings(
        source_image=source, input=str(CLIP), output=str(tmp_path / f"{key}.ts"), realtime=True
    )
    handle = svc.manager.start(key, settings)
    handle.pipeline.source.loop_file = True
    return handle


def web_offer() -> str:
    """A browser's SDP offer (video both ways), made by aiortc as a page's would be."""

    async def make() -> str:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make())


# ---------------------------------------------------------------------------- consent


def test_only_enrolled_people_are_accepted_as_source_faces_on_every_path(tmp_path):
    svc = make_service(tmp_path, require_consent=True)
    with serving(svc) as http:
        # enrol from one photo; the registry keeps its hash and descriptor, not the photo
        wrong = {"Authorization": "Bearer wrong"}
        assert http.post("/api/consent", params={"name": ANISTON}, headers=wrong).status_code == 401
        enrolled = http.post(
            "/api/consent", params={"name": ANISTON}, content=photo("aniston1.jpg")
        )
        assert enrolled.status_code == 200, enrolled.text
        listed = http.get("/api/consent").json()
        ((person,),) = [listed["people"]]
        assert person["name"] == ANISTON and listed["required"] is True
        assert [p["sha256"] for p in person["photos"]] == [image_sha256(decoded("aniston1.jpg"))]
        assert "embedding" not in json.dumps(listed)
        assert not list((tmp_path / "state").rglob("*.jpg")), "the photo itself is not kept"

        # the API's profile face: her OTHER photo (25 years apart) is her; a stranger is not
        ok = http.put("/api/profiles/alice", content=photo("aniston2.jpg"))
        assert ok.status_code == 200, ok.text
        refused = http.put("/api/profiles/bob", content=photo("musk1.jpg"))
        assert refused.status_code == 403, refused.text
        assert refused.json()["detail"] == "source: face not in the consent registry"
        assert "bob" not in svc.profiles

        # references: the face put on someone needs consent; who gets swapped does not
        url = "/api/profiles/alice/references"
        stranger_face = {
            "photo": ("p.jpg", photo("musk1.jpg")),
            "face": ("f.jpg", photo("musk2.jpg")),
        }
        refused = http.post(url, files=stranger_face)
        assert refused.status_code == 403 and "face: face not in" in refused.text, refused.text
        assert svc.profiles["alice"].references == ()
        her_face = {
            "photo": ("p.jpg", photo("musk1.jpg")),
            "face": ("f.jpg", photo("aniston2.jpg")),
        }
        assert http.post(url, files=her_face).status_code == 200
        assert len(svc.profiles["alice"].references) == 1

        # a running stream's face: refused, it keeps the face it had
        handle = start_stream(svc, "alice", PEOPLE / "aniston1.jpg", tmp_path)
        before = handle.pipeline.engine.source
        refused = http.post("/api/streams/alice/source", content=photo("jolie1.jpg"))
        assert refused.status_code == 403, refused.text
        assert refused.json()["detail"] == "source: face not in the consent registry"
        assert handle.pipeline.engine.source is before and handle.running
        ok = http.post(
            "/api/streams/alice/source", files={"file": ("a.jpg", photo("aniston2.jpg"))}
        )
        assert ok.status_code == 200, ok.text
        assert handle.pipeline.engine.source is not before

        # the web page: a sample face and an upload get the same check
        sample = http.post(
            "/api/web/sessions", json={"sdp": web_offer(), "type": "offer", "face": "obama.jpg"}
        )
        assert sample.status_code == 403 and "not in the consent registry" in sample.text
        assert svc.web.sessions() == []
        session = http.post("/api/web/sessions", json={"sdp": web_offer(), "type": "offer"})
        assert session.status_code == 200, session.text
        face_url = f"/api/web/sessions/{session.json()['session']}/face"
        refused = http.put(face_url, content=photo("dorsey1.jpg"))
        assert refused.status_code == 403, refused.text
        assert http.put(face_url, content=photo("aniston2.jpg")).status_code == 200

        # consent withdrawn: her face is refused from then on
        assert http.delete(f"/api/consent/{ANISTON}").status_code == 200
        assert http.delete(f"/api/consent/{ANISTON}").status_code == 404
        assert http.put("/api/profiles/carol", content=photo("aniston2.jpg")).status_code == 403

    lines = read_audit(tmp_path / "state" / "audit.log")
    seen = [(line["change"], line["outcome"]) for line in lines]
    assert seen == [
        ("consent_add", "allowed"),
        ("profile_set", "allowed"),
        ("profile_set", "denied"),
        ("reference", "denied"),
        ("reference", "allowed"),
        ("stream_source", "denied"),
        ("stream_source", "allowed"),
        ("web_face", "denied"),  # a sample face (opening a session without one is no change)
        ("web_face", "denied"),
        ("web_face", "allowed"),
        ("consent_remove", "allowed"),
        ("consent_remove", "failed"),
        ("profile_set", "denied"),
    ], seen
    denied_stream = lines[5]
    assert denied_stream["key"] == "alice" and denied_stream["status"] == 403
    assert denied_stream["reason"] == "source: face not in the consent registry"
    (face,) = denied_stream["faces"]
    assert face["sha256"] == image_sha256(decoded("jolie1.jpg"))
    assert face["consented"] is False and face["distance"] >= 0.6
    allowed = lines[1]["faces"][0]
    assert allowed["person"] == ANISTON and allowed["distance"] < 0.6, allowed
    assert {f["role"] for f in lines[4]["faces"]} == {"photo", "face"}
    assert (
        lines[0]["person"] == ANISTON
        and lines[0]["faces"][0]["sha256"] == person["photos"][0]["sha256"]
    )
    for line in lines:
        assert line["time"].endswith("Z") and line["client"] == "127.0.0.1"
        assert line["token"] == token_id(TOKEN)
    assert TOKEN not in (tmp_path / "state" / "audit.log").read_text()


# ---------------------------------------------------------------------------- moderation


class Webhook:
    """The operator's moderation service: answers as ``mode`` says, keeps what it got."""

    def __init__(self) -> None:
        self.mode = "allow"
        self.received: list[dict] = []
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                webhook.received.append(
                    {"body": json.loads(body), "auth": self.headers.get("Authorization")}
                )
                if webhook.mode == "slow":
                    time.sleep(3)
                status, reply = {
                    "allow": (200, {"allow": True}),
                    "deny": (200, {"allow": False, "reason": "not on this channel"}),
                    "slow": (200, {"allow": True}),
                    "error": (500, {"allow": True}),
                    "garbage": (200, {"allowed": "yes"}),
                }[webhook.mode]
                data = json.dumps(reply).encode()
                with contextlib.suppress(OSError):  # the slow one's caller has left
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/moderate"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def test_the_webhook_decides_and_a_refused_face_leaves_the_running_stream_as_it_was(
    tmp_path, webhook, monkeypatch
):
    monkeypatch.setenv("FACECAST_MODERATION_TOKEN", "hook-secret")
    audit = tmp_path / "logs" / "faces.jsonl"
    svc = make_service(
        tmp_path, moderation_url=webhook.url, moderation_timeout=1.0, audit_log=audit
    )
    with serving(svc) as http:
        handle = start_stream(svc, "cam", PEOPLE / "damon1.jpg", tmp_path)
        before = handle.pipeline.engine.source
        url = "/api/streams/cam/source"

        webhook.mode = "deny"
        reply = http.post(url, content=photo("pichai1.jpg"))
        assert reply.status_code == 403, reply.text
        assert reply.json()["detail"] == "denied by moderation: not on this channel"

        webhook.mode = "slow"  # no answer within the timeout: denied, not waited for
        started = time.monotonic()
        reply = http.post(url, content=photo("pichai1.jpg"))
        assert reply.status_code == 403 and "no answer within 1 s" in reply.text, reply.text
        assert time.monotonic() - started < 2.5

        for mode in ("error", "garbage"):
            webhook.mode = mode
            assert http.post(url, content=photo("pichai1.jpg")).status_code == 403, mode
        assert handle.pipeline.engine.source is before, "a refused face changed the stream"
        assert handle.running

        webhook.mode = "allow"
        reply = http.post(url, content=photo("pichai1.jpg"))
        assert reply.status_code == 200, reply.text
        assert handle.pipeline.engine.source is not before

        # the profile API asks too: denied, nothing is set
        webhook.mode = "deny"
        assert http.put("/api/profiles/studio", content=photo("musk1.jpg")).status_code == 403
        assert "studio" not in svc.profiles

    # what the webhook was sent: the change, the key, who asked, the image itself
    sent = webhook.received[0]
    assert sent["auth"] == "Bearer hook-secret"
    body = sent["body"]
    assert body["version"] == 1 and body["change"] == "stream_source" and body["key"] == "cam"
    assert body["requester"] == {"token": token_id(TOKEN), "client": "127.0.0.1"}
    (image,) = body["images"]
    assert image["role"] == "source" and image["type"] == "image/png"
    png = np.frombuffer(base64.b64decode(image["data"]), np.uint8)
    assert np.array_equal(cv2.imdecode(png, cv2.IMREAD_COLOR), decoded("pichai1.jpg"))
    assert image["sha256"] == image_sha256(decoded("pichai1.jpg"))
    assert len(webhook.received) == 6  # every change it was asked about, none twice

    lines = read_audit(audit)
    assert [(line["change"], line["allowed"]) for line in lines] == [
        *[("stream_source", False)] * 4,
        ("stream_source", True),
        ("profile_set", False),
    ]
    reasons = [line["reason"] for line in lines]
    assert reasons[0] == "denied by moderation: not on this channel"
    assert "no answer within 1 s" in reasons[1] and "HTTP 500" in reasons[2]
    assert reasons[4] is None and lines[4]["moderation"] == "allowed"
    assert all(line["outcome"] == "denied" for line in lines if not line["allowed"])
    assert lines[0]["faces"] == [{"role": "source", "sha256": image["sha256"]}]
    assert TOKEN not in audit.read_text() and "hook-secret" not in audit.read_text()


# ---------------------------------------------------------------------------- the audit log


def test_audit_lines_from_concurrent_writers_are_all_there_and_whole(tmp_path):
    path = tmp_path / "audit.log"
    # two logs on one file: as serve and `facecast consent` in two processes (flock)
    logs = [AuditLog(path), AuditLog(path)]
    padding = "x" * 5000  # longer than a pipe's atomic write: interleaving would show

    def write(n: int) -> None:
        for i in range(100):
            logs[n % 2].write({"writer": n, "i": i, "padding": padding})

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = read_audit(path)
    assert len(lines) == 800
    assert sorted((line["writer"], line["i"]) for line in lines) == [
        (n, i) for n in range(8) for i in range(100)
    ]
    assert (path.stat().st_mode & 0o777) == 0o600


# ---------------------------------------------------------------------------- the command line


def facecast(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "facecast.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_consent_commands_round_trip_and_serve_refuses_an_unconsented_profile(tmp_path):
    state = tmp_path / "state"
    added = facecast(
        "consent", "add", PEOPLE / "aniston1.jpg", "--name", ANISTON, "--state-dir", state
    )
    assert added.returncode == 0, added.stderr
    listed = facecast("consent", "list", "--state-dir", state)
    assert listed.returncode == 0 and ANISTON in listed.stdout, listed.stdout + listed.stderr
    assert image_sha256(decoded("aniston1.jpg"))[:12] in listed.stdout

    # the profiles file: alice is enrolled (her other photo), bob's face is nobody's
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(
        f"alice:\n  source: {PEOPLE / 'aniston2.jpg'}\n"
        f"bob:\n  source: {PEOPLE / 'zuckerberg1.jpg'}\n"
    )
    port = free_port()
    refused = facecast(
        "serve",
        "--profiles",
        profiles,
        "--state-dir",
        state,
        "--http-port",
        port,
        "--require-consent",
    )
    assert refused.returncode == 2, refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: profile 'bob': "), refused.stderr
    assert "zuckerberg1.jpg: face not in the consent registry" in errors[0]

    # a bad name, an unknown name: one line, exit 2
    bad = facecast("consent", "add", PEOPLE / "musk1.jpg", "--name", "../x", "--state-dir", state)
    assert bad.returncode == 2 and bad.stderr.startswith("error: consent name"), bad.stderr
    removed = facecast("consent", "remove", ANISTON, "--state-dir", state)
    assert removed.returncode == 0, removed.stderr
    again = facecast("consent", "remove", ANISTON, "--state-dir", state)
    assert again.returncode == 2 and "not in the consent registry" in again.stderr
    assert ConsentRegistry.in_folder(state).people() == []

    lines = read_audit(state / "audit.log")
    assert [(line["change"], line["outcome"]) for line in lines] == [
        ("consent_add", "allowed"),
        ("consent_remove", "allowed"),
    ]
    assert lines[0]["client"].startswith("cli:") and lines[0]["token"] is None


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_in_a_cluster_the_registry_lives_in_the_store(tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    try:
        added = facecast(
            "consent", "add", PEOPLE / "aniston1.jpg", "--name", ANISTON, "--store", redis.url
        )
        assert added.returncode == 0, added.stderr
        assert not (tmp_path / "state").exists()
        store = ClusterStore(redis.url)
        assert [p["name"] for p in ConsentRegistry.in_store(store).people()] == [ANISTON]
        # the ingest (which takes every face change in a cluster) checks against it
        profiles = {"alice": Profile(PEOPLE / "aniston2.jpg")}
        ingest = make_service(tmp_path, require_consent=True, store=store, profiles=profiles)
        try:
            client = TestClient(ingest.app, headers=AUTH)
            refused = client.put("/api/profiles/bob", content=photo("damon2.jpg"))
            assert refused.status_code == 403, refused.text
            assert (
                client.put("/api/profiles/carol", content=photo("aniston2.jpg")).status_code == 200
            )
            assert client.delete(f"/api/consent/{ANISTON}").status_code == 200
        finally:
            ingest.stop()
        assert ConsentRegistry.in_store(store).people() == []
        with pytest.raises(FacecastError, match=r"profile 'alice': .*aniston2\.jpg: face not in"):
            make_service(tmp_path, require_consent=True, store=store, profiles=profiles)

        # a worker's own API (a running stream's face) checks against the same registry
        assert (
            facecast(
                "consent", "add", PEOPLE / "aniston1.jpg", "--name", ANISTON, "--store", redis.url
            ).returncode
            == 0
        )
        audit = tmp_path / "worker-audit.log"
        worker = Worker(
            store, token=TOKEN, require_consent=True, http_port=free_port(), audit_log=audit
        )
        start_stream(worker, "alice", PEOPLE / "aniston1.jpg", tmp_path)
        try:
            client = TestClient(worker.app, headers=AUTH)
            refused = client.post("/api/streams/alice/source", content=photo("damon2.jpg"))
            assert refused.status_code == 403 and "consent" in refused.text, refused.text
            taken = client.post("/api/streams/alice/source", content=photo("aniston2.jpg"))
            assert taken.status_code == 200, taken.text
        finally:
            worker.manager.stop_all()
        assert [e["allowed"] for e in read_audit(audit)] == [False, True]
    finally:
        redis.stop()
