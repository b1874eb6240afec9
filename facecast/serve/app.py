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

An image upload is the raw body (a JPEG or PNG, whatever the ``Content-Type`` says) or
``multipart/form-data`` with the image in a part named ``file`` (``curl -F file=@face.jpg``).
Both get the same checks: 413 over the size limit, 415 when the bytes are not a JPEG or
PNG, 422 when the image cannot be used.

Security: routes that change anything, and those that list stream keys (a key is what a
publisher needs to publish), need ``Authorization: Bearer <FACECAST_API_TOKEN>``. Without a
configured token they are open, so ``bind_host`` then keeps the server on loopback and says
so. Uploads are size-limited while they arrive (a raw body and every multipart part alike:
nothing oversize is ever held whole), typed by their bytes, checked against the pixel and
decoding budget from their header, and decoded in memory, off the event loop: nothing from
a request ever names a file. A client gets ``HEADER_TIMEOUT`` seconds to send a request's
head and ``BODY_TIMEOUT`` seconds between pieces of its body (``ThreadedServer``), so
stalled requests do not pile up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any

import anyio.to_thread
import h11
import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from facecast.errors import FacecastError, MediaError, NoFaceError
from facecast.media.image_io import UnsupportedImageError, decode_image_bytes
from facecast.safety.moderation import FaceGate, audited, vet
from facecast.serve.metrics import CONTENT_TYPE, exposition, make_registry
from facecast.serve.streams import StreamEndedError, StreamManager, UnknownStreamError

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
LOOPBACK = "127.0.0.1"
# room in a multipart body for the boundaries and part headers around the images
FORM_OVERHEAD = 64 * 1024
UPLOAD_FIELD = "file"  # the multipart part holding a single-image upload (curl -F file=@x)

# Called on the event loop after a stream took a new face through the API: (key, photos of
# the face, name) -> whether the face was kept for the key's next publish too.
SourceHook = Callable[[str, list[np.ndarray], str], bool]
# Photos of one source person in one upload (repeated ``file`` parts): each face gets the one
# nearest its expression (swap/sources.py).
MAX_SOURCE_PHOTOS = 8
# Decoding an upload takes CPU and memory (up to image_io.MAX_DECODED_BYTES a picture, more
# while it is converted): on threads, so the event loop (/healthz, the publish hooks) never
# waits on one, and a few at a time, so a burst of uploads cannot add up.
DECODES_AT_ONCE = 2
# Slow clients: seconds to send a request's head (from its first byte, or from the
# connection when nothing came yet), and seconds the server waits for each piece of a body
# it is reading. Generous for a person's curl, short for a connection held open on purpose.
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
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


async def read_image_upload(request: Request, limit: int, name: str) -> np.ndarray:
    """The uploaded image (the raw body, or the multipart part ``file``), or the HTTP error
    that says what is wrong with it."""
    return (await read_image_uploads(request, limit, name, most=1))[0]


async def read_image_uploads(
    request: Request, limit: int, name: str, most: int = MAX_SOURCE_PHOTOS
) -> list[np.ndarray]:
    """Like ``read_image_upload``, but a multipart body may repeat the part ``file`` up to
    ``most`` times: several photos of one person. Each gets the same checks."""
    if not is_multipart(request):
        return [await decode_off_loop(request, await read_limited(request, limit), name)]
    parts = await read_form(
        request, limit, (UPLOAD_FIELD,), required=(UPLOAD_FIELD,), repeatable={UPLOAD_FIELD: most}
    )
    photos = parts[UPLOAD_FIELD]
    if len(photos) == 1:
        return [await decode_off_loop(request, photos[0], name)]
    return [
        await decode_off_loop(request, data, f"{name} (photo {i + 1})")
        for i, data in enumerate(photos)
    ]


async def decode_off_loop(request: Request, data: bytes, name: str) -> np.ndarray:
    """``decode_upload`` on a worker thread, at most ``DECODES_AT_ONCE`` per app at a time."""
    state = request.app.state
    limiter = getattr(state, "decode_limiter", None)
    if limiter is None:  # made here, on the loop it serves (one at a time: no race)
        limiter = state.decode_limiter = anyio.CapacityLimiter(DECODES_AT_ONCE)
    return await anyio.to_thread.run_sync(decode_upload, data, name, limiter=limiter)


def decode_upload(data: bytes, name: str) -> np.ndarray:
    """Uploaded bytes as an image: 415 when they are not a JPEG or PNG, 422 when they are
    one that cannot be used (corrupt, too many pixels, over the decoding budget). Slow for
    a large picture: from a coroutine, use ``decode_off_loop``."""
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
        raise HTTPException(413, f"upload over {size_text(limit)}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"upload over {size_text(limit)}")
        chunks.append(chunk)
    return b"".join(chunks)


def size_text(size: int) -> str:
    """A byte limit for a reason: in MB, or in KB under one (not "over 0 MB")."""
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):g} MB"
    return f"{size / 1024:g} KB"


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def read_form(
    request: Request,
    limit: int,
    fields: Collection[str],
    required: Collection[str] = (),
    repeatable: dict[str, int] | None = None,
) -> dict[str, list[bytes]]:
    """The parts of a ``multipart/form-data`` body, by name (each a list, in order): only
    ``fields``, each at most ``limit`` bytes, each of ``required`` present, a part given more
    than once only if ``repeatable`` allows it (up to its count). Parsed as the body
    arrives, so an oversize part is refused (413) without being held whole; an unknown or
    repeated part, a missing one or a broken body gets 422."""
    repeatable = repeatable or {}
    over = HTTPException(413, f"upload over {size_text(limit)}")
    # the parts and the framing around them
    total = sum(repeatable.get(name, 1) for name in fields) * limit + FORM_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > total:
        raise over
    form = FormParts(_boundary(request), limit, fields, repeatable)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > total:
            raise over
        form.feed(chunk)
    return form.finish(required)


