"""Stream-key profiles for ``facecast serve``: the YAML file, the state the API keeps, and
the stream settings a profile gives (``stream_settings``).

A profile says how one stream key is swapped: its face, ``faces``, ``blend``, optional
references and models. Profiles come from two places:

- the ``--profiles`` YAML file, written by the operator and never written by facecast;
- the state folder (``--state-dir``): every profile changed through the HTTP API (a new
  profile, a new face, references added or cleared, a stream's face changed while it ran)
  is written there whole, with the uploaded images, and so is every key deleted through
  the API. It is read at start and laid over the file: a key the API changed takes its
  profile from the state, a key the API deleted stays deleted, and every other key comes
  from the file as it now reads.

The state is ``profiles.yaml`` in the state folder, in the same format as the file (plus a
``deleted:`` list), with the uploads under ``faces/``. Every file is written to a temporary
name and moved into place with ``os.replace``, so a crash leaves the old state or the new
one, never half of one. One ``serve`` per state folder: at start it removes the images
that its state no longer names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from facecast.config import Reference, StreamSettings
from facecast.errors import FacecastError
from facecast.faces.select import Selection
from facecast.swap.sources import source_photos

BLENDS = ("feather", "poisson")
KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MODEL_FIELDS = ("detector", "recogniser", "swapper", "enhancer")
REFERENCE_FORMS = "PHOTO or {photo: PHOTO, face: FACE}"

log = logging.getLogger(__name__)


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


def stream_settings(
    base: StreamSettings, profile: Profile, input_url: str, output_url: str
) -> StreamSettings:
    """The settings of one key's stream: ``base`` with the profile's face and options."""
    return base.model_copy(
        update={
            "source_image": profile.source,
            "faces": profile.faces,
            "blend": profile.blend,
            "references": list(profile.references),
            **dict(profile.models),
            "input": input_url,
            "output": output_url,
            "realtime": False,
        }
    )


# ---------------------------------------------------------------------------- the YAML file


def load_profiles(path: Path) -> dict[str, Profile]:
    """``KEY: {source: PHOTO, faces: ..., blend: ..., references: [...]}`` from a YAML file.
    Each reference is ``PHOTO`` or ``{photo: PHOTO, face: FACE}``. A relative photo path is
    relative to the file. Every problem is reported with the key it is under."""
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise FacecastError(f"{path}: expected a mapping of stream key to profile")
    return parse_profiles(data, path.parent, str(path))


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise FacecastError(f"{path}: cannot read the profiles ({exc})") from None


def parse_profiles(data: dict[Any, Any], folder: Path, origin: str) -> dict[str, Profile]:
    """Profiles from a parsed mapping; relative paths are relative to ``folder``, errors
    start with ``origin: profile 'KEY'``."""
    return {
        str(key): _parse_profile(entry, folder, f"{origin}: profile {key!r}")
        for key, entry in data.items()
    }


def _parse_profile(entry: Any, folder: Path, where: str) -> Profile:
    if not isinstance(entry, dict) or "source" not in entry:
        raise FacecastError(f"{where}: needs at least `source: PHOTO`")
    unknown = set(entry) - {"source", "faces", "blend", "references", *MODEL_FIELDS}
    if unknown:
        raise FacecastError(f"{where}: unknown fields {', '.join(sorted(unknown))}")
    source = Path(entry["source"])
    source = source if source.is_absolute() else folder / source
    profile = Profile(
        source,
        str(entry.get("faces", "all")),
        str(entry.get("blend", "feather")),
        _load_references(entry.get("references"), folder, where),
        tuple((job, str(entry[job])) for job in MODEL_FIELDS if entry.get(job)),
    )
    try:
        Selection.parse(profile.faces)
    except ValueError as exc:
        raise FacecastError(f"{where}: {exc}") from None
    if profile.blend not in BLENDS:
        raise FacecastError(f"{where}: blend must be one of {', '.join(BLENDS)}")
    if source.is_dir():  # several photos of the person: each face gets the nearest
        source_photos([source])  # raises, naming the folder, when it holds no photo
    elif not source.is_file():
        raise FacecastError(f"{where}: source photo {source} not found")
    return profile


def _load_references(value: Any, folder: Path, where: str) -> tuple[Reference, ...]:
    """A profile's ``references:`` list, each photo checked to exist."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise FacecastError(f"{where}: references must be a list, each item {REFERENCE_FORMS}")
    return tuple(
        _load_reference(item, folder, f"{where}: references[{index}]")
        for index, item in enumerate(value)
    )


def _load_reference(item: Any, folder: Path, at: str) -> Reference:
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
    return paths["photo"], paths["face"]


