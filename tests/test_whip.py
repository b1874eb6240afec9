"""WHIP in and WHEP out of `facecast serve`, with real WebRTC stacks on both ends: headless
Chromium publishes its (fake) camera over WHIP and plays the watch page over WHEP, and a
Python aiortc client watches as a second viewer. Outputs are judged by identity.

FFmpeg's own WHIP muxer (in PyAV's FFmpeg 8.1, built on GnuTLS) publishes a face video
too, given an ECDSA P-256 certificate (the one it makes itself fails the DTLS handshake
with aiortc). Debian's simple-whip-client cannot start here: bookworm's whip-client links
libsoup 2, GStreamer's webrtc and nice plugins link libsoup 3. See docs/webrtc.md.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import av
import cv2
import httpx
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from facecast.serve.service import Service, load_profiles
from tests import live_helpers
from tests.live_helpers import publish, stop_process, wait_for_stream, wait_until

from . import test_web_page as web_page
from .conftest import MEDIA, REPO
from .media_helpers import identity_distances
from .test_live_stream import SINGER_WIDTH, grab_face_frames
from .test_service import service_on_free_ports, write_profiles

# fixtures shared with the web page's tests: Chromium with a fake camera showing a face
live_procs = live_helpers.live_procs
browser, camera_file = web_page.browser, web_page.camera_file
identities, new_page = web_page.identities, web_page.new_page
pytestmark = pytest.mark.slow

TOKEN = "whip-token"
SOURCE = "obama.jpg"  # the key's face; the camera shows lin-manuel-miranda
CLIP = MEDIA / "short_hamilton_clip.mp4"

# Publishes the page's camera to WHIP_URL; resolves with the session's Location.
WHIP_PUBLISH = """
async ([url, token, withAudio]) => {
  const stream = await navigator.mediaDevices.getUserMedia({video: true, audio: !!withAudio});
  const pc = new RTCPeerConnection();
  for (const track of stream.getTracks()) pc.addTransceiver(track, {direction: "sendonly"});
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((done) => {
    if (pc.iceGatheringState === "complete") return done();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && done();
    setTimeout(done, 3000);
  });
  const reply = await fetch(url, {method: "POST", body: pc.localDescription.sdp,
    headers: {"Content-Type": "application/sdp", "Authorization": `Bearer ${token}`}});
  if (reply.status !== 201) throw new Error(`${reply.status} ${await reply.text()}`);
  await pc.setRemoteDescription({type: "answer", sdp: await reply.text()});
  window.whipPc = pc;
  return reply.headers.get("Location");
}
"""


@pytest.fixture
def service(tmp_path):
    profiles = load_profiles(write_profiles(tmp_path, {"cam": SOURCE}))
    svc = service_on_free_ports(tmp_path, profiles, token=TOKEN)
    svc.start()
    yield svc
    svc.stop()


def api(svc: Service, path: str) -> str:
    return f"http://127.0.0.1:{svc.http_port}{path}"


def test_chromium_publishes_over_whip_and_the_key_comes_out_swapped(
    service, new_page, identities, analyser, embedder
):
    page = new_page()
    page.goto(api(service, "/healthz"))  # the page's origin: the service's
    location = page.evaluate(WHIP_PUBLISH, [api(service, "/whip/cam"), TOKEN, True])
    assert location.startswith("/whip/cam/")

    # relayed to live/cam: the key's own pipeline swaps it onto swapped/cam
    wait_for_stream(service.ingest.rtmp_url("swapped", "cam"), timeout=40)
    frames = grab_face_frames(service.ingest.rtmp_url("swapped", "cam"), analyser, 6, 40)
    distances = identity_distances(analyser, embedder, frames, identities)
    print("swapped/cam from WHIP", distances)
    assert distances[SOURCE] < distances["camera"]
    handle = service.manager.get("cam")
    assert handle.running and handle.pipeline.engine.options.label  # the AI label is on
    # the publisher's sound came along (Chromium's fake microphone beeps): AAC, not silent
    codec, loudness = audio_of(service.ingest.rtmp_url("swapped", "cam"), seconds=3)
    print("swapped/cam audio", codec, loudness)
    assert codec == "aac" and loudness > 100, (codec, loudness)

    # DELETE on the Location ends the session, and with it the key's stream
    wrong = httpx.delete(api(service, location), timeout=10)
    assert wrong.status_code == 401  # the publisher's token, not anybody's
    reply = httpx.delete(api(service, location), headers=auth(), timeout=10)
    assert reply.status_code == 200, reply.text
    assert wait_until(lambda: not service.manager.get("cam").running, 20)
    assert httpx.delete(api(service, location), headers=auth(), timeout=10).status_code == 404


def ecdsa_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate and key (PEM), as WebRTC stacks make them."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "whip-publisher")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_ffmpegs_whip_muxer_publishes_a_face_that_comes_out_swapped(
    service, tmp_path, analyser, embedder
):
    """FFmpeg's own WHIP muxer (tests/whip_publisher.py, its own process) publishes the
    clip; the key's output is swapped; SIGTERM closes the muxer, whose DELETE ends the key."""
    cert, key = ecdsa_certificate(tmp_path)
    log = tmp_path / "publisher.log"
    cmd = [sys.executable, "-m", "tests.whip_publisher", api(service, "/whip/cam"), str(CLIP)]
    with log.open("wb") as out:
        publisher = subprocess.Popen(
            [*cmd, TOKEN, str(cert), str(key)], stdout=out, stderr=subprocess.STDOUT, cwd=REPO
        )
    try:
        # swapped/cam exists once the relay has published and the pipeline started: before,
        # nginx refuses to play it
        wait_for_stream(service.ingest.rtmp_url("swapped", "cam"), timeout=40)
        # the singer only: a slow start under load once put the grab in the clip's audience
        # scene, whose one-face frames (small profiles) are nearer nobody
        frames = grab_face_frames(
            service.ingest.rtmp_url("swapped", "cam"), analyser, 6, 40, min_width=SINGER_WIDTH
        )
        publisher.send_signal(signal.SIGTERM)
        assert publisher.wait(30) == 0, log.read_text()[-3000:]
    finally:
        stop_process(publisher)
    assert "published" in log.read_text()
    refs = {SOURCE: embedding_of(analyser, embedder, MEDIA / SOURCE)}
    refs["clip"] = clip_identity(analyser, embedder)
    distances = identity_distances(analyser, embedder, frames, refs)
    print("swapped/cam from FFmpeg's WHIP muxer", distances)
    assert distances[SOURCE] < distances["clip"]
    assert wait_until(lambda: not service.manager.get("cam").running, 20)
    assert service.whip.sessions() == []


