"""The consent registry: the people who agreed to their face being used, and the check.

A person is enrolled from one or more photos (``facecast consent add PHOTO --name NAME``,
or ``POST /api/consent?name=NAME``). The registry keeps, per photo, the SHA-256 of the
decoded picture (``audit.image_sha256``) and the face's identity descriptor, never the photo
itself. With ``serve --require-consent``, every source face from any path (the profiles
file at start, the API, the web page) must match an enrolled person, else it is refused.

Matching uses the project's embedded recogniser (``faces/embed.py``: dlib's 5-point
alignment and 128-D ResNet descriptor, Euclidean distance) on the largest face the tiled
photo analyser finds, which is the face a swap would use. A face matches a person when it
is nearer than ``SAME_PERSON`` to any of their photos: dlib's own same-person distance, 0.6
(``embed.SAME_PERSON_DISTANCE``). A descriptor is the mean over ``VIEWS``: the aligned
face chip, two slightly shrunk and shifted copies, and the mirror of each (what dlib's own
``num_jitters`` does at random, here fixed, so a photo always gets the same descriptor).
On the project's test photos (7 people, 2 photos each, and 5 more) this brings the hardest
pair, two photos of one person 25 years apart, from 0.63 (one plain descriptor) to 0.57,
while different people stay at 0.65 and above. Enrol several photos of a person
(different ages, light, pose) to make a miss less likely: a miss only refuses a face, a
false match would accept one.

Where it lives: ``consent.json`` in the state folder (``--state-dir``) on a single box,
written whole and atomically, under a lock file so that ``facecast consent`` and ``serve``
can change it at once; in a cluster (``serve --role ingest``), the hash ``facecast:consent``
in the store (Redis), changed in transactions. Either way it is read again at every check,
so a person enrolled or removed while ``serve`` runs counts from the next change.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import dlib
import numpy as np
from fastapi import FastAPI, HTTPException, Request

from facecast.errors import FacecastError, NoFaceError
from facecast.faces.analyse import FaceAnalyser
from facecast.faces.embed import SAME_PERSON_DISTANCE, FaceEmbedder
from facecast.safety.audit import image_sha256, utc_now
from facecast.serve.profiles import write_atomic

if TYPE_CHECKING:
    from facecast.safety.moderation import FaceGate
    from facecast.serve.profiles import Profile
    from facecast.serve.store import ClusterStore

log = logging.getLogger(__name__)

REGISTRY_FILE = "consent.json"
LOCK_FILE = ".consent.lock"
STORE_KEY = "consent"  # the store's hash, under its prefix: facecast:consent
SAME_PERSON = SAME_PERSON_DISTANCE
CHIP = 150  # dlib's aligned chip for its ResNet: 150 px, 25 % padding
# (scale, shift x, shift y) of the chip, each also mirrored: dlib's jitter, fixed
VIEWS = ((1.0, 0.0, 0.0), (0.97, 0.02, 0.02), (0.97, -0.02, -0.02))
MAX_PHOTOS = 32  # per person: matching compares a face with every one
NAME_RE = re.compile(r"\w[\w .,'()-]{0,99}")
NAME_RULE = "1-100 letters, digits, spaces or . , ' ( ) - (starting with a letter or digit)"
REFUSED = "face not in the consent registry"


class ConsentError(FacecastError):
    """A face that matches no enrolled person, where consent is required."""


class UnknownPersonError(FacecastError):
    """No person of that name is enrolled."""


class RegistryWriteError(FacecastError):
    """The registry's file cannot be written (a full disk, no permission)."""


def check_name(name: str) -> str:
    """``name`` if it can name a person in the registry, else a FacecastError."""
    if not NAME_RE.fullmatch(name):
        raise FacecastError(f"consent name {name!r}: {NAME_RULE}")
    return name


@dataclass(frozen=True)
class Match:
    """The enrolled person nearest a face, and how near (None: nobody is enrolled)."""

    person: str | None
    distance: float | None
    threshold: float = SAME_PERSON

    @property
    def accepted(self) -> bool:
        return self.distance is not None and self.distance < self.threshold

    def describe(self) -> dict[str, Any]:
        """For the audit log: who the face is nearest, and how near."""
        distance = None if self.distance is None else round(self.distance, 3)
        return {"person": self.person, "distance": distance, "consented": self.accepted}


