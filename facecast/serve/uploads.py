"""Image uploads over HTTP: read within a size limit as they arrive, typed by their bytes,
and decoded off the event loop.

An image upload is the raw body (a JPEG or PNG, whatever the ``Content-Type`` says) or
``multipart/form-data`` with the image in a part named ``file`` (``curl -F file=@face.jpg``).
Both get the same checks: 413 over the size limit, 415 when the bytes are not a JPEG or
PNG, 422 when the image cannot be used. Uploads are size-limited while they arrive (a raw
body and every multipart part alike: nothing oversize is ever held whole), checked against
the pixel and decoding budget from their header, and decoded in memory, off the event loop:
nothing from a request ever names a file.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import anyio.to_thread
import numpy as np
from fastapi import HTTPException, Request
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

from facecast.errors import MediaError
from facecast.media.image_io import UnsupportedImageError, decode_image_bytes

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# room in a multipart body for the boundaries and part headers around the images
FORM_OVERHEAD = 64 * 1024
UPLOAD_FIELD = "file"  # the multipart part holding a single-image upload (curl -F file=@x)
# Photos of one source person in one upload (repeated ``file`` parts): each face gets the one
# nearest its expression (swap/sources.py).
MAX_SOURCE_PHOTOS = 8
# Decoding an upload takes CPU and memory (up to image_io.MAX_DECODED_BYTES a picture, more
# while it is converted): on threads, so the event loop (/healthz, the publish hooks) never
# waits on one, and a few at a time, so a burst of uploads cannot add up.
DECODES_AT_ONCE = 2


async def read_image_upload(request: Request, limit: int, name: str) -> np.ndarray:
    """The uploaded image (the raw body, or the multipart part ``file``), or the HTTP error
    that says what is wrong with it."""
    return (await read_image_uploads(request, limit, name, most=1))[0]


async def read_image_uploads(
    request: Request, limit: int, name: str, most: int = MAX_SOURCE_PHOTOS
) -> list[np.ndarray]:
    """Like ``read_image_upload``, but a multipart body may repeat the part ``file`` up to
    ``most`` times: several photos of one person. Each gets the same checks."""
    if not is_multipart(request):
        return [await decode_off_loop(request, await read_limited(request, limit), name)]
    parts = await read_form(
        request, limit, (UPLOAD_FIELD,), required=(UPLOAD_FIELD,), repeatable={UPLOAD_FIELD: most}
    )
    photos = parts[UPLOAD_FIELD]
    if len(photos) == 1:
        return [await decode_off_loop(request, photos[0], name)]
    return [
        await decode_off_loop(request, data, f"{name} (photo {i + 1})")
        for i, data in enumerate(photos)
    ]


async def decode_off_loop(request: Request, data: bytes, name: str) -> np.ndarray:
    """``decode_upload`` on a worker thread, at most ``DECODES_AT_ONCE`` per app at a time."""
    state = request.app.state
    limiter = getattr(state, "decode_limiter", None)
    if limiter is None:  # made here, on the loop it serves (one at a time: no race)
        limiter = state.decode_limiter = anyio.CapacityLimiter(DECODES_AT_ONCE)
    return await anyio.to_thread.run_sync(decode_upload, data, name, limiter=limiter)


def decode_upload(data: bytes, name: str) -> np.ndarray:
    """Uploaded bytes as an image: 415 when they are not a JPEG or PNG, 422 when they are
    one that cannot be used (corrupt, too many pixels, over the decoding budget). Slow for
    a large picture: from a coroutine, use ``decode_off_loop``."""
    try:
        return decode_image_bytes(data, name)
    except UnsupportedImageError as exc:
        raise HTTPException(415, str(exc)) from None
    except MediaError as exc:
        raise HTTPException(422, str(exc)) from None


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, refusing (413) anything over ``limit`` bytes: by its declared length when
    there is one, else by counting as it arrives, so an oversize upload is never held whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"upload over {size_text(limit)}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"upload over {size_text(limit)}")
        chunks.append(chunk)
    return b"".join(chunks)


def size_text(size: int) -> str:
    """A byte limit for a reason: in MB, or in KB under one (not "over 0 MB")."""
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):g} MB"
    return f"{size / 1024:g} KB"


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def read_form(
    request: Request,
    limit: int,
    fields: Collection[str],
    required: Collection[str] = (),
    repeatable: dict[str, int] | None = None,
) -> dict[str, list[bytes]]:
    """The parts of a ``multipart/form-data`` body, by name (each a list, in order): only
    ``fields``, each at most ``limit`` bytes, each of ``required`` present, a part given more
    than once only if ``repeatable`` allows it (up to its count). Parsed as the body
    arrives, so an oversize part is refused (413) without being held whole; an unknown or
    repeated part, a missing one or a broken body gets 422."""
    repeatable = repeatable or {}
    over = HTTPException(413, f"upload over {size_text(limit)}")
    # the parts and the framing around them
    total = sum(repeatable.get(name, 1) for name in fields) * limit + FORM_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > total:
        raise over
    form = FormParts(_boundary(request), limit, fields, repeatable)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > total:
            raise over
        form.feed(chunk)
    return form.finish(required)


def _boundary(request: Request) -> bytes:
    _, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary", b"")
    if not boundary:
        raise HTTPException(422, "multipart body without a boundary in its Content-Type")
    return boundary


class FormParts:
    """A streaming ``multipart/form-data`` parser that keeps only the parts it is told to,
    each up to ``limit`` bytes: python-multipart's low-level parser, because Starlette's
    ``request.form()`` spools any size of file to disk before a handler can refuse it."""

    def __init__(
        self,
        boundary: bytes,
        limit: int,
        fields: Collection[str],
        repeatable: dict[str, int] | None = None,
    ) -> None:
        self.limit, self.fields = limit, frozenset(fields)
        self.repeatable = repeatable or {}
        self.parts: dict[str, list[bytearray]] = {}
        self._current: tuple[str, bytearray] | None = None
        self._headers: dict[str, bytes] = {}
        self._header = [bytearray(), bytearray()]  # field, value of the header being read
        self._ended = False
        try:
            self._parser = MultipartParser(boundary, callbacks=self._callbacks())  # type: ignore[arg-type]
        except (ValueError, MultipartParseError) as exc:  # e.g. a boundary over 70 bytes
            raise HTTPException(422, f"multipart boundary: {exc}") from None

    def _callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header[0].extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header[1].extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_end": self._end,
        }

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise HTTPException(422, f"multipart body: {exc}") from None

    def finish(self, required: Collection[str]) -> dict[str, list[bytes]]:
        if not self._ended:
            raise HTTPException(422, "multipart body: it ends before its closing boundary")
        missing = [name for name in required if name not in self.parts]
        if missing:
            raise HTTPException(422, f"multipart body: no part named {', '.join(missing)}")
        return {name: [bytes(data) for data in datas] for name, datas in self.parts.items()}

    def _part_begin(self) -> None:
        self._current, self._headers = None, {}

    def _header_end(self) -> None:
        field, value = self._header
        self._headers[bytes(field).decode("latin-1").lower()] = bytes(value)
        field.clear()
        value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name not in self.fields:
            expected = ", ".join(sorted(self.fields))
            raise HTTPException(422, f"multipart body: unknown part {name!r} (expected {expected})")
        given = self.parts.setdefault(name, [])
        most = self.repeatable.get(name, 1)
        if len(given) >= most:
            if most == 1:
                raise HTTPException(422, f"multipart body: part {name!r} given twice")
            raise HTTPException(422, f"multipart body: part {name!r} at most {most} times")
        given.append(bytearray())
        self._current = (name, given[-1])

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._current is not None  # data comes after its part's headers
        name, buffer = self._current
        buffer.extend(data[start:end])
        if len(buffer) > self.limit:
            raise HTTPException(413, f"{name}: upload over {size_text(self.limit)}")

    def _end(self) -> None:
        self._ended = True
