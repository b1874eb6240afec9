"""GStreamer for the ``gst:`` inputs and outputs: loaded on first use (``gst_modules``), a
``gst:`` URL's pipeline description parsed with every error fatal, and the pipeline and bus
calls both directions make, each bounded by a timeout (no GLib main loop runs).

GStreamer is optional: ``gi`` is imported on first use, and a missing install gives a
``MediaError`` naming the fix. A description GStreamer cannot parse (unknown element, bad
property) is a ``MediaError`` at construction, never a hang.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from facecast.errors import MediaError

log = logging.getLogger(__name__)

PREFIX = "gst:"
STATE_WAIT = 5.0  # seconds to wait for a state change to finish
SECOND = 1_000_000_000  # GStreamer time is in nanoseconds
MISSING = (
    "GStreamer input/output needs the Debian GStreamer packages and pygobject<3.51 in the "
    "venv: run scripts/setup"
)

_gst: Any = None
_gst_lock = threading.Lock()


def is_gst(url: str | None) -> bool:
    return bool(url) and str(url).startswith(PREFIX)


def gst_modules() -> tuple[Any, Any]:
    """(Gst, GLib), initialised once; MediaError naming the fix when GStreamer is missing."""
    global _gst
    with _gst_lock:
        if _gst is None:
            try:
                import gi

                gi.require_version("Gst", "1.0")
                gi.require_version("GstApp", "1.0")
                from gi.repository import GLib, Gst, GstApp  # noqa: F401 (types the appsink)
            except (ImportError, ValueError) as exc:
                raise MediaError(f"{MISSING} ({exc})") from None
            Gst.init(None)
            _gst = (Gst, GLib)
    return _gst


def description(url: str) -> str:
    """The pipeline description of a ``gst:`` URL."""
    text = url[len(PREFIX) :] if url.startswith(PREFIX) else url
    text = text.strip().strip("!").strip()
    if not text:
        raise MediaError(f"{url!r}: a gst: input or output needs a pipeline description")
    return text


def parse(text: str, shown: str) -> Any:
    """``Gst.parse_launch`` with every error fatal; MediaError with GStreamer's reason."""
    Gst, GLib = gst_modules()
    try:
        return Gst.parse_launch_full(text, None, Gst.ParseFlags.FATAL_ERRORS)
    except GLib.Error as exc:
        raise MediaError(f"GStreamer cannot build {shown!r}: {exc.message}") from None


def bus_problem(bus: Any, timeout_ns: int = 0) -> str | None:
    """The first ERROR or EOS waiting on ``bus`` as a one-line reason (warnings are logged)."""
    Gst = gst_modules()[0]
    kinds = Gst.MessageType.ERROR | Gst.MessageType.EOS | Gst.MessageType.WARNING
    while True:
        msg = bus.timed_pop_filtered(timeout_ns, kinds)
        if msg is None:
            return None
        if msg.type == Gst.MessageType.EOS:
            return "end of stream"
        if msg.type == Gst.MessageType.ERROR:
            err, _debug = msg.parse_error()
            return f"{msg.src.get_name()}: {err.message}"
        warn, _debug = msg.parse_warning()
        log.warning("GStreamer warning from %s: %s", msg.src.get_name(), warn.message)
        timeout_ns = 0


def start_pipeline(pipeline: Any) -> str | None:
    """Set ``pipeline`` PLAYING; the reason it failed, or None."""
    Gst = gst_modules()[0]
    result = pipeline.set_state(Gst.State.PLAYING)
    if result == Gst.StateChangeReturn.FAILURE:
        return bus_problem(pipeline.get_bus()) or "cannot start the pipeline"
    return None


def stop_pipeline(pipeline: Any) -> None:
    Gst = gst_modules()[0]
    pipeline.set_state(Gst.State.NULL)
    pipeline.get_state(STATE_WAIT * SECOND)


def bgr_stride(width: int) -> int:
    """Bytes per row of video/x-raw BGR: GStreamer pads rows to a multiple of 4."""
    return (width * 3 + 3) & ~3


def bgr_rows(image: np.ndarray) -> bytes:
    """BGR rows padded as GStreamer lays out video/x-raw BGR."""
    height, width = image.shape[:2]
    stride = bgr_stride(width)
    if stride == width * 3:
        return image.tobytes()
    padded = np.zeros((height, stride), np.uint8)
    padded[:, : width * 3] = image.reshape(height, width * 3)
    return padded.tobytes()


__all__ = [
    "PREFIX",
    "SECOND",
    "bgr_rows",
    "bgr_stride",
    "bus_problem",
    "description",
    "gst_modules",
    "is_gst",
    "parse",
    "start_pipeline",
    "stop_pipeline",
]
