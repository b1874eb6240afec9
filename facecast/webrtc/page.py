"""WebRTC sessions: a browser's camera in, the swapped video back on the same transceiver.

One ``WebSession`` per browser: an aiortc ``RTCPeerConnection``, an asyncio task that reads
the incoming track into a ``LatestSlot``, one worker thread running its own ``SwapEngine`` on
the newest frame only (older ones are dropped and counted, never queued), and an outgoing
``SwappedTrack`` whose ``recv()`` hands the sender the newest swapped frame. Everything
aiortc touches lives on the event loop of the HTTP server; only the swap runs on the thread.

A session ends when the browser closes the connection (state ``failed``/``closed``), when its
camera track ends, when no frame came for ``idle_timeout`` seconds, on ``close()``, or at
shutdown (``close_all``). Closing ends the reader task, the worker thread and every task
aiortc started for the connection; each wait on the way has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    VideoStreamTrack,
)
from aiortc.mediastreams import (
    VIDEO_CLOCK_RATE,
    VIDEO_TIME_BASE,
    MediaStreamError,
    MediaStreamTrack,
)
from av import VideoFrame

from facecast.engine.pipeline import EngineOptions, SwapEngine
from facecast.errors import FacecastError
from facecast.live.slots import Closed, LatestSlot
from facecast.live.stats import SessionStats
from facecast.media.frame import Frame
from facecast.media.image_io import read_image
from facecast.webrtc.peer import (
    CLOSE_TIMEOUT,
    BadOfferError,
    close_quietly,
    end_on_connection_loss,
    set_offer,
    timed,
    video_transceiver,
)

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 4
IDLE_TIMEOUT = 10.0  # seconds without a camera frame before a session is closed
REPEAT_AFTER = 0.5  # seconds without a new swapped frame before the last one is sent again
MAX_SDP = 64 * 1024
SAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class SessionLimitError(FacecastError):
    """As many sessions as allowed are open."""


class UnknownSessionError(FacecastError):
    """No open session has that id."""


class UnknownFaceError(FacecastError):
    """No sample face has that name."""


EndCallback = Callable[["WebSession", str], None]


# ---------------------------------------------------------------------------- frames out


@dataclass
class Swapped:
    """A processed frame on its way to the sender."""

    frame: VideoFrame
    received: float  # time.monotonic() when its camera frame arrived


class Outbox:
    """The newest processed frame, handed from the worker thread to the event loop. Capacity
    one: a frame the sender did not take before the next one came is dropped and counted."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._latest: Swapped | None = None
        self._fresh = False
        self._event = asyncio.Event()
        self.dropped = 0

    def put_threadsafe(self, item: Swapped) -> None:
        # the loop may already be closed at shutdown: the frame has nowhere to go then
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._put, item)

    def _put(self, item: Swapped) -> None:
        if self._fresh:
            self.dropped += 1
        self._latest, self._fresh = item, True
        self._event.set()

    async def get(self, timeout: float) -> tuple[Swapped | None, bool]:
        """(the newest frame, whether it is new), waiting up to ``timeout`` s for a new
        one; (the last frame again, False) on timeout; (None, False) before any."""
        if not self._fresh:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout)
        self._event.clear()
        fresh, self._fresh = self._fresh, False
        return self._latest, fresh


class SwappedTrack(VideoStreamTrack):
    """The outgoing video: the newest swapped frame, never a queue. Without a new frame for
    ``REPEAT_AFTER`` s the last one is sent again, so the browser's player holds on."""

    def __init__(self, session: WebSession) -> None:
        super().__init__()
        self._session = session
        self._t0: float | None = None
        self._last_pts = -1

    async def recv(self) -> VideoFrame:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            item, fresh = await self._session.outbox.get(REPEAT_AFTER)
            if item is not None:
                break
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        # timestamps from the wall clock: frames come at the swap's pace, not a fixed rate
        pts = max(round((now - self._t0) * VIDEO_CLOCK_RATE), self._last_pts + 1)
        self._last_pts = pts
        frame = item.frame  # a repeat reuses the frame: the sender encodes one at a time
        frame.pts, frame.time_base = pts, VIDEO_TIME_BASE
        if fresh:
            self._session.stats.sent(now, now - item.received)
        return frame


