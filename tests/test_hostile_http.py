"""The HTTP plane against hostile clients: who may list the keys, bodies built to hurt the
parser or the decoder, and clients that open a request and never finish it.

Each test runs the service's real app on a real uvicorn server (``ThreadedServer``, the one
``serve`` and ``web`` use), without nginx, and talks to it with httpx or raw sockets.
"""

from __future__ import annotations

import base64
import json
import select
import socket
import struct
import zlib
from collections.abc import Iterator

import cv2
import httpx
import numpy as np
import pytest

from facecast.serve.app import LOOPBACK, ThreadedServer
from facecast.serve.ingest import free_ports
from facecast.serve.service import Service, load_profiles

from .conftest import MEDIA

TOKEN = "hostile-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT = 1.0  # the server's header and body timeouts here: short, so the tests are
WAIT = 20.0  # how long a test waits for the server to act; far more than it needs


# ---------------------------------------------------------------------------- images


def png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def png_bytes(
    width: int, height: int, pixel: bytes, *, bits: int = 8, color: int = 6, rows: int | None = None
) -> bytes:
    """A valid PNG of ``width`` x ``height`` whose every pixel is ``pixel`` (its samples as
    stored), compressed row by row so the picture is never held whole. ``rows``: only that
    many rows of data (a header that promises more than the file holds). ``color``: the PNG
    colour type (0 gray, 2 RGB, 4 gray+alpha, 6 RGBA)."""
    row = b"\0" + pixel * width  # filter type 0, then the samples
    packer = zlib.compressobj(6)
    data = [packer.compress(row) for _ in range(height if rows is None else rows)]
    data.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, bits, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", b"".join(data))
        + png_chunk(b"IEND", b"")
    )


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header (with a good CRC) claims ``width`` x ``height``."""
    return png_bytes(width, height, b"\x80\x80\x80", color=2, rows=1)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header (SOF) claims ``width`` x ``height``."""
    ok, encoded = cv2.imencode(".jpg", np.full((64, 64, 3), 128, np.uint8))
    assert ok
    data = bytearray(encoded.tobytes())
    pos = 2
    while data[pos + 1] != 0xC0:  # walk the segments to the baseline SOF
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    data[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---------------------------------------------------------------------------- a server


@pytest.fixture
def service(tmp_path) -> Iterator[Service]:
    """A service with one profile (alice), its app on a real uvicorn with short timeouts;
    nginx is never started."""
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(f"alice:\n  source: {MEDIA / 'obama.jpg'}\n")
    http_port, rtmp_port, hls_port = free_ports(3)
    svc = Service(
        load_profiles(profiles),
        token=TOKEN,
        http_port=http_port,
        rtmp_port=rtmp_port,
        hls_port=hls_port,
        prefix=tmp_path / "ingest",
    )
    http = ThreadedServer(
        svc.app, LOOPBACK, http_port, header_timeout=TIMEOUT, body_timeout=TIMEOUT
    )
    http.start()
    yield svc
    http.stop()
    svc.stop()


def url(service: Service, path: str) -> str:
    return f"http://{LOOPBACK}:{service.http_port}{path}"


def connect(service: Service) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, service.http_port), timeout=WAIT)
    sock.settimeout(WAIT)
    return sock


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {LOOPBACK}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout, after
    WAIT seconds, if it never does)."""
    received = []
    while chunk := sock.recv(65536):
        received.append(chunk)
    return b"".join(received)


def read_until_closed_or_reply(sock: socket.socket) -> bytes:
    """One whole HTTP reply (a Content-Length body), or what came before the close."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        if not chunk:
            return received
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length and (chunk := sock.recv(65536)):
        rest += chunk
    return head + b"\r\n\r\n" + rest


def healthy(service: Service) -> bool:
    return httpx.get(url(service, "/healthz"), timeout=WAIT).status_code == 200


# ---------------------------------------------------------------------------- who sees keys


def test_listing_the_keys_needs_the_token(service):
    """Keys are what a publisher needs to publish: with a token set, only its holder sees
    them. /healthz, /readyz and /metrics stay open (probes and scrapers send no token)."""
    for path in ("/api/profiles", "/api/streams", "/api/streams/alice"):
        refused = httpx.get(url(service, path), timeout=WAIT)
        assert refused.status_code == 401, (path, refused.text)
        assert "alice" not in refused.text
        wrong = httpx.get(url(service, path), headers={"Authorization": "Bearer no"}, timeout=WAIT)
        assert wrong.status_code == 401, (path, wrong.text)
    assert httpx.get(url(service, "/api/profiles"), headers=AUTH, timeout=WAIT).json()["alice"]
    assert httpx.get(url(service, "/api/streams"), headers=AUTH, timeout=WAIT).json() == {
        "streams": []
    }
    # no stream on alice yet: the token holder learns that, nobody else does
    missing = httpx.get(url(service, "/api/streams/alice"), headers=AUTH, timeout=WAIT)
    assert missing.status_code == 404
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(url(service, path), timeout=WAIT).status_code in (200, 503), path


