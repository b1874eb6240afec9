"""The WebRTC page in headless Chromium against the real server, on loopback.

Chromium's fake camera plays a .y4m of a real face (built here from the test photos);
the page sends it over WebRTC and shows what comes back. Identity checks use dlib
embeddings of frames grabbed from the page's own <video>, against the source photos and
the camera's face, so the expectation never comes from the code under test.
"""

from __future__ import annotations

import base64
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from facecast.serve.ingest import free_port
from facecast.serve.web import WebServer
from facecast.webrtc.page import WebSessions
from tests.media_helpers import identity_distances, read_y4m, swaying_face_frames, write_y4m

from .conftest import MEDIA, REPO, load

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CAMERA_PHOTO = "lin-manuel-miranda.png"
SAMPLE = "obama.jpg"  # in examples/, so the server lists it
UPLOAD = "biden.jpg"
CONNECT_TIMEOUT_MS = 30_000
POOL_THREADS = ("asyncio_", "AnyIO worker thread", "ThreadPoolExecutor-")

# Flags that let headless Chromium run as root on a machine with no network and no GPU,
# plus a fake camera that loops our file and grants itself permission.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    # a machine whose only interface is loopback still connects (the server side offers
    # 127.0.0.1 there too, see facecast/webrtc/page.py)
    "--allow-loopback-in-peer-connection",
]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def camera_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("camera") / "camera.y4m"
    return write_y4m(path, swaying_face_frames(CAMERA_PHOTO, (640, 360), frames=45), fps=15)


@pytest.fixture(scope="module")
def identities(camera_file, analyser, embedder) -> dict[str, np.ndarray]:
    """Reference embeddings: the two source photos, and the camera's face as the y4m
    holds it (the mean over a few of its frames)."""
    refs = {}
    for name in (SAMPLE, UPLOAD):
        photo = load(name)
        refs[name] = embedder.embed(photo, analyser.analyse(photo)[0])
    frames = read_y4m(camera_file)
    camera = [embedder.embed(f, analyser.analyse(f)[0]) for f in frames[::15]]
    refs["camera"] = np.mean(camera, axis=0)
    return refs


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The real ``facecast web`` server, in-process (so the tests can see its threads),
    on loopback without a token; the sample faces are the repo's examples/."""
    web = WebServer(WebSessions(faces_dir=REPO / "examples"), token=None, port=free_port())
    web.start()
    yield web.url
    web.stop()


@pytest.fixture(scope="module")
def browser(camera_file):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian package 'chromium')")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=[*CHROMIUM_ARGS, f"--use-file-for-fake-video-capture={camera_file}"],
            )
        except Exception as exc:  # a machine where Chromium cannot start at all
            pytest.skip(f"Chromium did not start: {exc}")
        yield browser
        browser.close()


@pytest.fixture
def new_page(browser):
    """Pages in their own browser contexts (separate sessionStorage, like two users)."""
    contexts = []

    def make():
        context = browser.new_context(viewport={"width": 1100, "height": 760})
        contexts.append(context)
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        return page

    yield make
    for context in contexts:
        context.close()


# ---------------------------------------------------------------------------- page helpers


def status(page) -> str:
    return page.locator("#status").text_content() or ""


def connect(page, base: str, sample: str | None = None) -> str:
    """Open the page, pick ``sample`` (if any), press Start; the session id once the
    page says "connected"."""
    page.goto(f"{base}/web/")
    if sample:
        page.wait_for_function(
            "name => [...document.querySelector('#face-sample').options]"
            ".some(o => o.value === name)",
            arg=sample,
        )
        page.select_option("#face-sample", sample)
    page.click("#start")
    try:
        page.wait_for_function(
            "document.querySelector('#status').textContent === 'connected'",
            timeout=CONNECT_TIMEOUT_MS,
        )
    except Exception as exc:
        raise AssertionError(f"page never connected: status {status(page)!r}") from exc
    session = page.locator("#session").text_content()
    assert session and session != "none"
    return session


