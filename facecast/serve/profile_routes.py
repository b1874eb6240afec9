"""The profile and reference API (``/api/profiles...``): the profiles in force, and each
change to them, saved before it takes effect.

Profiles and their references change through ``PUT``/``DELETE /api/profiles/KEY`` and
``POST``/``DELETE /api/profiles/KEY/references``; a change takes effect at the key's next
publish. A face changed on a running stream (``POST /api/streams/KEY/source``) becomes the
key's profile face too (``source_changed``), so a publisher that reconnects keeps it.
Deleting a profile leaves a running stream on the key running until its publisher stops;
the key is refused from its next publish.

With a state folder (``state_dir``), every such change is saved there and laid over the
``--profiles`` file at the next start (see ``facecast.serve.profiles``); on a cluster's
ingest, in the store. Without either, changes last until the process stops and uploads go
to a temporary folder.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from facecast.faces.analyse import FaceAnalyser
from facecast.faces.select import Selection
from facecast.safety.moderation import FaceGate, audited, vet
from facecast.serve.profiles import (
    BLENDS,
    KEY_RE,
    Profile,
    ProfileState,
    store_image,
    store_images,
)
from facecast.serve.store import ClusterStore, StoreError, StoreProfileState, profile_entry
from facecast.serve.streams import StreamManager, UnknownStreamError
from facecast.serve.uploads import (
    decode_off_loop,
    is_multipart,
    read_form,
    read_image_upload,
    read_limited,
)

log = logging.getLogger(__name__)


class ProfileRoutes:
    """The profiles in force (``profiles``: the service's publish hooks read the same dict)
    and the routes that change them."""

    def __init__(
        self,
        from_file: dict[str, Profile],
        *,
        state_dir: Path | None,
        store: ClusterStore | None,
        manager: StreamManager,
        max_upload: int,
    ) -> None:
        """Loads the profiles in force: the file's (``from_file``), with the changes kept in
        ``store`` (a cluster's ingest) or else in ``state_dir`` laid over them."""
        self.store = store
        self.manager = manager
        self.max_upload = max_upload
        self.gate: FaceGate | None = None  # consent, moderation, audit: see add_routes
        self._file_keys = set(from_file)
        self._state: ProfileState | StoreProfileState | None = None
        if store is not None:
            self._state = StoreProfileState(
                store, Path(tempfile.mkdtemp(prefix="facecast-ingest-"))
            )
        elif state_dir is not None:
            self._state = ProfileState(state_dir)
        # Faces uploaded through the API: a private folder, files named by us, never by
        # the request; kept with the state, else temporary.
        if self._state is not None:
            self.uploads: Path = self._state.faces
            self._changed, self._deleted = self._state.load()
            self._state.prune_faces(self._changed)
        else:
            self.uploads = Path(tempfile.mkdtemp(prefix="facecast-faces-"))
            self._changed, self._deleted = {}, set()
        self.profiles = {k: p for k, p in from_file.items() if k not in self._deleted}
        self.profiles.update(self._changed)
        if self._changed or self._deleted:
            log.info(
                "state %s: %d profile(s) set and %d deleted through the API",
                state_dir,
                len(self._changed),
                len(self._deleted),
            )

    def add_routes(self, app: FastAPI, guard: list[Any], gate: FaceGate) -> None:
        """The profile routes on ``app``, each behind ``guard`` (the bearer token); ``gate``
        vets every face they take."""
        self.gate = gate
        # the keys are what a publisher needs: listed to the token holder only
        app.add_api_route("/api/profiles", self._list_profiles, methods=["GET"], dependencies=guard)
        app.add_api_route(
            "/api/profiles/{key}", self._put_profile, methods=["PUT"], dependencies=guard
        )
        app.add_api_route(
            "/api/profiles/{key}", self._delete_profile, methods=["DELETE"], dependencies=guard
        )
        app.add_api_route(
            "/api/profiles/{key}/references",
            self._add_reference,
            methods=["POST"],
            dependencies=guard,
            openapi_extra={"requestBody": REFERENCE_BODY},
        )
        app.add_api_route(
            "/api/profiles/{key}/references",
            self._clear_references,
            methods=["DELETE"],
            dependencies=guard,
        )

    def discard_uploads(self) -> None:
        """At stop: without a state, the uploads folder goes (with one, it is the state's)."""
        if self._state is None:
            shutil.rmtree(self.uploads, ignore_errors=True)

    # Handlers that read or change ``profiles`` run on the event loop (coroutines, and the
    # stream-source hook, which the app's source route calls there), one at a time between
    # awaits, so a change is never seen half made. Each reads the profile again after its
    # last await.

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

    @audited("profile_set")  # consent, moderation and the audit log: see add_routes
    async def _put_profile(
        self, key: str, request: Request, faces: str = "all", blend: str = "feather"
    ) -> dict[str, Any]:
        """A profile for ``key`` from an uploaded face photo (the body, or the multipart
        part ``file``); options as query parameters. A key's references are kept. Takes
        effect at the key's next publish."""
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
        await vet(request, [("source", image)])  # 403 when refused: nothing changes
        path = self._store(image)
        old = self.profiles.get(key)
        kept = (old.references, old.models) if old else ((), ())
        self._commit(key, Profile(path, faces, blend, *kept))
        log.info("profile %s: set through the API", key)
        return {"key": key, "faces": faces, "blend": blend}

    async def _delete_profile(self, key: str) -> dict[str, Any]:
        """Remove ``key``'s profile: its publishers are refused from now on. A stream
        already running on the key runs on, with the faces it loaded, until its publisher
        stops (cutting a live audience off is the publisher's call, not a side effect)."""
        if key not in self.profiles:
            raise HTTPException(404, f"no profile for stream key {key!r}")
        self._commit(key, None)
        try:
            running = self.manager.get(key).running
        except UnknownStreamError:
            running = False
        log.info("profile %s: deleted through the API", key)
        return {"key": key, "deleted": True, "stream_running": running}

    @audited("reference")
    async def _add_reference(self, key: str, request: Request) -> dict[str, Any]:
        """One more person for ``key``'s profile to swap (reference mode): the body is
        ``{"photo": BASE64, "face": BASE64}``, or multipart parts ``photo`` and ``face``;
        ``face`` optional (then the profile's face). Takes effect at the key's next
        publish."""
        if key not in self.profiles:
            raise HTTPException(404, f"no profile for stream key {key!r}")
        images = await self._reference_upload(request, key)
        for what, image in images.items():
            await run_in_threadpool(_require_face, image, f"reference {what} for {key}")
        # the face put on the person needs consent; the photo of who is swapped does not
        face_part = [("face", images["face"])] if "face" in images else []
        await vet(request, face_part, [("photo", images["photo"])])
        profile = self.profiles.get(key)  # again: it may have been deleted meanwhile
        if profile is None:
            raise HTTPException(404, f"no profile for stream key {key!r}")
        photo = self._store(images["photo"])
        face = self._store(images["face"]) if "face" in images else None
        profile = replace(profile, references=(*profile.references, (photo, face)))
        self._commit(key, profile)
        log.info("profile %s: reference %d added through the API", key, len(profile.references))
        return {"key": key, "references": _reference_names(profile)}

    async def _reference_upload(self, request: Request, key: str) -> dict[str, np.ndarray]:
        """``photo`` and maybe ``face``, from multipart parts or a JSON body, decoded."""
        if is_multipart(request):
            parts = await read_form(request, self.max_upload, REFERENCE_FIELDS, ("photo",))
            uploads = {what: datas[0] for what, datas in parts.items()}
        else:
            # two images, each at most max_upload once decoded: base64 is 4/3 of that, plus
            # room for line breaks and the JSON around them
            body = await read_limited(request, 3 * self.max_upload)
            # up to 30 MB of JSON and base64 to undo: not on the loop either
            uploads = await run_in_threadpool(_reference_uploads, body, self.max_upload)
        # in the order given, photo first: the first bad one is the one reported
        return {
            what: await decode_off_loop(request, data, f"reference {what} for {key}")
            for what, data in uploads.items()
        }

    async def _clear_references(self, key: str) -> dict[str, Any]:
        """Back to swapping by ``faces`` for ``key``, from its next publish. The stored files
        stay until the service starts again: a stream starting now may still be reading
        them."""
        profile = self.profiles.get(key)
        if profile is None:
            raise HTTPException(404, f"no profile for stream key {key!r}")
        self._commit(key, replace(profile, references=()))
        log.info("profile %s: references cleared through the API", key)
        return {"key": key, "references": []}

    def source_changed(self, key: str, images: list[np.ndarray], name: str) -> bool:
        """A running stream took a new face through the API: it becomes the key's profile
        face, so a publisher that reconnects (a new pipeline) keeps it. False when the key
        has no profile any more (deleted while the stream ran): nothing to keep it in."""
        profile = self.profiles.get(key)
        if profile is None:
            return False
        try:
            source = self._store(images[0]) if len(images) == 1 else self._store_all(images)
            self._commit(key, replace(profile, source=source))
        except HTTPException as exc:
            raise HTTPException(
                exc.status_code,
                f"the stream has the new face, but it is not kept for the key's next "
                f"publish: {exc.detail}",
            ) from None
        log.info("profile %s: face from %s, kept for the next publish", key, name)
        return True

    def _commit(self, key: str, profile: Profile | None) -> None:
        """Set ``key``'s profile (None: delete it), saved to the state folder first: if
        that fails (507), nothing changes, so memory is never ahead of the disk."""
        changed, deleted = dict(self._changed), set(self._deleted)
        if profile is None:
            changed.pop(key, None)
            if key in self._file_keys:  # else it would come back from the file at start
                deleted.add(key)
        else:
            changed[key] = profile
            deleted.discard(key)
        if self._state is not None:
            try:
                self._state.save(changed, deleted)
                if self.store is not None:  # the workers' copy of the profile in force
                    entry = profile_entry(self.store, profile) if profile else None
                    self.store.set_profile(key, entry)
            except OSError as exc:
                raise HTTPException(507, f"cannot save the profiles' state: {exc}") from None
            except StoreError as exc:
                raise HTTPException(503, str(exc)) from None
        self._changed, self._deleted = changed, deleted
        if profile is None:
            del self.profiles[key]
        else:
            self.profiles[key] = profile

    def _store(self, image: np.ndarray) -> Path:
        """An uploaded image as a PNG in the private uploads folder, named by us."""
        try:
            return store_image(self.uploads, image)
        except OSError as exc:
            raise HTTPException(507, f"cannot store the uploaded image: {exc}") from None

    def _store_all(self, images: list[np.ndarray]) -> Path:
        """Several photos of one person as a folder of PNGs in the uploads folder (a profile
        source may be a folder), named by us."""
        try:
            return store_images(self.uploads, images)
        except OSError as exc:
            raise HTTPException(507, f"cannot store the uploaded images: {exc}") from None


# ---------------------------------------------------------------------------- API helpers

REFERENCE_FIELDS = ("photo", "face")


def _reference_schema(fmt: str, encoding: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["photo"],
        "additionalProperties": False,
        "properties": {
            "photo": {
                "type": "string",
                "format": fmt,
                "description": f"JPEG or PNG of the person to swap{encoding}",
            },
            "face": {
                "type": "string",
                "format": fmt,
                "description": f"JPEG or PNG of the face they get{encoding}; "
                "default: the profile's face",
            },
        },
    }


REFERENCE_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": _reference_schema("byte", ", base64")},
        "multipart/form-data": {"schema": _reference_schema("binary", "")},
    },
}
BODY_SHAPE = 'expected JSON {"photo": BASE64, "face": BASE64 (optional)}'


def _reference_uploads(body: bytes, limit: int) -> dict[str, bytes]:
    """``photo`` and, if given, ``face`` from a JSON reference body, still encoded; else the
    HTTP error (422 for the JSON or base64, 413 for an image over ``limit``)."""
    try:
        data = json.loads(body)
    except ValueError:  # not JSON, or not UTF-8
        raise HTTPException(422, f"body: {BODY_SHAPE}") from None
    except RecursionError:  # the decoder recurses per level: [[[[...]]]] runs out of stack
        raise HTTPException(422, f"body: nested too deeply; {BODY_SHAPE}") from None
    if not isinstance(data, dict) or "photo" not in data:
        raise HTTPException(422, f"body: {BODY_SHAPE}")
    unknown = set(data) - {"photo", "face"}
    if unknown:
        raise HTTPException(422, f"body: unknown fields {', '.join(sorted(unknown))}")
    uploads = {}
    for what in ("photo", "face"):
        text = data.get(what)
        if text is None and what == "face":
            continue
        if not isinstance(text, str):
            raise HTTPException(422, f"{what}: expected a base64 string")
        uploads[what] = _unbase64(text, what, limit)
    return uploads


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
