"""``facecast serve``: the ingest server, the HTTP plane and one pipeline per stream key.

A publisher pushes ``rtmp://HOST/live/KEY``. nginx asks the HTTP plane (``on_publish``)
whether KEY may publish; a key with a profile is accepted and its pipeline starts, reading
``live/KEY`` and publishing ``swapped/KEY`` with the profile's face. When the publisher
stops (``on_publish_done``) the pipeline stops. Everything lives on the ``Service`` object:
several can run in one process (the tests do).

A profile may name references (reference mode): then only the people in those photos are
swapped, each with the profile's face or a face of their own, and everyone else is left as
they are. Profiles and their references change through the HTTP API; a change takes effect
at the key's next publish.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import re
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import cv2
import numpy as np
import yaml
from fastapi import HTTPException, Request
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from facecast.config import Reference, StreamSettings
from facecast.errors import FacecastError
from facecast.faces.analyse import FaceAnalyser
from facecast.faces.select import Selection
from facecast.ingest import IngestServer
from facecast.live import engine_options
from facecast.server import (
    LOOPBACK,
    MAX_UPLOAD_BYTES,
    ThreadedServer,
    bearer_guard,
    bind_host,
    create_app,
    decode_upload,
    read_image_upload,
    read_limited,
)
from facecast.streams import StreamManager, UnknownStreamError
from facecast.web import mount_web
from facecast.webrtc import WebSessions

log = logging.getLogger(__name__)

BLENDS = ("feather", "poisson")
KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Profile:
    """How one stream key is swapped."""

    source: Path
    faces: str = "all"
    blend: str = "feather"
    # reference mode: (photo of a person to swap, the face they get; None = ``source``)
    references: tuple[Reference, ...] = ()
    # models for this key only (detector, recogniser, swapper, enhancer), over serve's own
    models: tuple[tuple[str, str], ...] = ()


MODEL_FIELDS = ("detector", "recogniser", "swapper", "enhancer")


def load_profiles(path: Path) -> dict[str, Profile]:
    """``KEY: {source: PHOTO, faces: ..., blend: ..., references: [...]}`` from a YAML file.
    Each reference is ``PHOTO`` or ``{photo: PHOTO, face: FACE}``. A relative photo path is
    relative to the file. Every problem is reported with the key it is under."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise FacecastError(f"{path}: cannot read the profiles ({exc})") from None
    if not isinstance(data, dict):
        raise FacecastError(f"{path}: expected a mapping of stream key to profile")
    profiles = {}
    for key, entry in data.items():
        where = f"{path}: profile {key!r}"
        if not isinstance(entry, dict) or "source" not in entry:
            raise FacecastError(f"{where}: needs at least `source: PHOTO`")
        unknown = set(entry) - {"source", "faces", "blend", "references", *MODEL_FIELDS}
        if unknown:
            raise FacecastError(f"{where}: unknown fields {', '.join(sorted(unknown))}")
        source = Path(entry["source"])
        source = source if source.is_absolute() else path.parent / source
        profile = Profile(
            source,
            str(entry.get("faces", "all")),
            str(entry.get("blend", "feather")),
            _load_references(entry.get("references"), path.parent, where),
            tuple((job, str(entry[job])) for job in MODEL_FIELDS if entry.get(job)),
        )
        try:
            Selection.parse(profile.faces)
        except ValueError as exc:
            raise FacecastError(f"{where}: {exc}") from None
        if profile.blend not in BLENDS:
            raise FacecastError(f"{where}: blend must be one of {', '.join(BLENDS)}")
        if not source.is_file():
            raise FacecastError(f"{where}: source photo {source} not found")
        profiles[str(key)] = profile
    return profiles


REFERENCE_FORMS = "PHOTO or {photo: PHOTO, face: FACE}"


