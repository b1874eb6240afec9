"""The machine-readable provenance mark every output carries.

A mark is a ``dict[str, str]``: metadata key → text, written as-is into PNG ``tEXt``
chunks, JPEG ``COM`` segments and video container tags. facecast's own entry lives under
``MARK_KEY`` and holds a JSON object, so one parser reads it back from any of them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from facecast import __version__

MARK_KEY = "facecast"

# IPTC's controlled vocabulary term for "created by a trained model": the value C2PA and
# the big platforms look for, so other tools can recognise the output without knowing us.
IPTC_TRAINED_ALGORITHMIC_MEDIA = (
    "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
)


def make_mark(**extra: Any) -> dict[str, str]:
    """The mark for one output: ``{"facecast": "<json>"}``.

    ``extra`` adds fields (generator, source face, options...). ``ai_generated`` is always
    true: an output without it would defeat the point of the mark, so it cannot be
    overridden. Values that JSON cannot hold are written as their ``str()``.
    """
    payload: dict[str, Any] = {
        "generator": f"facecast {__version__}",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "digital_source_type": IPTC_TRAINED_ALGORITHMIC_MEDIA,
    }
    payload.update(extra)
    payload["ai_generated"] = True
    # ASCII-only JSON fits a PNG tEXt chunk (Latin-1) and every container's tag encoding.
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"), default=str)
    return {MARK_KEY: text}


def parse_mark(mark: dict[str, str]) -> dict[str, Any] | None:
    """The decoded facecast payload of a mark read back from a file, or None if absent."""
    for key, value in mark.items():
        if key.lower() != MARK_KEY:
            continue
        try:
            payload = json.loads(value)
        except json.JSONDecodeError:
            return None
        return payload if isinstance(payload, dict) else None
    return None


def read_video_mark(path: str | Path) -> dict[str, str]:
    """The mark in a video file's container tags (``{}`` when there is none)."""
    from facecast.media._io import open_input

    with open_input(path) as container:
        tags = dict(container.metadata)
    # Matroska upper-cases tag names on the way back; mp4 keeps them.
    for key, value in tags.items():
        if key.lower() == MARK_KEY:
            return {MARK_KEY: value}
    # A muxer that drops custom tags still keeps ``comment``, where the sink puts a copy.
    comment = next((v for k, v in tags.items() if k.lower() == "comment"), None)
    if comment is not None and parse_mark({MARK_KEY: comment}) is not None:
        return {MARK_KEY: comment}
    return {}


def read_mark(path: str | Path) -> dict[str, str]:
    """The mark of an image or a video file, chosen by the file's content."""
    from facecast.media.image_io import read_image_mark
    from facecast.media.kind import detect_kind

    if detect_kind(path) == "image":
        return read_image_mark(path)
    return read_video_mark(path)