def count_frames(page, wanted: int, timeout_s: float = 15.0) -> dict:
    """Frames painted in #remote (requestVideoFrameCallback), and how far its clock moved."""
    return page.evaluate(
        """async ([wanted, timeoutMs]) => {
            const video = document.querySelector('#remote');
            const start = video.currentTime;
            let count = 0;
            await new Promise((resolve) => {
                const tick = () => {
                    count += 1;
                    if (count >= wanted) resolve(); else video.requestVideoFrameCallback(tick);
                };
                video.requestVideoFrameCallback(tick);
                setTimeout(resolve, timeoutMs);
            });
            return {count, advanced: video.currentTime - start,
                    width: video.videoWidth, height: video.videoHeight};
        }""",
        [wanted, timeout_s * 1000],
    )


def grab(page) -> np.ndarray:
    """The frame #remote shows now, as BGR."""
    url = page.evaluate(
        """() => {
            const video = document.querySelector('#remote');
            const canvas = document.createElement('canvas');
            canvas.width = video.videoWidth;
            canvas.height = video.videoHeight;
            canvas.getContext('2d').drawImage(video, 0, 0);
            return canvas.toDataURL('image/png');
        }"""
    )
    data = base64.b64decode(url.split(",", 1)[1])
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.size, "the grabbed frame did not decode"
    return image


def grab_frames(page, n: int, gap_s: float = 0.25) -> list[np.ndarray]:
    frames = []
    for _ in range(n):
        frames.append(grab(page))
        time.sleep(gap_s)
    return frames


def number(page, selector: str, timeout_ms: int = 15_000) -> float:
    """The number an on-screen stat shows, once it shows one."""
    page.wait_for_function(
        "sel => Number.isFinite(parseFloat(document.querySelector(sel).textContent))",
        arg=selector,
        timeout=timeout_ms,
    )
    return float(page.locator(selector).text_content())


def sessions(base: str) -> list[dict]:
    return httpx.get(f"{base}/api/web/sessions", timeout=10).json()["sessions"]


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


# ---------------------------------------------------------------------------- tests


def test_page_connects_shows_stats_and_swaps_the_face(
    server, new_page, identities, analyser, embedder, artifacts
):
    page = new_page()
    session = connect(page, server, sample=SAMPLE)

    frames = count_frames(page, 20)
    assert frames["count"] >= 20, frames
    assert frames["advanced"] > 0.5, frames
    assert (frames["width"], frames["height"]) == (640, 360), frames

    fps = number(page, "#fps")
    latency = number(page, "#latency")
    server_fps = number(page, "#server-fps")
    print(f"on screen: received {fps} fps, server {server_fps} fps, latency p50 {latency} ms")
    assert 0 < fps < 100 and 0 < latency < 5000 and server_fps > 0

    grabbed = grab_frames(page, 5)
    cv2.imwrite(str(artifacts / "web_remote_frame.png"), grabbed[-1])
    page.screenshot(path=str(artifacts / "web_page.png"), full_page=True)
    d = identity_distances(analyser, embedder, grabbed, identities, min_share=0.5)
    print("distances from the received video:", d)
    assert d[SAMPLE] < d["camera"]
    assert d[SAMPLE] < d[UPLOAD]

    listed = sessions(server)
    assert [(s["session"], s["face"], s["swapping"]) for s in listed] == [(session, SAMPLE, True)]

    # Swapping off: the camera's own face comes back, on the same connection
    page.uncheck("#swapping")
    wait_until(lambda: sessions(server)[0]["swapping"] is False, 5, "swapping off")
    time.sleep(0.5)
    d_off = identity_distances(analyser, embedder, grab_frames(page, 3), identities, min_share=0.5)
    print("distances with swapping off:", d_off)
    assert d_off["camera"] < d_off[SAMPLE]

    page.click("#stop")
    assert status(page) == "closed"
    wait_until(lambda: sessions(server) == [], 10, "the session to go after Stop")
    assert not page.errors, page.errors


