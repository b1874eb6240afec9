"""One attempt at a live output (``Connection``): its container, streams and (SRT) bridge,
worked on by its own thread, and what that needs around it: the RTP session description
and the UDP send queue.

Blocking. Each connection has its own worker thread that opens, encodes, muxes and closes
its container, because PyAV opens network outputs with ``avio_open()`` and no interrupt
callback: a TCP write to a link that went silent could block for many minutes and nothing
inside FFmpeg would cut it short. ``StreamSink.write()`` hands the frame to that worker and
waits at most ``write_timeout``; a connection that does not answer in time is abandoned (its worker
cleans up whenever its call returns) and a new one is opened in the background with
``Backoff``. Frames arriving while there is no connection are dropped and counted (see
live_sink).

Damaged audio. Audio is passed on as it came, so a damaged packet can reach a muxer
(FFmpeg's demuxer makes pieces of frames of a reordered or lossy UDP input; the input drops
the ones it can tell, see input_session). One the muxer refuses as malformed ("Invalid data
found when processing input": MPEG-TS refuses an AAC packet under 2 bytes) is dropped and
counted in the sink's ``audio_damaged``; it never fails the connection, which would cost
every viewer the reconnect (a second of frames) for one audio packet.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import av
import av.bitstream
import av.container

from facecast.errors import MediaError
from facecast.live.budget import encoder_budget
from facecast.media.audio_params import AudioParams
from facecast.media.h264 import with_trailing_aud
from facecast.media.live_errors import describe
from facecast.media.mark import MARK_KEY, sei_text
from facecast.media.output_plan import OutputPlan
from facecast.media.planes import BT601, ColourTags
from facecast.media.srt_bridge import Bridge
from facecast.media.urls import with_query
from facecast.media.video_encode import SeiMarker

# The output's own lines (its name first) under the output's logger, wherever the code
# sits: a log filter, or a test that captures "facecast.media.live_sink", sees all of them.
log = logging.getLogger("facecast.media.live_sink")


class Job:
    """One call for a connection's worker thread to make, and what came of it."""

    __slots__ = ("args", "done", "error", "fn", "result", "submitted")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]):
        self.fn, self.args = fn, args
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:  # handed to the caller, who decides
            self.error = exc
        finally:
            self.done.set()


@dataclass
class EncoderSettings:
    """How a connection sets up its video encoder (the same for every reconnect)."""

    width: int
    height: int
    fps: Fraction
    time_base: Fraction
    preset: str
    tune: str | None
    keyint: int
    bitrate: int | None
    maxrate: int
    colours: ColourTags = BT601  # the stream's colour tags (StreamSink's ``colours``)


