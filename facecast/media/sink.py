"""Writing video files: H.264 by default (x265 or VP9 on request), the input's audio remuxed,
the mark in the tags.

Timing is copied, not invented: the encoder works in the source's time base and every
frame keeps its pts, so the output has the input's frame count, duration and audio sync
(variable frame rate included). The output is written under a temporary name and renamed
on a clean close, so a failed run never leaves a truncated file behind.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.container
import numpy as np

from facecast.errors import MediaError
from facecast.media.frame import Frame
from facecast.media.mark import MARK_KEY, make_mark, sei_text
from facecast.media.planes import BT601, ColourTags
from facecast.media.source import VideoFileSource
from facecast.media.video_encode import SeiMarker, encoder_frame, fit_image

log = logging.getLogger(__name__)


_AAC_LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1", 8: "7.1"}  # anything else: downmix

_MOV_FAMILY = {"mp4", "mov", "m4v", "3gp", "3g2"}

# The encoders a video file can be written with (--output-video-encoder), each with its
# constant-quality scale. All three come with PyAV's own FFmpeg build.
VIDEO_ENCODERS = {"libx264": 51, "libx265": 51, "libvpx-vp9": 63}
X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
)


@dataclass(frozen=True)
class VideoQuality:
    """How a video file is encoded: the encoder, its constant-quality value (lower is
    better; None: the encoder's sensible default) and its speed preset (x264 names; VP9
    gets the matching ``cpu-used``)."""

    encoder: str = "libx264"
    crf: float | None = None
    preset: str = "veryfast"

    def __post_init__(self) -> None:
        if self.encoder not in VIDEO_ENCODERS:
            raise MediaError(
                f"video encoder {self.encoder!r}: use one of {', '.join(VIDEO_ENCODERS)}"
            )
        top = VIDEO_ENCODERS[self.encoder]
        if self.crf is not None and not 0 <= self.crf <= top:
            raise MediaError(f"crf {self.crf:g}: {self.encoder} takes 0 (best) to {top}")
        if self.preset not in X264_PRESETS:
            raise MediaError(f"preset {self.preset!r}: use one of {', '.join(X264_PRESETS)}")
        try:
            av.codec.Codec(self.encoder, "w")
        except (av.FFmpegError, ValueError) as exc:  # an FFmpeg built without it
            raise MediaError(f"video encoder {self.encoder} is not in this FFmpeg build") from exc

    def codec_options(self) -> dict[str, str]:
        """The encoder's own options for this quality and speed."""
        if self.encoder == "libvpx-vp9":
            # constant quality needs b:v 0; cpu-used 8 (fastest) .. 0 (slowest) mirrors the
            # x264 preset ladder
            crf = 32 if self.crf is None else self.crf
            cpu_used = 8 - X264_PRESETS.index(self.preset)
            return {"crf": f"{crf:g}", "b": "0", "deadline": "good", "cpu-used": str(cpu_used)}
        # x264 and x265 share presets and crf; 20 and 24 look alike (x265 is ~50 % smaller)
        crf = (20 if self.encoder == "libx264" else 24) if self.crf is None else self.crf
        options = {"preset": self.preset, "crf": f"{crf:g}"}
        if self.encoder == "libx265":
            options["x265-params"] = "log-level=error"  # x265 prints its banner otherwise
        return options


