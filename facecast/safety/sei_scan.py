"""Reading the in-band mark: facecast's H.264 SEI message (``SEI_UUID``) in the demuxed
packets of a file or a stream. Packets are split into NAL units (Annex B or avcC), SEI
messages walked, the UUID compared; nothing here writes a bitstream (the writer is
``facecast.media.video_encode.SeiMarker``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import av
import av.container

from facecast.media.mark import SEI_UUID_BYTES, parse_sei_text

log = logging.getLogger(__name__)

_NAL_SEI = 6
_SEI_USER_DATA_UNREGISTERED = 5


def nal_units(data: bytes, length_size: int | None = None) -> list[bytes]:
    """The NAL units of one H.264 packet: Annex B (start codes, as in MPEG-TS and as
    encoders emit) or, with ``length_size``, length-prefixed (avcC: MP4, Matroska, FLV)."""
    if length_size is None or data.startswith((b"\x00\x00\x01", b"\x00\x00\x00\x01")):
        units = []
        for chunk in data.split(b"\x00\x00\x01")[1:]:
            chunk = chunk.rstrip(b"\x00")  # a 4-byte start code's leading zero
            if chunk:
                units.append(chunk)
        return units
    units, pos = [], 0
    while pos + length_size <= len(data):
        size = int.from_bytes(data[pos : pos + length_size], "big")
        pos += length_size
        if size <= 0 or pos + size > len(data):
            break
        units.append(data[pos : pos + size])
        pos += size
    return units


def avcc_length_size(extradata: bytes | None) -> int | None:
    """The NAL length field size of an avcC record (MP4/Matroska/FLV), None if Annex B."""
    if extradata and len(extradata) >= 5 and extradata[0] == 1:
        return (extradata[4] & 0x03) + 1
    return None


def sei_user_data(nal: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(uuid, data) of each "user data unregistered" message in an SEI NAL unit."""
    if not nal or nal[0] & 0x1F != _NAL_SEI:
        return
    # Emulation prevention bytes out: 00 00 03 stands for 00 00 inside a NAL unit.
    rbsp = nal[1:].replace(b"\x00\x00\x03", b"\x00\x00")
    pos = 0
    while pos < len(rbsp) and rbsp[pos] != 0x80:  # 0x80: rbsp_trailing_bits
        kind = size = 0
        while pos < len(rbsp) and rbsp[pos] == 0xFF:
            kind, pos = kind + 255, pos + 1
        if pos >= len(rbsp):
            return
        kind, pos = kind + rbsp[pos], pos + 1
        while pos < len(rbsp) and rbsp[pos] == 0xFF:
            size, pos = size + 255, pos + 1
        if pos >= len(rbsp):
            return
        size, pos = size + rbsp[pos], pos + 1
        payload = rbsp[pos : pos + size]
        pos += size
        if kind == _SEI_USER_DATA_UNREGISTERED and len(payload) >= 16:
            yield payload[:16], payload[16:]


def sei_mark_in_packet(data: bytes, length_size: int | None = None) -> str | None:
    """The text of facecast's SEI mark in one H.264 packet, or None."""
    if SEI_UUID_BYTES not in data:  # the common case, decided without parsing
        return None
    for nal in nal_units(data, length_size):
        for uid, payload in sei_user_data(nal):
            if uid == SEI_UUID_BYTES:
                return payload.split(b"\x00", 1)[0].decode("ascii", "replace")
    return None


@dataclass
class SeiReport:
    """What the SEI scan of a video saw."""

    codec: str | None = None
    keyframes: int = 0  # keyframes read
    marked: int = 0  # of them, with the mark
    text: str | None = None  # the first mark's text
    seconds: float = 0.0  # media time covered

    @property
    def found(self) -> bool:
        return self.marked > 0

    @property
    def payload(self) -> dict[str, Any] | None:
        return parse_sei_text(self.text) if self.text else None


def scan_sei(
    container: av.container.InputContainer,
    *,
    max_keyframes: int | None = 5,
    deadline: float | None = None,
    live: bool = False,
) -> SeiReport:
    """Demux ``container``'s first video stream up to ``max_keyframes`` keyframes (None:
    all) or the monotonic ``deadline``, and count the keyframes that carry the mark.

    A keyframe counts as marked only when the mark is in its own packet (its access unit),
    where a decoder, a remuxer's parser and a late joiner all meet it.
    ``live``: a read error (the publisher left, the timeout fired) ends the scan with what
    was read instead of raising."""
    report = SeiReport()
    try:
        _scan(container, report, max_keyframes, deadline)
    except (av.FFmpegError, OSError) as exc:
        if not live:
            raise
        log.debug("reading stopped: %s", describe_error(exc))
    return report


def _scan(
    container: av.container.InputContainer,
    report: SeiReport,
    max_keyframes: int | None,
    deadline: float | None,
) -> None:
    if not container.streams.video:
        return
    stream = container.streams.video[0]
    report.codec = stream.codec_context.name
    if report.codec != "h264":
        return
    length_size = avcc_length_size(stream.codec_context.extradata)
    first_pts: int | None = None
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        text = sei_mark_in_packet(bytes(packet), length_size)
        if packet.pts is not None and packet.time_base is not None:
            first_pts = packet.pts if first_pts is None else first_pts
            report.seconds = float((packet.pts - first_pts) * packet.time_base)
        if packet.is_keyframe:
            report.keyframes += 1
            if text is not None:
                report.marked += 1
                report.text = report.text or text
            if max_keyframes is not None and report.keyframes >= max_keyframes:
                break
        if deadline is not None and time.monotonic() >= deadline:
            break


def describe_error(exc: BaseException) -> str:
    """An exception in one line: its strerror, else its text, else its type's name."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text)


__all__ = [
    "SeiReport",
    "avcc_length_size",
    "describe_error",
    "nal_units",
    "scan_sei",
    "sei_mark_in_packet",
    "sei_user_data",
]
