"""The machine-readable provenance mark every output carries.

A mark is a ``dict[str, str]``: metadata key → text, written as-is into PNG ``tEXt``
chunks, JPEG ``COM`` segments and video container tags. facecast's own entry lives under
``MARK_KEY`` and holds a JSON object, so one parser reads it back from any of them.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from facecast import __version__

MARK_KEY = "facecast"

IPTC_DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/"
# IPTC's controlled vocabulary (the values C2PA and the big platforms look for, so other
# tools recognise the output without knowing us). facecast's outputs are
# "compositeWithTrainedAlgorithmicMedia" ("Edited using Generative AI": real media with
# parts made by a trained model), not "trainedAlgorithmicMedia" ("Created using Generative
# AI": wholly generated, as from a text prompt): the frames, background, body, voice and
# timing are the target's own, and only the face region is the model's output.
IPTC_COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA = (
    IPTC_DIGITAL_SOURCE_TYPE + "compositeWithTrainedAlgorithmicMedia"
)
IPTC_TRAINED_ALGORITHMIC_MEDIA = IPTC_DIGITAL_SOURCE_TYPE + "trainedAlgorithmicMedia"

# The in-band mark: an H.264 SEI "user data unregistered" message (H.264 D.1.6), whose
# payload starts with this UUID (ISO/IEC 11578) and goes on with ``sei_text(mark)``. Drawn
# at random once for facecast; readers (``facecast verify``, anyone's) find the mark by it,
# so it must never change. A random UUID has no 00 00 byte pair, so no emulation
# prevention byte lands inside it and it is found as written.
SEI_UUID = "88a0f0ca-51b7-4900-93e0-ffb8405b092e"
SEI_UUID_BYTES = uuid.UUID(SEI_UUID).bytes

# The SEI text's short names for the mark's fields (anything else keeps its own name).
_SEI_NAMES = {
    "ai_generated": "ai",
    "generator": "gen",
    "digital_source_type": "dst",
    "created": "t",
    "source_face": "src",
    "visible_label": "label",
}
_SEI_VALUE_MAX = 64  # characters per value: the text rides in every keyframe


def make_mark(**extra: Any) -> dict[str, str]:
    """The mark for one output: ``{"facecast": "<json>"}``.

    ``extra`` adds fields (generator, source face, options...). ``ai_generated`` is always
    true: an output without it would defeat the point of the mark, so it cannot be
    overridden. Values that JSON cannot hold are written as their ``str()``.
    """
    payload: dict[str, Any] = {
        "generator": f"facecast {__version__}",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "digital_source_type": IPTC_COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
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


def sei_text(mark: dict[str, str]) -> str | None:
    """The mark as the short text of the in-band SEI message, or None without a facecast
    payload: ``ai=1&gen=facecast+0.1.0&dst=compositeWithTrainedAlgorithmicMedia&t=...``.

    Form-encoded (RFC 1866 / ``urlencode``): readable in a hex dump, parsed by any
    language's query-string parser, and free of the characters FFmpeg's filter option
    syntax reserves (``,`` ``:`` ``'`` ``\\``), so it passes through ``h264_metadata``'s
    ``sei_user_data`` unescaped. Field names are shortened (``_SEI_NAMES``), the IPTC term
    is given without its vocabulary URL, the time in ISO 8601 basic format, and each value
    is cut at 64 characters.
    """
    payload = parse_mark(mark)
    if payload is None:
        return None
    fields: list[tuple[str, str]] = []
    for key, value in payload.items():
        if isinstance(value, bool):
            text = "1" if value else "0"
        elif key == "digital_source_type" and str(value).startswith(IPTC_DIGITAL_SOURCE_TYPE):
            text = str(value)[len(IPTC_DIGITAL_SOURCE_TYPE) :]
        elif key == "created":
            text = _basic_time(str(value))
        else:
            text = str(value)
        if len(text) > _SEI_VALUE_MAX:
            text = text[: _SEI_VALUE_MAX - 3] + "..."
        fields.append((_SEI_NAMES.get(key, key), text))
    fields.sort(key=lambda kv: kv[0] != "ai")  # "ai=1" first: the one field that matters
    return urlencode(fields)


def parse_sei_text(text: str) -> dict[str, Any] | None:
    """The mark's payload back from ``sei_text``'s form (full field names, the IPTC URL,
    booleans), or None when ``text`` is not one."""
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return None
    longer = {short: name for name, short in _SEI_NAMES.items()}
    payload: dict[str, Any] = {}
    for short, value in pairs:
        name = longer.get(short, short)
        if name in ("ai_generated", "visible_label") and value in ("0", "1"):
            payload[name] = value == "1"
        elif name == "digital_source_type" and "/" not in value:
            payload[name] = IPTC_DIGITAL_SOURCE_TYPE + value
        else:
            payload[name] = value
    return payload if payload.get("ai_generated") is True else None


def _basic_time(text: str) -> str:
    """An ISO 8601 time in basic format, UTC (``20260501T120000Z``): no ``:`` in it."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return text
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y%m%dT%H%M%S") + ("Z" if moment.tzinfo is not None else "")


def mark_in_tags(tags: dict[str, str]) -> dict[str, str]:
    """The mark among a container's tags (``{}`` when there is none)."""
    # Matroska upper-cases tag names on the way back; mp4 keeps them.
    for key, value in tags.items():
        if key.lower() == MARK_KEY:
            return {MARK_KEY: value}
    # A muxer that drops custom tags still keeps ``comment``, where the sink puts a copy.
    comment = next((v for k, v in tags.items() if k.lower() == "comment"), None)
    if comment is not None and parse_mark({MARK_KEY: comment}) is not None:
        return {MARK_KEY: comment}
    return {}


def read_video_mark(path: str | Path) -> dict[str, str]:
    """The mark in a video file's container tags (``{}`` when there is none)."""
    from facecast.media._io import open_input

    with open_input(path) as container:
        tags = dict(container.metadata)
    return mark_in_tags(tags)


def read_mark(path: str | Path) -> dict[str, str]:
    """The mark of an image or a video file, chosen by the file's content."""
    from facecast.media.image_io import read_image_mark
    from facecast.media.kind import detect_kind

    if detect_kind(path) == "image":
        return read_image_mark(path)
    return read_video_mark(path)