def test_two_sessions_at_once_get_their_own_faces(server, new_page, identities, analyser, embedder):
    first, second = new_page(), new_page()
    id_first = connect(first, server, sample=SAMPLE)
    id_second = connect(second, server)  # no face yet: passes through
    assert id_first != id_second

    # the second user uploads a photo: used from the next frame, no reconnect
    second.set_input_files("#face-file", str(MEDIA / UPLOAD))
    wait_until(
        lambda: {s["session"]: s["face"] for s in sessions(server)}.get(id_second) is not None,
        10,
        "the uploaded face",
    )
    assert status(second) == "connected"
    time.sleep(1.0)

    d_first = identity_distances(
        analyser, embedder, grab_frames(first, 4), identities, min_share=0.5
    )
    d_second = identity_distances(
        analyser, embedder, grab_frames(second, 4), identities, min_share=0.5
    )
    print("first (obama):", d_first, "second (biden upload):", d_second)
    assert d_first[SAMPLE] < d_first[UPLOAD] and d_first[SAMPLE] < d_first["camera"]
    assert d_second[UPLOAD] < d_second[SAMPLE] and d_second[UPLOAD] < d_second["camera"]
    assert not first.errors and not second.errors, (first.errors, second.errors)


def session_threads(before: set[int]) -> list[threading.Thread]:
    """Threads started since ``before``, less the idle worker pools that outlive any one
    request by design (asyncio's default executor, AnyIO's pool for sync routes)."""
    return [
        t
        for t in threading.enumerate()
        if t.ident not in before and not t.name.startswith(POOL_THREADS) and t.is_alive()
    ]


def test_closing_the_tab_frees_the_session_and_its_threads(server, new_page):
    before = {t.ident for t in threading.enumerate()}
    page = new_page()
    session = connect(page, server, sample=SAMPLE)
    assert count_frames(page, 5)["count"] >= 5
    assert [s["session"] for s in sessions(server)] == [session]
    started = session_threads(before)
    assert started, "a session runs its swap on a thread of its own"

    closed_at = time.monotonic()
    page.close()  # fires pagehide: the page's beacon closes the session
    # the beacon takes milliseconds; without it the server's 10 s idle timeout would do it
    wait_until(lambda: sessions(server) == [], 4, "the page's beacon to close the session")
    print(f"session gone {time.monotonic() - closed_at:.2f} s after the tab closed")
    wait_until(lambda: not [t for t in started if t.is_alive()], 10, "the session's threads to end")
    assert session_threads(before) == [], [t.name for t in session_threads(before)]


def test_with_a_token_the_page_asks_for_it_and_closes_with_it(new_page):
    """A token-guarded server: the page shows its token field after a 401, sends the token
    on every call, and on leaving closes its session with a keepalive DELETE (a beacon
    cannot carry the header)."""
    token = "page-test-token"
    web = WebServer(WebSessions(faces_dir=REPO / "examples"), token=token, port=free_port())
    web.start()
    auth = {"Authorization": f"Bearer {token}"}

    def listed() -> list[dict]:
        reply = httpx.get(f"{web.url}/api/web/sessions", headers=auth, timeout=10)
        assert reply.status_code == 200, reply.text
        return reply.json()["sessions"]

    try:
        page = new_page()
        page.goto(f"{web.url}/web/")
        page.wait_for_selector("#token", state="visible", timeout=10_000)
        assert status(page).startswith("error:"), status(page)
        page.fill("#token", token)
        page.dispatch_event("#token", "change")
        page.wait_for_function(
            "name => [...document.querySelector('#face-sample').options]"
            ".some(o => o.value === name)",
            arg=SAMPLE,
        )
        session = connect(page, web.url)  # no face: the video passes through
        assert [s["session"] for s in listed()] == [session]
        page.close()
        wait_until(lambda: listed() == [], 4, "the keepalive DELETE to close the session")
    finally:
        web.stop()


def test_several_photos_of_the_person_upload_as_one_face(server, new_page):
    """Picking two photos in the page's file input sends both (a multipart form), and the
    server takes them as one face."""
    page = new_page()
    session = connect(page, server, sample=SAMPLE)
    people = MEDIA / "people"
    page.set_input_files("#face-file", [str(people / "jolie1.jpg"), str(people / "jolie2.jpg")])
    wait_until(
        lambda: {s["session"]: s["face"] for s in sessions(server)}.get(session) == "2 photos",
        15,
        "the two photos taken as the face",
    )
    assert page.locator("#face-name").text_content() == "2 photos"
    assert status(page) == "connected" and not page.errors, page.errors