# ---------------------------------------------------------------------------- one session


@dataclass(eq=False)
class WebSession:
    """One browser: its peer connection, its engine and worker thread, its stats. Made on
    the event loop (its outbox hands frames to it)."""

    id: str
    pc: RTCPeerConnection
    engine: SwapEngine
    face: str | None
    idle_timeout: float
    swapping: bool = True
    stats: SessionStats = field(default_factory=SessionStats)
    inbox: LatestSlot[tuple[VideoFrame, float]] = field(default_factory=LatestSlot)
    reader: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.outbox = Outbox(asyncio.get_running_loop())
        self.track = SwappedTrack(self)
        self._stop = threading.Event()
        self.worker = threading.Thread(target=self._work, name=f"webrtc-{self.id}", daemon=True)
        self._closing: asyncio.Task[None] | None = None

    @property
    def state(self) -> str:
        return self.pc.connectionState

    @property
    def frames_dropped(self) -> int:
        return self.inbox.dropped + self.outbox.dropped

    def status(self) -> dict[str, Any]:
        return {
            "session": self.id,
            "state": self.state,
            "face": self.face,
            "swapping": self.swapping,
        }

    def stats_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "frames_in": s.frames_in,
            "frames_out": s.frames_out,
            "frames_dropped": self.frames_dropped,
            "fps": round(s.fps(time.monotonic()), 2),
            "latency_ms": {"p50": s.latency_ms(50), "p95": s.latency_ms(95)},
            "faces": s.faces_last,
            "swapping": self.swapping,
            "face": self.face,
            # photos of the face in use: several when each frame picks the nearest
            "face_photos": len(sources.names) if (sources := self.engine.source_set) else 1,
        }

    def start(self, track: MediaStreamTrack, on_end: EndCallback) -> None:
        """Start reading ``track`` (the browser's camera) and swapping; ``on_end(session,
        reason)`` is called when the camera stops or goes idle."""
        self.worker.start()
        self.reader = asyncio.get_running_loop().create_task(
            self._read(track, on_end), name=f"webrtc-{self.id}-read"
        )

    async def _read(self, track: MediaStreamTrack, on_end: EndCallback) -> None:
        while True:
            try:
                frame = await asyncio.wait_for(track.recv(), self.idle_timeout)
            except TimeoutError:
                reason = f"no camera frame for {self.idle_timeout:g} s"
                break
            except MediaStreamError:
                reason = "the camera track ended"
                break
            self.stats.frames_in += 1
            self.inbox.put((frame, time.monotonic()))
        on_end(self, reason)

    def _work(self) -> None:
        """The worker thread: newest camera frame → swap → outbox, until stopped."""
        failures_logged = 0
        while not self._stop.is_set():
            try:
                item = self.inbox.get(0.2)
            except Closed:
                break
            if item is None:
                continue
            frame, received = item
            try:
                out = self._swap(frame, received)
            except Exception:  # one bad frame must not end the session
                self.stats.frames_failed += 1
                if failures_logged < 5:
                    log.exception("web session %s: a frame failed; sent unswapped", self.id)
                    failures_logged += 1
                out = frame  # as it came (aiortc's encoder converts whatever format)
            self.stats.frames_processed += 1
            self.outbox.put_threadsafe(Swapped(out, received))

    def _swap(self, frame: VideoFrame, received: float) -> VideoFrame:
        engine = self.engine
        if not self.swapping or engine.source is None:
            # no face chosen yet, or swapping off: the camera frame goes back as it came
            self.stats.faces_last = 0
            return frame
        picture = Frame.decoded(frame)
        self.stats.faces_last = engine.process_frame(picture, self.stats.clock, received).faces
        # converted here, on this thread, so the encoder's thread gets what it encodes: the
        # camera's own planes with the swapped boxes written in, when it sent 4:2:0
        planes = picture.planes()
        if planes is not None:
            return VideoFrame.from_ndarray(planes, format="yuv420p")
        return VideoFrame.from_ndarray(picture.image, format="bgr24").reformat(format="yuv420p")

    def set_face(self, images: list[np.ndarray], name: str) -> None:
        """Blocking (a tiled detection): call off the event loop. Raises NoFaceError and
        keeps the old face when a photo shows none. Several photos: of one person, each face
        gets the nearest in expression."""
        # the sources are prepared fully, then one reference is swapped: the worker sees
        # the old face or the new one, never half of each (as StreamManager.set_source)
        photos = [(image, f"{name} (photo {i + 1})") for i, image in enumerate(images)]
        self.engine.load_sources(photos if len(images) > 1 else [(images[0], name)])
        self.face = name

    async def close(self, reason: str = "closed") -> None:
        """Idempotent; concurrent callers wait for the same close."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(
                self._close(reason), name=f"webrtc-{self.id}-close"
            )
        await asyncio.shield(self._closing)

    async def _close(self, reason: str) -> None:
        log.info("web session %s: closing (%s)", self.id, reason)
        self._stop.set()
        self.inbox.close()
        self.track.stop()
        reader = self.reader
        if reader is not None and reader is not asyncio.current_task() and not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(reader, CLOSE_TIMEOUT)
        try:
            await asyncio.wait_for(self.pc.close(), CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("web session %s: the peer connection did not close in time", self.id)
        deadline = time.monotonic() + CLOSE_TIMEOUT
        # the worker is at most one frame from noticing the stop; wait without blocking
        while self.worker.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.worker.is_alive():
            log.warning("web session %s: the swap thread did not stop in time", self.id)
        else:
            self.engine.close()  # the worker no longer uses it


# ---------------------------------------------------------------------------- all sessions


class WebSessions:
    """Every open session of one server. All methods but ``close_all_blocking`` run on the
    server's event loop, one at a time, so the table is never seen half changed."""

    def __init__(
        self,
        options: EngineOptions | None = None,
        *,
        limit: int = DEFAULT_LIMIT,
        idle_timeout: float = IDLE_TIMEOUT,
        faces_dir: Path | None = EXAMPLES,
        ice_servers: Iterable[str] = (),
    ) -> None:
        """``options``: each session's engine (the visible label is always on);
        ``faces_dir``: where the sample faces are; ``ice_servers``: STUN/TURN URLs (none by
        default: host candidates reach loopback and the LAN, and nothing waits on a STUN
        server that may be unreachable)."""
        base = options or EngineOptions(temporal=True, detect_every=3)
        self.options = replace(base, label=True, temporal=True)
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.faces_dir = faces_dir
        self.ice_servers = [RTCIceServer(url) for url in ice_servers]
        self._sessions: dict[str, WebSession] = {}
        self._opening = 0  # sessions being negotiated: they count against the limit
        self._closing: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    # ------------------------------------------------------------------ sample faces

    def sample_faces(self) -> list[str]:
        folder = self.faces_dir
        if folder is None or not folder.is_dir():
            return []
        return sorted(
            p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SAMPLE_SUFFIXES
        )

    def sample_image(self, name: str) -> np.ndarray:
        """A sample face by its listed name (only listed names: a request never names a
        path)."""
        if name not in self.sample_faces():
            raise UnknownFaceError(f"no sample face {name!r}")
        assert self.faces_dir is not None
        return read_image(self.faces_dir / name)

    # ------------------------------------------------------------------ lifecycle

    async def create(self, sdp: str, kind: str, face: str | None) -> tuple[WebSession, str]:
        """A session answering ``sdp``: (the session, the answer's SDP). Raises
        SessionLimitError, BadOfferError, UnknownFaceError or NoFaceError."""
        self._remember_loop()
        face = face or None  # "" from a form's empty choice: no face yet
        if len(self._sessions) + self._opening >= self.limit:
            raise SessionLimitError(f"{self.limit} sessions are open: close one or try again later")
        if kind != "offer":
            raise BadOfferError(f"expected an SDP offer, got type {kind!r}")
        if len(sdp) > MAX_SDP:
            raise BadOfferError(f"the offer is over {MAX_SDP // 1024} KB")
        self._opening += 1
        try:
            image = await asyncio.to_thread(self.sample_image, face) if face else None
            engine = await asyncio.to_thread(self._engine, image, face)
            return await self._negotiate(sdp, engine, face)
        finally:
            self._opening -= 1

    def _engine(self, face_image: np.ndarray | None, name: str | None) -> SwapEngine:
        engine = SwapEngine(self.options)
        if face_image is not None:
            engine.load_source(face_image, name=name or "sample face")
        return engine

    async def _negotiate(
        self, sdp: str, engine: SwapEngine, face: str | None
    ) -> tuple[WebSession, str]:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self.ice_servers))
        session = WebSession(secrets.token_urlsafe(12), pc, engine, face, self.idle_timeout)
        try:
            await set_offer(pc, sdp)
            video = video_transceiver(pc.getTransceivers())
            video.sender.replaceTrack(session.track)
            video.direction = "sendrecv"
            await timed(pc.setLocalDescription(await pc.createAnswer()))
            if video.currentDirection != "sendrecv":
                raise BadOfferError(
                    "the offer's video must be sendrecv (camera in, swapped video back), "
                    f"not {video.currentDirection}"
                )
        except BaseException:
            await close_quietly(pc)
            raise

        end_on_connection_loss(pc, lambda reason: self._end(session, reason))

        self._sessions[session.id] = session
        session.start(video.receiver.track, self._end)
        log.info("web session %s: opened (face %s)", session.id, face or "none")
        return session, pc.localDescription.sdp

    def _end(self, session: WebSession, reason: str) -> None:
        """Close ``session`` from a callback (state change, reader): in a task of its own."""
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
        task = asyncio.get_running_loop().create_task(
            session.close(reason), name=f"webrtc-{session.id}-end"
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self, session_id: str, reason: str = "closed by request") -> None:
        """Idempotent: an unknown id is not an error (the browser may have left first)."""
        session = self._sessions.pop(session_id, None)
        if session is not None:
            await session.close(reason)

    async def close_all(self) -> None:
        while self._sessions or self._closing:
            sessions = list(self._sessions.values())
            self._sessions.clear()
            await asyncio.gather(
                *(s.close("server stopping") for s in sessions),
                *list(self._closing),
                return_exceptions=True,
            )

    def close_all_blocking(self, timeout: float = 15.0) -> None:
        """``close_all`` from another thread (shutdown), on the loop the sessions live on."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            for session in list(self._sessions.values()):
                session._stop.set()  # no loop left to close aiortc on: stop the threads
                session.inbox.close()
            return
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError("close_all_blocking() on the event loop: await close_all()")
        future = asyncio.run_coroutine_threadsafe(self.close_all(), loop)
        try:
            future.result(timeout)
        except TimeoutError:
            log.warning("web sessions did not all close within %.0f s", timeout)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the sessions live on (known from the first offer)."""
        return self._loop

    def _remember_loop(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()

    # ------------------------------------------------------------------ control

    def get(self, session_id: str) -> WebSession:
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSessionError(f"no open session {session_id!r}")
        return session

    def sessions(self) -> list[WebSession]:
        return list(self._sessions.values())

    async def set_face(self, session_id: str, images: list[np.ndarray], name: str) -> None:
        """A new face for the session (one photo, or several of one person), from its next
        frame, without reconnecting."""
        session = self.get(session_id)
        await asyncio.to_thread(session.set_face, images, name)
        log.info("web session %s: face is now %s", session_id, name)

    def set_swapping(self, session_id: str, enabled: bool) -> None:
        self.get(session_id).swapping = enabled
