"""Several live streams in one process: start, stop, inspect, change the face.

``StreamManager`` owns one ``LivePipeline`` per stream key, each on its own thread with its
own engine, models and stats (no state shared between streams, none at module level). The
HTTP plane and ``facecast serve`` drive it; metrics read it at scrape time.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facecast.config import StreamSettings
from facecast.errors import FacecastError
from facecast.live import LivePipeline, build_pipeline

log = logging.getLogger(__name__)


class UnknownStreamError(FacecastError):
    """No stream runs under that key."""


@dataclass
class StreamHandle:
    key: str
    settings: StreamSettings
    pipeline: LivePipeline
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    started: float = field(default_factory=time.time)
    error: str | None = None
    source_name: str = ""

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def status(self) -> dict[str, Any]:
        """What an operator sees in ``/api/streams``."""
        pipeline, stats = self.pipeline, self.pipeline.stats
        source, sink = pipeline.source, pipeline.sink
        elapsed = max(time.monotonic() - stats.started, 1e-6)
        return {
            "key": self.key,
            "running": self.running,
            "error": self.error,
            "started": self.started,
            "source_face": self.source_name,
            "swapping": pipeline.swapping,
            "input": {
                "url": getattr(source, "name", self.settings.input),
                "up": bool(source.connected),
                "since": getattr(source, "state_since", None),
                "reconnects": source.reconnects,
            },
            "output": {
                "url": getattr(sink, "name", self.settings.output),
                "up": bool(sink.connected) if sink else False,
                "since": getattr(sink, "state_since", None),
                "reconnects": sink.reconnects if sink else 0,
            },
            "fps_in": stats.frames_in / elapsed,
            "fps_out": stats.frames_out / elapsed,
            "latency_p50_ms": _finite(stats.latency_ms(50)),
            "latency_p99_ms": _finite(stats.latency_ms(99)),
            "frames": {
                "in": stats.frames_in,
                "out": stats.frames_out,
                "swapped": stats.frames_swapped,
                "passed": stats.frames_passed,
                "failed": stats.frames_failed,
                "dropped": dropped_frames(pipeline),
                "held": stats.frames_held,
            },
            "faces": stats.faces_last,
            "rate": stats.rate_level,
        }


def dropped_frames(pipeline: LivePipeline) -> int:
    """Frames dropped anywhere on the way: input buffer and both slots."""
    source_dropped = getattr(pipeline.source, "dropped", 0)
    return source_dropped + pipeline.decoded.dropped + pipeline.processed.dropped


def _finite(value: float) -> float | None:
    return None if value != value else round(value, 1)  # NaN (no sample yet) → null


class StreamManager:
    def __init__(self) -> None:
        self._streams: dict[str, StreamHandle] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(
        self,
        key: str,
        settings: StreamSettings,
        source_image: np.ndarray | None = None,
        source_name: str | None = None,
    ) -> StreamHandle:
        """Build and start the pipeline for ``key`` (replacing a stopped one). Raises
        FacecastError for a bad face photo or settings, before anything runs."""
        with self._lock:
            old = self._streams.get(key)
            if old is not None and old.running:
                raise FacecastError(f"stream {key!r} is already running")
        pipeline = build_pipeline(settings, source_image, name=key)
        handle = StreamHandle(
            key,
            settings,
            pipeline,
            source_name=source_name or str(settings.source_image or "uploaded face"),
        )
        handle.thread = threading.Thread(
            target=self._run, args=(handle,), name=f"stream-{key}", daemon=True
        )
        with self._lock:
            self._streams[key] = handle
        handle.thread.start()
        log.info("stream %s: started (%s → %s)", key, settings.input, settings.output)
        return handle

    def _run(self, handle: StreamHandle) -> None:
        try:
            handle.pipeline.run(handle.stop)
        except Exception as exc:  # the stream ends; the process and other streams go on
            handle.error = str(exc) or type(exc).__name__
            log.error("stream %s: stopped by an error: %s", handle.key, handle.error)
        else:
            log.info("stream %s: ended", handle.key)

    def stop(self, key: str, timeout: float = 15.0) -> None:
        handle = self.get(key)
        handle.stop.set()
        if handle.thread is not None:
            handle.thread.join(timeout)
        with self._lock:
            if self._streams.get(key) is handle:
                del self._streams[key]

    def stop_all(self, timeout: float = 15.0) -> None:
        for handle in self.handles():
            handle.stop.set()
        deadline = time.monotonic() + timeout
        for handle in self.handles():
            if handle.thread is not None:
                handle.thread.join(max(0.1, deadline - time.monotonic()))
        with self._lock:
            self._streams.clear()

    # ------------------------------------------------------------------ control

    def get(self, key: str) -> StreamHandle:
        with self._lock:
            handle = self._streams.get(key)
        if handle is None:
            raise UnknownStreamError(f"no stream {key!r}")
        return handle

    def handles(self) -> list[StreamHandle]:
        with self._lock:
            return list(self._streams.values())

    def set_source(self, key: str, image: np.ndarray, name: str) -> None:
        """A new source face for ``key``, used from its next frame. Raises NoFaceError
        (and keeps the old face) if the photo shows none."""
        handle = self.get(key)
        # load_source prepares the face fully, then swaps one reference: the swap thread
        # sees either the old face or the new one, never half of each.
        handle.pipeline.engine.load_source(image, name=name)
        handle.source_name = name
        log.info("stream %s: source face is now %s", key, name)

    def set_swapping(self, key: str, enabled: bool) -> None:
        self.get(key).pipeline.swapping = enabled
        log.info("stream %s: swapping %s", key, "on" if enabled else "off")

    def readiness(self) -> list[str]:
        """Why the service is not ready (empty when it is): a stream whose input is down,
        or that stopped with an error."""
        reasons = []
        for handle in self.handles():
            if handle.error:
                reasons.append(f"stream {handle.key}: {handle.error}")
            elif handle.running and not handle.pipeline.source.connected:
                reasons.append(f"stream {handle.key}: input down")
        return reasons