def _boundary(request: Request) -> bytes:
    _, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary", b"")
    if not boundary:
        raise HTTPException(422, "multipart body without a boundary in its Content-Type")
    return boundary


class FormParts:
    """A streaming ``multipart/form-data`` parser that keeps only the parts it is told to,
    each up to ``limit`` bytes: python-multipart's low-level parser, because Starlette's
    ``request.form()`` spools any size of file to disk before a handler can refuse it."""

    def __init__(
        self,
        boundary: bytes,
        limit: int,
        fields: Collection[str],
        repeatable: dict[str, int] | None = None,
    ) -> None:
        self.limit, self.fields = limit, frozenset(fields)
        self.repeatable = repeatable or {}
        self.parts: dict[str, list[bytearray]] = {}
        self._current: tuple[str, bytearray] | None = None
        self._headers: dict[str, bytes] = {}
        self._header = [bytearray(), bytearray()]  # field, value of the header being read
        self._ended = False
        try:
            self._parser = MultipartParser(boundary, callbacks=self._callbacks())  # type: ignore[arg-type]
        except (ValueError, MultipartParseError) as exc:  # e.g. a boundary over 70 bytes
            raise HTTPException(422, f"multipart boundary: {exc}") from None

    def _callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header[0].extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header[1].extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_end": self._end,
        }

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise HTTPException(422, f"multipart body: {exc}") from None

    def finish(self, required: Collection[str]) -> dict[str, list[bytes]]:
        if not self._ended:
            raise HTTPException(422, "multipart body: it ends before its closing boundary")
        missing = [name for name in required if name not in self.parts]
        if missing:
            raise HTTPException(422, f"multipart body: no part named {', '.join(missing)}")
        return {name: [bytes(data) for data in datas] for name, datas in self.parts.items()}

    def _part_begin(self) -> None:
        self._current, self._headers = None, {}

    def _header_end(self) -> None:
        field, value = self._header
        self._headers[bytes(field).decode("latin-1").lower()] = bytes(value)
        field.clear()
        value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name not in self.fields:
            expected = ", ".join(sorted(self.fields))
            raise HTTPException(422, f"multipart body: unknown part {name!r} (expected {expected})")
        given = self.parts.setdefault(name, [])
        most = self.repeatable.get(name, 1)
        if len(given) >= most:
            if most == 1:
                raise HTTPException(422, f"multipart body: part {name!r} given twice")
            raise HTTPException(422, f"multipart body: part {name!r} at most {most} times")
        given.append(bytearray())
        self._current = (name, given[-1])

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._current is not None  # data comes after its part's headers
        name, buffer = self._current
        buffer.extend(data[start:end])
        if len(buffer) > self.limit:
            raise HTTPException(413, f"{name}: upload over {size_text(self.limit)}")

    def _end(self) -> None:
        self._ended = True


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


class ThreadedServer:
    """uvicorn on a thread of its own (``serve`` and ``web`` share it). ``start`` returns
    once the port is bound, or raises: a port in use must not leave a service that only
    looks up. ``header_timeout`` and ``body_timeout``: see ``HEADER_TIMEOUT``,
    ``BODY_TIMEOUT``; a request that runs past either gets 408 and its connection closes."""

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        name: str = "http",
        *,
        header_timeout: float = HEADER_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
    ) -> None:
        config = uvicorn.Config(
            BodyTimeout(app, body_timeout),
            host=host,
            port=port,
            log_level="warning",
            lifespan="off",
            # uvicorn times out only idle kept-alive connections: the head of a request
            # gets a deadline from this protocol (h11, the parser uvicorn picks anyway)
            http=functools.partial(TimedH11Protocol, header_timeout=header_timeout),  # type: ignore[arg-type]
        )
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

    def is_alive(self) -> bool:
        return self._thread.is_alive()


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's head: ``header_timeout``
    seconds from the connection (nothing sent yet) or from the first byte of a request on a
    kept-alive one. Past it, 408 and the connection closes (just closes when nothing at all
    came). Idle kept-alive connections are uvicorn's own ``timeout_keep_alive``; bodies are
    ``BodyTimeout``'s."""

    def __init__(self, *args: Any, header_timeout: float = HEADER_TIMEOUT, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_deadline()  # the head is in: the app's (and the body's) now
        elif self._head_deadline is None and self.conn.trailing_data[0]:
            self._arm_head_deadline()  # part of the next request on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        transport = self.transport
        # still this protocol's (not upgraded), still open, still waiting for a head
        if transport.is_closing() or transport.get_protocol() is not self:
            return
        if self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # a request had begun: say why it ends
            reason = f"request head not received within {self.header_timeout:g} s".encode()
            transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(reason), reason)
            )
        transport.close()


class BodyTimeout:
    """ASGI middleware: while the app reads a request's body, each piece must come within
    ``timeout`` seconds, else the read raises HTTPException 408 (so the route's own error
    handling answers, and nothing half-uploaded is used) and the connection closes. Once the
    body is complete, reads wait as long as they like (they then only signal a disconnect)."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        complete = False

        async def timed_receive() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout(self.timeout):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(
                    408,
                    f"request body: nothing received for {self.timeout:g} s",
                    headers={"Connection": "close"},
                ) from None
            complete = message["type"] != "http.request" or not message.get("more_body")
            return message

        await self.app(scope, timed_receive, send)