# ---------------------------------------------------------------------------- bodies


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"photo": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"photo": "x", "face": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001,
    ],
    ids=["array", "photo", "face"],
)
def test_deeply_nested_json_for_a_reference_is_422(service, body):
    reply = httpx.post(
        url(service, "/api/profiles/alice/references"),
        content=body,
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=WAIT,
    )
    assert reply.status_code == 422, reply.text
    assert "nested" in reply.json()["detail"], reply.text
    assert healthy(service)


def test_an_image_over_the_decoding_budget_is_refused_from_its_header(service):
    """6000x6000 is under the pixel cap, but at 16 bits and four channels it is 288 MB
    once decoded: refused from its header, before anything is decoded."""
    deep = png_bytes(6000, 6000, b"\0" * 8, bits=16, color=6)
    assert len(deep) < 400_000  # a small upload
    reply = httpx.put(url(service, "/api/profiles/alice"), content=deep, headers=AUTH, timeout=WAIT)
    assert reply.status_code == 422, reply.text
    detail = reply.json()["detail"]
    assert "6000x6000" in detail and "16-bit" in detail and "MB" in detail, detail
    # the profile is as it was
    listed = httpx.get(url(service, "/api/profiles"), headers=AUTH, timeout=WAIT).json()
    assert listed["alice"]["source"] == "obama.jpg"


def test_the_server_answers_while_it_decodes_an_upload(service):
    """A large image within the budget takes a while to decode; /healthz (and nginx's
    publish hooks) are answered meanwhile. The reference's face is the same picture cut
    short, so the request ends in a 422 right after decoding, with no face detection."""
    photo = png_bytes(6000, 6000, b"\x50\x60\x70\x80")  # 8-bit RGBA, half transparent
    face = png_bytes(6000, 6000, b"\x50\x60\x70\x80", rows=3000)
    body = json.dumps({"photo": b64(photo), "face": b64(face)}).encode()
    headers = {**AUTH, "Content-Type": "application/json", "Content-Length": str(len(body))}
    with connect(service) as upload:
        upload.sendall(request_head("POST", "/api/profiles/alice/references", headers) + body)
        assert healthy(service)
        # answered while the upload is still being decoded: no reply to it yet
        assert not select.select([upload], [], [], 0)[0], "the upload finished first"
        reply = read_until_closed_or_reply(upload)
    assert reply.startswith(b"HTTP/1.1 422"), reply[:200]
    assert b"reference face for alice" in reply and b"corrupt" in reply, reply


# ---------------------------------------------------------------------------- slow clients


def test_stalled_requests_are_closed_and_the_server_stays_responsive(service):
    """Clients that send half a request head, or a head and half a body, then stall, are
    closed after the configured timeout (408 with a reason where a request had begun);
    /healthz is answered all the while. So is a kept-alive connection that stalls halfway
    through its second request."""
    face = (MEDIA / "biden.jpg").read_bytes()
    upload = {**AUTH, "Content-Type": "image/jpeg", "Content-Length": str(len(face))}
    half_heads, half_bodies, second_heads = [], [], []
    try:
        for _ in range(50):
            sock = connect(service)
            sock.sendall(b"PUT /api/profiles/alice HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthor")
            half_heads.append(sock)
        for _ in range(50):
            sock = connect(service)
            sock.sendall(request_head("PUT", "/api/profiles/alice", upload) + face[:1000])
            half_bodies.append(sock)
        for _ in range(5):
            sock = connect(service)
            sock.sendall(request_head("GET", "/healthz", {}))
            assert read_until_closed_or_reply(sock).startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
            second_heads.append(sock)
        assert healthy(service)

        for sock in half_heads + second_heads:
            closed = read_until_closed(sock)
            assert closed.startswith(b"HTTP/1.1 408"), closed
            assert b"request head" in closed, closed
        for sock in half_bodies:
            closed = read_until_closed(sock)
            assert closed.startswith(b"HTTP/1.1 408"), closed
            assert b"request body" in closed, closed
        assert healthy(service)
    finally:
        for sock in half_heads + half_bodies + second_heads:
            sock.close()
    # nothing half-uploaded was kept
    listed = httpx.get(url(service, "/api/profiles"), headers=AUTH, timeout=WAIT).json()
    assert listed["alice"]["source"] == "obama.jpg"


def test_a_connection_that_sends_nothing_is_closed(service):
    with connect(service) as idle:
        assert read_until_closed(idle) == b""  # nothing asked, nothing answered
        assert healthy(service)


def test_an_oversize_body_under_a_megabyte_says_its_limit():
    """The browser page's offer route takes 68 KB: its refusal said 'upload over 0 MB'."""
    from fastapi.testclient import TestClient

    from facecast.serve.web import create_web_app
    from facecast.webrtc.page import WebSessions

    client = TestClient(create_web_app(None, WebSessions()))
    reply = client.post("/api/web/sessions", content=b"{" + b" " * 100_000 + b"}")
    assert reply.status_code == 413
    assert reply.json()["detail"] == "upload over 68 KB", reply.text
