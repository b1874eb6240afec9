"""Who may change a face, and the record of every attempt: ``serve``'s face gate.

Every face change that comes in over HTTP (a profile set, a running stream's source, a
reference, the web page's face, a consent registry change) runs inside an ``Attempt``
(the ``audited`` decorator on its route). Before the change is made, the route calls
``vet`` with the decoded images, which:

1. with ``--require-consent``: matches each face that would be put on someone against the
   consent registry (``facecast.safety.consent``); a face that matches no enrolled person is
   refused, 403 ``"ROLE: face not in the consent registry"``;
2. with ``--moderation-url``: POSTs the images and what is asked to the operator's webhook
   (``Moderator``), which allows or denies; a denial, an error or no answer within the
   timeout refuses the change, 403 with the reason.

A refused change changes nothing (a running stream keeps its face). When the route is done,
allowed, refused or failed, the attempt writes one line to the audit log
(``facecast.safety.audit``).

The webhook contract (version 1). facecast sends ``POST URL`` with ``Content-Type:
application/json``, ``User-Agent: facecast/VERSION`` and, when ``FACECAST_MODERATION_TOKEN``
is set, ``Authorization: Bearer <it>``; the body::

    {"version": 1,
     "change": "stream_source",          # profile_set, stream_source, reference, web_face
     "key": "alice",                     # the stream key (web_face: the page's session id)
     "requester": {"token": "3f9a0c1b2d4e", "client": "10.0.0.7"},
     "images": [{"role": "source",       # source, or a reference's photo and face
                 "sha256": "...",        # audit.image_sha256 of the decoded image
                 "width": 640, "height": 480,
                 "type": "image/png", "data": "<base64 PNG of the decoded image>"}]}

``token`` is ``audit.token_id`` of the API token (never the token), null without one.
The webhook answers ``200`` with ``{"allow": true}`` or ``{"allow": false, "reason":
"..."}``. Anything else denies: another status, a body that is not such JSON, a
connection error, or no whole answer within the timeout (``--moderation-timeout``,
default 5 s). Redirects are not followed and proxy settings are not used.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import http.client
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar
from urllib.parse import urlsplit

import cv2
import numpy as np
from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool

from facecast import __version__
from facecast.errors import FacecastError, NoFaceError
from facecast.safety.audit import AuditLog, image_sha256, token_id
from facecast.safety.consent import REFUSED

if TYPE_CHECKING:
    from facecast.safety.consent import ConsentRegistry
    from facecast.serve.store import ClusterStore

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
TOKEN_ENV = "FACECAST_MODERATION_TOKEN"
MAX_REPLY = 64 * 1024  # a verdict is a line of JSON
MAX_REASON = 300  # characters of a webhook's reason passed on to the client
ATTEMPT = "face_attempt"  # where a request keeps its Attempt (request.state)

Images = list[tuple[str, np.ndarray]]  # (role, decoded image)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""


class Moderator:
    """The operator's moderation webhook. ``review`` never raises: whatever goes wrong is a
    denial that says why."""

    def __init__(
        self, url: str, timeout: float = DEFAULT_TIMEOUT, token: str | None = None
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FacecastError(f"--moderation-url {url!r}: expected an http:// or https:// URL")
        if not timeout > 0:
            raise FacecastError(f"--moderation-timeout {timeout!r}: expected seconds over 0")
        self.url = url
        self.timeout = timeout
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None

    async def review(
        self, change: str, key: str | None, requester: dict[str, Any], images: Images
    ) -> Verdict:
        body = await asyncio.to_thread(_payload, change, key, requester, images)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"facecast/{__version__}",
            "Connection": "close",
        }
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        exchange = _Exchange(self.url, self.timeout)
        try:
            status, reply = await asyncio.wait_for(
                asyncio.to_thread(exchange.post, body, headers), self.timeout
            )
        except TimeoutError:  # the deadline, or the socket's own timeout in the thread
            exchange.abort()  # the thread's socket: it stops waiting too
            return Verdict(False, f"moderation webhook: no answer within {self.timeout:g} s")
        except (OSError, http.client.HTTPException) as exc:  # ssl.SSLError is an OSError
            return Verdict(False, f"moderation webhook: {type(exc).__name__}: {exc}".rstrip(": "))
        return _verdict(status, reply)


class _Exchange:
    """One POST over http.client on a worker thread, with a socket timeout, that the event
    loop can cut short (``abort``) when the overall deadline passes."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        kind = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        self.conn = kind(parts.hostname or "", parts.port, timeout=timeout)
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        try:
            self.conn.request("POST", self.target, body=body, headers=headers)
            reply = self.conn.getresponse()
            return reply.status, reply.read(MAX_REPLY + 1)
        finally:
            self.conn.close()

    def abort(self) -> None:
        sock = self.conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _payload(change: str, key: str | None, requester: dict[str, Any], images: Images) -> bytes:
    entries = []
    for role, image in images:
        ok, png = cv2.imencode(".png", image)
        if not ok:
            raise FacecastError(f"{role}: cannot encode the image for the moderation webhook")
        entries.append(
            {
                "role": role,
                "sha256": image_sha256(image),
                "width": int(image.shape[1]),
                "height": int(image.shape[0]),
                "type": "image/png",
                "data": base64.b64encode(png.tobytes()).decode(),
            }
        )
    message = {
        "version": 1,
        "change": change,
        "key": key,
        "requester": requester,
        "images": entries,
    }
    return json.dumps(message).encode()


