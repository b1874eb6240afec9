"""Live outputs: H.264 (libx264) plus the input's audio, remuxed, to RTMP, UDP, RTP, SRT or a
file, reconnecting in the background when the link fails.

Where the code for each part lives: output_plan (how each kind of output is opened),
output_connection (one attempt at the output on its own worker thread: "Blocking", "Damaged
audio") and output_clock (the output timeline: "Timing", "Audio sync", "Media time").

Failing for good. A file is never reopened (that would overwrite it), and a link whose
``Backoff`` attempts are used up is not retried: from then on ``write()`` and
``write_audio()`` raise ``MediaError``, so the run ends with the reason instead of
streaming on into nothing. A file that failed is kept if what it holds plays (a recording
that ran for a while, then hit a full disk: see ``_MP4`` in output_plan), removed if not
(a header at most).

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
"""

from __future__ import annotations

import logging
import os
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
from av.video.frame import PictureType

from facecast.errors import MediaError
from facecast.media.audio_params import AudioParams
from facecast.media.backoff import Backoff
from facecast.media.frame import AudioChunk, Frame
from facecast.media.link_state import OutputState
from facecast.media.live_errors import describe
from facecast.media.output_clock import OutputClock
from facecast.media.output_connection import Connection, EncoderSettings, Job, udp_send_queue
from facecast.media.output_plan import OutputPlan, plan_output
from facecast.media.planes import BT601, ColourTags
from facecast.media.srt_bridge import check_srt_endpoint
from facecast.media.urls import redact
from facecast.media.video_encode import encoder_frame

log = logging.getLogger(__name__)

MAX_AUDIO_BACKLOG = 64  # audio jobs waiting on a slow connection before audio is dropped
# A UDP output whose send queue holds this much when the next frame is due is backed up
# (see "Backlog"): ~4 datagrams as the kernel counts them (each costs its buffer's size,
# ~2.3 kB for 1316 bytes), where a link that keeps up leaves none.
BACKLOG_BYTES = 8192
BITS_PER_PIXEL = 0.1  # default VBV cap for capped CRF: ~0.7 Mb/s at 360p30, 2.8 Mb/s at 720p30

# By its name from before the split: tests/test_live_media.py patches _Connection.
_Connection = Connection


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


class StreamSink(OutputState):
    """A live output (see the module docstring). Call its methods from one thread.

    State for metrics and the pipeline: ``connected``, ``state_since``, ``reconnects``,
    ``frames`` (written), ``dropped`` (frames not sent: no connection, or it failed),
    ``audio_packets``, ``audio_dropped``, ``audio_damaged`` (dropped as damaged: see
    "Damaged audio" in output_connection), ``send_seconds`` (the last frame's encode + mux
    time as ``write()`` saw it; ``send_seconds_avg`` smooths it: rising towards the frame
    interval means the link is backing up), and for UDP ``send_queue`` (bytes still queued
    on this host when the last frame was due, None if unknown) and ``backed_up`` (see
    "Backlog").
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
        colours: ColourTags = BT601,
    ):
        """``media_time``: the input is a file read as fast as it decodes, not a live
        signal, so the output keeps the input's own timestamps (relative to its start)
        instead of the clock at ``write()``; see "Media time" in output_clock.
        ``colours``: the output's colour tags, the first frame's (``Frame.colours``): frames
        with planes so tagged go to the encoder as they are, others are converted."""
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
        self._encoder = EncoderSettings(
            self.width,
            self.height,
            rate,
            self.time_base,
            preset,
            tune,
            keyint,
            bitrate,
            maxrate,
            colours,
        )
        self._keyint_s = keyint / float(rate)
        self._audio_params = audio if self.plan.audio else None
        if audio is not None and not self.plan.audio:
            log.info("%s: %s carries video only; audio is not sent", self.name, self.plan.kind)
        self.mark = mark
        self.media_time = media_time
        self.backoff = backoff or Backoff()
        self.open_timeout, self.write_timeout = open_timeout, write_timeout

        super().__init__()  # connected, state_since, reconnects, frames, dropped, send_seconds
        self.audio_packets = 0
        self.audio_dropped = 0
        self.audio_damaged = 0
        self.send_seconds_avg = 0.0
        self.send_queue: int | None = None
        self.backed_up = False

        self._clock = OutputClock(self.time_base, rate, media_time)  # output time 0: now
        self._last_key_at: float | None = None
        self._force_key = False
        self._srt_calls = 0  # SRT players the bridge has taken (see _usable)
        self._bit_rate: int | None = None  # the encoder's target after set_rate()

        self._conn: Connection | None = None
        self._abandoned: list[Connection] = []  # closing in the background; see close()
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
        at = self._clock.frame_time(frame, time.monotonic())
        conn = self._usable()
        if conn is None:
            self.dropped += 1
            self._raise_if_fatal()
            return
        if conn.local_port is not None:
            # what the frames before are still waiting for, now that this one is due
            self.send_queue = udp_send_queue(conn.local_port)
            self.backed_up = self.send_queue is not None and self.send_queue >= BACKLOG_BYTES
        vf = encoder_frame(frame, self.width, self.height, self._encoder.colours)
        vf.pts = self._clock.next_pts(at)
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
            self._lose(conn, describe(job.error))
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
        for chunk in self._clock.take_held():  # media time: the audio from before this frame
            self.write_audio(chunk)

    def write_audio(self, chunk: AudioChunk) -> None:
        """Remux one audio packet onto the output timeline (dropped if it would overlap
        audio already sent, or if there is no connection)."""
        if self._closed or self._audio_params is None:
            return
        if self._clock.before_first_frame:
            # kept until the first frame sets time 0 (bounded: see OutputClock.hold)
            if not self._clock.hold(chunk):
                self.audio_dropped += 1
            return
        span = self._clock.audio_span(chunk)
        if span is None:
            self.audio_dropped += 1  # before the output began, or a replay of sent audio
            return
        start, duration = span
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
        self._clock.audio_written(start, duration)
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

    def _usable(self) -> Connection | None:
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

    def _lose(self, conn: Connection, reason: str) -> None:
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
            conn = Connection(
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
                reason = describe(job.error) if job.error else "no answer"
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
                describe(exc),
                self.audio_damaged,
            )

    def _raise_if_fatal(self) -> None:
        """The output failed for good (a file, which is never reopened, or a link whose
        reconnects are used up): the caller's run must end, not stream on into nothing."""
        if self._fatal is not None:
            raise MediaError(f"{self.name}: cannot write ({self._fatal})")

    def _wait(self, job: Job, timeout: float) -> bool:
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

    def _abandon(self, conn: Connection) -> None:
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


__all__ = ["OutputPlan", "StreamSink", "output_geometry", "plan_output", "udp_send_queue"]
