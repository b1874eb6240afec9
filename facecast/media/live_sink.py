"""Live outputs: H.264 (libx264) plus the input's audio, remuxed, to RTMP, UDP, RTP, SRT or a
file, reconnecting in the background when the link fails.

Timing. The sink owns the output timeline: a video frame's pts is the monotonic clock at
``write()`` (since the sink was made), nudged to stay strictly increasing. Input timestamps
are never copied to video, so frames the pipeline drops, held (repeated) frames and an input
that reconnects with its pts back at 0 all still give a clean, increasing output.

Audio sync. Audio packets keep their input timing *within* the input's clock and are placed
on the output clock through one offset: ``offset = min(arrival - media time)`` over the last
2 s of audio packets (``_AudioClock``), and output time = ``media time + offset + L - t0``
where ``L`` is the video path's latency (median of ``write time - Frame.t_ingest`` over the
last 15 frames): audio is delayed exactly as much as the video it belongs with. The minimum
makes packets that arrive late (network jitter, the backlog an input hands over right after
it opens) map where they would have been had they arrived on time; a jump of more than 1 s
(a new publisher, pts back at 0) re-anchors at once. Audio that would overlap what was
already written (that backlog, a replayed stretch) is dropped and counted, so the audio
track stays continuous and in step with the picture.

Media time. A file read as fast as it decodes is not a live signal: on the clock above its
seconds would be squeezed into the fraction of a second they took to process, and most of
its audio dropped as overlapping. With ``media_time`` the output keeps the input's own
timestamps instead, video and audio alike, counted from the first frame (or the audio
before it), and nothing is dropped for backing up: every ``write()`` waits for its frame.

Failing for good. A file is never reopened (that would overwrite it), and a link whose
``Backoff`` attempts are used up is not retried: from then on ``write()`` and
``write_audio()`` raise ``MediaError``, so the run ends with the reason instead of
streaming on into nothing. A file that failed is kept if what it holds plays (a recording
that ran for a while, then hit a full disk: see ``_MP4``), removed if not (a header at
most).

Damaged audio. Audio is passed on as it came, so a damaged packet can reach a muxer
(FFmpeg's demuxer makes pieces of frames of a reordered or lossy UDP input; the input drops
the ones it can tell, see live_source). One the muxer refuses as malformed ("Invalid data
found when processing input": MPEG-TS refuses an AAC packet under 2 bytes) is dropped and
counted in ``audio_damaged``; it never fails the connection, which would cost every viewer
the reconnect (a second of frames) for one audio packet.

Backlog (UDP). A UDP send never blocks on a slow link: the datagrams wait in this host's
qdisc, and once it is full the kernel drops them without a word to the sender, so
``send_seconds`` cannot see such a link. What it does show is the socket's send queue
(``tx_queue`` in /proc/net/udp: datagrams handed to the kernel and not yet sent on). On a
link that carries the stream it is empty by the time the next frame is due; a link that
cannot keeps a standing backlog there. So a UDP output binds to a local port it knows
(``localport``) and reads that row before each frame: ``backed_up`` says the last frames
were still waiting, and the pipeline steps its rate down on it. This sees only a bottleneck
on this host's own egress (a shaped or saturated interface): a squeeze further along the
path drops datagrams there, and plain UDP/MPEG-TS has no receiver reports to tell of it.

Blocking. Each connection has its own worker thread that opens, encodes, muxes and closes
its container, because PyAV opens network outputs with ``avio_open()`` and no interrupt
callback: a TCP write to a link that went silent could block for many minutes and nothing
inside FFmpeg would cut it short. ``write()`` hands the frame to that worker and waits at
most ``write_timeout``; a connection that does not answer in time is abandoned (its worker
cleans up whenever its call returns) and a new one is opened in the background with
``Backoff``. Frames arriving while there is no connection are dropped and counted.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import queue
import socket
import statistics
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import av
import av.bitstream
import av.container
from av.video.frame import PictureType

from facecast.errors import MediaError
from facecast.media.backoff import Backoff
from facecast.media.frame import AudioChunk, Frame
from facecast.media.h264 import with_trailing_aud
from facecast.media.live_source import (
    SRT_BRIDGE,
    AudioParams,
    Bridge,
    check_srt_endpoint,
    check_srt_options,
    free_udp_port,
    redact,
    srt_listens,
    with_query,
)
from facecast.media.mark import MARK_KEY, sei_text
from facecast.media.sink import (
    _AVCOL_RANGE_MPEG,
    _AVCOL_SPC_SMPTE170M,
    SeiMarker,
    bgr_to_video_frame,
    fit_image,
)

log = logging.getLogger(__name__)

MS = Fraction(1, 1000)
TICKS_90K = Fraction(1, 90000)
UDP_PAYLOAD = 1316  # 7 TS packets: fits one Ethernet frame with IP/UDP (and SRT) headers
MAX_AUDIO_BACKLOG = 64  # audio jobs waiting on a slow connection before audio is dropped
MAX_EARLY_AUDIO = 512  # media time: audio packets kept until the first frame (~10 s of AAC)
AUDIO_WINDOW_S = 2.0
AUDIO_JUMP_S = 1.0
# A UDP output whose send queue holds this much when the next frame is due is backed up
# (see "Backlog"): ~4 datagrams as the kernel counts them (each costs its buffer's size,
# ~2.3 kB for 1316 bytes), where a link that keeps up leaves none.
BACKLOG_BYTES = 8192
BITS_PER_PIXEL = 0.1  # default VBV cap for capped CRF: ~0.7 Mb/s at 360p30, 2.8 Mb/s at 720p30

# Every live output hands each packet to the OS at once (flush_packets): without it a file
# keeps up to 32 kB in FFmpeg's buffer, which a killed process never writes (a fragmented
# MP4 killed after 1.5 s held only its 28-byte ftyp) and a reader tailing the file waits.
_FLUSH = {"flush_packets": "1"}
# Fragmented MP4: every fragment is self-contained, so the file plays even if the process
# is killed before close(); close() still writes the last fragment and the index.
_MP4 = {**_FLUSH, "movflags": "+frag_keyframe+empty_moov+default_base_moof+use_metadata_tags"}
# Live MPEG-TS (udp, srt): readers (FFmpeg's and most others) hand on a video frame only
# once they see the next one begin, twice over: the demuxer waits for the next PES when the
# PES length is left out (FFmpeg's default for video), and the H.264 parser waits for the
# next access unit's first NAL. That is two frame intervals (67 ms at 30 fps) per hop, more
# than the whole swap. So live MPEG-TS states its PES lengths and ends each frame with an
# access unit delimiter (the next frame's first NAL, allowed by H.264 7.4.1.2.3) so that the
# parser can close the frame at once. The one cost: the stream's very last delimiter has no
# frame after it, which readers skip (ours silently). Files keep plain framing.
# See docs/live-media.md, "Latency".
_TS = {**_FLUSH, "omit_video_pes_length": "0"}
_FILE_FORMATS: dict[str, tuple[str, Fraction, dict[str, str]]] = {
    ".ts": ("mpegts", TICKS_90K, _FLUSH),
    ".m2ts": ("mpegts", TICKS_90K, _FLUSH),
    ".mts": ("mpegts", TICKS_90K, _FLUSH),
    ".mp4": ("mp4", TICKS_90K, _MP4),
    ".m4v": ("mp4", TICKS_90K, _MP4),
    ".mov": ("mov", TICKS_90K, _MP4),
    ".mkv": ("matroska", MS, {**_FLUSH, "live": "1"}),
    ".flv": ("flv", MS, {**_FLUSH, "flvflags": "no_duration_filesize"}),
}


# ---------------------------------------------------------------------------- output plans


@dataclass
class OutputPlan:
    """How to open one output."""

    kind: str  # rtmp | udp | rtp | srt | file
    target: str  # what av.open() is given
    format: str
    options: dict[str, str] = field(default_factory=dict)
    time_base: Fraction = TICKS_90K  # the video encoder's: the muxer's own, so no rounding
    audio: bool = True  # rtp carries one stream: video only
    reconnect: bool = True  # a file is never reopened: that would overwrite it
    bridge: list[str] | None = None
    sdp_path: Path | None = None
    delimit_frames: bool = False  # end each video frame with an AUD (see _TS)


def plan_output(
    url: str, *, sdp_path: str | Path | None = None, bridge_port: int | None = None
) -> OutputPlan:
    """The muxer, target and options for ``url``; raises MediaError if unsupported."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    # Muxer options shared by live outputs: hold a stream back at most 0.1 s waiting for
    # the other one (default 10 s: video would stall whenever the input has no audio).
    live = {**_FLUSH, "max_interleave_delta": "100000"}
    live_ts = {**live, **_TS}
    if scheme.startswith("rtmp"):
        # no_duration_filesize: do not seek back at close to patch the header (RTMP can't).
        options = {**live, "flvflags": "no_duration_filesize"}
        return OutputPlan("rtmp", url, "flv", options, MS)
    if scheme == "udp":
        target = with_query(url, {"pkt_size": str(UDP_PAYLOAD)})
        return OutputPlan("udp", target, "mpegts", live_ts, TICKS_90K, delimit_frames=True)
    if scheme == "rtp":
        if not parts.hostname or not parts.port:
            raise MediaError(f"{url}: an RTP output needs a host and a port")
        sdp = (
            Path(sdp_path)
            if sdp_path
            else Path(tempfile.gettempdir()) / (f"facecast-rtp-{parts.port}.sdp")
        )
        return OutputPlan("rtp", url, "rtp", dict(_FLUSH), TICKS_90K, audio=False, sdp_path=sdp)
    if scheme == "srt":
        check_srt_options(url)  # the URL goes to the bridge as given (passphrase, latency...)
        port = bridge_port or free_udp_port()
        local = f"udp://127.0.0.1:{port}?pkt_size={UDP_PAYLOAD}"
        # A caller: -a:no, when the far end goes away the bridge exits, which the sink
        # notices and answers with a fresh connection (bridge included). A listener:
        # -a:yes, it listens again when a player leaves, and while nobody is on it drops
        # what it reads, so the sink (UDP to the bridge) never waits for a player.
        again = "-a:yes" if srt_listens(url) else "-a:no"
        bridge = [SRT_BRIDGE, again, "-loglevel:error", f"udp://127.0.0.1:{port}", url]
        return OutputPlan(
            "srt", local, "mpegts", live_ts, TICKS_90K, bridge=bridge, delimit_frames=True
        )
    if scheme in ("", "file") or len(scheme) == 1:
        path = Path(parts.path if scheme == "file" else url)
        suffix = path.suffix.lower()
        if suffix not in _FILE_FORMATS:
            known = ", ".join(sorted(_FILE_FORMATS))
            raise MediaError(
                f"{path}: unknown output format {suffix or '(no suffix)'}; use {known}"
            )
        fmt, time_base, options = _FILE_FORMATS[suffix]
        return OutputPlan("file", str(path), fmt, dict(options), time_base, reconnect=False)
    raise MediaError(f"{url}: unsupported output (use rtmp://, udp://, rtp://, srt:// or a file)")


