"""Live inputs: a self-healing reader for RTMP, UDP/RTP, HLS, SRT, V4L2 cameras and files.

``StreamSource(url).items(stop)`` yields decoded video ``Frame``s and compressed audio
``AudioChunk``s for as long as ``stop`` is clear, reconnecting (with ``Backoff``) whenever
the input cannot be opened, fails, ends, or stalls.

Threading. All PyAV work (open, demux, decode, close) happens on one reader thread per
``items()`` call, which owns the container for its whole life: PyAV cannot safely close a
container from another thread, and a container whose read was interrupted is dead (its
AVIOContext keeps the error; every later read fails at once), so a read cannot be cut short
on demand and then resumed. The reader hands items to the consumer through a small buffer;
the consumer waits on it in 0.1 s steps, so ``stop`` ends the iteration within ~0.1 s while
the reader finishes its current call (at most ``open_timeout`` or ``stall_timeout``) and
cleans up after itself.

What bounds each blocking call (measured with PyAV 18.1 / FFmpeg 8, see docs/live-media.md):

- PyAV's ``av.open(..., timeout=(open_s, read_s))`` installs an interrupt callback checked
  by every protocol's poll loop: ``open_s`` bounds ``avformat_open_input`` and (again)
  ``avformat_find_stream_info``; ``read_s`` bounds each ``av_read_frame``. This is the
  heartbeat: ``read_s = stall_timeout``, so a reader whose publisher went away while the
  server (nginx-rtmp) keeps the session open gets ``ExitError`` after ``stall_timeout``.
- Protocol options are backstops, one second later (see input_plan, which also says how
  the probe is bounded).
- A stalled stream that still sends packets (audio only, garbage) is caught by the frame
  clock: no decoded video frame for ``stall_timeout`` seconds means reconnect.

Retry cadence. A failed open is either "down" (connection refused, a host name that does not
resolve, a timeout, anything unknown): ``Backoff``'s exponential delays, so a server that is
down or restarting is not hammered by every reader; or "absent": the server answered that
nothing is published there (nginx-rtmp refusing the play of a key, an HLS 404), or a
listening input (UDP, RTP) heard nothing for ``open_timeout``. An absent input is looked at
again within ``ABSENT_POLL_S`` (jittered), however long it has been away, so a returning
publisher's stream is back within that plus its next keyframe instead of a grown backoff
(up to 10 s) later. The cost: one short session per second at a server that is up anyway
(nginx-rtmp logs a "stream not found" line for each). Repeated failures are logged once per
reason, then as a "still waiting" summary every ``WAITING_SUMMARY_S``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import av
import av.container

from facecast.errors import MediaError
from facecast.media._io import open_input
from facecast.media.audio_params import AudioParams
from facecast.media.backoff import Backoff
from facecast.media.frame import AudioChunk, Frame
from facecast.media.handoff import Halted, Handoff, sleep_unless_halted
from facecast.media.input_plan import LISTENING_KINDS, InputPlan, plan_input
from facecast.media.input_session import END, LOOP, Session, SessionReader, stream_fps
from facecast.media.link_state import InputState
from facecast.media.live_errors import OpenFailed, explain_open
from facecast.media.srt_bridge import (
    Bridge,
    check_srt_endpoint,
    check_srt_options,
    srt_listens,
)
from facecast.media.srt_input import SrtInputBridges
from facecast.media.urls import free_udp_port, redact, with_query

log = logging.getLogger(__name__)

BUFFER_ITEMS = 64  # reader → consumer: ~1 s of video plus its audio
# Longest wait between looks at an input that is up but has nothing to give yet (a key nobody
# publishes on, a UDP port nobody sends to): see "Retry cadence" in the module docstring.
ABSENT_POLL_S = 1.0
WAITING_SUMMARY_S = 15.0  # while an input stays down: one "still waiting" line this often

# By their names from before the split: tests/test_reconnect.py builds a _Handoff, raises
# _OpenFailed, and replaces _sleep (the wait between attempts, see _wait_retry) to record
# the waits.
_Handoff, _OpenFailed, _sleep = Handoff, OpenFailed, sleep_unless_halted


class StreamSource(SessionReader, InputState):
    """A self-healing live input. See the module docstring for what bounds each wait.

    Read-only state, safe to read from any thread: ``connected``, ``state_since``
    (monotonic time of the last change), ``reconnects`` (connection attempts after the
    first), ``bad_packets`` (read errors and undecodable packets skipped), ``frames``,
    ``audio_chunks``,
    ``dropped`` (frames discarded because the consumer fell behind a live input),
    ``last_frame_at`` (monotonic), ``width``/``height``/``fps`` of the current stream, and
    ``audio_params()``.
    """

    def __init__(
        self,
        url: str,
        *,
        realtime: bool = False,
        stall_timeout: float = 5.0,
        open_timeout: float = 5.0,
        backoff: Backoff | None = None,
        loop_file: bool = False,
        keep_all: bool = False,
    ):
        if stall_timeout <= 0 or open_timeout <= 0:
            raise ValueError("stall_timeout and open_timeout must be positive")
        self.url = str(url)
        self.name = redact(self.url)
        self.realtime = realtime
        self.loop_file = loop_file
        # a live input's frames are dropped, newest wins, when the consumer falls behind;
        # keep_all: never (a measurement must see every frame, bursts included)
        self.keep_all = keep_all
        self.stall_timeout = float(stall_timeout)
        self.open_timeout = float(open_timeout)
        self.backoff = backoff or Backoff()
        self.plan = plan_input(self.url, open_timeout=open_timeout, stall_timeout=stall_timeout)
        if self.plan.kind == "file":
            # A file that cannot be read (missing, corrupt, no video) will not become
            # readable by retrying: said now, in words, instead of retried forever.
            with open_input(self.plan.target) as probe:
                if not probe.streams.video:
                    raise MediaError(f"{self.plan.target}: no video stream")
        if self.plan.kind == "srt":
            check_srt_endpoint(self.url)  # a listener's port in use: said now, in words

        super().__init__()  # connected, state_since, reconnects, frames, fps, size, ...
        self.bad_packets = 0
        self.audio_chunks = 0
        self._audio: AudioParams | None = None
        self._handoff: Handoff | None = None
        self._reader: threading.Thread | None = None
        self._halt = threading.Event()
        self._last_failure = ""
        self._news = False  # the last failure was logged as news (not a repeat)
        self._ever_connected = False
        self._down_since: float | None = None  # monotonic; None while up (or never tried)
        self._down_attempts = 0  # failed attempts since then
        self._next_summary = 0.0  # when the next "still waiting" line is due
        self.bridge_pid: int | None = None  # the SRT bridge of the current connection
        self._srt = SrtInputBridges(self.url, self.open_timeout, self.stall_timeout)

    # ------------------------------------------------------------------ public

    @property
    def live(self) -> bool:
        return self.plan.live

    @property
    def dropped(self) -> int:
        return self._handoff.dropped if self._handoff else 0

    def audio_params(self) -> AudioParams | None:
        """The current (or last) input's audio, or None if it has none (or none yet)."""
        return self._audio

    def items(self, stop: threading.Event) -> Iterator[Frame | AudioChunk]:
        """Decoded video frames and compressed audio chunks until ``stop`` is set (or a
        file ends, without ``loop_file``; or ``backoff.max_attempts`` is used up).

        Never raises for input trouble: it reconnects. Ends within ~0.1 s of ``stop``.
        """
        # A previous iteration's reader may still be finishing a bounded call.
        self.join(self.reader_linger)
        self._halt = halt = threading.Event()
        drop = (self.plan.live or self.realtime) and not self.keep_all
        self._handoff = handoff = Handoff(BUFFER_ITEMS, drop=drop)

        def halted() -> bool:
            return stop.is_set() or halt.is_set()

        self._reader = threading.Thread(
            target=self._read_loop, args=(halted, handoff), name="facecast-input", daemon=True
        )
        self._reader.start()
        try:
            while not stop.is_set():
                item = handoff.get(0.1)
                if item is not None:
                    yield item
                elif handoff.finished:
                    break
        finally:
            halt.set()
            handoff.close()

    @property
    def reader_linger(self) -> float:
        """The longest the reader thread can take to notice a stop: PyAV applies the open
        timeout to ``avformat_open_input`` and again to ``avformat_find_stream_info``, and
        the read timeout to each read."""
        return 2 * self.open_timeout + self.stall_timeout + 1.0

    def join(self, timeout: float) -> bool:
        """Stop the reader of an ended iteration and wait up to ``timeout`` s for it to
        close its input; True once it has."""
        self._halt.set()
        reader = self._reader
        if reader is None:
            return True
        reader.join(timeout)
        return not reader.is_alive()

    def close(self, timeout: float | None = None) -> bool:
        """Like ``join``, waiting at most ``reader_linger`` by default."""
        return self.join(self.reader_linger if timeout is None else timeout)

    # ------------------------------------------------------------------ reader thread

    def _read_loop(self, halted: Halted, handoff: Handoff) -> None:
        attempts = 0
        try:
            while not halted():
                if attempts:
                    self.reconnects += 1
                attempts += 1
                try:
                    session = self._open(halted)
                except OpenFailed as exc:
                    if halted():
                        return
                    self._set_down(str(exc) if exc.absent else f"cannot connect ({exc})")
                    if not self._wait_retry(halted, absent=exc.absent):
                        return
                    continue
                self._set_up(session)
                try:
                    reason = self._pump(session, halted, handoff)
                finally:
                    session.close()
                if reason is None or halted():
                    return
                if reason is LOOP:
                    attempts = 0  # a loop of a file is not a reconnect
                    continue
                self._set_down(f"lost ({reason})")
                if session.frames and reason != END:
                    # It worked: retry quickly. Not after a clean end, though: an HLS
                    # playlist that ended replays its newest segment on every reopen.
                    self.backoff.reset()
                if not self._wait_retry(halted):
                    return
        except Exception:  # a bug, not input trouble: say so once, end the iteration
            log.exception("%s: input reader failed", self.name)
        finally:
            if self.connected:
                self.connected = False
                self.state_since = time.monotonic()
            self._srt.stop_listening()  # an SRT listener stops listening with its reader
            handoff.finish()
            # the last thing this thread does: its container is closed (see join())
            log.debug("%s: input reader done", self.name)

    def _open(self, halted: Halted) -> Session:
        plan = self.plan
        bridge = None
        keep, call = False, 0  # an SRT listener's bridge is kept (see SrtInputBridges)
        if plan.bridge:
            plan, bridge, keep, call = self._srt.attempt(halted)
        # Files cannot block; everything else gets the interrupt-callback bounds.
        timeout = (self.open_timeout, self.stall_timeout) if plan.live else None
        started = time.monotonic()
        try:
            container = av.open(
                plan.target, mode="r", format=plan.format, options=plan.options, timeout=timeout
            )
        except (av.FFmpegError, OSError, ValueError) as exc:
            # The interrupt callback fired (RTMP reports it as EIO, not ExitError).
            if isinstance(exc, av.error.ExitError) or (
                time.monotonic() - started >= self.open_timeout
            ):
                absent = plan.kind in LISTENING_KINDS
                within = f"within {self.open_timeout:g} s"
                if absent:
                    reason = f"no data arriving {within} (sender not running?)"
                else:
                    reason = f"nothing readable {within}"
            else:
                reason, absent = explain_open(exc, plan.kind, self.url)
            if bridge is not None:
                if not bridge.alive():
                    reason, absent = bridge.exit_reason(), False
                elif keep:
                    # still listening: this caller sent nothing readable, or went away
                    absent = True
                    if not bridge.peer_up():
                        reason = "the SRT caller went away"
                self._srt.drop(bridge, keep)
            raise OpenFailed(reason, absent=absent) from exc
        try:
            if not container.streams.video:
                found = ", ".join(s.type for s in container.streams) or "nothing"
                raise OpenFailed(
                    f"no video stream (found {found} in {time.monotonic() - started:.1f} s)"
                )
            video = container.streams.video[0]
            # Slice threads only: frame threading holds back one frame per thread.
            video.thread_type = "SLICE"
            audio = container.streams.audio[0] if container.streams.audio else None
        except BaseException:
            container.close()
            if bridge is not None:
                self._srt.drop(bridge, keep)
            raise
        return Session(container, video, audio, bridge, keep_bridge=keep, call=call)

    def _set_up(self, session: Session) -> None:
        video, audio = session.video, session.audio
        self.fps = stream_fps(video, prefer_guess=self.plan.kind == "rtmp")
        self.width, self.height = video.width or None, video.height or None
        params = None
        if audio is not None:
            try:
                params = AudioParams.from_stream(audio)
            except (av.FFmpegError, ValueError, MediaError) as exc:
                log.warning("%s: audio (%s) cannot be passed on: %s", self.name, audio.name, exc)
        if params is not None and self._audio is not None and not params.same_format(self._audio):
            log.warning(
                "%s: audio format changed after reconnecting (%s %d Hz → %s %d Hz); an "
                "output opened earlier keeps the old one",
                self.name,
                self._audio.codec,
                self._audio.sample_rate,
                params.codec,
                params.sample_rate,
            )
        if params is not None:
            self._audio = params
        self.connected = True
        self.state_since = now = time.monotonic()
        self._last_failure = ""
        self.bridge_pid = session.bridge.pid if session.bridge is not None else None
        size = f"{video.width}x{video.height}" if video.width else "size unknown yet"
        fps = f"{float(self.fps):.2f} fps" if self.fps else "fps unknown"
        sound = f" + {audio.name}" if audio is not None else ", no audio"
        down = ""
        if self._down_since is not None:
            gap = now - self._down_since
            down = f" after {gap:.1f} s down and {self._down_attempts} failed attempts"
            self._down_since = None
        # "reconnected" after the first time: an operator greps the log for the drops
        again = "reconnected" if self._ever_connected else "connected"
        self._ever_connected = True
        log.info("%s: %s (%s, %s, %s%s)%s", self.name, again, size, fps, video.name, sound, down)

    def _set_down(self, reason: str) -> None:
        was_up = self.connected
        self.connected = False
        now = time.monotonic()
        if was_up or self._down_since is None:
            # Down since the loss: a retry once a second is not a change of state.
            self.state_since = self._down_since = now
            self._down_attempts = 0
            self._next_summary = now + WAITING_SUMMARY_S
        if not was_up:
            self._down_attempts += 1  # a failed open (the loss itself is not an attempt)
        # The loss, or a new reason for failing, is news: one line. The same failure again
        # on every retry (once a second while a publisher is away) is routine: a summary
        # now and then shows the input is still tried, without flooding the log.
        self._news = was_up or reason != self._last_failure
        if self._news:
            log.warning("%s: %s", self.name, reason)
        elif now >= self._next_summary:
            self._next_summary = now + WAITING_SUMMARY_S
            log.info(
                "%s: still waiting (%d failed attempts in %.0f s): %s",
                self.name,
                self._down_attempts,
                now - self._down_since,
                reason,
            )
        else:
            log.debug("%s: %s", self.name, reason)
        self._last_failure = reason

    def _wait_retry(self, halted: Halted, absent: bool = False) -> bool:
        # An absent input is polled, a failing one backs off: see "Retry cadence" above.
        delay = self.backoff.poll_delay(ABSENT_POLL_S) if absent else self.backoff.next_delay()
        if delay is None:
            log.error("%s: giving up after %d attempts", self.name, self.backoff.attempts or 0)
            return False
        how = f" (then every ≤ {ABSENT_POLL_S:g} s while it is away)" if absent else ""
        level = logging.INFO if self._news else logging.DEBUG
        log.log(level, "%s: retry in %.1f s%s", self.name, delay, how)
        # An SRT listener that takes a caller meanwhile cuts the wait short: what it
        # forwards before a session reads it is lost. _sleep's True means woken: by a
        # halt (stop the loop), or by that caller (go on, even if it went away since).
        called: list[bool] = []

        def woken() -> bool:
            if halted():
                return True
            if self._srt.caller_waiting():
                called.append(True)
                return True
            return False

        return not _sleep(delay, woken) or bool(called)


__all__ = [
    "AudioParams",
    "Bridge",
    "InputPlan",
    "StreamSource",
    "check_srt_endpoint",
    "check_srt_options",
    "free_udp_port",
    "plan_input",
    "redact",
    "srt_listens",
    "with_query",
]