def _load_references(value: Any, folder: Path, where: str) -> tuple[Reference, ...]:
    """A profile's ``references:`` list, each photo checked to exist."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise FacecastError(f"{where}: references must be a list, each item {REFERENCE_FORMS}")
    references = []
    for index, item in enumerate(value):
        at = f"{where}: references[{index}]"
        if isinstance(item, str):
            fields: dict[Any, Any] = {"photo": item}
        elif isinstance(item, dict):
            fields = item
            unknown = set(map(str, fields)) - {"photo", "face"}
            if unknown:
                raise FacecastError(f"{at}: unknown fields {', '.join(sorted(unknown))}")
            if "photo" not in fields:
                raise FacecastError(f"{at}: needs `photo: PHOTO`")
        else:
            raise FacecastError(f"{at}: expected {REFERENCE_FORMS}")
        paths: dict[str, Path | None] = {"photo": None, "face": None}
        for name in paths:
            given = fields.get(name)
            if given is None and name == "face":
                continue
            if not isinstance(given, str) or not given.strip():
                raise FacecastError(f"{at}: {name} must be a photo's path")
            photo = Path(given)
            photo = photo if photo.is_absolute() else folder / photo
            if not photo.is_file():
                raise FacecastError(f"{at}: {name} {photo} not found")
            paths[name] = photo
        assert paths["photo"] is not None
        references.append((paths["photo"], paths["face"]))
    return tuple(references)


class Service:
    def __init__(
        self,
        profiles: dict[str, Profile],
        *,
        token: str | None,
        host: str = LOOPBACK,
        http_port: int = 8080,
        rtmp_port: int = 1935,
        hls_port: int = 8088,
        prefix: Path | None = None,
        base: StreamSettings | None = None,
        max_upload: int = MAX_UPLOAD_BYTES,
    ) -> None:
        """Nothing starts until ``start()``: ``app`` can be driven on its own (tests do)."""
        self.profiles = dict(profiles)
        self.max_upload = max_upload
        self.base = base or StreamSettings()
        self.manager = StreamManager()
        self.host = bind_host(host, token)
        self.http_port = http_port
        hook = f"http://{LOOPBACK}:{http_port}/hooks/rtmp"
        # The ingest server opens to other hosts exactly when the HTTP plane does.
        self.ingest = IngestServer(
            rtmp_port, hls_port, prefix, on_publish_url=hook, listen=self.host
        )
        self.app = create_app(self.manager, token, max_upload)
        # the browser page (/web/, /api/web/): WebRTC sessions with this service's models
        self.web = WebSessions(engine_options(self.base))
        mount_web(self.app, self.web, token, max_upload)
        self.app.add_api_route("/hooks/rtmp", self._rtmp_hook, methods=["POST"])
        self.app.add_api_route(
            "/api/profiles/{key}",
            self._put_profile,
            methods=["PUT"],
            dependencies=bearer_guard(token),
        )
        self.app.add_api_route(
            "/api/profiles/{key}/references",
            self._add_reference,
            methods=["POST"],
            dependencies=bearer_guard(token),
            openapi_extra={"requestBody": REFERENCE_BODY},
        )
        self.app.add_api_route(
            "/api/profiles/{key}/references",
            self._clear_references,
            methods=["DELETE"],
            dependencies=bearer_guard(token),
        )
        self.app.add_api_route("/api/profiles", self._list_profiles, methods=["GET"])
        # Faces uploaded for new profiles: a private folder, files named by us, never by
        # the request.
        self._uploads = Path(tempfile.mkdtemp(prefix="facecast-faces-"))
        self._http: ThreadedServer | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Service:
        self._http = ThreadedServer(self.app, self.host, self.http_port)
        self._http.start()
        self.ingest.start()
        log.info(
            "serving %d profile(s): publish to %s, watch %s; HTTP on %s:%d",
            len(self.profiles),
            self.ingest.rtmp_url("live", "KEY"),
            self.ingest.rtmp_url("swapped", "KEY"),
            self.host,
            self.http_port,
        )
        return self

    def stop(self) -> None:
        """Stop every stream (each flushes its output), then nginx, then the HTTP plane."""
        self.manager.stop_all()
        self.web.close_all_blocking()  # on the HTTP loop, so before the HTTP plane stops
        self.ingest.stop()
        if self._http is not None:
            self._http.stop()
        shutil.rmtree(self._uploads, ignore_errors=True)

    # ------------------------------------------------------------------ profiles API

    # Handlers that read or change ``profiles`` are coroutines: they all run on the event
    # loop, one at a time, so a change is never seen half made.

    async def _list_profiles(self) -> dict[str, Any]:
        return {
            key: {
                "source": p.source.name,
                "faces": p.faces,
                "blend": p.blend,
                "references": _reference_names(p),
                **dict(p.models),
            }
            for key, p in sorted(self.profiles.items())
        }

    async def _put_profile(
        self, key: str, request: Request, faces: str = "all", blend: str = "feather"
    ) -> dict[str, Any]:
        """A profile for ``key`` from an uploaded face photo (the request body); options as
        query parameters. A key's references are kept. Takes effect at the key's next
        publish."""
        if not KEY_RE.fullmatch(key):
            raise HTTPException(422, "stream key: 1-64 letters, digits, '-' or '_'")
        try:
            Selection.parse(faces)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        if blend not in BLENDS:
            raise HTTPException(422, f"blend must be one of {', '.join(BLENDS)}")
        name = f"face for {key}"
        image = await read_image_upload(request, self.max_upload, name)
        await run_in_threadpool(_require_face, image, name)
        path = self._store(image)
        old = self.profiles.get(key)
        kept = (old.references, old.models) if old else ((), ())
        self.profiles[key] = Profile(path, faces, blend, *kept)
        log.info("profile %s: set through the API", key)
        return {"key": key, "faces": faces, "blend": blend}

    async def _add_reference(self, key: str, request: Request) -> dict[str, Any]:
        """One more person for ``key``'s profile to swap (reference mode): the body is
        ``{"photo": BASE64, "face": BASE64}``, ``face`` optional (then the profile's face).
        Takes effect at the key's next publish."""
        if key not in self.profiles:
            raise HTTPException(404, f"no profile for stream key {key!r}")
        # two images, each at most max_upload once decoded: base64 is 4/3 of that, plus
        # room for line breaks and the JSON around them
        body = await read_limited(request, 3 * self.max_upload)
        images = _reference_images(body, self.max_upload, key)
        for what, image in images.items():
            await run_in_threadpool(_require_face, image, f"reference {what} for {key}")
        photo = self._store(images["photo"])
        face = self._store(images["face"]) if "face" in images else None
        profile = self.profiles[key]  # read again after the awaits: profiles are never removed
        profile = replace(profile, references=(*profile.references, (photo, face)))
        self.profiles[key] = profile
        log.info("profile %s: reference %d added through the API", key, len(profile.references))
        return {"key": key, "references": _reference_names(profile)}

    async def _clear_references(self, key: str) -> dict[str, Any]:
        """Back to swapping by ``faces`` for ``key``, from its next publish. The stored files
        stay until the service stops: a stream starting now may still be reading them."""
        profile = self.profiles.get(key)
        if profile is None:
            raise HTTPException(404, f"no profile for stream key {key!r}")
        self.profiles[key] = replace(profile, references=())
        log.info("profile %s: references cleared through the API", key)
        return {"key": key, "references": []}

    def _store(self, image: np.ndarray) -> Path:
        """An uploaded image as a PNG in the private uploads folder, named by us."""
        path = self._uploads / f"{uuid.uuid4().hex}.png"
        if not cv2.imwrite(str(path), image):
            raise HTTPException(500, "cannot store the uploaded image")
        return path

    def run(self, stop: threading.Event) -> None:
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()

    # ------------------------------------------------------------------ publish hooks

    async def _rtmp_hook(self, request: Request) -> Any:
        # nginx calls from loopback; nobody else may start or stop streams this way.
        if request.client is None or request.client.host != LOOPBACK:
            raise HTTPException(403, "publish hooks are for the local ingest server")
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        call, app, key = form.get("call", ""), form.get("app", ""), form.get("name", "")
        if app != "live":
            return PlainTextResponse("ok")
        if call == "publish":
            if key not in self.profiles:
                log.warning("refused a publisher on unknown stream key %r", key)
                raise HTTPException(403, f"unknown stream key {key!r}")
            threading.Thread(target=self._start_stream, args=(key,), daemon=True).start()
        elif call == "publish_done":
            threading.Thread(target=self._stop_stream, args=(key,), daemon=True).start()
        return PlainTextResponse("ok")

    def settings_for(self, key: str) -> StreamSettings:
        profile = self.profiles[key]
        return self.base.model_copy(
            update={
                "source_image": profile.source,
                "faces": profile.faces,
                "blend": profile.blend,
                "references": list(profile.references),
                **dict(profile.models),
                "input": self.ingest.rtmp_url("live", key),
                "output": self.ingest.rtmp_url("swapped", key),
                "realtime": False,
            }
        )

    def _start_stream(self, key: str) -> None:
        with self._lock:
            try:
                handle = self.manager.get(key)
            except UnknownStreamError:
                handle = None
            if handle is not None and handle.running:
                return  # a publisher back quickly: the running input reconnects by itself
            try:
                self.manager.start(
                    key, self.settings_for(key), source_name=self.profiles[key].source.name
                )
            except FacecastError as exc:
                log.error("stream %s: cannot start: %s", key, exc)

    def _stop_stream(self, key: str) -> None:
        with self._lock, contextlib.suppress(UnknownStreamError):
            self.manager.stop(key)


# ---------------------------------------------------------------------------- API helpers

REFERENCE_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["photo"],
                "additionalProperties": False,
                "properties": {
                    "photo": {
                        "type": "string",
                        "format": "byte",
                        "description": "JPEG or PNG of the person to swap, base64",
                    },
                    "face": {
                        "type": "string",
                        "format": "byte",
                        "description": "JPEG or PNG of the face they get, base64; "
                        "default: the profile's face",
                    },
                },
            }
        }
    },
}
BODY_SHAPE = 'expected JSON {"photo": BASE64, "face": BASE64 (optional)}'


