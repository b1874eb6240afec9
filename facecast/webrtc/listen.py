"""``facecast stream --input whip-listen://HOST:PORT/PATH``: a WHIP endpoint as a stream's input.

OBS (30+), a browser or any RFC 9725 client publishes to ``http://HOST:PORT/PATH``; its video
goes straight into the pipeline (no ingest, no relay: outside service mode there is no nginx
asking this process anything, so frames never leave it). One publisher at a time (409 for a
second); one that leaves is waited for, the output sending holding frames meanwhile, and the
next is taken as a reconnect. ``DELETE`` on the ``Location`` ends a session, ``PATCH`` is 405
(no trickle, as the RFC allows).

Security as in service mode: publishers send ``FACECAST_API_TOKEN`` as their bearer token.
Without a token only a loopback address may listen (a non-loopback one is refused at start,
in words), so nobody off this host can publish into the stream.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request, Response

from facecast.errors import MediaError
from facecast.live.slots import LatestSlot
from facecast.media.frame import Frame
from facecast.serve.app import ThreadedServer
from facecast.webrtc.peer import BadOfferError, NegotiationTimeout
from facecast.webrtc.whip import (
    BusyKeyError,
    UnknownSessionError,
    WhipIngest,
    WhipSession,
    accept_post,
    bgr_at,
    no_trickle,
    read_offer,
    sdp_created,
    session_frames,
)

log = logging.getLogger(__name__)

SCHEME = "whip-listen://"
DEFAULT_PATH = "/whip"
# A WebRTC sender's frame rate is not known up front (it varies with its bandwidth and
# CPU): the output is opened at the rate browsers and OBS send by default.
NOMINAL_FPS = Fraction(30)
SESSION_KEY = "input"  # the one key this endpoint publishes to (WhipIngest is keyed)


def is_whip_listen(url: str | None) -> bool:
    return bool(url) and str(url).lower().startswith(SCHEME)


def parse_whip_listen(url: str) -> tuple[str, int, str]:
    """(host, port, path) of ``whip-listen://HOST:PORT[/PATH]``; an empty host listens on
    loopback. Anything else is a ``MediaError`` that names the part that is wrong."""
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise MediaError(f"{url}: a whip-listen URL takes no query or fragment")
    try:
        port = parts.port
    except ValueError:
        raise MediaError(f"{url}: the port must be a number from 1 to 65535") from None
    if port is None or port == 0:
        raise MediaError(f"{url}: name the port to listen on (whip-listen://HOST:PORT/PATH)")
    path = parts.path.rstrip("/") or DEFAULT_PATH
    if not all(part.replace("-", "").replace("_", "").isalnum() for part in path[1:].split("/")):
        raise MediaError(f"{url}: the path may hold letters, digits, '-', '_' and '/' only")
    return parts.hostname or "127.0.0.1", port, path


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    """A ``MediaError`` in words when ``host:port`` cannot be listened on (in use, or not an
    address of this machine), before the HTTP server would log its own traceback-like line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise MediaError(f"cannot listen for WHIP on {host}:{port} ({reason})") from None


class WhipListenSource:
    """A live input fed by WHIP publishers (see the module docstring). Same face as
    ``StreamSource`` to the pipeline: ``items(stop)``, ``connected``, ``reconnects``,
    ``fps``, ``live``, ``audio_params()``, ``close()``. Listens from construction on, so a
    port in use or a missing token is said before anything else starts."""

    live = True
    fps = NOMINAL_FPS

    def __init__(self, url: str, *, token: str | None = None) -> None:
        self.url = url
        self.host, self.port, self.path = parse_whip_listen(url)
        if token is None and not is_loopback(self.host):
            raise MediaError(
                f"{url}: listening on {self.host} lets other hosts publish; set "
                "FACECAST_API_TOKEN (publishers send it as their bearer token) or listen on "
                "127.0.0.1"
            )
        self.token = token
        check_port_free(self.host, self.port)
        self.connected = False
        self.reconnects = 0
        self.sessions = 0  # publishers taken, in all
        self.frames = 0
        self._frames: LatestSlot[Frame] = LatestSlot()
        self._size: tuple[int, int] | None = None  # the first publisher's, kept for the output
        self.ingest = WhipIngest(self._take)
        self.server = ThreadedServer(self._app(), self.host, self.port, name="whip-listen")
        self.server.start()
        log.info("WHIP: publish to http://%s:%d%s", self.host, self.port, self.path)

    # ------------------------------------------------------------------ the pipeline's side

    def audio_params(self) -> None:
        return None  # the publisher's audio is answered inactive (see docs/webrtc.md)

    def items(self, stop: threading.Event) -> Iterator[Frame]:
        """The newest frame of the current publisher, until ``stop``; between publishers
        nothing (the pipeline holds its last frame). Ends within ~0.1 s of ``stop``."""
        yield from self._frames.values(lambda: not stop.is_set(), poll=0.1)

    def close(self) -> bool:
        """End every session and stop listening; False if the server did not stop in time."""
        loop = self.ingest.loop
        if loop is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self.ingest.close_all(), loop)
            try:
                future.result(10)
            except Exception as exc:
                log.warning("WHIP: sessions did not close cleanly: %s", exc)
        self._frames.close()
        self.server.stop()
        return not self.server.is_alive()

    # ------------------------------------------------------------------ one session

    def _take(self, session: WhipSession) -> None:
        """On the session's thread: its frames, at the first publisher's size, into the
        pipeline's slot, until it closes (as the decoder's planes while the size holds,
        else scaled as BGR)."""
        if self.sessions:
            self.reconnects += 1
        self.sessions += 1
        self.connected = True
        try:
            for frame in session_frames(session):
                timing = {"index": self.frames, "pts": frame.pts, "time_base": frame.time_base}
                self._size = self._size or (frame.width, frame.height)
                if (frame.width, frame.height) == self._size:
                    picture = Frame.decoded(frame, **timing)
                else:
                    picture = Frame(bgr_at(frame, self._size), **timing)
                self._frames.put(picture)
                self.frames += 1
        finally:
            self.connected = False

    # ------------------------------------------------------------------ HTTP

    def _app(self) -> FastAPI:
        app = FastAPI(title="facecast WHIP input", docs_url=None, redoc_url=None)
        add = app.add_api_route
        add(self.path, self._offer, methods=["POST"], status_code=201)
        add(self.path, accept_post, methods=["OPTIONS"])
        add(self.path + "/{session}", self._delete, methods=["DELETE"])
        add(self.path + "/{session}", no_trickle, methods=["PATCH"])
        return app

    def _require_token(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), self.token):
            raise HTTPException(401, "a WHIP publisher needs the API token as its bearer token")

    async def _offer(self, request: Request) -> Response:
        self._require_token(request)
        offer = await read_offer(request)
        try:
            session, answer = await self.ingest.create(SESSION_KEY, offer)
        except BusyKeyError:
            raise HTTPException(409, "this input already has a publisher") from None
        except BadOfferError as exc:
            raise HTTPException(400, str(exc)) from None
        except NegotiationTimeout as exc:
            raise HTTPException(503, str(exc)) from None
        return sdp_created(answer, f"{self.path}/{session}")

    async def _delete(self, session: str, request: Request) -> dict[str, Any]:
        self._require_token(request)
        try:
            await self.ingest.close(session)
        except UnknownSessionError as exc:
            raise HTTPException(404, str(exc)) from None
        return {"session": session, "ended": True, "at": time.time()}
