"""WHIP in (RFC 9725) for ``facecast serve``, and the SDP-over-HTTP pieces WHIP, WHEP
(``webrtc/whep.py``) and whip-listen (``webrtc/listen.py``) share.

**WHIP**: a publisher (OBS 30+, a browser, any WebRTC stack that speaks RFC 9725) POSTs
an SDP offer to ``/whip/KEY``. Its video is relayed into the service's own ingest as an
RTMP publish to ``live/KEY``, so from there on it *is* an RTMP publisher: the same hook
accepts the key, the same pipeline swaps it with KEY's profile and publishes
``swapped/KEY`` (RTMP, HLS, WHEP), and the same publish_done ends it. The relay is an
ffmpeg process fed raw frames (newest only) on its stdin, encoding low-latency x264: not
PyAV in this process, whose RTMP connect holds the GIL while nginx asks this very process
(the publish hook) whether the key may publish. ``DELETE`` on the session's ``Location``
ends it; so does the peer connection failing or the track ending.

Everything aiortc touches runs on the HTTP server's event loop; the RTMP relay and readers
run on threads of their own, and every wait on the way has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
import cv2
import numpy as np
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from fastapi import HTTPException, Request, Response

from facecast.errors import FacecastError
from facecast.live.slots import DropOldestQueue, LatestSlot
from facecast.serve.app import read_limited
from facecast.webrtc import peer
from facecast.webrtc.peer import BadOfferError

log = logging.getLogger(__name__)

FFMPEG = "ffmpeg"  # Debian's: the relay's encoder and RTMP client
RELAY_KEYINT_S = 1  # the relay's keyframe interval: the pipeline's reader starts on one
FIRST_FRAME_TIMEOUT = 10.0  # a WHIP session that sends no video in this long is closed
READ_TIMEOUT = 5.0  # each open and read of swapped/KEY by a WHEP reader
VIEWER_QUEUE = 60  # packets a WHEP viewer may lag behind (about 2 s) before skipping ahead
VIDEO_CLOCK = Fraction(1, 90000)
AUDIO_RATE = 48000  # what the relay is fed: Opus's own rate, stereo s16
AUDIO_BYTES = 4  # per stereo s16 sample
AUDIO_CHUNKS = 250  # ~5 s of 20 ms Opus frames between the reader and the relay
AUDIO_GAP_S = 0.1  # no sound for this long: the relay is fed silence (it must not starve)
MAX_SDP = 64 * 1024


class UnknownSessionError(FacecastError):
    """No WHIP/WHEP session with that id."""


class BusyKeyError(FacecastError):
    """The key already has a publisher."""


def check_offer(sdp: str) -> None:
    """Refuse what cannot be an offer we answer, before a peer connection is made."""
    if len(sdp) > MAX_SDP:
        raise BadOfferError(f"the offer is over {MAX_SDP // 1024} KB")
    if not sdp.startswith("v=0"):
        raise BadOfferError("the body is not an SDP offer (it must start with v=0)")
    if "\nm=video " not in sdp.replace("\r\n", "\n"):
        raise BadOfferError("the offer has no video")


def _first_audio(transceivers: list[Any]) -> Any | None:
    """The offer's first audio transceiver (``video_transceiver`` left it inactive)."""
    return next((t for t in transceivers if t.kind == "audio"), None)


def session_frames(session: WhipSession) -> Iterator[av.VideoFrame]:
    """A session's newest frames as they come (older ones dropped), until it closes."""
    return session.slot.values(lambda: not session.closed, poll=0.5)


def bgr_at(frame: av.VideoFrame, size: tuple[int, int] | None) -> np.ndarray:
    """``frame`` as BGR, at ``size`` (width, height) when given: a WebRTC sender scales its
    video to its bandwidth and CPU as it goes, while an encoder downstream keeps the size
    it was opened with."""
    image = frame.to_ndarray(format="bgr24")
    if size is not None and (image.shape[1], image.shape[0]) != size:
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return image


