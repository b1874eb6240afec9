"""Reading one open live input until it fails: demux, decode, pace a file to its timestamps,
spot stalls and damaged packets (``SessionReader``, the part of ``StreamSource`` that works
on an open ``Session``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import av.container

from facecast.media.audio_params import is_adts, whole_adts_frames
from facecast.media.frame import AudioChunk, Frame
from facecast.media.h264 import is_lone_aud
from facecast.media.handoff import Halted, Handoff, sleep_unless_halted
from facecast.media.input_plan import InputPlan
from facecast.media.live_errors import describe, explain_read
from facecast.media.srt_bridge import Bridge

# The input's own lines (its name first) under the input's logger, wherever the code sits:
# a log filter, or a test that captures "facecast.media.live_source", sees all of them.
log = logging.getLogger("facecast.media.live_source")

MAX_CONSECUTIVE_READ_ERRORS = 32


@dataclass
class Session:
    """One open input: its container, the streams read, and (SRT) its bridge."""

    container: av.container.InputContainer
    video: av.VideoStream
    audio: av.AudioStream | None
    bridge: Bridge | None
    frames: int = 0
    # An SRT listener's bridge outlives the session (it is the input's, kept listening
    # across callers); ``call`` is its count of callers when this one's session opened.
    keep_bridge: bool = False
    call: int = 0

    def close(self) -> None:
        try:
            self.container.close()
        except (av.FFmpegError, OSError) as exc:
            log.debug("closing input: %s", exc)
        if self.bridge is not None and not self.keep_bridge:
            self.bridge.stop()


LOOP = "end of file (looping)"
END = "end of stream"


class SessionReader:
    """``StreamSource``'s reading of an open ``Session``: a mixin for that class, whose state
    (the counters and settings annotated here) it updates as frames and packets arrive."""

    name: str
    plan: InputPlan
    realtime: bool
    loop_file: bool
    stall_timeout: float
    frames: int
    bad_packets: int
    audio_chunks: int
    last_frame_at: float | None
    width: int | None
    height: int | None

    def _pump(self, session: Session, halted: Halted, handoff: Handoff) -> str | None:
        """Read until the input fails: the reason, or None when halted or a file ended."""
        container, video, audio = session.container, session.video, session.audio
        streams: list[av.VideoStream | av.AudioStream] = [video]
        if audio is not None:
            streams.append(audio)
        live = self.plan.live
        pace = _Pacer() if self.realtime and not live else None
        # AAC with no configuration in the stream (MPEG-TS, raw .aac) is ADTS: each packet
        # must then be whole ADTS frames, which tells a damaged packet from a good one
        adts = audio is not None and is_adts(audio)
        last_video = time.monotonic()  # the frame clock starts at connect
        errors = 0
        while True:
            try:
                for packet in container.demux(*streams):
                    if halted():
                        return None
                    errors = 0
                    if pace is not None and not pace.wait(packet, halted):
                        return None
                    if packet.stream.index == video.index:
                        # Until the first keyframe arrives (joining mid-GOP) the decoder
                        # rejects what it gets: expected, so counted but not logged.
                        for frame in self._decode(video, packet, quiet=not session.frames):
                            session.frames += 1
                            last_video = frame.t_ingest
                            if not handoff.put(frame, halted):
                                return None
                    elif packet.size:
                        chunk = _chunk(packet)
                        if chunk is not None and adts and not whole_adts_frames(chunk.data):
                            # Pieces of frames: what FFmpeg's parser makes of reordered or
                            # lost TS packets. Undecodable, and a one-byte piece is refused
                            # by the MPEG-TS muxer: dropped here, before any output.
                            self._bad("damaged audio packet (not whole ADTS frames)")
                        elif chunk is not None:
                            self.audio_chunks += 1
                            if not handoff.put(chunk, halted):
                                return None
                    if live:
                        reason = self._stalled(session, last_video)
                        if reason:
                            return reason
                # demux() ended after its flush packets: end of stream
                return self._ended()
            except av.error.ExitError:
                # PyAV's read timeout (the heartbeat); the container is unusable now.
                return None if halted() else f"no data for {self.stall_timeout:.1f} s"
            except av.error.EOFError:
                return self._ended()
            except av.error.BlockingIOError:
                # A non-blocking device (v4l2) has no frame ready: poll again shortly.
                if sleep_unless_halted(0.005, halted):
                    return None
            except OSError as exc:
                # I/O failure (PyAV's errno errors subclass OSError): the link is gone.
                return None if halted() else explain_read(exc, self.plan.kind)
            except av.FFmpegError as exc:
                # Damaged data: the demuxer resyncs after it, so skip and read on.
                errors += 1
                self._bad(f"read error ({describe(exc)})")
                if errors >= MAX_CONSECUTIVE_READ_ERRORS:
                    return f"{errors} read errors in a row ({describe(exc)})"
            if live:
                reason = self._stalled(session, last_video)
                if reason:
                    return reason

    def _stalled(self, session: Session, last_video: float) -> str | None:
        bridge = session.bridge
        if bridge is not None and not bridge.alive():
            return bridge.exit_reason()
        if bridge is not None and session.keep_bridge and bridge.hangups >= session.call:
            # an SRT listener's caller left (it listens on for the next one)
            return "the SRT caller went away"
        idle = time.monotonic() - last_video
        if idle > self.stall_timeout:
            return f"no video frame for {idle:.1f} s"
        return None

    def _ended(self) -> str | None:
        if self.plan.live:
            return END
        return LOOP if self.loop_file else None

    def _decode(self, video: av.VideoStream, packet: av.Packet, quiet: bool) -> Iterator[Frame]:
        if is_lone_aud(packet):
            return  # the delimiter that ends a low-delay MPEG-TS stream: no frame in it
        try:
            decoded = video.decode(packet)
        except av.FFmpegError as exc:
            if quiet:
                self.bad_packets += 1
            else:
                self._bad(f"undecodable video packet ({describe(exc)})")
            return
        for vf in decoded:
            now = time.monotonic()
            timing = {
                "index": self.frames,
                "pts": vf.pts,
                "time_base": Fraction(vf.time_base) if vf.time_base else None,
                "t_ingest": now,
            }
            try:
                frame = Frame.decoded(vf, **timing)
            except (av.FFmpegError, ValueError) as exc:
                self._bad(f"unconvertible video frame ({exc})")
                continue
            self.frames += 1
            self.last_frame_at = now
            self.width, self.height = vf.width, vf.height
            yield frame

    def _bad(self, what: str) -> None:
        self.bad_packets += 1
        # Garbage on a live link comes in bursts: one line per problem would flood the log.
        if self.bad_packets <= 5:
            log.warning("%s: skipped %s", self.name, what)
        elif self.bad_packets in (10, 100, 1000) or self.bad_packets % 10_000 == 0:
            log.warning("%s: %d damaged packets skipped so far", self.name, self.bad_packets)


# ---------------------------------------------------------------------------- helpers


class _Pacer:
    """Holds a file's packets back to their presentation time (realtime=True), so a file
    behaves like a live input. Re-anchors after a stall so the file does not then burst."""

    def __init__(self) -> None:
        self.origin: float | None = None  # wall time of media time 0

    def wait(self, packet: av.Packet, halted: Halted) -> bool:
        ts = packet.dts if packet.dts is not None else packet.pts
        if ts is None or packet.time_base is None:
            return True
        t = float(ts * packet.time_base)
        now = time.monotonic()
        if self.origin is None or now - (self.origin + t) > 1.0:
            self.origin = now - t
            return True
        delay = self.origin + t - now
        return delay <= 0 or not sleep_unless_halted(delay, halted)


def _chunk(packet: av.Packet) -> AudioChunk | None:
    """An audio packet as the consumer gets it; None when it has no timestamp."""
    if packet.pts is None and packet.dts is None:
        return None
    return AudioChunk(
        data=bytes(packet),
        pts=packet.pts,
        dts=packet.dts,
        time_base=Fraction(packet.time_base),
        duration=packet.duration or None,
        t_ingest=time.monotonic(),
    )


def stream_fps(video: av.VideoStream, prefer_guess: bool) -> Fraction | None:
    """The stream's frame rate. With ``fpsprobesize=0`` (RTMP) FLV's ``average_rate`` is
    the metadata's rate truncated to an integer (29 for 29.97) and ``guessed_rate`` is
    right; elsewhere ``guessed_rate`` can be the H.264 field rate (59.94 for 29.97)."""
    order = (video.guessed_rate, video.average_rate)
    if not prefer_guess:
        order = order[::-1]
    for rate in (*order, video.base_rate):
        if rate and 1 <= rate <= 240:
            return Fraction(rate)
    return None


__all__ = ["END", "LOOP", "Session", "SessionReader", "stream_fps"]