def _reference_images(body: bytes, limit: int, key: str) -> dict[str, np.ndarray]:
    """``photo`` and, if given, ``face`` from a reference body, decoded; else the HTTP
    error (422 for the JSON or base64, 413 for an image over ``limit``, 415 for a type)."""
    try:
        data = json.loads(body)
    except ValueError:  # not JSON, or not UTF-8
        raise HTTPException(422, f"body: {BODY_SHAPE}") from None
    if not isinstance(data, dict) or "photo" not in data:
        raise HTTPException(422, f"body: {BODY_SHAPE}")
    unknown = set(data) - {"photo", "face"}
    if unknown:
        raise HTTPException(422, f"body: unknown fields {', '.join(sorted(unknown))}")
    images = {}
    for what in ("photo", "face"):
        text = data.get(what)
        if text is None and what == "face":
            continue
        if not isinstance(text, str):
            raise HTTPException(422, f"{what}: expected a base64 string")
        images[what] = decode_upload(_unbase64(text, what, limit), f"reference {what} for {key}")
    return images


def _unbase64(text: str, what: str, limit: int) -> bytes:
    """Base64 (line breaks allowed, a ``data:...;base64,`` prefix too) to at most ``limit``
    bytes."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    text = "".join(text.split())
    too_big = HTTPException(413, f"{what}: image over {limit // (1024 * 1024)} MB")
    if len(text) > 4 * (limit // 3 + 1):
        raise too_big
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"{what}: not valid base64") from None
    if len(data) > limit:
        raise too_big
    return data


def _require_face(image: np.ndarray, name: str) -> None:
    """422 unless ``image`` shows a face. Slow (a tiled detection): run off the event loop."""
    if not FaceAnalyser(tiles=True).analyse(image):
        raise HTTPException(422, f"{name}: no face found in the photo")


def _reference_names(profile: Profile) -> list[dict[str, str | None]]:
    """What the API shows of a profile's references: file names, never folders."""
    return [
        {"photo": photo.name, "face": face.name if face else None}
        for photo, face in profile.references
    ]