def _verdict(status: int, reply: bytes) -> Verdict:
    if status != 200:
        return Verdict(False, f"moderation webhook answered HTTP {status}")
    if len(reply) > MAX_REPLY:
        return Verdict(False, f"moderation webhook: answer over {MAX_REPLY // 1024} KB")
    try:
        data = json.loads(reply)
    except ValueError:
        return Verdict(False, 'moderation webhook: expected JSON {"allow": true|false}')
    if not isinstance(data, dict) or not isinstance(data.get("allow"), bool):
        return Verdict(False, 'moderation webhook: expected JSON {"allow": true|false}')
    if data["allow"]:
        return Verdict(True)
    reason = data.get("reason")
    reason = " ".join(str(reason).split())[:MAX_REASON] if reason else "no reason given"
    return Verdict(False, f"denied by moderation: {reason}")


# ---------------------------------------------------------------------------- the gate


class FaceGate:
    """Consent, moderation and the audit log for one service. Any part may be off: a
    gate with none of them lets everything through and records nothing."""

    def __init__(
        self,
        *,
        token: str | None,
        registry: ConsentRegistry | None = None,
        require_consent: bool = False,
        moderator: Moderator | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        if require_consent and registry is None:
            raise FacecastError(
                "--require-consent needs the consent registry: a state folder "
                "(--state-dir) or, in a cluster, the store"
            )
        self.token_id = token_id(token)
        self.registry = registry
        self.require_consent = require_consent
        self.moderator = moderator
        self.audit = audit

    def attempt(self, request: Request, key: str | None, change: str) -> Attempt:
        return Attempt(self, request, key, change)

    def record(self, entry: dict[str, Any]) -> None:
        """A line in the audit log, if there is one (``facecast consent`` writes its own)."""
        if self.audit is not None:
            self.audit.write(entry)


class Attempt:
    """One face change over HTTP: vetted by ``vet``, recorded on exit."""

    def __init__(self, gate: FaceGate, request: Request, key: str | None, change: str) -> None:
        self.gate = gate
        self.key = key
        self.change = change
        client = request.client.host if request.client else None
        self.requester = {"token": gate.token_id, "client": client}
        self.faces: list[dict[str, Any]] = []
        self.refused = False
        self.moderation: str | None = None
        self.quiet = False  # no face was asked for after all (see ``no_face_change``)

    async def note(self, images: Images) -> None:
        """Name ``images`` in the audit line without vetting them."""
        if self.gate.audit is not None:
            hashes = await run_in_threadpool(lambda: [image_sha256(i) for _, i in images])
            self.faces += [
                {"role": role, "sha256": digest}
                for (role, _), digest in zip(images, hashes, strict=True)
            ]

    async def vet(self, faces: Images, others: Images | None = None) -> None:
        """Refuse the change (HTTPException 403, and nothing changes) unless each of
        ``faces`` (faces that will be put on people) is enrolled when consent is required,
        and the moderation webhook allows ``faces`` and ``others`` (e.g. a reference's
        photo of who gets swapped). 422 for a face to check that shows no face."""
        gate = self.gate
        start = len(self.faces)
        others = others or []
        await self.note([*faces, *others])
        if gate.require_consent:
            assert gate.registry is not None
            for index, (role, image) in enumerate(faces):
                try:
                    match = await run_in_threadpool(gate.registry.match, image, role)
                except NoFaceError as exc:
                    raise HTTPException(422, str(exc)) from None
                except FacecastError as exc:  # the registry cannot be read: nothing passes
                    raise HTTPException(503, f"consent registry: {exc}") from None
                if gate.audit is not None:
                    self.faces[start + index].update(match.describe())
                if not match.accepted:
                    self.refused = True
                    raise HTTPException(403, f"{role}: {REFUSED}")
        if gate.moderator is not None:
            verdict = await gate.moderator.review(
                self.change, self.key, self.requester, [*faces, *others]
            )
            self.moderation = "allowed" if verdict.allowed else verdict.reason
            if not verdict.allowed:
                self.refused = True
                raise HTTPException(403, verdict.reason)

    def entry(self, status: int, reason: str | None) -> dict[str, Any]:
        subject = "person" if self.change.startswith("consent") else "key"
        allowed = status < 400
        outcome = "allowed" if allowed else "denied" if self.refused else "failed"
        entry: dict[str, Any] = {
            "change": self.change,
            subject: self.key,
            "faces": self.faces,
            **self.requester,
            "allowed": allowed,
            "outcome": outcome,
            "status": status,
            "reason": reason,
        }
        if self.moderation is not None:
            entry["moderation"] = self.moderation
        return entry

    async def __aenter__(self) -> Attempt:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _: Any
    ) -> None:
        if self.gate.audit is None or (self.quiet and exc is None):
            return
        if exc is None:
            status, reason = 200, None
        elif isinstance(exc, HTTPException):
            status, reason = exc.status_code, str(exc.detail)
        elif isinstance(exc, Exception):
            status, reason = 500, f"{type(exc).__name__}: {exc}"
        else:  # cancelled (the client left, the server stops): no awaiting any more
            self.gate.audit.write(self.entry(499, "the request was cancelled"))
            return
        await run_in_threadpool(self.gate.audit.write, self.entry(status, reason))