class Connection:
    """One attempt at the output: container, streams and (SRT) bridge, all touched only by
    this connection's own worker thread, in the order the jobs were submitted."""

    def __init__(
        self,
        plan: OutputPlan,
        encoder: EncoderSettings,
        audio: AudioParams | None,
        mark: dict[str, str] | None,
        name: str,
        damaged: Callable[[BaseException], None],
    ):
        self.plan, self.encoder, self.audio_params, self.mark = plan, encoder, audio, mark
        self.name = name
        self.damaged = damaged  # an audio packet dropped as damaged (see "Damaged audio")
        self.local_port: int | None = None  # UDP: the port its socket is bound to
        self.failed: str | None = None  # set once: the connection is dead
        self.frames = 0
        self.audio_tb: Fraction | None = None
        self.last_audio_ticks: int | None = None
        self.bridge: Bridge | None = None
        self._container: av.container.OutputContainer | None = None
        self._video: av.VideoStream | None = None
        self._audio: av.AudioStream | None = None
        self._sdp_done = False
        # AAC into anything but MPEG-TS: ADTS headers stripped (see open())
        self._adts: av.bitstream.BitStreamFilterContext | None = None
        self._sei: SeiMarker | None = None  # the mark in every keyframe (see SeiMarker)
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="facecast-output", daemon=True)
        self._thread.start()

    # -- plumbing (caller side)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Job:
        job = Job(fn, args)
        with self._lock:
            self._pending += 1
        self._jobs.put(job)
        return job

    @property
    def pending(self) -> int:
        return self._pending

    def fail(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason

    def abandon(self) -> None:
        """Close in the background: if the worker is stuck, it closes when it comes back."""
        self.fail("closed")
        self.submit(self.close, False)
        self._jobs.put(None)

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the worker to end (after ``abandon``/``finish``);
        True once it has, and with it every PyAV call on this connection."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def finish(self, timeout: float) -> bool:
        """Flush and close, waiting up to ``timeout`` s; True if it completed."""
        job = self.submit(self.close, True)
        self._jobs.put(None)
        done = job.done.wait(timeout)
        if done and job.error is not None:
            log.warning("%s: closing the output: %s", self.name, describe(job.error))
        return done

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job.run()
            with self._lock:
                self._pending -= 1
            if job.error is not None and job.fn != self.close:
                self.fail(describe(job.error))

    # -- jobs (worker side)

    def open(self) -> None:
        plan = self.plan
        if plan.bridge:
            self.bridge = Bridge(plan.bridge)
            # An SRT listener whose port is held would start, fail to bind and exit; the
            # open would succeed (UDP to it) and the link flap. A failed open backs off.
            problem = self.bridge.listen_problem()
            if problem:
                raise MediaError(problem)
            self.bridge.start()
        target = plan.target
        if plan.kind == "udp":
            target, self.local_port = _with_local_port(target)
        try:
            self._container = av.open(
                target, mode="w", format=plan.format, options=dict(plan.options)
            )
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise MediaError(describe(exc)) from exc
        out = self._container
        self._video = self._add_video(out)
        self._sei = SeiMarker.for_stream(out, self._video, self.mark)
        if self.audio_params is not None and plan.audio:
            self._audio = self._add_audio(out, self.audio_params)
        if self.mark:
            for key, value in self.mark.items():
                out.metadata[key] = value
            if MARK_KEY in self.mark:
                out.metadata.setdefault("comment", self.mark[MARK_KEY])
            if plan.format == "mpegts":
                # MPEG-TS keeps only the service tags: say it there.
                out.metadata["service_provider"] = "facecast"
                out.metadata["service_name"] = "AI-generated (facecast)"
        # Connects (network outputs) and writes the header; opens the encoder.
        out.start_encoding()
        if self._audio is not None:
            self.audio_tb = Fraction(self._audio.time_base)
            if self._audio.codec_context.name == "aac" and plan.format != "mpegts":
                # MPEG-TS input carries AAC as ADTS, a header on every packet; MP4, Matroska
                # and FLV want the bare frames (the configuration is in the header, see
                # AudioParams). FFmpeg's muxers are meant to insert this filter themselves
                # but MP4 with empty_moov refused the first packet ("Malformed AAC
                # bitstream") and the recording ended 0.1 s in. Bare frames pass unchanged.
                self._adts = av.bitstream.BitStreamFilterContext(
                    "aac_adtstoasc", in_stream=self._audio
                )
        if plan.sdp_path is not None:
            _write_sdp(plan, None)

    def _add_video(self, out: av.container.OutputContainer) -> av.VideoStream:
        enc = self.encoder
        # the encoder's share of the cores, taken when this connection opens (live/budget.py)
        options = {"preset": enc.preset, "threads": str(encoder_budget())}
        if enc.tune:
            options["tune"] = enc.tune
        # A bounded send rate: VBV with a 1 s buffer, for ABR and capped CRF alike.
        options["maxrate"] = str(enc.maxrate)
        options["bufsize"] = str(enc.maxrate)
        if enc.bitrate is None:
            options["crf"] = "23"
        if self.mark and sei_text(self.mark) is not None:
            options = SeiMarker.encoder_options(options)
        stream = out.add_stream("libx264", rate=enc.fps, options=options)
        stream.width, stream.height, stream.pix_fmt = enc.width, enc.height, "yuv420p"
        ctx = stream.codec_context
        ctx.time_base = enc.time_base
        ctx.framerate = enc.fps
        ctx.gop_size = enc.keyint
        enc.colours.tag(ctx)
        if enc.bitrate is not None:
            ctx.bit_rate = enc.bitrate
        stream.time_base = enc.time_base
        return stream

    def _add_audio(
        self, out: av.container.OutputContainer, params: AudioParams
    ) -> av.AudioStream | None:
        try:
            template_container, template = params.open_template()
        except (av.FFmpegError, MediaError, OSError) as exc:
            log.warning("%s: audio dropped: cannot read its parameters (%s)", self.name, exc)
            return None
        try:
            return out.add_stream_from_template(template)
        except (av.FFmpegError, ValueError) as exc:
            log.warning(
                "%s: audio dropped: %s cannot carry %s (%s)",
                self.name,
                self.plan.format,
                params.codec,
                exc,
            )
            return None
        finally:
            template_container.close()

    def encode_video(self, frame: av.VideoFrame, bit_rate: int | None) -> tuple[float, bool]:
        assert self._container is not None and self._video is not None
        start = time.perf_counter()
        ctx = self._video.codec_context
        if bit_rate is not None and ctx.bit_rate != bit_rate:
            # libx264 picks up a changed bit_rate at the next frame (x264_encoder_reconfig):
            # no reopen, no break in the stream.
            ctx.bit_rate = bit_rate
        packets = self._video.encode(frame)
        keyframe = any(p.is_keyframe for p in packets)
        if self._sei is not None and keyframe:
            packets = self._sei.apply(packets)
        if self.plan.delimit_frames:
            packets = [with_trailing_aud(p) for p in packets]
        if packets:
            self._mux(packets)
            if keyframe and not self._sdp_done and self.plan.sdp_path is not None:
                _write_sdp(self.plan, bytes(packets[0]))
                self._sdp_done = True
        self.frames += 1
        return time.perf_counter() - start, keyframe

    def mux_audio(self, data: bytes, ticks: int, duration: int | None) -> None:
        assert self._container is not None and self._audio is not None
        packet = av.Packet(data)
        packet.stream = self._audio
        packet.time_base = self._audio.time_base
        packet.pts = packet.dts = ticks
        if duration:
            packet.duration = duration
        packets = [packet]
        if self._adts is not None:
            try:
                packets = self._adts.filter(packet)
            except av.FFmpegError as exc:
                self.damaged(exc)  # its ADTS header: dropped, the recording goes on
                return
        for out in packets:
            out.stream = self._audio
        self._mux(packets)

    def _mux(self, packets: list[av.Packet]) -> None:
        """Mux; a packet the muxer refuses as malformed is dropped, not a failed link."""
        assert self._container is not None
        try:
            self._container.mux(packets)
        except av.error.InvalidDataError as exc:
            # A link's failures come as OSError (EIO, EPIPE, ECONNREFUSED); this is one
            # packet's content (see "Damaged audio"). Counted as audio even from a video
            # write: the muxer interleaves, so it may be writing an audio packet queued
            # earlier, and audio is the one stream facecast does not make itself.
            self.damaged(exc)

    def close(self, flush: bool) -> None:
        try:
            if self._container is not None:
                if flush and self._video is not None and self.failed is None:
                    with contextlib.suppress(av.FFmpegError, OSError):
                        flushed = self._video.encode(None)
                        if self._sei is not None:
                            flushed = self._sei.apply(flushed)
                        self._container.mux(flushed)
                self._container.close()
        except (av.FFmpegError, OSError) as exc:
            if flush:
                raise MediaError(describe(exc)) from exc
        finally:
            self._container = None
            if self.bridge is not None:
                self.bridge.stop()


# ---------------------------------------------------------------------------- helpers


def _write_sdp(plan: OutputPlan, keyframe: bytes | None) -> None:
    """The session description a receiver opens (``ffplay -protocol_whitelist
    file,udp,rtp x.sdp``). Written at connect, then again with the H.264 parameter sets
    from the first keyframe so late receivers can start decoding before the next one."""
    assert plan.sdp_path is not None
    parts = urlsplit(plan.target)
    fmtp = "packetization-mode=1"
    if keyframe:
        nals = _annexb_nals(keyframe)
        sps = next((n for n in nals if n and n[0] & 0x1F == 7), None)
        pps = next((n for n in nals if n and n[0] & 0x1F == 8), None)
        if sps and pps and len(sps) >= 4:
            sets = ",".join(base64.b64encode(n).decode() for n in (sps, pps))
            fmtp += f"; sprop-parameter-sets={sets}; profile-level-id={sps[1:4].hex().upper()}"
    text = (
        "v=0\n"
        f"o=- 0 0 IN IP4 {parts.hostname}\n"
        "s=facecast (AI-generated)\n"
        f"c=IN IP4 {parts.hostname}\n"
        "t=0 0\n"
        f"m=video {parts.port} RTP/AVP 96\n"
        "a=rtpmap:96 H264/90000\n"
        f"a=fmtp:96 {fmtp}\n"
    )
    path = plan.sdp_path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: a receiver never reads half a file


def _with_local_port(target: str) -> tuple[str, int | None]:
    """A UDP ``target`` bound to a local port known in advance: the URL's own ``localport``,
    or one free now (another process could take it before FFmpeg binds it: that open fails
    and the next attempt picks another). Its socket is then the row of /proc/net/udp with
    that port; FFmpeg does not say which socket it opened."""
    given = dict(parse_qsl(urlsplit(target).query)).get("localport")
    if given is not None:
        return target, int(given) if given.isdigit() else None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("", 0))
        port = int(sock.getsockname()[1])
    return with_query(target, {"localport": str(port)}), port


def udp_send_queue(port: int) -> int | None:
    """Bytes this host still holds for the UDP socket bound to local ``port``: the
    ``tx_queue`` column of /proc/self/net/udp (and udp6), the kernel's sk_wmem_alloc,
    which counts datagrams not yet sent on, mostly those waiting in the qdisc. None if
    there is no such socket (or no /proc: not Linux)."""
    queued: int | None = None
    for table in ("/proc/self/net/udp", "/proc/self/net/udp6"):
        try:
            with open(table) as rows:
                next(rows, None)  # the header
                for row in rows:
                    # sl local_address rem_address st tx_queue:rx_queue ...
                    fields = row.split()
                    if len(fields) > 4 and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        tx = int(fields[4].split(":", 1)[0], 16)
                        queued = tx if queued is None else max(queued, tx)
        except (OSError, ValueError):
            continue
    return queued


def _annexb_nals(data: bytes) -> list[bytes]:
    out = []
    for chunk in data.split(b"\x00\x00\x01"):
        chunk = chunk.rstrip(b"\x00")
        if chunk:
            out.append(chunk)
    return out


__all__ = ["Connection", "EncoderSettings", "Job", "udp_send_queue"]
