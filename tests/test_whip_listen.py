"""``facecast stream --input whip-listen://HOST:PORT/PATH`` (issue 17, point 1), run as a user
runs it: its own process, a WHIP publisher that is not facecast's code (headless Chromium's
WebRTC stack, publishing its fake camera), the output read back over UDP and judged by
identity. The publisher leaves (DELETE) and another comes: the stream goes on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from facecast.errors import MediaError
from facecast.media.live_source import free_udp_port
from facecast.serve.ingest import free_ports
from facecast.webrtc.listen import parse_whip_listen
from tests import live_helpers
from tests.live_helpers import stop_process, wait_until

from . import test_web_page as web_page
from .conftest import MEDIA, REPO
from .media_helpers import identity_distances
from .test_live_stream import grab_face_frames
from .test_whip import WHIP_PUBLISH

live_procs = live_helpers.live_procs
browser, camera_file = web_page.browser, web_page.camera_file
identities, new_page = web_page.identities, web_page.new_page

SOURCE = "obama.jpg"  # the stream's face; the camera shows another person
STREAM = [sys.executable, "-m", "facecast.cli", "stream", "--source", str(MEDIA / SOURCE)]


def start_stream(input_url: str, output_url: str, log: Path, **env: str) -> subprocess.Popen:
    cmd = [*STREAM, "--input", input_url, "--output", output_url, "--stall-timeout", "2"]
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            start_new_session=True,
        )


def test_whip_publishers_feed_a_stream_one_after_another(
    tmp_path, new_page, identities, analyser, embedder
):
    (port,) = free_ports(1)
    out_port = free_udp_port()
    endpoint = f"http://127.0.0.1:{port}/live"
    log = tmp_path / "stream.log"
    proc = start_stream(f"whip-listen://127.0.0.1:{port}/live", f"udp://127.0.0.1:{out_port}", log)
    try:
        assert wait_until(lambda: "WHIP: publish to" in log.read_text(), 60), log.read_text()
        output = f"udp://127.0.0.1:{out_port}?timeout=5000000"

        for round_ in (1, 2):  # the second publisher comes after the first has left
            page = new_page()
            page.goto(endpoint)  # the endpoint's origin (a 405 page): the POST is same-origin
            location = page.evaluate(WHIP_PUBLISH, [endpoint, ""])
            assert location.startswith("/live/")
            if round_ == 1:  # one publisher at a time
                busy = httpx.post(endpoint, content=SECOND_OFFER, headers=SDP, timeout=10)
                assert busy.status_code == 409, busy.text
            frames = grab_face_frames(output, analyser, 6, 40)
            distances = identity_distances(analyser, embedder, frames, identities)
            print(f"publisher {round_}", {k: round(v, 3) for k, v in distances.items()})
            assert distances[SOURCE] < distances["camera"]
            reply = httpx.delete(f"http://127.0.0.1:{port}{location}", timeout=10)
            assert reply.status_code == 200, reply.text
            page.close()
        assert httpx.delete(f"http://127.0.0.1:{port}{location}", timeout=10).status_code == 404

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        said = log.read_text()
        assert "reconnects in 1" in said and "Traceback" not in said, said[-3000:]
    finally:
        stop_process(proc)


# an offer with video that no peer will ever answer: enough to be refused or accepted
SECOND_OFFER = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendonly\r\n"
    "a=rtpmap:96 VP8/90000\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"
    "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\na=setup:actpass\r\na=rtcp-mux\r\n"
)
SDP = {"Content-Type": "application/sdp"}


def test_a_token_is_needed_off_loopback_and_publishers_must_send_it(tmp_path):
    (port,) = free_ports(1)
    url = f"whip-listen://0.0.0.0:{port}/live"
    refused = subprocess.run(
        [*STREAM, "-i", url, "-o", str(tmp_path / "out.mp4")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "FACECAST_API_TOKEN"},
        timeout=120,
    )
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "FACECAST_API_TOKEN" in lines[0], refused.stderr
    assert not (tmp_path / "out.mp4").exists()

    log = tmp_path / "stream.log"
    proc = start_stream(url, str(tmp_path / "out.mp4"), log, FACECAST_API_TOKEN="t0ken")
    try:
        assert wait_until(lambda: "WHIP: publish to" in log.read_text(), 60), log.read_text()
        endpoint = f"http://127.0.0.1:{port}/live"
        wrong = httpx.post(endpoint, content=SECOND_OFFER, headers=SDP, timeout=10)
        assert wrong.status_code == 401 and "token" in wrong.json()["detail"]
        bad = httpx.post(
            endpoint, content="hello", headers={**SDP, "Authorization": "Bearer t0ken"}, timeout=10
        )
        assert bad.status_code == 400 and "SDP" in bad.json()["detail"]
        patch = httpx.patch(f"{endpoint}/x", timeout=10)
        assert patch.status_code == 405 and "DELETE" in patch.headers["allow"]
    finally:
        stop_process(proc)


def test_a_port_in_use_is_one_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*STREAM, "-i", f"whip-listen://127.0.0.1:{port}/live", "-o", str(tmp_path / "o.mp4")],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: cannot listen for WHIP on 127.0.0.1:{port} (in use)"
    ]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("whip-listen://127.0.0.1/live", "name the port"),
        ("whip-listen://127.0.0.1:99999/live", "port must be a number"),
        ("whip-listen://127.0.0.1:9000/li ve", "path may hold"),
        ("whip-listen://127.0.0.1:9000/live?x=1", "no query"),
    ],
)
def test_bad_whip_listen_urls_name_what_is_wrong(url, said):
    with pytest.raises(MediaError, match=said):
        parse_whip_listen(url)


def test_a_whip_listen_url_without_a_path_takes_the_default():
    assert parse_whip_listen("whip-listen://:9000") == ("127.0.0.1", 9000, "/whip")
