"""Still images in and out: always BGR uint8 inside facecast, marked on the way out.

OpenCV does the decoding and encoding; the mark is spliced into the encoded bytes here:
a PNG ``tEXt`` (or ``iTXt`` for non-Latin-1 text) chunk right after ``IHDR``, or a JPEG
``COM`` segment (``key=value``) after the ``APPn`` segments. Both are ignored by viewers
and kept by most tools that do not re-encode. What a file's header says, and the limits it
is held to before anything is decoded, are in image_header.
"""

from __future__ import annotations

import os
import re
import struct
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import numpy as np

from facecast.errors import MediaError
from facecast.media._io import open_input, read_bytes, require_file
from facecast.media.image_header import (
    MAX_DECODED_BYTES,
    MAX_IMAGE_PIXELS,
    PNG_SIGNATURE,
    ImageHeader,
    check_decodable,
    image_header,
    jpeg_segments,
    png_chunk_spans,
)
from facecast.media.kind import sniff_image_format

WRITABLE_SUFFIXES = (".png", ".jpg", ".jpeg")

# PNG keywords: 1-79 printable Latin-1 characters; we also keep JPEG COM keys to that set
# minus "=", which separates key from value there.
_KEY_RE = re.compile(r"[\x21-\x3c\x3e-\x7e](?:[\x20-\x3c\x3e-\x7e]{0,77}[\x21-\x3c\x3e-\x7e])?")
_COM_MAX = 0xFFFF - 2  # segment length field counts itself


# ---------------------------------------------------------------------------- reading


def read_image(path: str | Path) -> np.ndarray:
    """The image at ``path`` as BGR uint8 (H, W, 3).

    Grayscale becomes BGR; 16-bit and float images are scaled to 8 bits; an alpha channel
    is composited onto white (a transparent PNG cut-out should look like it does in a
    browser, not turn black). JPEG EXIF orientation is applied. Formats OpenCV cannot read
    but FFmpeg can (GIF, a one-frame video) are decoded through PyAV (first frame).

    A file gets the same limits as an upload (``check_decodable``), read from its header
    before anything is decoded: a small file that claims a huge picture is refused, not
    allocated.
    """
    path = require_file(path)
    data = read_bytes(path)
    fmt = sniff_image_format(data[:32])
    if fmt is not None:
        header = image_header(data, fmt)
        if header is not None:
            check_decodable(header, str(path))
        elif fmt in HEADER_REQUIRED:
            raise MediaError(f"{path}: corrupt {fmt.upper()} header")
        # else a WebP, BMP or TIFF variant these readers do not know: OpenCV's own checks
        # (its pixel cap included) and the check after decoding still apply
    # IMREAD_COLOR applies the EXIF orientation; JPEG has no alpha to lose.
    flags = cv2.IMREAD_COLOR if fmt == "jpeg" else cv2.IMREAD_UNCHANGED
    image = _imdecode(data, flags, str(path))
    if image is None:
        if fmt is not None:
            raise MediaError(f"{path}: corrupt or unsupported {fmt.upper()} image")
        return _read_first_video_frame(path)
    _check_decoded(image, str(path))
    return to_bgr8(image)


UPLOAD_FORMATS = ("jpeg", "png")
HEADER_REQUIRED = ("jpeg", "png")  # formats whose header readers here know every variant


class UnsupportedImageError(MediaError):
    """Bytes that are not an image type we accept (judged by content, not by name)."""


def decode_image_bytes(data: bytes, name: str = "upload") -> np.ndarray:
    """An uploaded JPEG or PNG as BGR uint8. The type is sniffed from the bytes and the
    size read from the header before anything is decoded, so a small file that claims a
    huge picture is refused without allocating it."""
    fmt = sniff_image_format(data[:32])
    if fmt not in UPLOAD_FORMATS:
        raise UnsupportedImageError(f"{name}: not a JPEG or PNG image")
    header = image_header(data, fmt)
    if header is None:
        raise MediaError(f"{name}: corrupt {fmt.upper()} header")
    check_decodable(header, name)
    flags = cv2.IMREAD_COLOR if fmt == "jpeg" else cv2.IMREAD_UNCHANGED
    image = _imdecode(data, flags, name)
    if image is None:
        raise MediaError(f"{name}: corrupt {fmt.upper()} image")
    return to_bgr8(image)


