"""The HTTP control plane: health, readiness, metrics, stream status and control.

Routes:
- ``GET /healthz``: the process answers (liveness).
- ``GET /readyz``: 200 when models load and every stream's input is up, else 503 with the
  reasons (readiness).
- ``GET /metrics``: Prometheus text format (see ``facecast.serve.metrics``). Open, like the two
  above: probes and scrapers send no token. Its ``stream`` label is the key, or with
  ``FACECAST_METRICS_KEYS=hash`` a keyed hash of it (``metrics_label``).
- ``GET /api/streams``, ``GET /api/streams/{key}``: status of each stream, running or ended
  within the manager's retention (``state``: running, ended or failed; times in ISO-8601
  UTC).
- ``POST /api/streams/{key}/source``: a new source face, used from the stream's next frame;
  409 once the stream has ended. ``facecast serve`` also makes it the key's profile face
  (``on_source``), so the next publish on the key keeps it.
- ``POST /api/streams/{key}/swapping``: ``{"enabled": false}`` passes frames through.

Uploads and their checks: ``facecast.serve.uploads``; the server thread and its deadlines
for slow clients: ``facecast.serve.http_server`` (both importable from here too).

Security: routes that change anything, and those that list stream keys (a key is what a
publisher needs to publish), need ``Authorization: Bearer <FACECAST_API_TOKEN>``. Without a
configured token they are open, so ``bind_host`` then keeps the server on loopback and says
so.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from facecast.errors import FacecastError, NoFaceError
from facecast.safety.moderation import FaceGate, audited, vet
from facecast.serve.http_server import ThreadedServer
from facecast.serve.metrics import CONTENT_TYPE, exposition, make_registry
from facecast.serve.streams import StreamEndedError, StreamManager, UnknownStreamError
from facecast.serve.uploads import (
    MAX_UPLOAD_BYTES,
    decode_off_loop,
    is_multipart,
    read_form,
    read_image_upload,
    read_image_uploads,
    read_limited,
)

# The uploads and the server thread have modules of their own; their names that callers
# import from here stay importable from here.
__all__ = [
    "LOOPBACK",
    "MAX_UPLOAD_BYTES",
    "METRICS_KEYS_ENV",
    "SourceHook",
    "SwappingRequest",
    "ThreadedServer",
    "bearer_guard",
    "bind_host",
    "create_app",
    "decode_off_loop",
    "is_multipart",
    "metrics_label",
    "read_form",
    "read_image_upload",
    "read_image_uploads",
    "read_limited",
    "stream_errors",
]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# Called on the event loop after a stream took a new face through the API: (key, photos of
# the face, name) -> whether the face was kept for the key's next publish too.
SourceHook = Callable[[str, list[np.ndarray], str], bool]
# The ``stream`` label of /metrics: the key, or a keyed hash of it for keys that are secrets
METRICS_KEYS_ENV = "FACECAST_METRICS_KEYS"
METRICS_KEYS = ("key", "hash")


class SwappingRequest(BaseModel):
    enabled: bool


def create_app(
    manager: StreamManager,
    token: str | None,
    max_upload: int = MAX_UPLOAD_BYTES,
    on_source: SourceHook | None = None,
    metrics_keys: str | None = None,
    gate: FaceGate | None = None,
) -> FastAPI:
    """``metrics_keys``: ``key`` or ``hash`` (see ``metrics_label``); None reads
    ``FACECAST_METRICS_KEYS``, ``key`` when it is not set. ``gate``: consent, moderation
    and the audit log for a new source face (``facecast.safety.moderation``; None: none)."""
    app = FastAPI(title="facecast", docs_url="/api/docs", openapi_url="/api/openapi.json")
    label = metrics_label(metrics_keys, token)
    registry = make_registry(manager, label=label)
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

    def status(handle: Any) -> dict[str, Any]:
        if label is None:
            return handle.status()
        return {**handle.status(), "metrics_label": label(handle.key)}

    # the keys, and whether a guessed one exists, are for the token holder
    @app.get("/api/streams", dependencies=guard)
    def streams() -> dict[str, Any]:
        return {"streams": [status(handle) for handle in manager.handles()]}

    @app.get("/api/streams/{key}", dependencies=guard)
    def stream(key: str) -> dict[str, Any]:
        try:
            return status(manager.get(key))
        except UnknownStreamError as exc:
            raise HTTPException(404, str(exc)) from None

    @app.post("/api/streams/{key}/source", dependencies=guard)
    @audited("stream_source", gate)
    async def set_source(key: str, request: Request) -> dict[str, Any]:
        with stream_errors():
            manager.running(key)  # 404/409 before the upload is read
        name = f"upload for {key}"
        images = await read_image_uploads(request, max_upload, name)
        # consent and moderation: a refused face (403) leaves the stream's face as it was
        await vet(request, [(_role("source", i, images), image) for i, image in enumerate(images)])
        with stream_errors():
            # face detection takes a while: off the loop, where the hooks are served
            await run_in_threadpool(manager.set_sources, key, images, name)
        # back on the loop, where the profile handlers run one at a time
        kept = on_source(key, images, name) if on_source is not None else False
        return {
            "key": key,
            "source_face": name,
            "photos": len(images),
            "width": images[0].shape[1],
            "height": images[0].shape[0],
            "profile_updated": kept,
        }

    @app.post("/api/streams/{key}/swapping", dependencies=guard)
    def set_swapping(key: str, body: SwappingRequest) -> dict[str, Any]:
        with stream_errors():
            manager.set_swapping(key, body.enabled)
        return {"key": key, "swapping": body.enabled}

    return app


def _role(name: str, index: int, photos: list[Any]) -> str:
    """What a photo is called in a refusal and the audit log: ``source``, or ``source 2``
    of several photos of the person."""
    return f"{name} {index + 1}" if len(photos) > 1 else name


def metrics_label(mode: str | None, token: str | None) -> Callable[[str], str] | None:
    """How a stream key becomes its ``stream`` label on /metrics, which is open: None for
    the key itself; for ``hash``, the first 12 hex digits of HMAC-SHA256(token, key), stable
    while the token is, and not to be reversed by hashing guesses without it (/api/streams
    shows each stream's label to the token holder). A bad mode is a FacecastError."""
    mode = mode if mode is not None else os.environ.get(METRICS_KEYS_ENV) or "key"
    if mode not in METRICS_KEYS:
        raise FacecastError(f"{METRICS_KEYS_ENV}={mode!r}: use one of {', '.join(METRICS_KEYS)}")
    if mode == "key":
        return None
    secret = (token or "").encode()
    return lambda key: hmac.new(secret, key.encode(), "sha256").hexdigest()[:12]


@contextlib.contextmanager
def stream_errors() -> Iterator[None]:
    """Stream errors as HTTP ones: 404 for an unknown key, 409 for an ended stream, 422 for
    a photo with no face."""
    try:
        yield
    except UnknownStreamError as exc:
        raise HTTPException(404, str(exc)) from None
    except StreamEndedError as exc:
        raise HTTPException(409, str(exc)) from None
    except NoFaceError as exc:
        raise HTTPException(422, str(exc)) from None


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


def _model_problems() -> list[str]:
    from facecast.models.registry import REGISTRY, check

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