async def read_offer(request: Request) -> str:
    """A WHIP/WHEP request's SDP offer: ``application/sdp`` (else 415), at most MAX_SDP
    bytes (else 413), text (else 400)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/sdp":
        raise HTTPException(415, "the offer must be sent as Content-Type: application/sdp")
    body = await read_limited(request, MAX_SDP)
    try:
        return body.decode()
    except UnicodeDecodeError:
        raise HTTPException(400, "the offer is not text") from None


def sdp_created(answer: str, location: str) -> Response:
    """RFC 9725's answer to an accepted offer: 201, the SDP answer, the session's URL."""
    return Response(
        answer, status_code=201, media_type="application/sdp", headers={"Location": location}
    )


async def no_trickle() -> Response:
    """Trickle ICE and ICE restarts (PATCH) are not supported: RFC 9725 says 405; our
    answers carry every candidate."""
    return Response(status_code=405, headers={"Allow": "DELETE"})


async def accept_post() -> Response:
    """OPTIONS on a WHIP/WHEP endpoint: what it takes."""
    return Response(status_code=204, headers={"Accept-Post": "application/sdp"})


async def _finish_answer(pc: RTCPeerConnection) -> str:
    await peer.timed(pc.setLocalDescription(await pc.createAnswer()))
    return pc.localDescription.sdp


# ---------------------------------------------------------------------------- WHIP ingest


@dataclass
class WhipSession:
    id: str
    key: str
    pc: RTCPeerConnection
    slot: LatestSlot[av.VideoFrame] = field(default_factory=LatestSlot)
    # the publisher's sound as 48 kHz stereo s16 PCM, in order (None: not taken); a consumer
    # that falls behind loses the oldest, never delays the video
    audio: DropOldestQueue[bytes] | None = None
    audio_frames: int = 0
    reader: asyncio.Task[None] | None = None
    audio_reader: asyncio.Task[None] | None = None
    relay: threading.Thread | None = None
    frames: int = 0
    started: float = field(default_factory=time.monotonic)
    closed: bool = False


# What a WHIP session's video goes to: called on a thread of its own per session, it takes
# frames from ``session.slot`` until the session closes (``Closed``).
Consumer = Callable[[WhipSession], None]


class WhipIngest:
    """Open WHIP sessions; each hands its video to ``consume`` (``RtmpRelay`` in service
    mode, the pipeline's input for ``stream --input whip-listen://``)."""

    def __init__(self, consume: Consumer, audio: bool = False) -> None:
        """``audio``: the offer's first audio is received too (``WhipSession.audio``);
        else answered inactive."""
        self.consume = consume
        self.take_audio = audio
        self._sessions: dict[str, WhipSession] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # the HTTP server's, once known

    async def create(self, key: str, sdp: str) -> tuple[str, str]:
        """(session id, SDP answer) for a publisher's offer on ``key``."""
        check_offer(sdp)
        self.loop = asyncio.get_running_loop()
        if any(s.key == key for s in self._sessions.values()):
            raise BusyKeyError(f"stream key {key!r} already has a WHIP publisher")
        pc = RTCPeerConnection()
        session = WhipSession(secrets.token_urlsafe(12), key, pc)
        try:
            await peer.set_offer(pc, sdp)
            # the offer's first video, received, and with take_audio its first audio; the
            # rest answered inactive, as the browser page does
            video = peer.video_transceiver(pc.getTransceivers())
            video.direction = "recvonly"
            audio = _first_audio(pc.getTransceivers()) if self.take_audio else None
            if audio is not None:
                audio.direction = "recvonly"
                session.audio = DropOldestQueue(AUDIO_CHUNKS)
            answer = await _finish_answer(pc)
        except BaseException:
            await peer.close_quietly(pc)
            raise

        peer.end_on_connection_loss(pc, lambda reason: self._end(session, reason))

        self._sessions[session.id] = session
        session.reader = asyncio.get_running_loop().create_task(
            self._read(session, video.receiver.track), name=f"whip-{session.id}-read"
        )
        if audio is not None:
            session.audio_reader = asyncio.get_running_loop().create_task(
                self._read_audio(session, audio.receiver.track), name=f"whip-{session.id}-audio"
            )
        session.relay = threading.Thread(
            target=self.consume, args=(session,), name=f"whip-{session.id}-relay", daemon=True
        )
        session.relay.start()
        log.info("WHIP %s: publisher on %s", session.id, key)
        return session.id, answer

    async def _read_audio(self, session: WhipSession, track: MediaStreamTrack) -> None:
        """The publisher's sound, as PCM, into ``session.audio``. Its end ends nothing: the
        video is the session."""
        assert session.audio is not None
        resampler = av.AudioResampler(format="s16", layout="stereo", rate=AUDIO_RATE)
        try:
            while True:
                frame = await asyncio.wait_for(track.recv(), READ_TIMEOUT)
                for pcm in resampler.resample(frame):
                    session.audio.put(bytes(pcm.planes[0])[: pcm.samples * AUDIO_BYTES])
                session.audio_frames += 1
        except (MediaStreamError, TimeoutError):
            log.info("WHIP %s: the publisher's audio ended", session.id)
        except asyncio.CancelledError:
            pass

    async def _read(self, session: WhipSession, track: MediaStreamTrack) -> None:
        """The publisher's frames into the session's slot (newest only)."""
        try:
            while True:
                timeout = FIRST_FRAME_TIMEOUT if session.frames == 0 else READ_TIMEOUT
                session.slot.put(await asyncio.wait_for(track.recv(), timeout))
                session.frames += 1
        except (MediaStreamError, TimeoutError):
            reason = "no video" if session.frames == 0 else "the track ended"
            self._end(session, reason)
        except asyncio.CancelledError:
            pass

    def _end(self, session: WhipSession, reason: str) -> None:
        if self._sessions.pop(session.id, None) is not None:
            asyncio.get_running_loop().create_task(self._close(session, reason))

    async def close(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            raise UnknownSessionError(f"no WHIP session {session_id!r}")
        await self._close(session, "ended by DELETE")

    async def _close(self, session: WhipSession, reason: str) -> None:
        session.closed = True
        session.slot.close()
        for task in (session.reader, session.audio_reader):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        await peer.close_quietly(session.pc)
        if session.relay is not None:
            await asyncio.to_thread(session.relay.join, 10)
        log.info(
            "WHIP %s: %s ended (%s, %d frames)", session.id, session.key, reason, session.frames
        )

    async def close_all(self) -> None:
        for session_id in list(self._sessions):
            with contextlib.suppress(UnknownSessionError):
                await self.close(session_id)

    def sessions(self) -> list[WhipSession]:
        return list(self._sessions.values())


class RtmpRelay:
    """A WHIP session's video, and its sound when it has some, published over RTMP by an
    ffmpeg process (``FfmpegRelay``; see the module's docstring for why not PyAV here)."""

    def __init__(self, live_url: Callable[[str], str]) -> None:
        self.live_url = live_url

    def __call__(self, session: WhipSession) -> None:
        """Publish the session's frames to ``live_url(key)`` until it closes; a relay that
        dies is started again."""
        relay: FfmpegRelay | None = None
        size: tuple[int, int] | None = None
        try:
            for frame in session_frames(session):
                # the relay keeps the first size (a new one would restart the key's stream)
                image = bgr_at(frame, size)
                size = size or (image.shape[1], image.shape[0])
                if relay is not None and relay.exited():
                    log.warning(
                        "WHIP %s: relay exited (%s: %s); starting it again",
                        session.id,
                        relay.proc.returncode,
                        relay.said(),
                    )
                    relay.stop()
                    relay = None
                if relay is None:
                    relay = FfmpegRelay(self.live_url(session.key), *size, session.audio)
                try:
                    relay.write(image)
                except (BrokenPipeError, OSError) as exc:
                    log.warning("WHIP %s: relay to the ingest stopped (%s)", session.id, exc)
        finally:
            if relay is not None:
                relay.stop()


# ---------------------------------------------------------------------------- WHEP egress


class FfmpegRelay:
    """One ffmpeg relay publishing a session to RTMP: raw BGR video on its stdin, timed by
    arrival (a WebRTC track has no fixed rate), encoded low-latency H.264; and for a
    session with sound, raw PCM on a pipe of its own, encoded AAC. A thread feeds the
    sound, and silence while the publisher sends none: ffmpeg interleaves its inputs and
    would hold the video back waiting for sound that does not come."""

    def __init__(
        self, url: str, width: int, height: int, audio: DropOldestQueue[bytes] | None
    ) -> None:
        cmd = [FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error"]
        cmd += ["-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{width}x{height}"]
        cmd += ["-use_wallclock_as_timestamps", "1", "-i", "pipe:0"]
        read_fd = write_fd = None
        if audio is not None:
            read_fd, write_fd = os.pipe()
            cmd += ["-f", "s16le", "-ar", str(AUDIO_RATE), "-ac", "2"]
            cmd += ["-use_wallclock_as_timestamps", "1", "-thread_queue_size", "256"]
            cmd += ["-i", f"pipe:{read_fd}"]
        cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency"]
        cmd += ["-pix_fmt", "yuv420p"]
        cmd += ["-force_key_frames", f"expr:gte(t,n_forced*{RELAY_KEYINT_S})"]
        cmd += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-fps_mode", "passthrough"]
        if audio is not None:
            # timestamps by arrival jitter: resampled to an even clock, gaps filled
            cmd += ["-c:a", "aac", "-b:a", "128k", "-af", "aresample=async=1"]
        cmd += ["-f", "flv", "-flvflags", "no_duration_filesize", url]
        # what ffmpeg says, read back if it exits; closed with the process object
        self.errors = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=self.errors,
            pass_fds=() if read_fd is None else (read_fd,),
        )
        self._audio_fd = write_fd
        self._halt = threading.Event()
        self._feeder: threading.Thread | None = None
        if read_fd is not None and audio is not None:
            os.close(read_fd)  # ffmpeg's now
            self._feeder = threading.Thread(
                target=self._feed_audio, args=(audio,), name="whip-relay-audio", daemon=True
            )
            self._feeder.start()

    def write(self, image: np.ndarray) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(image.tobytes())

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def said(self) -> str:
        self.errors.seek(0)
        return self.errors.read()[-400:].decode(errors="replace").strip().replace("\n", "; ")

    def _feed_audio(self, audio: DropOldestQueue[bytes]) -> None:
        assert self._audio_fd is not None
        fed_until = time.monotonic()
        while not self._halt.is_set():
            chunks = audio.drain()
            now = time.monotonic()
            if chunks:
                data = b"".join(chunks)
            elif now - fed_until >= AUDIO_GAP_S:
                data = bytes(int((now - fed_until) * AUDIO_RATE) * AUDIO_BYTES)  # silence
            else:
                self._halt.wait(0.01)
                continue
            fed_until = now
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._audio_fd, view) :]
            except OSError:  # ffmpeg is gone: the video side sees it too
                return

    def stop(self) -> None:
        """Close its inputs (it flushes and unpublishes), then wait; killed if it hangs."""
        self._halt.set()
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self._feeder is not None:
            self._feeder.join(2)
        if self._audio_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._audio_fd)
        self.errors.close()
