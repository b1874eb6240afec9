"""The browser page: its static files at ``/web/`` and its signalling routes under
``/api/web/`` (see ``facecast.webrtc.page`` for the sessions behind them).

Routes (all need the bearer token when the server has one):
- ``GET /api/web/faces``: the sample faces a page can pick.
- ``POST /api/web/sessions``: ``{"sdp", "type": "offer", "face"}`` → the answer and the
  session id; 503 over the session limit, 422 for a bad offer or an unknown sample.
- ``GET /api/web/sessions``: every open session and its connection state.
- ``PUT /api/web/sessions/{id}/face``: a JPEG/PNG body, or ``?sample=NAME`` with no body.
- ``POST /api/web/sessions/{id}/swapping``: ``{"enabled": bool}``.
- ``GET /api/web/sessions/{id}/stats``: frames, drops, fps, server latency.
- ``DELETE /api/web/sessions/{id}`` and ``POST /api/web/sessions/{id}/close``: 204, also
  for an unknown id.

``facecast serve`` mounts these into its own app (``mount_web``); ``facecast web`` serves
them alone (``create_web_app``, ``WebServer``).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, HTTPException, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError

from facecast.errors import NoFaceError
from facecast.safety.moderation import FaceGate, audited, no_face_change, vet
from facecast.serve.app import LOOPBACK, SwappingRequest, bearer_guard, bind_host
from facecast.serve.http_server import Runnable, ThreadedServer
from facecast.serve.uploads import MAX_UPLOAD_BYTES, read_image_uploads, read_limited
from facecast.webrtc.page import (
    MAX_SDP,
    SessionLimitError,
    UnknownFaceError,
    UnknownSessionError,
    WebSessions,
)
from facecast.webrtc.peer import BadOfferError, NegotiationTimeout

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
NAME_RE = re.compile(r"[^\w .,()+-]")


class OfferRequest(BaseModel):
    sdp: str
    type: Literal["offer"]
    face: str | None = None


def web_router(
    sessions: WebSessions,
    token: str | None,
    max_upload: int = MAX_UPLOAD_BYTES,
    gate: FaceGate | None = None,
) -> APIRouter:
    """``gate``: consent, moderation and the audit log for every face a session is given,
    a sample or an upload (``facecast.safety.moderation``; None: none)."""
    # Handlers are coroutines: they run on the event loop the sessions live on.
    router = APIRouter(prefix="/api/web", dependencies=bearer_guard(token))

    def session_or_404(session_id: str) -> None:
        try:
            sessions.get(session_id)
        except UnknownSessionError as exc:
            raise HTTPException(404, str(exc)) from None

    @router.get("/faces")
    async def faces() -> dict[str, list[str]]:
        return {"faces": sessions.sample_faces()}

    @router.post("/sessions")
    @audited("web_face", gate, key="session_id")  # none yet: the audit line's key is null
    async def open_session(request: Request) -> dict[str, str]:
        # the offer plus some room for the JSON around it; parsed here so the limit holds
        body = await read_limited(request, MAX_SDP + 4096)
        try:
            offer = OfferRequest.model_validate_json(body)
        except ValidationError as exc:
            raise HTTPException(422, _first_error(exc)) from None
        if offer.face and gate is not None:  # a sample face, vetted as any other face
            try:
                sample = await asyncio.to_thread(sessions.sample_image, offer.face)
            except UnknownFaceError as exc:
                raise HTTPException(422, str(exc)) from None
            await vet(request, [(f"sample {offer.face}", sample)])
        elif not offer.face:
            no_face_change(request)  # no face yet: not a face change
        try:
            session, answer = await sessions.create(offer.sdp, offer.type, offer.face)
        except (SessionLimitError, NegotiationTimeout) as exc:
            raise HTTPException(503, str(exc)) from None
        except (BadOfferError, UnknownFaceError, NoFaceError) as exc:
            raise HTTPException(422, str(exc)) from None
        return {"session": session.id, "sdp": answer, "type": "answer"}

    @router.get("/sessions")
    async def list_sessions() -> dict[str, list[dict[str, Any]]]:
        return {"sessions": [s.status() for s in sessions.sessions()]}

    @router.put("/sessions/{session_id}/face")
    @audited("web_face", gate, key="session_id")
    async def set_face(
        session_id: str, request: Request, sample: str | None = None, name: str | None = None
    ) -> dict[str, str]:
        """The body is the photo (JPEG or PNG; ``name`` optionally labels it), or a
        multipart form repeating the part ``file`` for several photos of the person (each
        face then gets the nearest in expression), or ``?sample=NAME`` picks a sample face
        and the body is ignored."""
        session_or_404(session_id)
        if sample is not None:
            try:
                image = await asyncio.to_thread(sessions.sample_image, sample)
            except UnknownFaceError as exc:
                raise HTTPException(422, str(exc)) from None
            label = sample
            images = [image]
        else:
            label = _display_name(name)
            images = await read_image_uploads(request, max_upload, label)
        several = len(images) > 1
        roles = [f"{label} {i + 1}" if several else label for i in range(len(images))]
        await vet(request, list(zip(roles, images, strict=True)))
        try:
            await sessions.set_face(session_id, images, label)
        except NoFaceError as exc:
            raise HTTPException(422, str(exc)) from None
        except UnknownSessionError as exc:  # closed while the face was being read
            raise HTTPException(404, str(exc)) from None
        return {"face": label}

    @router.post("/sessions/{session_id}/swapping")
    async def set_swapping(session_id: str, body: SwappingRequest) -> dict[str, bool]:
        try:
            sessions.set_swapping(session_id, body.enabled)
        except UnknownSessionError as exc:
            raise HTTPException(404, str(exc)) from None
        return {"enabled": body.enabled}

    @router.get("/sessions/{session_id}/stats")
    async def stats(session_id: str) -> dict[str, Any]:
        try:
            return sessions.get(session_id).stats_dict()
        except UnknownSessionError as exc:
            raise HTTPException(404, str(exc)) from None

    async def close(session_id: str) -> Response:
        await sessions.close(session_id)
        return Response(status_code=204)

    # DELETE for the page's Stop; POST .../close for navigator.sendBeacon on pagehide
    router.add_api_route("/sessions/{session_id}", close, methods=["DELETE"], status_code=204)
    router.add_api_route("/sessions/{session_id}/close", close, methods=["POST"], status_code=204)
    return router


def mount_web(
    app: FastAPI,
    sessions: WebSessions,
    token: str | None,
    max_upload: int = MAX_UPLOAD_BYTES,
    gate: FaceGate | None = None,
) -> None:
    """The page's routes and static files on ``app``."""
    app.include_router(web_router(sessions, token, max_upload, gate))
    app.mount("/web", StaticFiles(directory=STATIC, html=True), name="web")


