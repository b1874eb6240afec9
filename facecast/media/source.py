"""Reading video files with PyAV: every frame in order, as ``Frame``s, plus the audio packets.

``demux()`` hands out decoded video frames and *undecoded* audio packets in container
order, so the sink can remux the audio untouched and it stays in sync by timestamp.

Damage does not stop a file: a packet the decoder rejects, or a read error in the middle,
is counted in ``bad_packets``, logged, and skipped. Only a run of read errors with no
good packet in between ends the stream early (there is nothing left to read).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import av.container
import cv2
import numpy as np

from facecast.errors import MediaError
from facecast.media._io import open_input
from facecast.media.frame import Frame
from facecast.media.planes import BT601, ColourTags, keeps_planes

log = logging.getLogger(__name__)

# Consecutive demux errors after which the rest of the file is taken as unreadable.
MAX_CONSECUTIVE_READ_ERRORS = 32

# Display-matrix rotation (degrees counter-clockwise, as PyAV reports it) → the cv2 rotation
# that turns the stored picture upright, as ffmpeg's autorotate does.
_ROTATE = {
    90: cv2.ROTATE_90_COUNTERCLOCKWISE,
    180: cv2.ROTATE_180,
    -180: cv2.ROTATE_180,
    -90: cv2.ROTATE_90_CLOCKWISE,
    270: cv2.ROTATE_90_CLOCKWISE,
}


class VideoFileSource:
    """A video file opened for reading (context manager).

    Frames come out upright: a phone video's rotation flag is applied to the pixels, and
    ``width``/``height`` are the upright size.
    """

    def __init__(self, path: str | Path, *, threads: bool = True, autorotate: bool = True):
        self.path = Path(path)
        self.bad_packets = 0
        self.frames_decoded = 0
        self._container: av.container.InputContainer = open_input(self.path)
        try:
            if not self._container.streams.video:
                raise MediaError(f"{self.path}: no video stream (is it an audio file?)")
            self.video_stream: av.VideoStream = self._container.streams.video[0]
            if threads:
                # Frame + slice threads: several times faster on multi-core machines, and
                # frames still come out in presentation order.
                self.video_stream.thread_type = "AUTO"
            audio = self._container.streams.audio
            self.audio_stream: av.AudioStream | None = audio[0] if audio else None
            self.rotation = self._probe_rotation() if autorotate else 0
        except BaseException:
            self._container.close()
            raise

    # ------------------------------------------------------------------ properties

    @property
    def width(self) -> int:
        w, h = self.video_stream.width, self.video_stream.height
        return h if self.rotation in (90, -90, 270) else w

    @property
    def height(self) -> int:
        w, h = self.video_stream.width, self.video_stream.height
        return w if self.rotation in (90, -90, 270) else h

    @property
    def fps(self) -> Fraction:
        """Average frame rate (falls back to FFmpeg's guess, then 30)."""
        stream = self.video_stream
        for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
            if rate:
                return Fraction(rate)
        return Fraction(30)

    @property
    def time_base(self) -> Fraction:
        return Fraction(self.video_stream.time_base or Fraction(1, 90000))

    @property
    def duration(self) -> float | None:
        """Video duration in seconds: the stream's, else the container's; None if unknown."""
        stream = self.video_stream
        if stream.duration and stream.time_base:
            return float(stream.duration * stream.time_base)
        if self._container.duration:
            return self._container.duration / av.time_base
        return None

    @property
    def frame_count(self) -> int:
        """Frames in the file: the container's count, else duration × fps; 0 if unknown."""
        if self.video_stream.frames > 0:
            return self.video_stream.frames
        duration = self.duration
        return round(duration * self.fps) if duration else 0

    @property
    def colours(self) -> ColourTags:
        """What the output of this file's frames should be tagged: the stream's own colour
        tags when its frames travel as planes (see ``_to_frame``), else what OpenCV's BGR
        conversion gives (``BT601``)."""
        ctx = self.video_stream.codec_context
        return ColourTags.of(ctx) if not self.rotation and keeps_planes(ctx) else BT601

    @property
    def has_audio(self) -> bool:
        return self.audio_stream is not None

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._container.metadata)

    # ------------------------------------------------------------------ reading

    def frames(self) -> Iterator[Frame]:
        """Every decodable video frame, in presentation order."""
        for item in self._demux(with_audio=False):
            if isinstance(item, Frame):
                yield item

    def demux(self) -> Iterator[Frame | av.Packet]:
        """Decoded video ``Frame``s and raw audio ``av.Packet``s, in container order.

        Audio packets keep their own timestamps (``packet.time_base``); pass them to
        ``VideoFileSink.write_audio`` untouched. Empty flush packets are not yielded.
        Use a packet before closing the source: its ``.stream`` points into the container,
        and PyAV segfaults when that is touched after close.
        """
        return self._demux(with_audio=True)

    def _demux(self, with_audio: bool) -> Iterator[Frame | av.Packet]:
        video = self.video_stream
        streams: list[av.VideoStream | av.AudioStream] = [video]
        if with_audio and self.audio_stream is not None:
            streams.append(self.audio_stream)
        consecutive_errors = 0
        while True:
            try:
                for packet in self._container.demux(*streams):
                    consecutive_errors = 0
                    if packet.stream.index == video.index:
                        yield from self._decode(packet)
                    elif packet.size and packet.dts is not None:
                        yield packet
                return  # demux() ends after its flush packets: the decoder is drained
            except av.error.EOFError:
                break
            except av.FFmpegError as exc:
                # Retrying demux() resumes after the bad spot (FFmpeg has moved on).
                self._bad(f"read error ({exc})")
                consecutive_errors += 1
                if consecutive_errors >= MAX_CONSECUTIVE_READ_ERRORS:
                    log.warning(
                        "%s: giving up after %d read errors in a row", self.path, consecutive_errors
                    )
                    break
        yield from self._decode(None)

    def _decode(self, packet: av.Packet | None) -> Iterator[Frame]:
        try:
            decoded = self.video_stream.decode(packet)
        except av.FFmpegError as exc:
            self._bad(f"undecodable video packet ({exc})")
            return
        for vf in decoded:
            yield self._to_frame(vf)

    def _to_frame(self, vf: av.VideoFrame) -> Frame:
        time_base = Fraction(vf.time_base) if vf.time_base else self.time_base
        timing = {"index": self.frames_decoded, "pts": vf.pts, "time_base": time_base}
        if not self.rotation:
            # the decoder's planes travel if they can; BGR is made only if a stage reads it
            frame = Frame.decoded(vf, **timing)
        else:
            image = cv2.rotate(vf.to_ndarray(format="bgr24"), _ROTATE[self.rotation])
            frame = Frame(np.ascontiguousarray(image), **timing)
        self.frames_decoded += 1
        return frame

    def _bad(self, what: str) -> None:
        self.bad_packets += 1
        # One line per problem would flood the log on a badly damaged file.
        if self.bad_packets <= 10:
            log.warning("%s: skipped %s", self.path, what)
        elif self.bad_packets == 11:
            log.warning("%s: more damaged packets; counting without logging", self.path)

    def _probe_rotation(self) -> int:
        """The display rotation of the first frame, read from a separate handle."""
        try:
            with av.open(str(self.path)) as probe:
                for vf in probe.decode(video=0):
                    rotation = round(vf.rotation) if vf.rotation else 0
                    return rotation if rotation in _ROTATE else 0
        except (av.FFmpegError, OSError):
            return 0
        return 0

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoFileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
