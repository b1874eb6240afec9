"""What an image file's bytes say before anything is decoded: the layout of PNG chunks and
JPEG segments, and the picture's size, channels and bit depth from its header
(``image_header``), held to the decoding limits (``check_decodable``) so that a small file
claiming a huge picture is refused, not allocated."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from facecast.errors import MediaError
from facecast.media.kind import ImageFormat

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_IMAGE_PIXELS = 40_000_000  # ~6300x6300: any real photo; refuses decompression bombs
# What a decoded picture may take before it becomes BGR uint8: any 8-bit one at the pixel
# cap (4 channels), a 16-bit one at half of it. A 6000x6000 16-bit RGBA PNG is a few
# hundred KB on the wire but 288 MB decoded, and more while it is converted.
MAX_DECODED_BYTES = 4 * MAX_IMAGE_PIXELS
MB = 1_000_000  # decimal, as the docs give the budget (160 MB)


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
    for ctype, _, _ in png_chunk_spans(data):
        if ctype == b"tRNS":
            return True
        if ctype in (b"IDAT", b"IEND"):
            return False
    return False


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_header(data: bytes) -> ImageHeader | None:
    for _, marker, payload in jpeg_segments(data):
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


def png_chunk_spans(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, offset of the body, length) of each chunk, without copying any body."""
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        yield ctype, pos + 8, length
        if ctype == b"IEND":
            return
        pos += 12 + length


def jpeg_segments(data: bytes) -> Iterator[tuple[int, int, bytes]]:
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


__all__ = [
    "MAX_DECODED_BYTES",
    "MAX_IMAGE_PIXELS",
    "PNG_SIGNATURE",
    "ImageHeader",
    "check_decodable",
    "image_header",
    "jpeg_segments",
    "png_chunk_spans",
]
