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
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

from facecast.errors import MediaError
from facecast.media._io import open_input, require_file
from facecast.media.kind import ImageFormat, sniff_image_format

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

    A file gets the same limits as an upload (``check_decodable``), read from its header
    before anything is decoded: a small file that claims a huge picture is refused, not
    allocated.
    """
    path = require_file(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MediaError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
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
MAX_IMAGE_PIXELS = 40_000_000  # ~6300x6300: any real photo; refuses decompression bombs
# What a decoded picture may take before it becomes BGR uint8: any 8-bit one at the pixel
# cap (4 channels), a 16-bit one at half of it. A 6000x6000 16-bit RGBA PNG is a few
# hundred KB on the wire but 288 MB decoded, and more while it is converted.
MAX_DECODED_BYTES = 4 * MAX_IMAGE_PIXELS
MB = 1_000_000  # decimal, as the docs give the budget (160 MB)


class UnsupportedImageError(MediaError):
    """Bytes that are not an image type we accept (judged by content, not by name)."""


@dataclass(frozen=True)
class ImageHeader:
    """What an image file says of its picture, before it is decoded: its size, and the
    channels and bits per sample OpenCV will decode it to."""

    width: int
    height: int
    channels: int
    bits: int

    @property
    def decoded_bytes(self) -> int:
        sample = max(1, (self.bits + 7) // 8)  # 1-, 2- and 4-bit samples decode to bytes
        return self.width * self.height * self.channels * sample


def check_decodable(header: ImageHeader, name: str) -> None:
    """MediaError unless the picture is within the pixel cap and the decoding budget."""
    width, height = header.width, header.height
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaError(
            f"{name}: {width}x{height} is too large (at most {MAX_IMAGE_PIXELS:,} pixels)"
        )
    if header.decoded_bytes > MAX_DECODED_BYTES:
        raise MediaError(
            f"{name}: {width}x{height} at {header.bits}-bit with {header.channels} channels "
            f"takes {header.decoded_bytes / MB:.0f} MB to decode (at most "
            f"{MAX_DECODED_BYTES / MB:.0f} MB: use fewer pixels or 8 bits)"
        )


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


def image_header(data: bytes, fmt: ImageFormat) -> ImageHeader | None:
    """The picture ``data`` holds, from its header; None when the header is unreadable."""
    try:
        header = _HEADER_READERS[fmt](data)
    except (struct.error, IndexError, ValueError):  # cut short, or nonsense offsets
        return None
    if header is None or header.width <= 0 or header.height <= 0:
        return None
    return header


# PNG colour type -> channels as OpenCV decodes it with IMREAD_UNCHANGED: gray, -, RGB,
# palette, gray+alpha, -, RGBA. A tRNS chunk adds an alpha channel to RGB and palette.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 4, 6: 4}


def _png_header(data: bytes) -> ImageHeader | None:
    if len(data) < 26 or data[12:16] != b"IHDR":
        return None
    width, height, bits, color = struct.unpack(">IIBB", data[16:26])
    channels = _PNG_CHANNELS.get(color)
    if channels is None:
        return None
    if color in (2, 3) and _png_has_transparency(data):
        channels = 4
    return ImageHeader(width, height, channels, bits)


def _png_has_transparency(data: bytes) -> bool:
    """A tRNS chunk before the image data (where the format puts it); chunk types only,
    so a large IDAT is never copied."""
    for ctype, _, _ in _png_chunk_spans(data):
        if ctype == b"tRNS":
            return True
        if ctype in (b"IDAT", b"IEND"):
            return False
    return False


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_header(data: bytes) -> ImageHeader | None:
    for _, marker, payload in _jpeg_segments(data):
        if marker in _JPEG_SOF and len(payload) >= 5:
            height, width = struct.unpack(">HH", payload[1:5])
            return ImageHeader(width, height, 3, 8)  # IMREAD_COLOR: always BGR uint8
    return None


def _webp_header(data: bytes) -> ImageHeader | None:
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended: the canvas, 24-bit sizes less one; flags say alpha
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        return ImageHeader(width, height, 4 if data[20] & 0x10 else 3, 8)
    if chunk == b"VP8L" and data[20] == 0x2F:  # lossless: 14-bit sizes less one, packed
        bits = int.from_bytes(data[21:25], "little")
        width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        return ImageHeader(width, height, 4 if bits >> 28 & 1 else 3, 8)
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":  # lossy: after the start code
        width, height = struct.unpack("<HH", data[26:30])
        return ImageHeader(width & 0x3FFF, height & 0x3FFF, 3, 8)
    return None


def _bmp_header(data: bytes) -> ImageHeader | None:
    if int.from_bytes(data[14:18], "little") == 12:  # OS/2 core header: 16-bit sizes
        width, height, _, bits = struct.unpack("<HHHH", data[18:26])
    else:
        width, height, _, bits = struct.unpack("<iiHH", data[18:30])
    # a negative height is a top-down bitmap; 32-bit ones may carry alpha
    return ImageHeader(abs(width), abs(height), 4 if bits == 32 else 3, 8)


_TIFF_SIZES = {3: 2, 4: 4}  # SHORT, LONG: the types the tags read here come in


def _tiff_header(data: bytes) -> ImageHeader | None:
    """The first page (the one OpenCV decodes): width, height, bits and samples per pixel."""
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    tags: dict[int, int] = {}
    for i in range(count):
        entry = data[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
        tag, kind, n = struct.unpack(order + "HHI", entry[:8])
        size = _TIFF_SIZES.get(kind)
        if tag not in (256, 257, 258, 277) or size is None or n < 1:
            continue
        # the first value: in the entry when all of them fit in its 4 bytes, else at an offset
        where = entry[8:12]
        if size * n > 4:
            (offset,) = struct.unpack(order + "I", where)
            where = data[offset : offset + size]
        (tags[tag],) = struct.unpack(order + ("H" if size == 2 else "I"), where[:size])
    if 256 not in tags or 257 not in tags:
        return None
    return ImageHeader(tags[256], tags[257], max(tags.get(277, 1), 1), tags.get(258, 1))


_HEADER_READERS = {
    "png": _png_header,
    "jpeg": _jpeg_header,
    "webp": _webp_header,
    "bmp": _bmp_header,
    "tiff": _tiff_header,
}


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


def _png_chunk_spans(data: bytes):
    """(type, offset of the body, length) of each chunk, without copying any body."""
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        yield ctype, pos + 8, length
        if ctype == b"IEND":
            return
        pos += 12 + length


def _png_chunks(data: bytes):
    for ctype, start, length in _png_chunk_spans(data):
        body = data[start : start + length]
        if len(body) < length:
            return  # truncated file: keep what was read
        yield ctype, body


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