def clip_identity(analyser, embedder) -> np.ndarray:
    """The clip's singer, as an embedding (a frame of its one-face stretch)."""
    with av.open(str(CLIP)) as clip:
        for index, frame in enumerate(clip.decode(video=0)):
            if index == 150:
                image = frame.to_ndarray(format="bgr24")
                return embedder.embed(image, analyser.analyse(image)[0])
    raise AssertionError("the clip is shorter than expected")


def embedding_of(analyser, embedder, path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    return embedder.embed(image, analyser.analyse(image)[0])


def test_whep_viewers_share_the_swapped_stream_and_free_it_when_they_leave(
    service, live_procs, new_page, identities, analyser, embedder
):
    live_procs.add(publish(service.ingest.rtmp_url("live", "cam"), CLIP, loop=True))
    wait_for_stream(service.ingest.rtmp_url("swapped", "cam"), timeout=40)

    page = new_page()
    page.goto(api(service, "/web/watch/cam"))
    playing = "() => document.getElementById('video').videoWidth > 0"
    page.wait_for_function(playing, timeout=30_000)
    assert page.errors == []

    # a second viewer: aiortc, decoding what the same reader hands out (on a thread of its
    # own: Playwright's sync API keeps an event loop running on this one)
    with ThreadPoolExecutor(1) as pool:
        frames = pool.submit(asyncio.run, whep_frames(api(service, "/whep/cam"), 8)).result()
    distances = identity_distances(analyser, embedder, frames, {SOURCE: identities[SOURCE]})
    print("WHEP frames", distances)
    assert distances[SOURCE] < 0.5
    assert len(service.whep._feeds) == 1  # one reader of swapped/cam for both viewers

    page.close()
    assert wait_until(lambda: not service.whep._feeds, 20), "the reader outlived its viewers"


async def whep_frames(url: str, n: int) -> list[np.ndarray]:
    """``n`` decoded frames watched over WHEP by an aiortc client (a second, unrelated
    viewer); the session is DELETEd after."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    got: asyncio.Future = asyncio.get_running_loop().create_future()
    pc.on("track", lambda track: got.set_result(track))
    await pc.setLocalDescription(await pc.createOffer())
    async with httpx.AsyncClient(timeout=20) as http:
        reply = await http.post(
            url, content=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}
        )
        assert reply.status_code == 201, reply.text
        await pc.setRemoteDescription(RTCSessionDescription(reply.text, "answer"))
        track = await asyncio.wait_for(got, 20)
        frames = []
        deadline = time.monotonic() + 30
        while len(frames) < n and time.monotonic() < deadline:
            frame = await asyncio.wait_for(track.recv(), 10)
            frames.append(frame.to_ndarray(format="bgr24"))
        location = reply.headers["location"]
        assert (await http.delete(url.rsplit("/whep/", 1)[0] + location)).status_code == 200
    await pc.close()
    return frames


def audio_of(url: str, seconds: float) -> tuple[str, float]:
    """The codec of ``url``'s audio and the loudest 20 ms (RMS of s16 samples) in its
    first ``seconds``."""
    with av.open(url, options={"rw_timeout": "10000000"}) as container:
        stream = container.streams.audio[0]
        loudest, decoded = 0.0, 0.0
        for frame in container.decode(stream):
            samples = frame.to_ndarray().astype(np.float64)
            if frame.format.name.startswith("flt"):
                samples *= 32767
            window = max(1, frame.sample_rate // 50)
            for start in range(0, samples.shape[-1], window):
                chunk = samples[..., start : start + window]
                loudest = max(loudest, float(np.sqrt(np.mean(chunk**2))))
            decoded += frame.samples / frame.sample_rate
            if decoded >= seconds:
                break
        return stream.codec_context.name, loudest


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/sdp"}


AUDIO_ONLY = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
)


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "reason"),
    [
        ("/whip/cam", AUDIO_ONLY, auth(), 400, "no video"),
        ("/whip/cam", "hello", auth(), 400, "not an SDP offer"),
        ("/whip/cam", AUDIO_ONLY, auth("guess"), 401, "API token"),
        ("/whip/cam", AUDIO_ONLY, {"Content-Type": "application/sdp"}, 401, "API token"),
        ("/whip/mallory", AUDIO_ONLY, auth(), 404, "no profile"),
        ("/whip/cam", AUDIO_ONLY, {**auth(), "Content-Type": "text/plain"}, 415, "application/sdp"),
        ("/whep/mallory", AUDIO_ONLY, auth(), 404, "no profile"),
        ("/whep/cam", "v=0\r\nm=video oops", auth(), 400, "cannot"),
    ],
)
def test_bad_offers_are_refused_with_a_reason_and_start_nothing(
    service, path, body, headers, status, reason
):
    reply = httpx.post(api(service, path), content=body, headers=headers, timeout=10)
    assert reply.status_code == status, reply.text
    assert reason in reply.json()["detail"]
    assert service.whip.sessions() == [] and not service.whep._sessions
    assert service.manager.handles() == []


def test_trickle_is_answered_as_the_rfc_says(service):
    reply = httpx.patch(api(service, "/whip/cam/x"), headers=auth(), timeout=10)
    assert reply.status_code == 405 and "DELETE" in reply.headers["allow"]
    options = httpx.options(api(service, "/whip/cam"), timeout=10)
    assert options.status_code == 204 and options.headers["accept-post"] == "application/sdp"


def test_the_watch_page_is_served_for_any_key(service):
    page = httpx.get(api(service, "/web/watch/cam"), timeout=10)
    assert page.status_code == 200 and "/whep/" in page.text