class VideoFileSink:
    """An output video file (context manager). Exiting on an exception discards the file."""

    def __init__(
        self,
        path: str | Path,
        *,
        width: int,
        height: int,
        fps: Fraction,
        time_base: Fraction | None = None,
        audio_template: av.AudioStream | None = None,
        mark: dict[str, str] | None = None,
        quality: VideoQuality | None = None,
        tune: str | None = None,
        keyint: int | None = None,
        faststart: bool = True,
        sample_aspect_ratio: Fraction | None = None,
        colours: ColourTags = BT601,
    ):
        """``colours``: how the output's YUV is to be read; frames whose planes carry these
        tags go to the encoder as they are, others as BGR converted by OpenCV, so give
        anything but ``BT601`` only when the frames will come with such planes."""
        self.path = Path(path)
        self.fps = Fraction(fps)
        self.colours = colours
        # Even sizes: 4:2:0 chroma needs them; an odd last row/column is cropped off.
        self.width, self.height = width - width % 2, height - height % 2
        if self.width < 2 or self.height < 2:
            raise MediaError(f"{self.path}: cannot encode a {width}x{height} video")
        self.time_base = Fraction(time_base) if time_base else 1 / self.fps
        self.frames_written = 0
        self.audio_packets_written = 0
        self.retimed_frames = 0
        self._last_pts: int | None = None
        self._warned_resize = False
        self._closed = False
        self._audio_reencode = False

        suffix = self.path.suffix.lower()
        self._tmp = self.path.with_name(f".{self.path.stem}.{uuid.uuid4().hex[:12]}{suffix}")
        try:
            self._container: av.container.OutputContainer = av.open(
                str(self._tmp), mode="w", options=self._muxer_options(suffix, faststart)
            )
        except ValueError as exc:  # PyAV: "Could not determine output format"
            raise MediaError(
                f"{self.path}: unknown video format {suffix or '(no suffix)'}; use .mp4 or .mkv"
            ) from exc
        except (av.FFmpegError, OSError) as exc:
            raise MediaError(f"{self.path}: cannot create output ({exc})") from exc
        try:
            self._setup(
                quality or VideoQuality(), tune, keyint, sample_aspect_ratio, mark, audio_template
            )
        except BaseException:
            self._discard()
            raise

    @classmethod
    def for_source(
        cls, path: str | Path, source: VideoFileSource, **kwargs: object
    ) -> VideoFileSink:
        """A sink matching ``source``: same size, rate, time base, and its audio stream."""
        sar = source.video_stream.sample_aspect_ratio
        if source.rotation in (90, -90, 270) and sar:
            sar = 1 / sar
        return cls(
            path,
            width=source.width,
            height=source.height,
            fps=source.fps,
            time_base=source.time_base,
            audio_template=source.audio_stream,
            sample_aspect_ratio=sar,
            colours=source.colours,
            **kwargs,  # type: ignore[arg-type]
        )

    @staticmethod
    def _muxer_options(suffix: str, faststart: bool) -> dict[str, str]:
        if suffix.lstrip(".") not in _MOV_FAMILY:
            return {}
        # use_metadata_tags: without it the mp4 muxer silently drops every tag it has no
        # atom for, our "facecast" key included. faststart: the index goes up front so the
        # file plays while downloading (costs one rewrite at close).
        flags = "+use_metadata_tags" + ("+faststart" if faststart else "")
        return {"movflags": flags}

    def _setup(
        self,
        quality: VideoQuality,
        tune: str | None,
        keyint: int | None,
        sample_aspect_ratio: Fraction | None,
        mark: dict[str, str] | None,
        audio_template: av.AudioStream | None,
    ) -> None:
        out = self._container
        codec = quality.encoder
        if codec not in out.supported_codecs:
            raise MediaError(
                f"{self.path}: the {out.format.name} format cannot hold {codec} video; "
                "use .mp4 or .mkv"
            )
        options = quality.codec_options()
        if tune:
            options["tune"] = tune
        if codec == "libx264" and mark and sei_text(mark) is not None:
            options = SeiMarker.encoder_options(options)
        try:
            stream = out.add_stream(codec, rate=self.fps, options=options)
        except (av.FFmpegError, ValueError) as exc:
            raise MediaError(f"{self.path}: encoder {codec} is not available ({exc})") from exc
        stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
        stream.time_base = self.time_base  # a hint: mp4 keeps it, mkv rounds to 1/1000
        ctx = stream.codec_context
        ctx.time_base = self.time_base
        self.colours.tag(ctx)
        if keyint:
            ctx.gop_size = int(keyint)
        if sample_aspect_ratio:
            ctx.sample_aspect_ratio = sample_aspect_ratio
        self._video = stream
        self._sei = SeiMarker.for_stream(out, stream, mark)

        if mark:
            for key, value in mark.items():
                out.metadata[key] = value
            # ``comment`` is the one free-text tag every muxer and player keeps and shows.
            if MARK_KEY in mark and "comment" not in mark:
                out.metadata["comment"] = mark[MARK_KEY]

        self._audio: av.AudioStream | None = None
        if audio_template is not None:
            self._audio = self._add_audio(audio_template)

    def _add_audio(self, template: av.AudioStream) -> av.AudioStream:
        out = self._container
        name = template.codec_context.name
        if name in out.supported_codecs:
            return out.add_stream_from_template(template)
        # The one case audio is re-encoded: the output format cannot carry the codec.
        log.warning(
            "%s: %s audio cannot go in %s; re-encoding it to AAC", self.path, name, out.format.name
        )
        self._audio_reencode = True
        stream = out.add_stream("aac", rate=template.sample_rate)
        channels = template.layout.nb_channels
        # A standard layout for the channel count: PCM from Matroska/WAV often has an
        # unordered "2 channels" layout, which the AAC encoder refuses outright.
        stream.layout = _AAC_LAYOUTS.get(channels, "stereo")
        # Set explicitly: otherwise PyAV takes the first frame's sample format (u8, s16...)
        # which AAC rejects; with it, PyAV resamples each frame to planar float.
        stream.format = "fltp"
        return stream

    # ------------------------------------------------------------------ writing

    def write(self, frame: Frame) -> None:
        """Encode one frame, keeping its timestamp (rescaled if its time base differs)."""
        vf = encoder_frame(frame, self.width, self.height, self.colours, self._fit)
        vf.pts = self._next_pts(frame)
        vf.time_base = self.time_base
        self._mux(self._encoded(self._video.encode(vf)))
        self.frames_written += 1

    def write_audio(self, packet: av.Packet) -> None:
        """Remux one audio packet from the source (its timestamps are rescaled, not changed)."""
        if self._audio is None:
            return
        if self._audio_reencode:
            try:
                decoded = packet.decode()
            except av.FFmpegError as exc:
                log.warning("%s: dropped an undecodable audio packet (%s)", self.path, exc)
                return
            # The decoder is never flushed at the end: the codecs that land here (PCM
            # variants, WavPack, TTA) hold no samples back.
            for audio_frame in decoded:
                self._mux(self._audio.encode(audio_frame))
        else:
            packet.stream = self._audio
            self._mux([packet])
        self.audio_packets_written += 1

    def _fit(self, image: np.ndarray) -> np.ndarray:
        fitted, scaled = fit_image(image, self.width, self.height)
        if scaled and not self._warned_resize:
            h, w = image.shape[:2]
            log.warning(
                "%s: frame size changed to %dx%d; scaling to %dx%d",
                self.path,
                w,
                h,
                self.width,
                self.height,
            )
            self._warned_resize = True
        return fitted

    def _next_pts(self, frame: Frame) -> int:
        if frame.pts is None:
            # No timestamp (a generated frame): continue at the nominal frame rate.
            step = max(1, round(1 / (self.fps * self.time_base)))
            pts = 0 if self._last_pts is None else self._last_pts + step
        elif frame.time_base is None or frame.time_base == self.time_base:
            pts = frame.pts
        else:
            pts = round(frame.pts * frame.time_base / self.time_base)
        if self._last_pts is not None and pts <= self._last_pts:
            # Duplicate or backwards pts from a damaged input: the encoder needs strictly
            # increasing ones; nudging by one tick keeps the frame instead of dropping it.
            pts = self._last_pts + 1
            self.retimed_frames += 1
        self._last_pts = pts
        return pts

    def _encoded(self, packets: list[av.Packet]) -> list[av.Packet]:
        """Video packets from the encoder, the in-band mark added to keyframes."""
        if self._sei is None or not packets:
            return packets
        try:
            return self._sei.apply(packets)
        except av.FFmpegError as exc:
            raise MediaError(f"{self.path}: cannot mark the video ({exc})") from exc

    def _mux(self, packets: list[av.Packet]) -> None:
        if not packets:
            return
        try:
            self._container.mux(packets)
        except av.FFmpegError as exc:
            raise MediaError(f"{self.path}: cannot write video ({exc})") from exc

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Flush the encoders, finish the file and move it to its final name."""
        if self._closed:
            return
        try:
            self._mux(self._encoded(self._video.encode(None)))
            if self._audio is not None and self._audio_reencode:
                self._mux(self._audio.encode(None))
            self._container.close()
        except BaseException:
            self._discard()
            raise
        self._closed = True
        try:
            self._tmp.replace(self.path)
        except OSError as exc:
            self._tmp.unlink(missing_ok=True)
            raise MediaError(f"{self.path}: cannot write ({exc.strerror or exc})") from exc

    def _discard(self) -> None:
        self._closed = True
        # Unlinked first: the trailer then goes into a file that is already gone, and
        # faststart's second pass (a copy of the whole file, seconds for a long one) fails
        # at once when it reopens the name, so a stopped run ends promptly. A failure to
        # finish a file that is being thrown away does not matter.
        self._tmp.unlink(missing_ok=True)
        with contextlib.suppress(av.FFmpegError, OSError):
            self._container.close()

    def __enter__(self) -> VideoFileSink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            self._discard()


# ---------------------------------------------------------------------- file → file


@dataclass
class TranscodeStats:
    """Seconds spent per stage over a whole file, for per-frame reporting."""

    frames: int = 0
    audio_packets: int = 0
    bad_packets: int = 0
    decode_s: float = 0.0  # demux + decode + YUV→BGR
    process_s: float = 0.0  # the caller's function
    encode_s: float = 0.0  # BGR→YUV + encode + mux, flush included
    wall_s: float = 0.0

    def ms_per_frame(self, stage: str) -> float:
        seconds: float = getattr(self, f"{stage}_s")
        return 1000.0 * seconds / self.frames if self.frames else 0.0


def transcode(
    src_path: str | Path,
    dst_path: str | Path,
    process: Callable[[Frame], np.ndarray | None],
    progress: Callable[[int], None] | None = None,
    mark: dict[str, str] | None = None,
    **sink_options: object,
) -> TranscodeStats:
    """Decode every frame of ``src_path``, run ``process`` on it, encode to ``dst_path``.

    ``process`` returns the new image (or None after editing ``frame.image`` in place).
    Frames are handled one at a time in order, nothing is dropped; audio is remuxed.
    ``progress`` gets the number of frames done after each one. ``mark`` defaults to
    ``make_mark()``; ``sink_options`` go to ``VideoFileSink`` (quality, keyint, ...).
    """
    stats = TranscodeStats()
    start = time.perf_counter()
    clock = time.perf_counter
    with VideoFileSource(src_path) as source:
        with VideoFileSink.for_source(
            dst_path, source, mark=mark if mark is not None else make_mark(), **sink_options
        ) as sink:
            items = source.demux()
            while True:
                t0 = clock()
                item = next(items, None)
                t1 = clock()
                stats.decode_s += t1 - t0
                if item is None:
                    break
                if isinstance(item, av.Packet):
                    sink.write_audio(item)
                    stats.encode_s += clock() - t1
                    continue
                result = process(item)
                if result is not None:
                    item.image = result
                t2 = clock()
                sink.write(item)
                t3 = clock()
                stats.process_s += t2 - t1
                stats.encode_s += t3 - t2
                stats.frames += 1
                if progress is not None:
                    progress(stats.frames)
            if stats.frames == 0:
                raise MediaError(f"{source.path}: no video frame could be decoded")
            t4 = clock()
            sink.close()
            stats.encode_s += clock() - t4
        stats.audio_packets = sink.audio_packets_written
        stats.bad_packets = source.bad_packets
    stats.wall_s = clock() - start
    return stats
