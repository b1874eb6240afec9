"""Still images in and out: always BGR uint8 inside facecast, marked on the way out.

OpenCV does the decoding and encoding; the mark is spliced into the encoded bytes here:
a PNG ``tEXt`` (or ``iTXt`` for non-Latin-1 text) chunk right after ``IHDR``, or a JPEG
``COM`` segment (``key=value``) after the ``APPn`` segments. Both are ignored by viewers
and kept by most tools that do not re-encode.
"""

from __future__ import annotations

import os
import re
import struct
import uuid
import zlib
from pathlib import Path

import av
import cv2
import numpy as np

from facecast.errors import MediaError
from facecast.media._io import open_input, read_head, require_file
from facecast.media.kind import sniff_image_format

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
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
    """
    path = require_file(path)
    fmt = sniff_image_format(read_head(path, 32))
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise MediaError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    if fmt == "jpeg":
        # IMREAD_COLOR applies the EXIF orientation; JPEG has no alpha to lose.
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    else:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        if fmt is not None:
            raise MediaError(f"{path}: corrupt or unsupported {fmt.upper()} image")
        return _read_first_video_frame(path)
    return to_bgr8(image)


UPLOAD_FORMATS = ("jpeg", "png")
MAX_UPLOAD_PIXELS = 40_000_000  # ~6300x6300: any real photo; refuses decompression bombs


class UnsupportedImageError(MediaError):
    """Bytes that are not an image type we accept (judged by content, not by name)."""


def decode_image_bytes(data: bytes, name: str = "upload") -> np.ndarray:
    """An uploaded JPEG or PNG as BGR uint8. The type is sniffed from the bytes and the
    size read from the header before anything is decoded, so a small file that claims a
    huge picture is refused without allocating it."""
    fmt = sniff_image_format(data[:32])
    if fmt not in UPLOAD_FORMATS:
        raise UnsupportedImageError(f"{name}: not a JPEG or PNG image")
    size = _png_size(data) if fmt == "png" else _jpeg_size(data)
    if size is None:
        raise MediaError(f"{name}: corrupt {fmt.upper()} header")
    width, height = size
    if width * height > MAX_UPLOAD_PIXELS:
        raise MediaError(
            f"{name}: {width}x{height} is too large (at most {MAX_UPLOAD_PIXELS:,} pixels)"
        )
    flags = cv2.IMREAD_COLOR if fmt == "jpeg" else cv2.IMREAD_UNCHANGED
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None:
        raise MediaError(f"{name}: corrupt {fmt.upper()} image")
    return to_bgr8(image)


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return (width, height) if width and height else None


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    for _, marker, payload in _jpeg_segments(data):
        if marker in _JPEG_SOF and len(payload) >= 5:
            height, width = struct.unpack(">HH", payload[1:5])
            return (width, height) if width and height else None
    return None


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """Normalise any decoded image (gray, BGRA, 16-bit, float) to BGR uint8."""
    if image.dtype != np.uint8:
        if image.dtype == np.uint16:
            image = (image >> 8).astype(np.uint8)
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
    a = alpha.astype(np.float32)[:, :, None] * (1.0 / 255.0)
    out = bgra[:, :, :3].astype(np.float32) * a + 255.0 * (1.0 - a)
    return (out + 0.5).astype(np.uint8)


def _read_first_video_frame(path: Path) -> np.ndarray:
    with open_input(path) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: not an image (no picture in it)")
        stream = container.streams.video[0]
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
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MediaError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
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


def _png_chunks(data: bytes):
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if len(body) < length:
            return  # truncated file: keep what was read
        yield ctype, body
        if ctype == b"IEND":
            return
        pos += 12 + length


def _jpeg_segments(data: bytes):
    """(offset, marker, payload) for each marker segment before the scan data."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return  # lost sync: corrupt header
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no more headers
            yield pos, marker, b""
            return
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2:
            return
        yield pos, marker, data[pos + 4 : pos + 2 + length]
        pos += 2 + length


def _jpeg_comments(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for _, marker, payload in _jpeg_segments(data):
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
    for offset, marker, payload in _jpeg_segments(jpeg):
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