R = TypeVar("R")


def audited(
    change: str, gate: FaceGate | None = None, *, key: str = "key"
) -> Callable[[Callable[..., Awaitable[R]]], Callable[..., Awaitable[R]]]:
    """A route that changes a face runs inside an ``Attempt`` of ``gate`` (None: the
    ``gate`` attribute of the method's object, when it has one); ``key``: the route's
    parameter that names what changes. Its ``request`` parameter reaches ``vet``/``note``.
    Without a gate the route runs as it is."""

    def decorate(route: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
        @functools.wraps(route)
        async def wrapper(*args: Any, **kwargs: Any) -> R:
            chosen = gate if gate is not None else getattr(args[0], "gate", None) if args else None
            request = kwargs.get("request")
            if chosen is None or request is None:
                return await route(*args, **kwargs)
            attempt = chosen.attempt(request, kwargs.get(key), change)
            setattr(request.state, ATTEMPT, attempt)
            async with attempt:
                return await route(*args, **kwargs)

        return wrapper

    return decorate


async def vet(request: Request, faces: Images, others: Images | None = None) -> None:
    """``Attempt.vet`` for the request's attempt; nothing when it has none (no gate)."""
    attempt = getattr(request.state, ATTEMPT, None)
    if attempt is not None:
        await attempt.vet(faces, others)


def no_face_change(request: Request) -> None:
    """The request turned out to ask for no face (a web session opened without one): if
    it succeeds, it is not an attempt to log."""
    attempt = getattr(request.state, ATTEMPT, None)
    if attempt is not None:
        attempt.quiet = True


async def note(request: Request, images: Images) -> None:
    """``Attempt.note`` for the request's attempt; nothing when it has none."""
    attempt = getattr(request.state, ATTEMPT, None)
    if attempt is not None:
        await attempt.note(images)


@dataclass(frozen=True)
class GateSettings:
    """What ``serve`` is told about its face gate, the same on every role that takes faces
    (single box, ingest, worker): ``require_consent``, the moderation webhook's URL and
    timeout, and the audit log's file (None: ``audit.log`` in the state folder)."""

    require_consent: bool = False
    moderation_url: str | None = None
    moderation_timeout: float = DEFAULT_TIMEOUT
    audit_log: Path | None = None


class GateOptions(TypedDict, total=False):
    """``GateSettings`` as keyword arguments: how ``Service`` and ``Worker`` take them."""

    require_consent: bool
    moderation_url: str | None
    moderation_timeout: float
    audit_log: Path | None


def build_gate(
    settings: GateSettings,
    *,
    token: str | None,
    state_dir: Path | None,
    store: ClusterStore | None = None,
) -> FaceGate:
    """``serve``'s gate. The consent registry lives with the state: in ``store`` for a
    cluster's ingest, else in ``state_dir`` (none without either). The audit log is
    ``settings.audit_log``, by default ``audit.log`` in ``state_dir`` (none without one)."""
    from facecast.safety.audit import AUDIT_FILE
    from facecast.safety.consent import ConsentRegistry

    registry = None
    if store is not None:
        registry = ConsentRegistry.in_store(store)
    elif state_dir is not None:
        registry = ConsentRegistry.in_folder(state_dir)
    audit_log = settings.audit_log
    if audit_log is None and state_dir is not None:
        audit_log = state_dir / AUDIT_FILE
    url = settings.moderation_url
    moderator = Moderator(url, settings.moderation_timeout) if url else None
    return FaceGate(
        token=token,
        registry=registry,
        require_consent=settings.require_consent,
        moderator=moderator,
        audit=AuditLog(audit_log) if audit_log is not None else None,
    )