# ---------------------------------------------------------------------------- identity


class FaceIdentity:
    """The descriptor of the face a swap would use in a photo: the largest one the tiled
    analyser finds, through dlib's alignment and ResNet, averaged over ``VIEWS``.
    Thread-safe (the dlib models are loaded once and used one call at a time)."""

    def __init__(self) -> None:
        self._embedder: FaceEmbedder | None = None
        self._lock = threading.Lock()

    def embedding(self, image: np.ndarray, name: str) -> np.ndarray:
        """NoFaceError when ``image`` shows no face."""
        faces = FaceAnalyser(tiles=True).analyse(image)  # its own: analysers keep state
        if not faces:
            raise NoFaceError(f"{name}: no face found in the photo")
        x0, y0, x1, y1 = (round(float(v)) for v in faces[0].box)
        rgb = np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        with self._lock:
            if self._embedder is None:
                self._embedder = FaceEmbedder()
            model = self._embedder
            shape = model.shape_predictor(rgb, dlib.rectangle(x0, y0, x1, y1))
            chip = dlib.get_face_chip(rgb, shape, size=CHIP, padding=0.25)
            descriptors = model.recogniser.compute_face_descriptor(_views(chip))
        return np.mean([np.asarray(d, np.float32) for d in descriptors], axis=0)


def _views(chip: np.ndarray) -> list[np.ndarray]:
    """``chip`` as ``VIEWS`` say, each also mirrored."""
    views = []
    for scale, dx, dy in VIEWS:
        matrix = cv2.getRotationMatrix2D((CHIP / 2, CHIP / 2), 0.0, 1 / scale)
        matrix[:, 2] += (dx * CHIP, dy * CHIP)
        view = cv2.warpAffine(chip, matrix, (CHIP, CHIP), borderMode=cv2.BORDER_REFLECT)
        views += [np.ascontiguousarray(view), np.ascontiguousarray(view[:, ::-1])]
    return views


# ---------------------------------------------------------------------------- where it lives

Entry = dict[str, Any]  # a person: {"name", "added", "photos": [{"sha256", "added", ...}]}
Change = Callable[[Entry | None], Entry | None]  # old entry -> new one (None: removed)


class Backend(Protocol):
    where: str

    def load(self) -> dict[str, Entry]: ...

    def change(self, name: str, fn: Change) -> Entry | None:
        """Apply ``fn`` to ``name``'s entry atomically; the new entry."""
        ...


class FileBackend:
    """``consent.json`` in a folder: ``{"version": 1, "people": {NAME: entry}}``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.file = folder / REGISTRY_FILE
        self.where = str(self.file)

    def load(self) -> dict[str, Entry]:
        try:
            text = self.file.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise FacecastError(f"{self.file}: cannot read the consent registry ({exc})") from None
        try:
            data = json.loads(text)
            people = data["people"]
            if not isinstance(people, dict):
                raise TypeError("people is not a mapping")
        except (ValueError, KeyError, TypeError) as exc:
            raise FacecastError(f"{self.file}: not a consent registry ({exc})") from None
        return people

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time, across processes (``serve`` and ``facecast consent``)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = (self.folder / LOCK_FILE).open("a")
        except OSError as exc:
            raise RegistryWriteError(
                f"{self.folder}: cannot write the consent registry ({exc})"
            ) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def change(self, name: str, fn: Change) -> Entry | None:
        with self._locked():
            people = self.load()
            entry = fn(people.get(name))
            if entry is None:
                people.pop(name, None)
            else:
                people[name] = entry
            text = json.dumps({"version": 1, "people": people}, indent=1, ensure_ascii=False)
            try:
                write_atomic(self.file, text.encode())
            except OSError as exc:
                raise RegistryWriteError(f"{self.file}: cannot write it ({exc})") from None
        return entry


class StoreBackend:
    """The cluster's store: a hash of NAME -> entry (JSON), changed in a transaction."""

    def __init__(self, store: ClusterStore) -> None:
        self.store = store
        self.name = store.prefix + STORE_KEY
        self.where = f"{store.safe_url()} ({self.name})"

    def load(self) -> dict[str, Entry]:
        raw = self.store.call("read the consent registry", self.store.redis.hgetall, self.name)
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def change(self, name: str, fn: Change) -> Entry | None:
        def transaction(pipe: Any) -> Entry | None:
            old = pipe.hget(self.name, name)
            entry = fn(json.loads(old) if old else None)
            pipe.multi()
            if entry is None:
                pipe.hdel(self.name, name)
            else:
                pipe.hset(self.name, name, json.dumps(entry))
            return entry

        # redis-py runs it again when another writer changed the hash meanwhile (WATCH)
        return self.store.call(
            "change the consent registry",
            self.store.redis.transaction,
            transaction,
            self.name,
            value_from_callable=True,
        )


