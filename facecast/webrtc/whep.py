"""WHEP out (the egress twin of RFC 9725) for ``facecast serve``: a viewer POSTs an offer
to ``/whep/KEY`` and gets ``swapped/KEY`` as WebRTC. One reader per key (a thread playing
the ingest's RTMP output) hands every viewer the same H.264 packets, which aiortc
packetises as they are: one encode, the pipeline's, however many watch. A viewer's queue is
bounded: one that falls behind skips to the next keyframe instead of queueing. The last
viewer leaving stops the key's reader. Every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import av
from aiortc import RTCPeerConnection, RTCRtpSender
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from facecast.webrtc.peer import (
    BadOfferError,
    NegotiationTimeout,
    close_quietly,
    end_on_connection_loss,
    set_offer,
)
from facecast.webrtc.whip import (
    READ_TIMEOUT,
    VIDEO_CLOCK,
    VIEWER_QUEUE,
    BusyKeyError,
    UnknownSessionError,
    _finish_answer,
    check_offer,
)

log = logging.getLogger(__name__)


class PacketTrack(MediaStreamTrack):
    """One viewer's video: the key's H.264 packets as they come, for aiortc to packetise
    without encoding. Bounded: a viewer that lags ``VIEWER_QUEUE`` packets skips to the
    next keyframe."""

    kind = "video"

    def __init__(self, feed: KeyFeed) -> None:
        super().__init__()
        self.feed = feed
        self.queue: asyncio.Queue[av.Packet | None] = asyncio.Queue()
        self.skipping = True  # until the first keyframe: nothing decodes before it

    def offer(self, packet: av.Packet, keyframe: bool) -> None:
        """On the event loop: one packet from the feed."""
        if self.queue.qsize() >= VIEWER_QUEUE:
            self.skipping = True
            while not self.queue.empty():
                self.queue.get_nowait()
        if self.skipping and not keyframe:
            return
        self.skipping = False
        self.queue.put_nowait(packet)

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        packet = await self.queue.get()
        if packet is None:
            raise MediaStreamError
        return packet

    def stop(self) -> None:
        super().stop()
        self.queue.put_nowait(None)
        self.feed.leave(self)


class KeyFeed:
    """The reader of one key's ``swapped/KEY``: a thread that plays it from the ingest,
    turns each packet into Annex B (what RTP's H.264 payload wants) and hands it to every
    viewer's track on the event loop. Reconnects while viewers remain."""

    def __init__(self, key: str, url: str, loop: asyncio.AbstractEventLoop, on_empty: Any):
        self.key, self.url, self.loop = key, url, loop
        self.viewers: set[PacketTrack] = set()
        self.on_empty = on_empty
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"whep-{key}", daemon=True)
        self._thread.start()

    def join(self, track: PacketTrack) -> None:
        self.viewers.add(track)

    def leave(self, track: PacketTrack) -> None:
        self.viewers.discard(track)
        if not self.viewers:
            self._stop.set()
            self.on_empty(self)

    def _deliver(self, packet: av.Packet, keyframe: bool) -> None:
        for viewer in list(self.viewers):
            viewer.offer(packet, keyframe)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._play()
            except (av.FFmpegError, OSError) as exc:
                log.debug("WHEP %s: %s (retrying)", self.key, exc)
            except Exception:
                log.exception("WHEP %s: reader failed", self.key)
            self._stop.wait(0.3)

    def _play(self) -> None:
        options = {"rtmp_live": "live", "fflags": "nobuffer", "analyzeduration": "300000"}
        with av.open(self.url, options=options, timeout=(READ_TIMEOUT, READ_TIMEOUT)) as src:
            stream = src.streams.video[0]
            annexb = av.BitStreamFilterContext("h264_mp4toannexb", stream)
            for packet in src.demux(stream):
                if self._stop.is_set():
                    return
                for out in annexb.filter(packet):
                    if out.pts is None:
                        continue
                    out.pts = int(out.pts * out.time_base / VIDEO_CLOCK)
                    out.time_base = VIDEO_CLOCK
                    self.loop.call_soon_threadsafe(self._deliver, out, out.is_keyframe)

    def stop(self) -> None:
        self._stop.set()


@dataclass
class WhepSession:
    id: str
    key: str
    pc: RTCPeerConnection
    track: PacketTrack


class WhepEgress:
    """Open WHEP sessions, and one ``KeyFeed`` per key that has viewers."""

    def __init__(self, play_url: Callable[[str], str], limit: int = 32) -> None:
        self.play_url = play_url
        self.limit = limit
        self._sessions: dict[str, WhepSession] = {}
        self._feeds: dict[str, KeyFeed] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # the HTTP server's, once known

    async def create(self, key: str, sdp: str) -> tuple[str, str]:
        check_offer(sdp)
        if len(self._sessions) >= self.limit:
            raise BusyKeyError(f"{self.limit} viewers are watching: try again later")
        loop = self.loop = asyncio.get_running_loop()
        feed = self._feeds.get(key)
        if feed is None:
            feed = self._feeds[key] = KeyFeed(key, self.play_url(key), loop, self._forget)
        track = PacketTrack(feed)
        feed.join(track)
        pc = RTCPeerConnection()
        session = WhepSession(secrets.token_urlsafe(12), key, pc, track)
        try:
            # made before the offer is read, so that the offer's video takes it, with its
            # codec preference: the packets are H.264 as the pipeline encoded them, and
            # nothing else can be sent (preferences set later would not reach the answer)
            video = pc.addTransceiver(track, direction="sendonly")
            video.setCodecPreferences(
                [
                    c
                    for c in RTCRtpSender.getCapabilities("video").codecs
                    if c.mimeType == "video/H264" and c.parameters.get("packetization-mode") == "1"
                ]
            )
            await set_offer(pc, sdp)
            for transceiver in pc.getTransceivers():
                if transceiver is not video:
                    transceiver.direction = "inactive"
            answer = await _finish_answer(pc)
        except BaseException as exc:
            track.stop()
            await close_quietly(pc)
            if isinstance(exc, (BadOfferError, NegotiationTimeout)) or not isinstance(
                exc, Exception
            ):
                raise
            raise BadOfferError(f"cannot answer the offer: {exc}") from None

        end_on_connection_loss(pc, lambda _reason: self._end(session))

        self._sessions[session.id] = session
        log.info("WHEP %s: viewer on %s (%d on it)", session.id, key, len(feed.viewers))
        return session.id, answer

    def _forget(self, feed: KeyFeed) -> None:
        if self._feeds.get(feed.key) is feed:
            del self._feeds[feed.key]

    def _end(self, session: WhepSession) -> None:
        if self._sessions.pop(session.id, None) is not None:
            asyncio.get_running_loop().create_task(self._close(session))

    async def close(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            raise UnknownSessionError(f"no WHEP session {session_id!r}")
        await self._close(session)

    async def _close(self, session: WhepSession) -> None:
        session.track.stop()
        await close_quietly(session.pc)
        log.info("WHEP %s: viewer of %s left", session.id, session.key)

    async def close_all(self) -> None:
        for session_id in list(self._sessions):
            with contextlib.suppress(UnknownSessionError):
                await self.close(session_id)
        for feed in list(self._feeds.values()):
            feed.stop()
        self._feeds.clear()

    def viewers(self, key: str) -> int:
        return sum(1 for s in self._sessions.values() if s.key == key)