# ---------------------------------------------------------------------------- worker


class _Job:
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
class _EncoderSettings:
    width: int
    height: int
    fps: Fraction
    time_base: Fraction
    preset: str
    tune: str | None
    keyint: int
    bitrate: int | None
    maxrate: int


class _Connection:
    """One attempt at the output: container, streams and (SRT) bridge, all touched only by
    this connection's own worker thread, in the order the jobs were submitted."""

    def __init__(
        self,
        plan: OutputPlan,
        encoder: _EncoderSettings,
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
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="facecast-output", daemon=True)
        self._thread.start()

    # -- plumbing (caller side)

    def submit(self, fn: Callable[..., Any], *args: Any) -> _Job:
        job = _Job(fn, args)
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
            log.warning("%s: closing the output: %s", self.name, _describe(job.error))
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
                self.fail(_describe(job.error))

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
            raise MediaError(_describe(exc)) from exc
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
        options = {"preset": enc.preset}
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
        ctx.colorspace = _AVCOL_SPC_SMPTE170M
        ctx.color_range = _AVCOL_RANGE_MPEG
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
                raise MediaError(_describe(exc)) from exc
        finally:
            self._container = None
            if self.bridge is not None:
                self.bridge.stop()


# ---------------------------------------------------------------------------- audio clock