# ---------------------------------------------------------------------------- the API's state


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/facecast``, else ``~/.local/state/facecast`` (the XDG default)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "facecast"


def resolve_state_dir(given: Path | None) -> Path | None:
    """The state folder for ``serve``: the one asked for (a problem with it is then an error
    at start), else the default when it can be written. A default that cannot (a container
    with a read-only root, a user without a home) means no state, with a warning, rather
    than a service that will not start."""
    if given is not None:
        return given
    folder = default_state_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK | os.X_OK)
    except OSError:
        writable = False
    if not writable:
        log.warning(
            "cannot write the state folder %s: profile changes made through the API will "
            "not survive a restart (set --state-dir or FACECAST_STATE_DIR)",
            folder,
        )
        return None
    return folder


STATE_HEADER = (
    "# Written by `facecast serve`: the profiles changed and the keys deleted through its\n"
    "# HTTP API, laid over its --profiles file at start. Edit only while serve is stopped.\n"
)


class ProfileState:
    """The state folder: ``profiles.yaml`` (profiles the API set, keys it deleted) and the
    uploaded images under ``faces/``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.file = folder / "profiles.yaml"
        self.faces = folder / "faces"
        try:
            self.faces.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FacecastError(f"state folder {folder}: cannot create it ({exc})") from None

    def load(self) -> tuple[dict[str, Profile], set[str]]:
        """(profiles set through the API, keys deleted through it); nothing yet: both empty.
        A broken state is an error that names the file: starting without it would quietly
        bring back what the API deleted."""
        if not self.file.exists():
            return {}, set()
        data = _read_yaml(self.file)
        data = data if isinstance(data, dict) else {"profiles": data}
        profiles, deleted = data.get("profiles") or {}, data.get("deleted") or []
        if not isinstance(profiles, dict) or not isinstance(deleted, list):
            raise FacecastError(
                f"{self.file}: expected `profiles:` (a mapping) and `deleted:` (a list)"
            )
        return parse_profiles(profiles, self.folder, str(self.file)), {str(k) for k in deleted}

    def save(self, profiles: dict[str, Profile], deleted: set[str]) -> None:
        """Replace the state with these profiles and deletions, atomically."""
        data = {
            "profiles": {key: self._entry(p) for key, p in sorted(profiles.items())},
            "deleted": sorted(deleted),
        }
        text = STATE_HEADER + yaml.safe_dump(data, sort_keys=False)
        write_atomic(self.file, text.encode())

    def _entry(self, profile: Profile) -> dict[str, Any]:
        """A profile in the file's format: our images relative to the folder (it can move),
        the operator's own photos by their absolute path."""
        entry: dict[str, Any] = {
            "source": self._path(profile.source),
            "faces": profile.faces,
            "blend": profile.blend,
        }
        if profile.references:
            entry["references"] = [
                {"photo": self._path(photo)} | ({"face": self._path(face)} if face else {})
                for photo, face in profile.references
            ]
        entry.update(dict(profile.models))
        return entry

    def _path(self, path: Path) -> str:
        path = path.absolute()
        with contextlib.suppress(ValueError):
            return str(path.relative_to(self.folder.absolute()))
        return str(path)

    def prune_faces(self, profiles: dict[str, Profile]) -> None:
        """Remove the images (and temporary files left by a crash) that no profile names.
        At start only: a stream that is starting may still be reading a replaced face."""
        named = {path.absolute() for profile in profiles.values() for path in _paths(profile)}
        leftovers = [*self.faces.iterdir(), *self.folder.glob(f".{self.file.name}.*.tmp")]
        for path in leftovers:
            if path.absolute() in named:
                continue
            if path.is_dir():  # a set of photos (store_images), or one a crash left half-made
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_file():
                path.unlink(missing_ok=True)


def _paths(profile: Profile) -> list[Path]:
    references = [path for pair in profile.references for path in pair if path is not None]
    return [profile.source, *references]


def store_image(folder: Path, image: np.ndarray) -> Path:
    """``image`` as a PNG in ``folder``, under a name of ours, never the request's. Raises
    OSError when it cannot be written."""
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError("the image cannot be encoded as PNG")
    path = folder / f"{uuid.uuid4().hex}.png"
    write_atomic(path, data.tobytes())
    return path


def store_images(folder: Path, images: list[np.ndarray]) -> Path:
    """``images`` as PNGs in a new folder inside ``folder``, named by us. The folder gets its
    final name only once every photo is in it, so a half-written set is never a source."""
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".photos-", suffix=".tmp"))
    try:
        for image in images:
            store_image(staging, image)
        final = folder / uuid.uuid4().hex
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` at ``path``, all or nothing: written and flushed to a temporary file in the
    same folder (so the rename cannot cross file systems), then moved over ``path``."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
