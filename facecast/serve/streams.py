"""Several live streams in one process: start, stop, inspect, change the face.

``StreamManager`` owns one ``LivePipeline`` per stream key, each on its own thread with its
own engine, models and stats (no state shared between streams, none at module level). The
HTTP plane and ``facecast serve`` drive it; metrics read it at scrape time.

A stream that ends (its publisher left, its input ended, or an error stopped it) stays
listed for ``retention`` seconds (default 300) with its final counts and ``state``
``"ended"`` or ``"failed"``: the status API and Prometheus see how it finished, the last
frames included. Its engine has released its models by then; only the counters are kept.
A new start on the same key replaces it at once.

Times in ``status()`` are ISO-8601 UTC wall-clock strings. The sources and sinks stamp
their state changes with ``time.monotonic()`` (immune to clock steps, meaningless to an
operator), so each handle converts them with one offset taken when it was made: a stamp
reads the same in every request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from facecast.config import StreamSettings
from facecast.errors import FacecastError
from facecast.live.pipeline import LivePipeline, build_pipeline

log = logging.getLogger(__name__)

# How long an ended stream stays listed (status API, metrics), in seconds.
DEFAULT_RETENTION = 300.0

State = Literal["running", "ended", "failed"]


class UnknownStreamError(FacecastError):
    """No stream runs under that key."""


class StreamEndedError(FacecastError):
    """The stream under that key has ended: it is listed, but cannot be changed."""


def without_query(url: str) -> str:
    """``url`` with no query string: ``facecast serve`` gives its workers per-run secrets
    there (``?facecast=...``), and the status API and logs must not show them."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="")) if parts.query else url