class _AudioClock:
    """Input audio time → output time (see the module docstring)."""

    def __init__(self) -> None:
        self._window: deque[tuple[float, float]] = deque()  # (arrival, arrival - media)

    def wall_time(self, chunk: AudioChunk) -> float:
        """The monotonic time at which ``chunk`` was live, as best known."""
        ts = chunk.pts if chunk.pts is not None else chunk.dts
        if ts is None:
            return chunk.t_ingest
        media = float(ts * chunk.time_base)
        offset = chunk.t_ingest - media
        window = self._window
        if window and abs(offset - min(o for _, o in window)) > AUDIO_JUMP_S:
            window.clear()  # a new timeline: re-anchor now
        window.append((chunk.t_ingest, offset))
        while window and chunk.t_ingest - window[0][0] > AUDIO_WINDOW_S:
            window.popleft()
        return media + min(o for _, o in window)


# ---------------------------------------------------------------------------- the sink


def output_geometry(name: str, width: int, height: int, fps: float) -> tuple[int, int, Fraction]:
    """An output's size rounded down to even (4:2:0 encoders reject odd ones) and its rate
    as a fraction; a MediaError naming the output when either is unusable."""
    even_w, even_h = width - width % 2, height - height % 2
    if even_w < 2 or even_h < 2:
        raise MediaError(f"{name}: cannot send a {width}x{height} video")
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise MediaError(f"{name}: frame rate must be positive, not {fps}")
    return even_w, even_h, rate


