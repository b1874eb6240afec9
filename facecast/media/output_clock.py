"""A live output's timeline (``OutputClock``): the output time of each video frame and audio
packet a ``StreamSink`` writes.

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
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from fractions import Fraction

from facecast.media.frame import AudioChunk, Frame

MAX_EARLY_AUDIO = 512  # media time: audio packets kept until the first frame (~10 s of AAC)
AUDIO_WINDOW_S = 2.0
AUDIO_JUMP_S = 1.0


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


class OutputClock:
    """Output seconds and pts for one live output (see the module docstring). ``t0``, the
    monotonic time of output time 0, is when the clock is made."""

    def __init__(self, time_base: Fraction, fps: Fraction, media_time: bool) -> None:
        self.time_base, self.fps, self.media_time = time_base, fps, media_time
        self.t0 = time.monotonic()  # output time 0
        self._last_pts: int | None = None
        self._latency: deque[float] = deque(maxlen=15)
        self._audio_clock = _AudioClock()
        self._audio_end: float | None = None  # output seconds where written audio ends
        self._last_audio_duration = 0.0
        # media time: the input time that is output time 0 (set by the first frame), the
        # last frame's input time, and the audio that came before the first frame
        self._origin: float | None = None
        self._last_media: float | None = None
        self._early_audio: list[AudioChunk] = []

    # ------------------------------------------------------------------ video

    def frame_time(self, frame: Frame, now: float) -> float:
        """``frame``'s output seconds, written at monotonic time ``now``."""
        self._latency.append(now - frame.t_ingest)
        return self._media_frame_time(frame) if self.media_time else now - self.t0

    def _media_frame_time(self, frame: Frame) -> float:
        """Media time: the frame's output time, from its input timestamp. The first frame
        (or audio that came before it) is time 0."""
        t = frame.seconds
        if t is None:  # no timestamp: the next one at the frame rate
            t = 0.0 if self._last_media is None else self._last_media + 1 / float(self.fps)
        self._last_media = t
        if self._origin is None:
            self._origin = min([t, *(chunk_time(c) for c in self._early_audio)])
        return t - self._origin

    def next_pts(self, at: float) -> int:
        """The pts for output seconds ``at``, nudged to stay strictly increasing."""
        pts = round(at / self.time_base)
        if self._last_pts is not None and pts <= self._last_pts:
            pts = self._last_pts + 1
        self._last_pts = pts
        return pts

    # ------------------------------------------------------------------ audio

    @property
    def before_first_frame(self) -> bool:
        """Media time, and no frame yet: audio cannot be placed until one sets time 0."""
        return self.media_time and self._origin is None

    def hold(self, chunk: AudioChunk) -> bool:
        """Keep ``chunk`` until the first frame sets time 0 (see ``before_first_frame``);
        False when too many wait already (an input whose video never starts must not fill
        the memory)."""
        if len(self._early_audio) >= MAX_EARLY_AUDIO:
            return False
        self._early_audio.append(chunk)
        return True

    def take_held(self) -> list[AudioChunk]:
        """The audio held before the first frame (now placeable), handed over once."""
        held, self._early_audio = self._early_audio, []
        return held

    def audio_span(self, chunk: AudioChunk) -> tuple[float, float] | None:
        """Where ``chunk`` goes: (start, duration) in output seconds, a start a few ms early
        moved up against the audio already written; None when it falls before the output
        began or would replay audio already written."""
        if self.media_time:
            assert self._origin is not None, "audio before the first frame is held, not placed"
            start = chunk_time(chunk) - self._origin
        else:
            latency = statistics.median(self._latency) if self._latency else 0.0
            start = self._audio_clock.wall_time(chunk) + latency - self.t0
        duration = float(chunk.duration * chunk.time_base) if chunk.duration else 0.0
        duration = duration or self._last_audio_duration
        self._last_audio_duration = duration
        end = self._audio_end
        if start < 0 or (end is not None and start < end - max(0.5 * duration, 0.005)):
            return None
        if end is not None and start < end:
            start = end  # a few ms early: butt it against the previous packet
        return start, duration

    def audio_written(self, start: float, duration: float) -> None:
        """``chunk`` placed by ``audio_span`` went out: later audio must not overlap it."""
        self._audio_end = start + duration


def chunk_time(chunk: AudioChunk) -> float:
    """An audio packet's input time in seconds (the source hands on none without one)."""
    ts = chunk.pts if chunk.pts is not None else chunk.dts
    return float((ts or 0) * chunk.time_base)


__all__ = ["OutputClock", "chunk_time"]