def create_web_app(
    token: str | None, sessions: WebSessions, max_upload: int = MAX_UPLOAD_BYTES
) -> FastAPI:
    """``facecast web``: the page alone, ``/`` redirecting to it. Sessions close when the
    app shuts down (when it runs with a lifespan; ``WebServer`` closes them itself)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await sessions.close_all()

    app = FastAPI(
        title="facecast web",
        docs_url="/api/docs",
        openapi_url="/api/openapi.json",
        lifespan=lifespan,
    )

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/web/")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    mount_web(app, sessions, token, max_upload)
    return app


class WebServer(Runnable):
    """``facecast web``: uvicorn on a thread of its own. ``stop()`` closes every session
    (on the server's loop, while it still runs), then the server."""

    def __init__(
        self,
        sessions: WebSessions,
        *,
        token: str | None,
        host: str = LOOPBACK,
        port: int = 8080,
        max_upload: int = MAX_UPLOAD_BYTES,
    ) -> None:
        self.sessions = sessions
        self.host = bind_host(host, token)
        self.port = port
        self.app = create_web_app(token, sessions, max_upload)
        self._http = ThreadedServer(self.app, self.host, self.port, name="web-http")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> WebServer:
        self._http.start(timeout)
        log.info("web page on %s/web/", self.url)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.sessions.close_all_blocking(timeout)
        self._http.stop(timeout)


def _display_name(name: str | None) -> str:
    """What the page shows for an uploaded face: its file name, tidied; never a path."""
    if not name:
        return "upload"
    cleaned = NAME_RE.sub("", name.replace("\\", "/").rsplit("/", 1)[-1]).strip()
    return cleaned[:64] or "upload"


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error.get("loc", ())) or "body"
    return f"{where}: {error.get('msg', 'invalid')} (expected {{sdp, type: offer, face}})"