def iso_utc(epoch: float) -> str:
    """``2026-11-29T19:30:00.123Z`` for a ``time.time()`` value."""
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class StreamHandle:
    key: str
    settings: StreamSettings
    pipeline: LivePipeline
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    started: float = field(default_factory=time.time)  # wall clock (epoch seconds)
    error: str | None = None
    source_name: str = ""
    # monotonic time the pipeline's run returned; None while it runs
    ended_at: float | None = None
    # set by StreamManager.stop(): nobody waits for this stream any more (publisher gone)
    released: bool = False
    # wall minus monotonic, taken once so that converted stamps do not jitter between calls
    clock_offset: float = field(default_factory=lambda: time.time() - time.monotonic())

    @property
    def running(self) -> bool:
        """From start until the pipeline's run returns (its counts are final after that)."""
        return self.ended_at is None

    @property
    def state(self) -> State:
        if self.running:
            return "running"
        return "failed" if self.error else "ended"

    def wall_time(self, monotonic_at: float | None) -> str | None:
        """A ``time.monotonic()`` stamp as ISO-8601 UTC, or None."""
        return None if monotonic_at is None else iso_utc(monotonic_at + self.clock_offset)

    def input_up(self) -> bool:
        return self.running and bool(self.pipeline.source.connected)

    def output_up(self) -> bool:
        sink = self.pipeline.sink
        return self.running and sink is not None and bool(sink.connected)

    def status(self) -> dict[str, Any]:
        """What an operator sees in ``/api/streams``."""
        pipeline, stats = self.pipeline, self.pipeline.stats
        source, sink = pipeline.source, pipeline.sink
        # an ended stream's rates are over its own life, not diluted by the time since
        until = self.ended_at if self.ended_at is not None else time.monotonic()
        elapsed = max(until - stats.started, 1e-6)
        return {
            "key": self.key,
            "state": self.state,
            "running": self.running,
            "error": self.error,
            "started": iso_utc(self.started),
            "ended": self.wall_time(self.ended_at),
            "source_face": self.source_name,
            "swapping": pipeline.swapping,
            "input": {
                "url": without_query(str(getattr(source, "name", self.settings.input))),
                "up": self.input_up(),
                "since": self.wall_time(getattr(source, "state_since", None)),
                "reconnects": source.reconnects,
            },
            "output": {
                "url": without_query(str(getattr(sink, "name", self.settings.output))),
                "up": self.output_up(),
                "since": self.wall_time(getattr(sink, "state_since", None)),
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
    def __init__(self, retention: float = DEFAULT_RETENTION) -> None:
        """``retention``: seconds an ended stream stays listed with its final counts."""
        self._streams: dict[str, StreamHandle] = {}
        self._lock = threading.Lock()
        self.retention = retention
        # What else the streams depend on reports here, so /readyz and /metrics (built on
        # the manager) see it: ``facecast serve`` adds its ingest server. ``checks``: each
        # returns reasons the service is not ready; ``collectors``: Prometheus collectors
        # (``collect()``), read at scrape time.
        self.checks: list[Callable[[], list[str]]] = []
        self.collectors: list[Any] = []

    # ------------------------------------------------------------------ lifecycle

    def start(
        self,
        key: str,
        settings: StreamSettings,
        source_image: np.ndarray | None = None,
        source_name: str | None = None,
    ) -> StreamHandle:
        """Build and start the pipeline for ``key`` (replacing an ended one). Raises
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
        log.info(
            "stream %s: started (%s → %s)",
            key,
            without_query(str(settings.input)),
            without_query(str(settings.output)),
        )
        return handle

    def _run(self, handle: StreamHandle) -> None:
        try:
            handle.pipeline.run(handle.stop)
        except Exception as exc:  # the stream ends; the process and other streams go on
            handle.error = str(exc) or type(exc).__name__
            log.error("stream %s: stopped by an error: %s", handle.key, handle.error)
        else:
            log.info("stream %s: ended", handle.key)
        finally:
            # after run() returned: every counter is final when the state says so
            handle.ended_at = time.monotonic()

    def stop(self, key: str, timeout: float = 15.0) -> None:
        """Stop ``key``'s stream and wait for it to flush; it stays listed as ended for
        ``retention`` seconds."""
        handle = self.release(key)
        if handle.thread is not None:
            handle.thread.join(timeout)

    def release(self, key: str) -> StreamHandle:
        """Tell ``key``'s stream to stop (its publisher is gone) without waiting for it to
        flush: the caller may be the event loop. ``handle.released`` is set on return, so a
        publisher that comes back is seen to need a new pipeline."""
        handle = self.get(key)
        handle.released = True
        handle.stop.set()
        return handle

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
        """The stream under ``key``, running or ended within the retention."""
        with self._lock:
            self._forget_expired()
            handle = self._streams.get(key)
        if handle is None:
            raise UnknownStreamError(f"no stream {key!r}")
        return handle

    def handles(self) -> list[StreamHandle]:
        with self._lock:
            self._forget_expired()
            return list(self._streams.values())

    def _forget_expired(self) -> None:
        """Drop streams that ended more than ``retention`` ago. Done on read, under the
        lock: no timer thread, and nothing reads a stream between its expiry and this."""
        now = time.monotonic()
        expired = [
            key
            for key, handle in self._streams.items()
            if handle.ended_at is not None and now - handle.ended_at > self.retention
        ]
        for key in expired:
            del self._streams[key]

    def running(self, key: str) -> StreamHandle:
        """The stream under ``key`` if it still runs: StreamEndedError when it has ended
        (a change to it would go nowhere)."""
        handle = self.get(key)
        if not handle.running:
            raise StreamEndedError(f"stream {key!r} has ended")
        return handle

    def set_source(self, key: str, image: np.ndarray, name: str) -> None:
        """A new source face for ``key``, used from its next frame. Raises NoFaceError
        (and keeps the old face) if the photo shows none."""
        handle = self.running(key)
        # load_source prepares the face fully, then swaps one reference: the swap thread
        # sees either the old face or the new one, never half of each.
        handle.pipeline.engine.load_source(image, name=name)
        handle.source_name = name
        log.info("stream %s: source face is now %s", key, name)

    def set_sources(self, key: str, images: list[np.ndarray], name: str) -> None:
        """``set_source`` with several photos of the person: each face gets the one nearest
        its expression. Raises NoFaceError (and keeps the old face) if any shows none."""
        if len(images) == 1:
            self.set_source(key, images[0], name)
            return
        handle = self.running(key)
        photos = [(image, f"{name} (photo {i + 1})") for i, image in enumerate(images)]
        handle.pipeline.engine.load_sources(photos)
        handle.source_name = f"{name} ({len(images)} photos)"
        log.info("stream %s: source face is now %s", key, handle.source_name)

    def set_swapping(self, key: str, enabled: bool) -> None:
        self.running(key).pipeline.swapping = enabled
        log.info("stream %s: swapping %s", key, "on" if enabled else "off")

    def readiness(self) -> list[str]:
        """Why the service is not ready (empty when it is): a stream whose input is down,
        or that stopped with an error while its publisher is still there (an ended,
        released stream is history, not a fault)."""
        reasons = [reason for check in self.checks for reason in check()]
        for handle in self.handles():
            if handle.error and not handle.released:
                reasons.append(f"stream {handle.key}: {handle.error}")
            elif handle.running and not handle.released and not handle.pipeline.source.connected:
                # (a released stream is winding down: its input is gone on purpose)
                reasons.append(f"stream {handle.key}: input down")
        return reasons
