"""The HTTP control plane: health, readiness, metrics, stream status and control.

Routes:
- ``GET /healthz``: the process answers (liveness).
- ``GET /readyz``: 200 when models load and every stream's input is up, else 503 with the
  reasons (readiness).
- ``GET /metrics``: Prometheus text format (see ``facecast.metrics``).
- ``GET /api/streams``, ``GET /api/streams/{key}``: status of each stream.
- ``POST /api/streams/{key}/source``: a new source face, as the raw body of a JPEG or PNG
  upload (``Content-Type: image/jpeg``), used from the stream's next frame.
- ``POST /api/streams/{key}/swapping``: ``{"enabled": false}`` passes frames through.

Security: routes that change anything need ``Authorization: Bearer <FACECAST_API_TOKEN>``.
Without a configured token they are open, so ``serve_http`` then binds to loopback only
and says so. Uploads are size-limited before they are read whole, typed by their bytes,
and decoded in memory: nothing from a request ever names a file.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from typing import Any

import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from facecast.errors import FacecastError, MediaError, NoFaceError
from facecast.media.image_io import UnsupportedImageError, decode_image_bytes
from facecast.metrics import CONTENT_TYPE, exposition, make_registry
from facecast.streams import StreamManager, UnknownStreamError

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
LOOPBACK = "127.0.0.1"


class SwappingRequest(BaseModel):
    enabled: bool


def create_app(
    manager: StreamManager, token: str | None, max_upload: int = MAX_UPLOAD_BYTES
) -> FastAPI:
    app = FastAPI(title="facecast", docs_url="/api/docs", openapi_url="/api/openapi.json")
    registry = make_registry(manager)
    # Model files are checked once: they do not change under a running process.
    model_problems = _model_problems()

    guard = bearer_guard(token)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        reasons = model_problems + manager.readiness()
        body = {"ready": not reasons, "reasons": reasons}
        return JSONResponse(body, status_code=200 if not reasons else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(exposition(registry), media_type=CONTENT_TYPE)

    @app.get("/api/streams")
    def streams() -> dict[str, Any]:
        return {"streams": [handle.status() for handle in manager.handles()]}

    @app.get("/api/streams/{key}")
    def stream(key: str) -> dict[str, Any]:
        try:
            return manager.get(key).status()
        except UnknownStreamError as exc:
            raise HTTPException(404, str(exc)) from None

    @app.post("/api/streams/{key}/source", dependencies=guard)
    async def set_source(key: str, request: Request) -> dict[str, Any]:
        try:
            manager.get(key)
        except UnknownStreamError as exc:
            raise HTTPException(404, str(exc)) from None
        name = f"upload for {key}"
        image = await read_image_upload(request, max_upload, name)
        try:
            manager.set_source(key, image, name)
        except NoFaceError as exc:
            raise HTTPException(422, str(exc)) from None
        except UnknownStreamError as exc:
            raise HTTPException(404, str(exc)) from None
        return {"key": key, "source_face": name, "width": image.shape[1], "height": image.shape[0]}

    @app.post("/api/streams/{key}/swapping", dependencies=guard)
    def set_swapping(key: str, body: SwappingRequest) -> dict[str, Any]:
        try:
            manager.set_swapping(key, body.enabled)
        except UnknownStreamError as exc:
            raise HTTPException(404, str(exc)) from None
        return {"key": key, "swapping": body.enabled}

    return app


def bearer_guard(token: str | None) -> list[Any]:
    """The dependency list for routes that change anything: 401 unless the request carries
    ``Authorization: Bearer <token>``. Without a token the server is loopback-only."""

    def authorised(request: Request) -> None:
        if token is None:
            return  # loopback-only server (see bind_host)
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    return [Depends(authorised)]


async def read_image_upload(request: Request, limit: int, name: str) -> np.ndarray:
    """The request body as an image, or the HTTP error that says what is wrong with it."""
    return decode_upload(await read_limited(request, limit), name)


def decode_upload(data: bytes, name: str) -> np.ndarray:
    """Uploaded bytes as an image: 415 when they are not a JPEG or PNG, 422 when they are
    one that cannot be used (corrupt, too many pixels)."""
    try:
        return decode_image_bytes(data, name)
    except UnsupportedImageError as exc:
        raise HTTPException(415, str(exc)) from None
    except MediaError as exc:
        raise HTTPException(422, str(exc)) from None


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, refusing (413) anything over ``limit`` bytes: by its declared length when
    there is one, else by counting as it arrives, so an oversize upload is never held whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"upload over {limit // (1024 * 1024)} MB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"upload over {limit // (1024 * 1024)} MB")
        chunks.append(chunk)
    return b"".join(chunks)


def _model_problems() -> list[str]:
    from facecast.models import REGISTRY, check

    problems = []
    for model in REGISTRY.values():
        problem = check(model)
        if problem:
            problems.append(problem)
    return problems


def bind_host(requested: str, token: str | None) -> str:
    """Where the HTTP plane may listen: anywhere with a token, loopback only without."""
    if token is None and requested not in (LOOPBACK, "localhost", "::1"):
        log.warning(
            "no FACECAST_API_TOKEN set: the HTTP plane listens on %s only (not %s); set a "
            "token to serve other hosts",
            LOOPBACK,
            requested,
        )
        return LOOPBACK
    if token is None:
        log.warning("no FACECAST_API_TOKEN set: control routes are open to local users")
    return requested


class ThreadedServer:
    """uvicorn on a thread of its own (``serve`` and ``web`` share it). ``start`` returns
    once the port is bound, or raises: a port in use must not leave a service that only
    looks up."""

    def __init__(self, app: Any, host: str, port: int, name: str = "http") -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.where = f"{host}:{port}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self.server.run()
        except SystemExit:  # uvicorn's way to say it could not bind; start() reports it
            log.debug("uvicorn on %s exited at startup", self.where)

    def start(self, timeout: float = 15.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.server.started:
            self.stop()
            raise FacecastError(f"the HTTP server did not start on {self.where} (port in use?)")

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