def _imdecode(data: bytes, flags: int, name: str) -> np.ndarray | None:
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as exc:  # OpenCV's own limits, for a header the readers here skip
        reason = str(exc).strip().splitlines()[-1]
        raise MediaError(f"{name}: OpenCV cannot decode it ({reason})") from None


def _check_decoded(image: np.ndarray, name: str) -> None:
    """The pixel cap, for a picture whose header was not read before decoding."""
    height, width = image.shape[:2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    check_decodable(ImageHeader(width, height, channels, 8 * image.itemsize), name)


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """Normalise any decoded image (gray, BGRA, 16-bit, float) to BGR uint8."""
    if image.dtype != np.uint8:
        if image.dtype == np.uint16:
            # straight into bytes: no second 16-bit copy of a large picture
            image = np.right_shift(image, 8, out=np.empty(image.shape, np.uint8), casting="unsafe")
        elif np.issubdtype(image.dtype, np.floating):
            image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        else:
            raise MediaError(f"unsupported image sample type {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if channels == 2:  # gray + alpha
        bgr = cv2.cvtColor(np.ascontiguousarray(image[:, :, 0]), cv2.COLOR_GRAY2BGR)
        return composite_on_white(np.dstack([bgr, image[:, :, 1]]))
    if channels == 4:
        return composite_on_white(image)
    if channels == 3:
        return np.ascontiguousarray(image)
    raise MediaError(f"unsupported image with {channels} channels")


def composite_on_white(bgra: np.ndarray) -> np.ndarray:
    alpha = bgra[:, :, 3]
    if alpha.min() == 255:  # opaque alpha channel: nothing to blend
        return np.ascontiguousarray(bgra[:, :, :3])
    out = np.empty((*bgra.shape[:2], 3), np.uint8)
    # a band of rows at a time: the float temporaries of a whole 40 Mpixel picture would
    # take over a GB
    step = max(1, _BLEND_PIXELS // max(1, bgra.shape[1]))
    for top in range(0, bgra.shape[0], step):
        band = bgra[top : top + step]
        a = band[:, :, 3].astype(np.float32)[:, :, None] * (1.0 / 255.0)
        blended = band[:, :, :3].astype(np.float32) * a + 255.0 * (1.0 - a)
        out[top : top + step] = blended + 0.5
    return out


_BLEND_PIXELS = 1 << 20  # pixels per band in composite_on_white


def _read_first_video_frame(path: Path) -> np.ndarray:
    with open_input(path) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: not an image (no picture in it)")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width and height:  # from the container's header: checked before decoding
            check_decodable(ImageHeader(width, height, 3, 8), str(path))
        try:
            for packet in container.demux(stream):
                for frame in packet.decode():
                    return frame.to_ndarray(format="bgr24")
        except av.FFmpegError as exc:
            raise MediaError(f"{path}: corrupt image ({exc})") from exc
    raise MediaError(f"{path}: corrupt image (no picture could be decoded)")


def read_image_mark(path: str | Path) -> dict[str, str]:
    """The text metadata of a PNG (tEXt/zTXt/iTXt) or JPEG (COM) file.

    JPEG comments written by facecast come back as key → value; a foreign comment without
    a ``key=`` prefix comes back under ``"comment"``. Other formats give ``{}``.
    """
    path = require_file(path)
    data = read_bytes(path)
    fmt = sniff_image_format(data[:32])
    if fmt == "png":
        return _png_text_chunks(data)
    if fmt == "jpeg":
        return _jpeg_comments(data)
    return {}


def _png_text_chunks(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for ctype, body in _png_chunks(data):
        try:
            if ctype == b"tEXt":
                key, _, text = body.partition(b"\0")
                out[key.decode("latin-1")] = text.decode("latin-1")
            elif ctype == b"zTXt":
                key, _, rest = body.partition(b"\0")
                out[key.decode("latin-1")] = zlib.decompress(rest[1:]).decode("latin-1")
            elif ctype == b"iTXt":
                key, _, rest = body.partition(b"\0")
                compressed, rest = rest[0], rest[2:]
                _lang, _, rest = rest.partition(b"\0")
                _translated, _, text = rest.partition(b"\0")
                if compressed:
                    text = zlib.decompress(text)
                out[key.decode("latin-1")] = text.decode("utf-8")
        except (zlib.error, UnicodeDecodeError, IndexError):
            continue  # one malformed chunk must not hide the others
    return out


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    for ctype, start, length in png_chunk_spans(data):
        body = data[start : start + length]
        if len(body) < length:
            return  # truncated file: keep what was read
        yield ctype, body


def _jpeg_comments(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for _, marker, payload in jpeg_segments(data):
        if marker != 0xFE:
            continue
        text = payload.decode("utf-8", errors="replace")
        key, sep, value = text.partition("=")
        if sep and _KEY_RE.fullmatch(key):
            out[key] = value
        else:
            out["comment"] = f"{out['comment']}\n{text}" if "comment" in out else text
    return out


# ---------------------------------------------------------------------------- writing


def write_image(
    path: str | Path, image: np.ndarray, mark: dict[str, str], *, jpeg_quality: int = 95
) -> None:
    """Write ``image`` (BGR or gray uint8) as PNG or JPEG (by suffix) carrying ``mark``.

    The file is written to a temporary name and renamed, so a crash never leaves a
    half-written output that looks finished.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITABLE_SUFFIXES:
        raise MediaError(
            f"{path}: cannot write a marked {suffix or 'suffix-less'} image; "
            f"use one of {', '.join(WRITABLE_SUFFIXES)}"
        )
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 image, got {image.dtype} with shape {image.shape}")
    for key in mark:
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"invalid mark key {key!r}: 1-79 printable ASCII, no '='")
    if suffix == ".png":
        ok, buf = cv2.imencode(".png", image)
        encoded = _png_with_text(buf.tobytes(), mark) if ok else b""
    else:
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
        encoded = _jpeg_with_comments(buf.tobytes(), mark) if ok else b""
    if not ok:
        raise MediaError(f"{path}: OpenCV could not encode the image")
    _atomic_write(path, encoded)


def png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _png_with_text(png: bytes, mark: dict[str, str]) -> bytes:
    if not png.startswith(PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise MediaError("OpenCV produced an unexpected PNG layout")
    ihdr_end = len(PNG_SIGNATURE) + 12 + struct.unpack(">I", png[8:12])[0]
    chunks = []
    for key, text in mark.items():
        try:
            body = key.encode("latin-1") + b"\0" + text.encode("latin-1")
            chunks.append(png_chunk(b"tEXt", body))
        except UnicodeEncodeError:
            # iTXt: keyword, no compression, empty language and translated keyword, UTF-8.
            body = key.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8")
            chunks.append(png_chunk(b"iTXt", body))
    return png[:ihdr_end] + b"".join(chunks) + png[ihdr_end:]


def _jpeg_with_comments(jpeg: bytes, mark: dict[str, str]) -> bytes:
    insert_at = 2
    for offset, marker, payload in jpeg_segments(jpeg):
        if 0xE0 <= marker <= 0xEF:  # APPn (JFIF, EXIF) must stay first
            insert_at = offset + 4 + len(payload)
        else:
            break
    segments = []
    for key, value in mark.items():
        payload = f"{key}={value}".encode()
        if len(payload) > _COM_MAX:
            raise MediaError(f"mark {key!r} is too long for a JPEG comment ({len(payload)} bytes)")
        segments.append(b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload)
    return jpeg[:insert_at] + b"".join(segments) + jpeg[insert_at:]


def _atomic_write(path: Path, data: bytes) -> None:
    # A unique sibling name opened with "xb" (not mkstemp, whose 0600 mode would stick to
    # the output) so the final file gets the usual umask-derived permissions.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with tmp.open("xb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MediaError(f"{path}: cannot write ({exc.strerror or exc})") from exc


__all__ = [
    "HEADER_REQUIRED",
    "MAX_DECODED_BYTES",
    "MAX_IMAGE_PIXELS",
    "UPLOAD_FORMATS",
    "WRITABLE_SUFFIXES",
    "ImageHeader",
    "UnsupportedImageError",
    "check_decodable",
    "composite_on_white",
    "decode_image_bytes",
    "image_header",
    "png_chunk",
    "read_image",
    "read_image_mark",
    "to_bgr8",
    "write_image",
]