# ---------------------------------------------------------------------------- the registry


class ConsentRegistry:
    """Who agreed, and whether a face is one of them. Thread-safe."""

    def __init__(
        self,
        backend: Backend,
        threshold: float = SAME_PERSON,
        identity: FaceIdentity | None = None,
    ) -> None:
        self.backend = backend
        self.threshold = threshold
        self.identity = identity or FaceIdentity()

    @classmethod
    def in_folder(cls, folder: Path) -> ConsentRegistry:
        return cls(FileBackend(folder))

    @classmethod
    def in_store(cls, store: ClusterStore) -> ConsentRegistry:
        return cls(StoreBackend(store))

    @property
    def where(self) -> str:
        return self.backend.where

    def people(self) -> list[dict[str, Any]]:
        """Each enrolled person: name, when added, and their photos' hashes (no descriptors)."""
        return [
            {
                "name": name,
                "added": entry.get("added"),
                "photos": [
                    {"sha256": photo["sha256"], "added": photo.get("added")}
                    for photo in entry.get("photos", [])
                ],
            }
            for name, entry in sorted(self.backend.load().items())
        ]

    def add(self, name: str, photos: list[tuple[np.ndarray, str]]) -> dict[str, Any]:
        """Enrol ``name`` from ``photos`` ((image, what to call it in errors)), or add the
        photos to them. NoFaceError names a photo with no face; nothing is added then.
        Returns ``{"name", "added": [sha256 of each new photo], "photos": count}``."""
        check_name(name)
        new = []
        for image, label in photos:  # every photo first: all or nothing
            vector = self.identity.embedding(image, label)
            new.append({"sha256": image_sha256(image), "added": utc_now(), "embedding": vector})

        def enrol(entry: Entry | None) -> Entry:
            entry = entry or {"name": name, "added": utc_now(), "photos": []}
            known = {photo["sha256"] for photo in entry["photos"]}
            for photo in new:
                if photo["sha256"] not in known:
                    known.add(photo["sha256"])
                    vector = [round(float(v), 6) for v in photo["embedding"]]
                    entry["photos"].append({**photo, "embedding": vector})
            if len(entry["photos"]) > MAX_PHOTOS:
                raise FacecastError(f"{name!r}: at most {MAX_PHOTOS} photos a person")
            return entry

        entry = self.backend.change(name, enrol)
        assert entry is not None
        log.debug("consent: %s enrolled with %d photo(s)", name, len(entry["photos"]))
        return {
            "name": name,
            "added": [photo["sha256"] for photo in new],
            "photos": len(entry["photos"]),
        }

    def remove(self, name: str) -> None:
        """UnknownPersonError when ``name`` is not enrolled."""
        found = []

        def drop(entry: Entry | None) -> None:
            found.append(entry is not None)

        self.backend.change(name, drop)
        if not found[-1]:  # the last run of ``drop`` (a store transaction may retry)
            raise UnknownPersonError(f"{name!r} is not in the consent registry")
        log.debug("consent: %s removed", name)

    def match(self, image: np.ndarray, name: str) -> Match:
        """The enrolled person nearest the face in ``image``. NoFaceError when it shows
        none. Slow (detection, six descriptors): not on an event loop."""
        vector = self.identity.embedding(image, name)
        best: tuple[float, str] | None = None
        for person, entry in self.backend.load().items():
            photos = [photo["embedding"] for photo in entry.get("photos", [])]
            if not photos:
                continue
            distance = float(np.linalg.norm(np.asarray(photos, np.float32) - vector, axis=1).min())
            if best is None or distance < best[0]:
                best = (distance, person)
        if best is None:
            return Match(None, None, self.threshold)
        return Match(best[1], best[0], self.threshold)

    def check_photos(self, photos: list[Path], where: str) -> None:
        """Every photo's face must be enrolled: else a FacecastError that starts with
        ``where`` and names the photo (``serve`` at start, ``swap`` and ``stream``)."""
        from facecast.media.image_io import read_image

        for photo in photos:
            try:
                match = self.match(read_image(photo), str(photo))
            except NoFaceError as exc:
                raise FacecastError(f"{where}: {exc}") from None
            if not match.accepted:
                raise ConsentError(f"{where}: {photo}: {REFUSED} ({self.where})")


