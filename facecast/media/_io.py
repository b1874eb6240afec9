"""Opening files, with every failure turned into a MediaError that names file and reason."""

from __future__ import annotations

import errno
from pathlib import Path

import av
import av.container

from facecast.errors import MediaError


def require_file(path: str | Path) -> Path:
    """``path`` as a Path, after checking it is a readable, non-empty regular file."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise MediaError(f"{path}: file not found") from exc
    except PermissionError as exc:
        raise MediaError(f"{path}: permission denied") from exc
    except OSError as exc:
        raise MediaError(f"{path}: cannot access file ({exc.strerror or exc})") from exc
    if path.is_dir():
        raise MediaError(f"{path}: is a directory, not a media file")
    if st.st_size == 0:
        raise MediaError(f"{path}: file is empty")
    return path


def read_bytes(path: Path) -> bytes:
    """All of ``path``'s bytes; MediaError naming the file when they cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise MediaError(f"{path}: file not found") from exc
    except OSError as exc:
        raise _cannot_read(path, exc) from exc


def read_head(path: Path, size: int = 64) -> bytes:
    """The first ``size`` bytes of ``path``; MediaError naming the file when unreadable."""
    try:
        with path.open("rb") as fh:
            return fh.read(size)
    except OSError as exc:
        raise _cannot_read(path, exc) from exc


def _cannot_read(path: Path, exc: OSError) -> MediaError:
    return MediaError(f"{path}: cannot read file ({exc.strerror or exc})")


# FFmpeg's Y4M reader takes a header line of at most this many bytes, newline included
# (MAX_YUV4_HEADER in libavformat), and says only "Header too large." in its log: the caller
# gets a bare errno, EBUSY ("Device or resource busy") before FFmpeg 8 and EINVAL since.
Y4M_HEADER_MAX = 128


def y4m_header_problem(path: Path) -> str | None:
    """What is wrong with a Y4M file's header line for FFmpeg, or None (not Y4M, or fine)."""
    head = read_head(path, 4096)
    if not head.startswith(b"YUV4MPEG2"):
        return None
    end = head.find(b"\n")
    if 0 <= end < Y4M_HEADER_MAX:
        return None
    size = f"{end + 1} bytes" if end >= 0 else f"over {len(head)} bytes"
    return (
        f"{path}: Y4M header line is {size}, FFmpeg reads at most {Y4M_HEADER_MAX}; "
        "rewrite the file without its X... comment fields"
    )


def open_input(
    path: str | Path, options: dict[str, str] | None = None
) -> av.container.InputContainer:
    """Open a media file with PyAV, or raise MediaError saying why it cannot be read."""
    path = require_file(path)
    try:
        try:
            return av.open(str(path), mode="r", options=options or {})
        except (av.FFmpegError, OSError) as exc:
            # formats whose failure FFmpeg reports only as an errno: said in words
            problem = y4m_header_problem(path)
            if problem is None:
                raise
            raise MediaError(problem) from exc
    except av.error.InvalidDataError as exc:
        # Also what a truncated mp4 whose index (moov) was at the cut-off end gives.
        raise MediaError(
            f"{path}: not a readable image or video file (unrecognised or corrupt content)"
        ) from exc
    except av.error.PermissionError as exc:
        raise MediaError(f"{path}: permission denied") from exc
    except (av.FFmpegError, OSError) as exc:
        if getattr(exc, "errno", None) == errno.ENOENT:
            raise MediaError(f"{path}: file not found") from exc
        raise MediaError(f"{path}: cannot open as media ({exc})") from exc