class StreamSink:
    """A live output (see the module docstring). Call its methods from one thread.

    State for metrics and the pipeline: ``connected``, ``state_since``, ``reconnects``,
    ``frames`` (written), ``dropped`` (frames not sent: no connection, or it failed),
    ``audio_packets``, ``audio_dropped``, ``audio_damaged`` (dropped as damaged: see
    "Damaged audio"), ``send_seconds`` (the last frame's encode + mux time as ``write()``
    saw it; ``send_seconds_avg`` smooths it: rising towards the frame interval means the
    link is backing up), and for UDP ``send_queue`` (bytes still queued on this host when
    the last frame was due, None if unknown) and ``backed_up`` (see "Backlog").
    """

    def __init__(
        self,
        url: str | Path,
        *,
        width: int,
        height: int,
        fps: Fraction | float,
        audio: AudioParams | None,
        preset: str = "ultrafast",
        tune: str | None = "zerolatency",
        keyint: int | None = None,
        bitrate: int | None = None,
        backoff: Backoff | None = None,
        mark: dict[str, str] | None = None,
        sdp_path: str | Path | None = None,
        open_timeout: float = 5.0,
        write_timeout: float = 2.0,
        connect_wait: float = 1.0,
        media_time: bool = False,
    ):
        """``media_time``: the input is a file read as fast as it decodes, not a live
        signal, so the output keeps the input's own timestamps (relative to its start)
        instead of the clock at ``write()``; see "Media time" in the module docstring."""
        self.url = str(url)
        self.name = redact(self.url)
        self.width, self.height, rate = output_geometry(self.name, width, height, fps)
        self.plan = plan_output(self.url, sdp_path=sdp_path)
        if self.plan.kind == "srt":
            check_srt_endpoint(self.url)  # a listener's port in use: said now, in words
        if self.plan.kind == "file":
            parent = Path(self.plan.target).resolve().parent
            if not parent.is_dir():
                raise MediaError(f"{self.name}: folder {parent} does not exist")
        self.fps = rate
        self.time_base = self.plan.time_base
        keyint = keyint or max(1, round(rate))  # ~1 s: a new viewer waits at most that
        maxrate = bitrate or round(BITS_PER_PIXEL * self.width * self.height * float(rate))
        self._encoder = _EncoderSettings(
            self.width, self.height, rate, self.time_base, preset, tune, keyint, bitrate, maxrate
        )
        self._keyint_s = keyint / float(rate)
        self._audio_params = audio if self.plan.audio else None
        if audio is not None and not self.plan.audio:
            log.info("%s: %s carries video only; audio is not sent", self.name, self.plan.kind)
        self.mark = mark
        self.media_time = media_time
        self.backoff = backoff or Backoff()
        self.open_timeout, self.write_timeout = open_timeout, write_timeout

        self.connected = False
        self.state_since = time.monotonic()
        self.reconnects = 0
        self.frames = 0
        self.dropped = 0
        self.audio_packets = 0
        self.audio_dropped = 0
        self.audio_damaged = 0
        self.send_seconds = 0.0
        self.send_seconds_avg = 0.0
        self.send_queue: int | None = None
        self.backed_up = False

        self._t0 = time.monotonic()  # output time 0
        self._last_pts: int | None = None
        self._last_key_at: float | None = None
        self._force_key = False
        self._srt_calls = 0  # SRT players the bridge has taken (see _usable)
        self._bit_rate: int | None = None  # the encoder's target after set_rate()
        self._latency: deque[float] = deque(maxlen=15)
        self._audio_clock = _AudioClock()
        self._audio_end: float | None = None  # output seconds where written audio ends
        self._last_audio_duration = 0.0
        # media time: the input time that is output time 0 (set by the first frame), the
        # last frame's input time, and the audio that came before the first frame
        self._origin: float | None = None
        self._last_media: float | None = None
        self._early_audio: list[AudioChunk] = []

        self._conn: _Connection | None = None
        self._abandoned: list[_Connection] = []  # closing in the background; see close()
        self._lock = threading.Lock()
        self._closed = False
        self._wake = threading.Event()  # connection lost, or closing
        self._first_attempt = threading.Event()
        self._fatal: str | None = None
        self._supervisor = threading.Thread(
            target=self._supervise, name="facecast-output-connect", daemon=True
        )
        before = _file_state(self.plan)
        self._supervisor.start()
        # A file opens at once or never; a network peer gets a moment before frames drop.
        wait = self.open_timeout + 1.0 if self.plan.kind == "file" else connect_wait
        self._first_attempt.wait(wait)
        if self._fatal is not None:
            self._closed = True
            self._wake.set()
            self._supervisor.join(self.open_timeout)
            for conn in self._abandoned:  # the failed connection, closed on its worker
                conn.join(self.open_timeout)
            if before != _file_state(self.plan) and not _plays(Path(self.plan.target)):
                # a header, or nothing, that the failed open wrote: not a recording (a file
                # the open never touched is the user's, whatever it holds)
                Path(self.plan.target).unlink(missing_ok=True)
            raise MediaError(f"{self.name}: cannot write ({self._fatal})")

    # ------------------------------------------------------------------ writing

    def write(self, frame: Frame) -> None:
        """Encode and send one frame (pts from the sink's clock). Never raises for link
        trouble: a frame that cannot be sent is dropped and counted."""
        if self._closed:
            return
        now = time.monotonic()
        self._latency.append(now - frame.t_ingest)
        at = self._frame_time(frame) if self.media_time else now - self._t0
        conn = self._usable()
        if conn is None:
            self.dropped += 1
            self._raise_if_fatal()
            return
        if conn.local_port is not None:
            # what the frames before are still waiting for, now that this one is due
            self.send_queue = udp_send_queue(conn.local_port)
            self.backed_up = self.send_queue is not None and self.send_queue >= BACKLOG_BYTES
        image, _ = fit_image(frame.image, self.width, self.height)
        vf = bgr_to_video_frame(image)
        vf.pts = self._next_pts(at)
        vf.time_base = self.time_base
        if (
            self._force_key
            or conn.frames == 0
            or (self._last_key_at is not None and at - self._last_key_at >= self._keyint_s)
        ):
            # Keyframes by the clock, not by frame count, so a lowered frame rate does not
            # stretch the time a new viewer waits for a picture.
            vf.pict_type = PictureType.I
            self._force_key = False
        # Passed with every frame (the worker only acts on a change), so a connection
        # opened after a reconnect picks up the adapted rate too.
        job = conn.submit(conn.encode_video, vf, self._bit_rate)
        if not job.done.wait(self.write_timeout):
            self._lose(conn, f"a frame took more than {self.write_timeout:g} s to send")
            self.dropped += 1
            self._raise_if_fatal()
            return
        if job.error is not None:
            self._lose(conn, _describe(job.error))
            self.dropped += 1
            self._raise_if_fatal()
            return
        _, keyframe = job.result
        elapsed = time.perf_counter() - job.submitted
        self.send_seconds = elapsed
        self.send_seconds_avg += 0.1 * (elapsed - self.send_seconds_avg)
        if keyframe:
            self._last_key_at = at
        self.frames += 1
        if self._early_audio:  # media time: the audio from before this first frame
            early, self._early_audio = self._early_audio, []
            for chunk in early:
                self.write_audio(chunk)

    def _frame_time(self, frame: Frame) -> float:
        """Media time: the frame's output time, from its input timestamp. The first frame
        (or audio that came before it) is time 0."""
        t = frame.seconds
        if t is None:  # no timestamp: the next one at the frame rate
            t = 0.0 if self._last_media is None else self._last_media + 1 / float(self.fps)
        self._last_media = t
        if self._origin is None:
            self._origin = min([t, *(_chunk_time(c) for c in self._early_audio)])
        return t - self._origin

    def write_audio(self, chunk: AudioChunk) -> None:
        """Remux one audio packet onto the output timeline (dropped if it would overlap
        audio already sent, or if there is no connection)."""
        if self._closed or self._audio_params is None:
            return
        if self.media_time:
            if self._origin is None:
                # before the first frame: kept until that frame sets time 0 (bounded: an
                # input whose video never starts must not fill the memory)
                if len(self._early_audio) < MAX_EARLY_AUDIO:
                    self._early_audio.append(chunk)
                else:
                    self.audio_dropped += 1
                return
            start = _chunk_time(chunk) - self._origin
        else:
            latency = statistics.median(self._latency) if self._latency else 0.0
            start = self._audio_clock.wall_time(chunk) + latency - self._t0
        duration = float(chunk.duration * chunk.time_base) if chunk.duration else 0.0
        duration = duration or self._last_audio_duration
        self._last_audio_duration = duration
        end = self._audio_end
        if start < 0 or (end is not None and start < end - max(0.5 * duration, 0.005)):
            self.audio_dropped += 1  # before the output began, or a replay of sent audio
            return
        if end is not None and start < end:
            start = end  # a few ms early: butt it against the previous packet
        conn = self._usable()
        # a live link that backs up drops audio; a file (media time) is waited for by
        # every write() and never does
        backlog = not self.media_time and conn is not None and conn.pending > MAX_AUDIO_BACKLOG
        if conn is None or conn.audio_tb is None or backlog:
            self.audio_dropped += 1
            self._raise_if_fatal()
            return
        ticks = round(start / conn.audio_tb)
        if conn.last_audio_ticks is not None and ticks <= conn.last_audio_ticks:
            ticks = conn.last_audio_ticks + 1
        conn.last_audio_ticks = ticks
        length = round(duration / conn.audio_tb) if duration else None
        conn.submit(conn.mux_audio, chunk.data, ticks, length)
        self._audio_end = start + duration
        self.audio_packets += 1

    def set_rate(self, fps: float, bitrate: int | None) -> None:
        """Adapt to the link: the pipeline now sends ``fps`` frames a second and wants
        ``bitrate`` bits a second (None: keep the rate control as opened).

        Applied at the next frame, which is made a keyframe. FFmpeg's libx264 budgets bits
        per frame from the frame rate it was opened with (measured: at half the frame rate
        the bitrate halves), so the encoder's target is scaled by opened fps / ``fps`` to
        land on ``bitrate``. The VBV cap set at open stays: asking for more bits per frame
        than it allows gets the cap.
        """
        if fps <= 0:
            raise ValueError("fps must be positive")
        if bitrate is not None and self._encoder.bitrate is not None:
            self._bit_rate = round(bitrate * float(self._encoder.fps) / fps)
        elif bitrate is not None:
            log.info("%s: constant-quality output: bitrate %d ignored", self.name, bitrate)
        self._force_key = True

    # ------------------------------------------------------------------ connection

    def _usable(self) -> _Connection | None:
        conn = self._conn
        if conn is None:
            return None
        if conn.failed is not None:
            self._lose(conn, conn.failed)
            return None
        if conn.bridge is not None and not conn.bridge.alive():
            self._lose(conn, conn.bridge.exit_reason())
            return None
        if conn.bridge is not None and conn.bridge.calls != self._srt_calls:
            # an SRT player called in (a listener's bridge serves one after another): a
            # keyframe now, so it shows a picture at once instead of up to keyint later
            self._srt_calls = conn.bridge.calls
            self._force_key = True
        return conn

    def _lose(self, conn: _Connection, reason: str) -> None:
        conn.fail(reason)
        if not self.plan.reconnect and self._fatal is None:
            self._fatal = conn.failed or reason  # a file is never reopened: the end
        with self._lock:
            if self._conn is conn:
                self._wake.set()

    def _supervise(self) -> None:
        first = True
        while True:
            # Cleared before the check: a close() after this point leaves it set.
            self._wake.clear()
            if self._closed:
                return
            if not first:
                self.reconnects += 1
            conn = _Connection(
                self.plan, self._encoder, self._audio_params, self.mark, self.name, self._damaged
            )
            job = conn.submit(conn.open)
            done = self._wait(job, self.open_timeout)
            if done and job.error is None:
                with self._lock:
                    published = not self._closed
                    if published:
                        self._conn = conn
                if not published:
                    self._abandon(conn)
                    return
                self._set_state(True, "connected")
                self._first_attempt.set()
                self._wake.wait()
                with self._lock:
                    if self._conn is conn:
                        self._conn = None
                if self._closed:
                    return  # close() took this connection and flushes it
                reason = conn.failed or "lost"
                self._abandon(conn)
                self._set_state(False, f"lost ({reason})")
                if conn.frames:
                    self.backoff.reset()
            else:
                reason = _describe(job.error) if job.error else "no answer"
                if not done:
                    reason = f"no answer within {self.open_timeout:g} s"
                self._abandon(conn)
                if self._closed:
                    return
                if first and not self.plan.reconnect:
                    self._fatal = reason
                    self._first_attempt.set()
                    return
                self._set_state(False, f"cannot connect ({reason})")
            first = False
            self._first_attempt.set()
            if not self.plan.reconnect:
                self._fatal = self._fatal or reason
                return
            delay = self.backoff.next_delay()
            if delay is None:
                self._fatal = f"gave up after {self.backoff.attempts} attempts: {reason}"
                return
            log.info("%s: retry in %.1f s", self.name, delay)
            end = time.monotonic() + delay
            while not self._closed and time.monotonic() < end:
                time.sleep(min(0.05, max(0.0, end - time.monotonic())))

    def _damaged(self, exc: BaseException) -> None:
        """A connection's worker dropped a damaged audio packet."""
        self.audio_damaged += 1
        if self.audio_damaged <= 5 or self.audio_damaged % 1000 == 0:
            log.warning(
                "%s: dropped a damaged audio packet (%s; %d so far)",
                self.name,
                _describe(exc),
                self.audio_damaged,
            )

    def _raise_if_fatal(self) -> None:
        """The output failed for good (a file, which is never reopened, or a link whose
        reconnects are used up): the caller's run must end, not stream on into nothing."""
        if self._fatal is not None:
            raise MediaError(f"{self.name}: cannot write ({self._fatal})")

    def _wait(self, job: _Job, timeout: float) -> bool:
        """Wait for ``job`` up to ``timeout`` s, giving up early when the sink closes."""
        end = time.monotonic() + timeout
        while not job.done.wait(0.05):
            if self._closed or time.monotonic() >= end:
                return job.done.is_set()
        return True

    def _set_state(self, up: bool, what: str, level: int = logging.WARNING) -> None:
        changed = up != self.connected
        self.connected = up
        if changed:
            self.state_since = time.monotonic()
        # Only a fresh failure is a warning; retries of a known one and recoveries are info.
        if up or not changed:
            level = logging.INFO
        log.log(level, "%s: output %s", self.name, what)

    # ------------------------------------------------------------------ timing

    def _next_pts(self, at: float) -> int:
        """``at``: output seconds."""
        pts = round(at / self.time_base)
        if self._last_pts is not None and pts <= self._last_pts:
            pts = self._last_pts + 1
        self._last_pts = pts
        return pts

    # ------------------------------------------------------------------ lifetime

    def close(self, timeout: float = 5.0) -> None:
        """Flush the encoder and close the output (at most ``timeout`` s). Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            conn = self._conn
            self._conn = None
            self._wake.set()
        deadline = time.monotonic() + timeout
        self._supervisor.join(timeout)
        if conn is not None and conn.failed is None:
            if not conn.finish(timeout):
                log.warning("%s: output did not close within %g s", self.name, timeout)
        elif conn is not None:
            self._abandon(conn)
        # Connections given up on close on their own workers: waited for (within the same
        # deadline) so that no thread is still inside PyAV when the process exits.
        for old in self._abandoned:
            old.join(max(0.0, deadline - time.monotonic()))
        if self._fatal is not None and self.plan.kind == "file":
            self._drop_unplayable()
        if self.connected:
            self._set_state(False, "closed", logging.INFO)

    def _abandon(self, conn: _Connection) -> None:
        conn.abandon()
        self._abandoned = [c for c in self._abandoned if not c.join(0)]
        self._abandoned.append(conn)

    def _drop_unplayable(self) -> None:
        """A file that failed for good: what it holds is kept if it plays (a recording
        that ran for a while and then hit a full disk), removed if not (a header at most)."""
        path = Path(self.plan.target)
        if _plays(path):
            log.warning("%s: kept what was recorded before the failure", self.name)
        else:
            path.unlink(missing_ok=True)

    def __enter__(self) -> StreamSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def _file_state(plan: OutputPlan) -> tuple[int, int] | None:
    """A file output's size and mtime, None if absent (or not a file): tells whether a
    failed open wrote it."""
    if plan.kind != "file":
        return None
    try:
        st = os.stat(plan.target)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _plays(path: Path) -> bool:
    """Whether ``path`` holds at least one decodable video frame."""
    try:
        with av.open(str(path)) as container:
            return next(container.decode(video=0), None) is not None
    except (av.FFmpegError, OSError, ValueError, IndexError):
        return False


def _chunk_time(chunk: AudioChunk) -> float:
    """An audio packet's input time in seconds (the source hands on none without one)."""
    ts = chunk.pts if chunk.pts is not None else chunk.dts
    return float((ts or 0) * chunk.time_base)


def _annexb_nals(data: bytes) -> list[bytes]:
    out = []
    for chunk in data.split(b"\x00\x00\x01"):
        chunk = chunk.rstrip(b"\x00")
        if chunk:
            out.append(chunk)
    return out


def _describe(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text).split(": '", 1)[0]


__all__ = ["OutputPlan", "StreamSink", "plan_output", "udp_send_queue"]