def profile_photos(profile: Profile) -> list[Path]:
    """The photos whose faces a profile puts on people: its source (every photo of a
    folder) and its references' own faces. A reference's ``photo`` is who gets swapped,
    not a face that is used."""
    from facecast.swap.sources import source_photos

    faces = [face for _, face in profile.references if face is not None]
    return [*source_photos([profile.source]), *faces]


def check_profiles(registry: ConsentRegistry, profiles: dict[str, Profile]) -> None:
    """``serve --require-consent`` at start: every profile's faces are enrolled, else a
    FacecastError naming the key and the photo."""
    for key, profile in sorted(profiles.items()):
        registry.check_photos(profile_photos(profile), f"profile {key!r}")
    if profiles:
        log.info("consent: the faces of %d profile(s) are all enrolled", len(profiles))


# ---------------------------------------------------------------------------- HTTP


def consent_routes(
    app: FastAPI,
    registry: ConsentRegistry,
    gate: FaceGate | None,
    token: str | None,
    max_upload: int,
) -> None:
    """``GET /api/consent``, ``POST /api/consent?name=NAME`` (photos as the body or
    ``-F file=@...``, up to 8) and ``DELETE /api/consent/NAME``, behind the API token.
    Changes go to the audit log (``gate``)."""
    from starlette.concurrency import run_in_threadpool

    from facecast.safety.moderation import audited, note
    from facecast.serve.app import bearer_guard
    from facecast.serve.store import StoreError
    from facecast.serve.uploads import read_image_uploads

    guard = bearer_guard(token)

    @app.get("/api/consent", dependencies=guard)
    async def list_people() -> dict[str, Any]:
        try:
            people = await run_in_threadpool(registry.people)
        except FacecastError as exc:  # an unreadable registry, or the store
            raise HTTPException(503, str(exc)) from None
        required = bool(gate and gate.require_consent)
        return {"people": people, "threshold": registry.threshold, "required": required}

    @app.post("/api/consent", dependencies=guard)
    @audited("consent_add", gate, key="name")
    async def add_person(name: str, request: Request) -> dict[str, Any]:
        try:
            check_name(name)
        except FacecastError as exc:
            raise HTTPException(422, str(exc)) from None
        images = await read_image_uploads(request, max_upload, f"photo of {name}")
        several = len(images) > 1
        labels = [
            f"photo of {name}" + (f" ({i + 1})" if several else "") for i in range(len(images))
        ]
        await note(request, list(zip(labels, images, strict=True)))
        photos = list(zip(images, labels, strict=True))
        try:
            return await run_in_threadpool(registry.add, name, photos)
        except RegistryWriteError as exc:
            raise HTTPException(507, str(exc)) from None
        except StoreError as exc:
            raise HTTPException(503, str(exc)) from None
        except FacecastError as exc:  # no face in a photo, too many photos
            raise HTTPException(422, str(exc)) from None

    @app.delete("/api/consent/{name}", dependencies=guard)
    @audited("consent_remove", gate, key="name")
    async def remove_person(name: str, request: Request) -> dict[str, Any]:
        try:
            await run_in_threadpool(registry.remove, name)
        except UnknownPersonError as exc:
            raise HTTPException(404, str(exc)) from None
        except RegistryWriteError as exc:
            raise HTTPException(507, str(exc)) from None
        except FacecastError as exc:  # the store
            raise HTTPException(503, str(exc)) from None
        return {"name": name, "removed": True}
