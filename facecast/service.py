"""``facecast serve``: the ingest server, the HTTP plane and one pipeline per stream key.

A publisher pushes ``rtmp://HOST/live/KEY``. nginx asks the HTTP plane (``on_publish``)
whether KEY may publish; a key with a profile is accepted and its pipeline starts, reading
``live/KEY`` and publishing ``swapped/KEY`` with the profile's face. When the publisher
stops (``on_publish_done``) the pipeline stops. Everything lives on the ``Service`` object:
several can run in one process (the tests do).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import cv2
import uvicorn
import yaml
from fastapi import HTTPException, Request
from fastapi.responses import PlainTextResponse

from facecast.config import StreamSettings
from facecast.errors import FacecastError
from facecast.faces.analyse import FaceAnalyser
from facecast.faces.select import Selection
from facecast.ingest import IngestServer
from facecast.server import (
    LOOPBACK,
    MAX_UPLOAD_BYTES,
    bearer_guard,
    bind_host,
    create_app,
    read_image_upload,
)
from facecast.streams import StreamManager, UnknownStreamError

log = logging.getLogger(__name__)

BLENDS = ("feather", "poisson")
KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Profile:
    """How one stream key is swapped."""

    source: Path
    faces: str = "all"
    blend: str = "feather"


def load_profiles(path: Path) -> dict[str, Profile]:
    """``KEY: {source: PHOTO, faces: ..., blend: ...}`` from a YAML file. A relative photo
    path is relative to the file. Every problem is reported with the key it is under."""
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
        unknown = set(entry) - {"source", "faces", "blend"}
        if unknown:
            raise FacecastError(f"{where}: unknown fields {', '.join(sorted(unknown))}")
        source = Path(entry["source"])
        source = source if source.is_absolute() else path.parent / source
        profile = Profile(
            source, str(entry.get("faces", "all")), str(entry.get("blend", "feather"))
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
    ) -> None:
        self.profiles = dict(profiles)
        self.base = base or StreamSettings()
        self.manager = StreamManager()
        self.host = bind_host(host, token)
        self.http_port = http_port
        hook = f"http://{LOOPBACK}:{http_port}/hooks/rtmp"
        # The ingest server opens to other hosts exactly when the HTTP plane does.
        self.ingest = IngestServer(
            rtmp_port, hls_port, prefix, on_publish_url=hook, listen=self.host
        )
        self.app = create_app(self.manager, token)
        self.app.add_api_route("/hooks/rtmp", self._rtmp_hook, methods=["POST"])
        self.app.add_api_route(
            "/api/profiles/{key}",
            self._put_profile,
            methods=["PUT"],
            dependencies=bearer_guard(token),
        )
        self.app.add_api_route("/api/profiles", self._list_profiles, methods=["GET"])
        # Faces uploaded for new profiles: a private folder, files named by us, never by
        # the request.
        self._uploads = Path(tempfile.mkdtemp(prefix="facecast-faces-"))
        self._http: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Service:
        config = uvicorn.Config(
            self.app, host=self.host, port=self.http_port, log_level="warning", lifespan="off"
        )
        self._http = uvicorn.Server(config)
        self._http_thread = threading.Thread(target=self._http.run, name="http", daemon=True)
        self._http_thread.start()
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
        self.ingest.stop()
        if self._http is not None:
            self._http.should_exit = True
        if self._http_thread is not None:
            self._http_thread.join(10)
        shutil.rmtree(self._uploads, ignore_errors=True)

    # ------------------------------------------------------------------ profiles API

    def _list_profiles(self) -> dict[str, Any]:
        return {
            key: {"source": p.source.name, "faces": p.faces, "blend": p.blend}
            for key, p in sorted(self.profiles.items())
        }

    async def _put_profile(
        self, key: str, request: Request, faces: str = "all", blend: str = "feather"
    ) -> dict[str, Any]:
        """A profile for ``key`` from an uploaded face photo (the request body); options as
        query parameters. Takes effect at the key's next publish."""
        if not KEY_RE.fullmatch(key):
            raise HTTPException(422, "stream key: 1-64 letters, digits, '-' or '_'")
        try:
            Selection.parse(faces)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        if blend not in BLENDS:
            raise HTTPException(422, f"blend must be one of {', '.join(BLENDS)}")
        image = await read_image_upload(request, MAX_UPLOAD_BYTES, f"face for {key}")
        if not FaceAnalyser(tiles=True).analyse(image):
            raise HTTPException(422, f"face for {key}: no face found in the photo")
        path = self._uploads / f"{uuid.uuid4().hex}.png"
        if not cv2.imwrite(str(path), image):
            raise HTTPException(500, "cannot store the uploaded face")
        self.profiles[key] = Profile(path, faces, blend)
        log.info("profile %s: set through the API", key)
        return {"key": key, "faces": faces, "blend": blend}

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
