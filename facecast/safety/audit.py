"""The audit log of face changes: one JSON line per attempt, allowed or not.

``facecast serve`` writes a line for every attempt to change a face: a profile set through
the API, a running stream's source, a reference, a face picked or uploaded on the web page,
and a person added to or removed from the consent registry (``facecast consent`` writes
those too). A line says when (ISO-8601 UTC), what, which key, which faces, who asked, and
whether it was allowed and why not::

    {"time": "2026-11-29T19:30:00.123Z", "change": "stream_source", "key": "alice",
     "faces": [{"role": "source", "sha256": "...", "person": "Alice A.", "distance": 0.41}],
     "token": "3f9a0c1b2d4e", "client": "10.0.0.7", "allowed": false, "outcome": "denied",
     "status": 403, "reason": "denied by moderation: nudity"}

Faces are named by ``image_sha256``: the SHA-256 of the decoded picture (see there), the
same whether it came as a raw body, a form or base64. Tokens never appear: ``token_id`` is
a short one-way hash of the API token, so lines can tell tokens apart.

Every line is one ``write`` to a file opened with ``O_APPEND``, under an exclusive
``flock`` and this process's own lock, then ``fsync``: lines from concurrent requests, and
from other processes (``facecast consent`` beside ``serve``), never interleave or overwrite
each other. The file is opened for each line, so it can be rotated from outside (logrotate,
``mv``) with no signal and no ``copytruncate``: the next line creates a new file. facecast
itself never rotates or trims it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from facecast.errors import FacecastError

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.log"  # its name in the state folder, the default place
# What changed, as the ``change`` field says it
CHANGES = (
    "profile_set",  # PUT /api/profiles/KEY
    "stream_source",  # POST /api/streams/KEY/source
    "reference",  # POST /api/profiles/KEY/references
    "web_face",  # the browser page: a sample picked or a photo uploaded
    "consent_add",  # POST /api/consent, facecast consent add
    "consent_remove",  # DELETE /api/consent/NAME, facecast consent remove
)


def utc_now() -> str:
    """``2026-11-29T19:30:00.123Z``: now, as every time facecast shows."""
    from facecast.serve.streams import iso_utc

    return iso_utc(time.time())


def image_sha256(image: np.ndarray) -> str:
    """The SHA-256 of a decoded picture, in hex: over the text ``HxWxC`` and a newline, then
    its pixels as 8-bit BGR rows (``hashlib.sha256(b"%dx%dx%d\\n" % img.shape +
    img.tobytes())`` on ``cv2.imread``'s array for a JPEG or an opaque PNG). It names what
    is used, not how it was sent: the same photo as a body, a form part or base64 hashes
    the same."""
    pixels = np.ascontiguousarray(image)
    shape = pixels.shape if pixels.ndim == 3 else (*pixels.shape, 1)
    digest = hashlib.sha256(b"%dx%dx%d\n" % tuple(shape))
    digest.update(memoryview(pixels).cast("B"))
    return digest.hexdigest()


def token_id(token: str | None) -> str | None:
    """A short name for an API token in the log: 12 hex digits of a salted SHA-256, never
    the token. The same token always gives the same id."""
    if not token:
        return None
    return hashlib.sha256(b"facecast audit token id\0" + token.encode()).hexdigest()[:12]


class AuditLog:
    """Appends JSON lines to ``path`` (created with its folder, mode 0600). Thread-safe, and
    safe beside other processes appending to the same file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
        except OSError as exc:
            raise FacecastError(f"audit log {path}: cannot write it ({exc})") from None

    def write(self, entry: dict[str, Any]) -> None:
        """One line, whole, with ``time`` first when the entry has none. A line that cannot
        be written is logged as an error, not raised: the change it records was already
        decided."""
        entry = {"time": utc_now(), **entry}
        line = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            except OSError as exc:
                log.error("audit log %s: cannot open it (%s); lost: %s", self.path, exc, line)
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                view = memoryview(line)
                while view:  # a regular file takes it in one go; a short write goes on
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as exc:
                log.error("audit log %s: cannot write it (%s); lost: %s", self.path, exc, line)
            finally:
                os.close(fd)  # also releases the flock


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Every line of an audit log, parsed (tests and tools)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
