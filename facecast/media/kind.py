"""Is a file an image or a video? Decided by its content, never by its name.

Rules, in order:

1. Magic bytes of PNG, JPEG, WebP, BMP or TIFF → ``"image"`` (no decoder is run).
2. Anything else is offered to FFmpeg (PyAV). A file with a video stream of two or more
   frames is a ``"video"``. A container with exactly one picture (a one-frame GIF, a
   single-frame mp4) is an ``"image"``: there is no motion to keep, and ``read_image``
   decodes it through PyAV when OpenCV cannot.
3. Missing, empty, unreadable, unrecognised, no video stream, no decodable frame →
   ``MediaError`` naming the file and the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import av

from facecast.errors import MediaError
from facecast.media._io import open_input, read_head, require_file

MediaKind = Literal["image", "video"]

ImageFormat = Literal["png", "jpeg", "webp", "bmp", "tiff"]

# BITMAPINFOHEADER sizes of the BMP variants in use; "BM" alone is too weak a signature
# (any text file starting with those two letters would match).
_BMP_DIB_SIZES = {12, 40, 52, 56, 64, 108, 124}


def sniff_image_format(head: bytes) -> ImageFormat | None:
    """The still-image format whose signature starts ``head``, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if (
        len(head) >= 18
        and head[:2] == b"BM"
        and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES
    ):
        return "bmp"
    return None


def detect_kind(path: str | Path) -> MediaKind:
    """``"image"`` or ``"video"`` for the file at ``path``, by content (see module doc)."""
    path = require_file(path)
    if sniff_image_format(read_head(path, 32)) is not None:
        return "image"
    frames = count_video_frames(path, limit=2)
    return "video" if frames >= 2 else "image"


def count_video_frames(path: str | Path, limit: int) -> int:
    """Decode up to ``limit`` frames of the first video stream and say how many came out.

    Trusts the container's frame count when it states two or more, since decoding is
    then unnecessary; raises MediaError when there is no video stream or nothing decodes.
    """
    path = Path(path)
    with open_input(path) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: no video stream (not an image or a video file)")
        stream = container.streams.video[0]
        if stream.frames >= limit:
            return stream.frames
        decoded = 0
        errors = 0
        try:
            for packet in container.demux(stream):
                try:
                    decoded += len(packet.decode())
                except av.FFmpegError:
                    errors += 1
                if decoded >= limit:
                    break
        except av.FFmpegError as exc:
            if decoded == 0:
                raise MediaError(f"{path}: cannot read video ({exc})") from exc
        if decoded == 0:
            codec = stream.codec_context.name if stream.codec_context else "unknown"
            reason = "corrupt data" if errors else f"codec {codec!r} gave no picture"
            raise MediaError(f"{path}: no decodable video frame ({reason})")
        return decoded
