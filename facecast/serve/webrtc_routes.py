"""WHIP in and WHEP out on ``facecast serve``'s HTTP plane, and the page that watches a key.

A WHIP publisher (``POST /whip/KEY``) is relayed to ``live/KEY`` on the service's own ingest,
so it is swapped like any RTMP publisher; a WHEP viewer (``POST /whep/KEY``) watches
``swapped/KEY`` as it is; ``/web/watch/KEY`` is the browser page that does so. WHIP's auth
is the API token; WHEP's is the key's play token when viewer auth is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, Response

from facecast.serve.app import LOOPBACK
from facecast.serve.ingest import IngestServer
from facecast.serve.publish_hooks import PublishHooks
from facecast.webrtc.peer import BadOfferError, NegotiationTimeout
from facecast.webrtc.whep import WhepEgress
from facecast.webrtc.whip import (
    BusyKeyError,
    RtmpRelay,
    WhipIngest,
    accept_post,
    no_trickle,
    read_offer,
    sdp_created,
)
from facecast.webrtc.whip import UnknownSessionError as WebrtcSessionError

WATCH_PAGE = Path(__file__).resolve().parent / "static" / "watch.html"


class WebrtcRoutes:
    """The WHIP and WHEP sessions of one service (``whip``, ``whep``) and their routes. A
    WHIP publisher is one more publisher: ``hooks`` say which keys have a profile and which
    have a publisher already."""

    def __init__(
        self, hooks: PublishHooks, ingest: IngestServer, token: str | None, viewer_auth: bool
    ) -> None:
        self.hooks = hooks
        self.ingest = ingest
        self.token = token
        self.viewer_auth = viewer_auth
        # WHIP in (relayed to live/KEY on our own ingest), WHEP out (swapped/KEY as it is)
        self.whip = WhipIngest(RtmpRelay(lambda key: ingest.rtmp_url("live", key)), audio=True)
        self.whep = WhepEgress(lambda key: ingest.play_urls(key, LOOPBACK)["rtmp"])

    def add_routes(self, app: FastAPI) -> None:
        add = app.add_api_route
        add("/whip/{key}", self._whip_offer, methods=["POST"], status_code=201)
        add("/whip/{key}", accept_post, methods=["OPTIONS"], include_in_schema=False)
        add("/whip/{key}/{session}", self._whip_delete, methods=["DELETE"])
        add("/whip/{key}/{session}", no_trickle, methods=["PATCH"])
        add("/whep/{key}", self._whep_offer, methods=["POST"], status_code=201)
        add("/whep/{key}", accept_post, methods=["OPTIONS"], include_in_schema=False)
        add("/whep/{key}/{session}", self._whep_delete, methods=["DELETE"])
        add("/whep/{key}/{session}", no_trickle, methods=["PATCH"])
        add("/web/watch/{key}", self._watch_page, methods=["GET"], include_in_schema=False)

    def _bearer(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None

    def _require_token(self, request: Request) -> None:
        """WHIP's auth is the API token, as a bearer token (RFC 9725, section 4.5)."""
        given = self._bearer(request)
        if self.token and not (given and hmac.compare_digest(given, self.token)):
            raise HTTPException(401, "a WHIP publisher needs the API token as its bearer token")

    def _require_viewer(self, request: Request, key: str) -> None:
        """WHEP viewers: anyone when viewer auth is off (as for HLS); else the key's play
        token (or the API token) as the bearer token."""
        if not self.viewer_auth:
            return
        given = self._bearer(request) or ""
        allowed = [self.ingest.play_token(key), *([self.token] if self.token else [])]
        if not any(hmac.compare_digest(given, a) for a in allowed):
            raise HTTPException(401, f"watching {key!r} needs its play token (GET /api/play/KEY)")

    async def _sdp_offer(self, request: Request, key: str) -> str:
        if key not in self.hooks.profiles:
            raise HTTPException(404, f"no profile for stream key {key!r}")
        return await read_offer(request)

    async def _whip_offer(self, key: str, request: Request) -> Response:
        """A WHIP publisher's offer for ``key``: 201, the answer and the session's URL."""
        self._require_token(request)
        offer = await self._sdp_offer(request, key)
        if self.hooks.has_publisher(key):
            raise HTTPException(409, f"stream key {key!r} already has a publisher")
        try:
            session, answer = await self.whip.create(key, offer)
        except (BadOfferError, BusyKeyError) as exc:
            raise HTTPException(409 if isinstance(exc, BusyKeyError) else 400, str(exc)) from None
        except NegotiationTimeout as exc:
            raise HTTPException(503, str(exc)) from None
        return sdp_created(answer, f"/whip/{key}/{session}")

    async def _whep_offer(self, key: str, request: Request) -> Response:
        """A WHEP viewer's offer for ``key``'s swapped stream."""
        self._require_viewer(request, key)
        offer = await self._sdp_offer(request, key)
        try:
            session, answer = await self.whep.create(key, offer)
        except BadOfferError as exc:
            raise HTTPException(400, str(exc)) from None
        except (BusyKeyError, NegotiationTimeout) as exc:
            raise HTTPException(503, str(exc)) from None
        return sdp_created(answer, f"/whep/{key}/{session}")

    async def _whip_delete(self, key: str, session: str, request: Request) -> dict[str, Any]:
        self._require_token(request)
        try:
            await self.whip.close(session)
        except WebrtcSessionError as exc:
            raise HTTPException(404, str(exc)) from None
        return {"key": key, "session": session, "ended": True}

    async def _whep_delete(self, key: str, session: str, request: Request) -> dict[str, Any]:
        self._require_viewer(request, key)
        try:
            await self.whep.close(session)
        except WebrtcSessionError as exc:
            raise HTTPException(404, str(exc)) from None
        return {"key": key, "session": session, "ended": True}

    async def _watch_page(self, key: str) -> FileResponse:
        return FileResponse(WATCH_PAGE, media_type="text/html")

    def close(self) -> None:
        """Every WHIP and WHEP session, closed on the loop they live on (shutdown)."""
        for sessions in (self.whip, self.whep):
            loop = sessions.loop
            if loop is None or loop.is_closed() or not loop.is_running():
                continue
            future = asyncio.run_coroutine_threadsafe(sessions.close_all(), loop)
            with contextlib.suppress(Exception):  # a timeout: the threads are daemons
                future.result(10)
