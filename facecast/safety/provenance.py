"""Provenance that survives: finding all of facecast's marks in a file or a live stream.

Three marks, each for a different reader (see README, "Provenance"):

- the container mark (``facecast.media.mark``): tags any media tool shows, lost on a remux
  or a restream;
- the in-band mark: an H.264 SEI message with ``SEI_UUID`` in every keyframe, written by
  ``facecast.media.video_encode.SeiMarker``; it travels with the picture (remux, restream, a
  viewer who joins late). Read by ``facecast.safety.sei_scan``;
- a C2PA manifest (files: MP4/MOV, JPEG, PNG), signed with the user's certificate or a
  local TEST one, readable by any C2PA tool (c2pa-python, c2patool, contentcredentials.org):
  ``facecast.safety.c2pa_manifest``.

This module looks for all three in a file or a live stream (``verify``, behind ``facecast
verify``), and keeps the names the CLI and the tests import from here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av

from facecast.errors import MediaError
from facecast.media.mark import mark_in_tags, parse_mark
from facecast.safety.c2pa_manifest import (
    TEST_ORGANIZATION,
    C2paReport,
    SigningKey,
    load_signing_key,
    local_test_key,
    read_c2pa,
    sign_file,
)
from facecast.safety.sei_scan import SeiReport, describe_error, scan_sei

# ``facecast verify --json``: each report's attributes under their keys there, in order.
_SEI_JSON = {
    "found": "found",
    "codec": "codec",
    "keyframes_read": "keyframes",
    "keyframes_marked": "marked",
    "mark": "payload",
    "text": "text",
}
_C2PA_KEYS = ("found", "supported", "signer", "issuer", "test_key", "validation", "problems")
_C2PA_JSON = {key: key for key in (*_C2PA_KEYS, "digital_source_types", "generator", "error")}


def _json_fields(report: SeiReport | C2paReport | None, keys: dict[str, str]) -> Any:
    """``report``'s attributes under the JSON ``keys`` they map from; None for no report."""
    if report is None:
        return None
    return {key: getattr(report, attribute) for key, attribute in keys.items()}


@dataclass
class Verification:
    """What ``facecast verify`` found in one file or stream."""

    target: str
    kind: str  # image | video | stream
    sei: SeiReport | None = None  # None: not applicable (an image)
    container: dict[str, Any] | None = None  # the container mark's payload
    c2pa: C2paReport | None = None  # None: not applicable (a stream)

    @property
    def found(self) -> bool:
        return bool(
            (self.sei and self.sei.found)
            or self.container
            or (self.c2pa and self.c2pa.found and not self.c2pa.error)
        )

    def as_json(self) -> dict[str, Any]:
        sei = _json_fields(self.sei, _SEI_JSON)
        c2pa = _json_fields(self.c2pa, _C2PA_JSON)
        return {
            "input": self.target,
            "kind": self.kind,
            "found": self.found,
            "sei": sei,
            "container": {"found": self.container is not None, "mark": self.container},
            "c2pa": c2pa,
        }

    def lines(self) -> list[str]:
        """One line per mark, for people."""
        out = []
        if self.sei is None:
            out.append("sei: not applicable (an image)")
        elif self.sei.codec not in (None, "h264"):
            out.append(f"sei: not applicable ({self.sei.codec} video: H.264 only)")
        elif self.sei.found:
            out.append(
                f"sei: found in {self.sei.marked} of {self.sei.keyframes} keyframe(s) read: "
                f"{_summary(self.sei.payload)}"
            )
        else:
            read = (
                f"{self.sei.keyframes} keyframe(s) read"
                if self.sei.keyframes
                else "no keyframe read"
            )
            out.append(f"sei: none ({read})")
        if self.container:
            out.append(f"container: found: {_summary(self.container)}")
        else:
            out.append("container: none")
        if self.c2pa is None:
            out.append("c2pa: not applicable (a live stream)")
        elif self.c2pa.error:
            out.append(f"c2pa: unreadable manifest ({self.c2pa.error})")
        elif self.c2pa.found:
            kinds = ", ".join(k.rsplit("/", 1)[-1] for k in self.c2pa.digital_source_types)
            state = self.c2pa.validation or "unknown"
            if self.c2pa.problems:
                state += f" ({', '.join(self.c2pa.problems)})"
            out.append(
                f"c2pa: found: digitalSourceType={kinds or 'none'} "
                f"signer={self.c2pa.signer!r} issuer={self.c2pa.issuer!r} validation={state}"
            )
        elif not self.c2pa.supported:
            out.append("c2pa: not applicable (a format C2PA does not cover)")
        else:
            out.append("c2pa: none")
        return out


def _summary(payload: dict[str, Any] | None) -> str:
    if not payload:
        return "(unparsed)"
    parts = []
    for key in ("ai_generated", "generator", "digital_source_type", "created", "swapper"):
        if key in payload:
            value = payload[key]
            if key == "digital_source_type":
                value = str(value).rsplit("/", 1)[-1]
            parts.append(f"{key}={value}")
    return " ".join(parts) or json.dumps(payload)


def verify(target: str, *, seconds: float = 10.0, keyframes: int | None = 5) -> Verification:
    """Look for every mark in a file (image or video) or a live stream URL (read for at
    most ``seconds``). Raises MediaError for input that cannot be read."""
    from facecast.media.kind import detect_kind

    if "://" in target and not target.lower().startswith("file://"):
        return _verify_stream(target, seconds, keyframes)
    path = Path(target.removeprefix("file://"))
    kind = detect_kind(path)  # MediaError for a missing or unreadable file
    if kind == "image":
        from facecast.media.image_io import read_image_mark

        container = parse_mark(read_image_mark(path))
        return Verification(target, "image", None, container, read_c2pa(path))
    from facecast.media._io import open_input

    with open_input(path) as media:
        container = parse_mark(mark_in_tags(dict(media.metadata)))
        try:
            sei = scan_sei(media, max_keyframes=keyframes)
        except av.FFmpegError as exc:
            raise MediaError(f"{path}: cannot read the video ({exc})") from exc
    return Verification(target, "video", sei, container, read_c2pa(path))


def _verify_stream(url: str, seconds: float, keyframes: int | None) -> Verification:
    from facecast.media.input_plan import plan_input
    from facecast.media.srt_bridge import Bridge
    from facecast.media.urls import redact

    name = redact(url)
    plan = plan_input(url, open_timeout=seconds, stall_timeout=seconds)
    deadline = time.monotonic() + seconds
    bridge = None
    try:
        if plan.bridge:
            bridge = Bridge(plan.bridge)
            bridge.start()
            if not bridge.wait_connected(seconds, lambda: False):
                reason = bridge.exit_reason() if not bridge.alive() else "SRT did not connect"
                raise MediaError(f"{name}: {reason} within {seconds:g} s")
        left = max(0.5, deadline - time.monotonic())
        try:
            container = av.open(
                plan.target,
                mode="r",
                format=plan.format,
                options=plan.options,
                timeout=(left, left),
            )
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise MediaError(f"{name}: cannot open ({describe_error(exc)})") from exc
        with container:
            tags = parse_mark(mark_in_tags(dict(container.metadata)))
            sei = scan_sei(container, max_keyframes=keyframes, deadline=deadline, live=True)
    finally:
        if bridge is not None:
            bridge.stop()
    return Verification(url, "stream", sei, tags, None)


__all__ = [
    "TEST_ORGANIZATION",
    "C2paReport",
    "SeiReport",
    "SigningKey",
    "Verification",
    "load_signing_key",
    "local_test_key",
    "read_c2pa",
    "scan_sei",
    "sign_file",
    "verify",
]
