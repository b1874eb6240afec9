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
- Protocol options are backstops, one second later: ``rw_timeout`` (µs) for RTMP and HTTP,
  ``timeout`` (µs) for UDP/RTP. Never pass ``timeout`` to RTMP: there it is the *listen*
  timeout and turns the client into a server ("Address already in use").
- A stalled stream that still sends packets (audio only, garbage) is caught by the frame
  clock: no decoded video frame for ``stall_timeout`` seconds means reconnect.

Probing. ``fflags=nobuffer`` is *not* used: it discards the packets read while probing, and
with them the keyframe that ended the probe, so decoding starts one GOP later (+2 s on the
test clip). ``fpsprobesize=0`` lets the probe end as soon as every stream has codec
parameters instead of also counting frames for a frame-rate estimate. The RTMP probe window
must exceed the publisher's keyframe interval: nginx-rtmp forwards video to a new reader
only from the next keyframe, and FLV creates its video stream on the first video packet,
so a short probe (the often-quoted ``analyzeduration=500000, probesize=65536``) opens the
stream with audio only, and PyAV never delivers packets of streams that appear later.

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

import errno
import io
import ipaddress
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import av
import av.container
import numpy as np

from facecast.errors import MediaError
from facecast.media._io import open_input
from facecast.media.backoff import Backoff
from facecast.media.frame import AudioChunk, Frame
from facecast.media.h264 import is_lone_aud

log = logging.getLogger(__name__)

BUFFER_ITEMS = 64  # reader → consumer: ~1 s of video plus its audio
MAX_CONSECUTIVE_READ_ERRORS = 32
UDP_FIFO_PACKETS = 50_000  # FFmpeg's UDP ring buffer, in 188-byte units (~9 MB)
UDP_SOCKET_BUFFER = 4 << 20  # kernel receive buffer: a 1 s hiccup of a 20 Mb/s stream
SRT_BRIDGE = "srt-live-transmit"  # Debian package srt-tools; PyAV's FFmpeg has no libsrt
# What srt-live-transmit (libsrt) accepts in an SRT URL's query; anything else it refuses
# with "ConfigurePre: Operation not supported: Bad parameters" or "Invalid mode".
SRT_MODES = ("caller", "client", "listener", "server", "rendezvous")
SRT_PASSPHRASE_CHARS = (10, 79)
SRT_KEY_LENGTHS = ("0", "16", "24", "32")
# srt-live-transmit counts latency in ms, FFmpeg and OBS in µs: a value past this many ms
# (10 s) is most likely meant as µs, and gets a warning.
SRT_LATENCY_WARN_MS = 10_000
# Longest wait between looks at an input that is up but has nothing to give yet (a key nobody
# publishes on, a UDP port nobody sends to): see "Retry cadence" in the module docstring.
ABSENT_POLL_S = 1.0
WAITING_SUMMARY_S = 15.0  # while an input stays down: one "still waiting" line this often
LISTENING_KINDS = frozenset({"udp", "rtp", "sdp"})  # the open itself waits for a sender

Halted = Callable[[], bool]


def _us(seconds: float) -> str:
    """An FFmpeg duration option: integer microseconds as text."""
    return str(max(1, round(seconds * 1_000_000)))


# ---------------------------------------------------------------------------- audio params


@dataclass(frozen=True)
class AudioParams:
    """What an output needs to carry the input's audio packets without re-encoding them.

    ``template`` is a tiny NUT file holding the input stream's exact codec parameters
    (extradata, profile, layout, frame size) and one dummy packet; ``open_template()`` reads
    it back as a stream for ``OutputContainer.add_stream_from_template``. PyAV has no way to
    set codec parameters such as extradata on a stream without an encoder attached, and the
    input's own stream cannot be used because its container closes on every reconnect.
    """

    codec: str
    sample_rate: int
    layout: str
    channels: int
    extradata: bytes
    time_base: Fraction
    template: bytes = field(repr=False)

    def open_template(self) -> tuple[av.container.InputContainer, av.AudioStream]:
        """The template container and its audio stream; close the container when done."""
        container = av.open(io.BytesIO(self.template), format="nut")
        try:
            return container, container.streams.audio[0]
        except IndexError:
            container.close()
            raise MediaError("audio template holds no audio stream") from None

    def same_format(self, other: AudioParams | None) -> bool:
        return other is not None and (
            self.codec,
            self.sample_rate,
            self.channels,
            self.extradata,
        ) == (other.codec, other.sample_rate, other.channels, other.extradata)

    @classmethod
    def from_stream(cls, stream: av.AudioStream) -> AudioParams:
        ctx = stream.codec_context
        extradata = bytes(ctx.extradata or b"")
        if ctx.name == "aac" and not extradata:
            # ADTS (MPEG-TS, raw .aac): the configuration travels in every packet's header
            # and the stream has none, but MP4 with empty_moov and live Matroska write it
            # into their header before any packet ("Malformed AAC bitstream" / "Error
            # parsing AAC extradata"): built here from the probed parameters. The sink
            # strips the ADTS headers (aac_adtstoasc, see live_sink._Connection.open).
            extradata = adts_config(ctx) or b""
        buf = io.BytesIO()
        with av.open(buf, "w", format="nut") as out:
            copy = out.add_stream_from_template(stream)
            if extradata:
                copy.codec_context.extradata = extradata
            # A reader needs one packet to accept the file; its content is never decoded
            # by the sink (only the stream parameters are copied).
            dummy = av.Packet(b"\x00" * 8)
            dummy.pts = dummy.dts = 0
            dummy.time_base = stream.time_base
            dummy.stream = copy
            out.mux(dummy)
        return cls(
            codec=ctx.name,
            sample_rate=int(ctx.sample_rate or 0),
            layout=ctx.layout.name if ctx.layout else "",
            channels=ctx.layout.nb_channels if ctx.layout else 0,
            extradata=extradata,
            time_base=Fraction(stream.time_base or Fraction(1, ctx.sample_rate or 48000)),
            template=buf.getvalue(),
        )


# MPEG-4 audio sampling frequency indices (ISO/IEC 14496-3, table 1.18)
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)
_AAC_RATES += (7350,)  # index 12, the last one in use
# The object types an ADTS header can name (its 2-bit profile + 1), by FFmpeg's profile name
_ADTS_OBJECT_TYPES = {"Main": 1, "LC": 2, "SSR": 3, "LTP": 4}


def adts_config(ctx: av.AudioCodecContext) -> bytes | None:
    """The AudioSpecificConfig of an ADTS AAC stream, from its probed parameters: what
    ``aac_adtstoasc`` builds from the first packet's header, known before any packet.
    None for what cannot be told apart this way (a rate or layout outside the table)."""
    rate, channels = int(ctx.sample_rate or 0), ctx.layout.nb_channels if ctx.layout else 0
    profile = ctx.profile or "LC"
    if profile in ("HE-AAC", "HE-AACv2"):
        # The ADTS header describes the LC core (half the rate; v2: mono) and leaves SBR
        # and PS implicit, which FFmpeg's probe reports as the decoded result.
        channels = 1 if profile == "HE-AACv2" else channels
        profile, rate = "LC", rate // 2
    object_type = _ADTS_OBJECT_TYPES.get(profile)
    channel_config = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 8: 7}.get(channels)
    if object_type is None or rate not in _AAC_RATES or channel_config is None:
        return None
    # 5 bits object type, 4 bits rate index, 4 bits channels, 3 zero flags (GASpecificConfig)
    value = object_type << 11 | _AAC_RATES.index(rate) << 7 | channel_config << 3
    return value.to_bytes(2, "big")


# ---------------------------------------------------------------------------- input plans


@dataclass
class InputPlan:
    """How to open one input: what ``av.open`` is given, and what kind of input it is."""

    kind: str  # rtmp | udp | rtp | sdp | srt | hls | http | v4l2 | file | url
    target: str
    format: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    live: bool = True
    bridge: list[str] | None = None  # SRT: the bridge command; ``target`` is its UDP side


def with_query(target: str, extra: dict[str, str]) -> str:
    """``target`` with ``extra`` query parameters added; the URL's own values win."""
    parts = urlsplit(target)
    query = dict(extra)
    query.update(parse_qsl(parts.query, keep_blank_values=True))
    text = "&".join(f"{k}={v}" if v != "" else k for k, v in query.items())
    return urlunsplit(parts._replace(query=text))


def plan_input(
    url: str,
    *,
    open_timeout: float = 5.0,
    stall_timeout: float = 5.0,
    bridge_port: int | None = None,
) -> InputPlan:
    """The protocol, format and options used to open ``url``.

    ``bridge_port`` is the loopback UDP port an SRT bridge delivers to (picked free when
    None). Raises MediaError for an unsupported scheme.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    backstop = _us(stall_timeout + 1.0)  # protocol timeouts: only if PyAV's did not fire

    def probe(seconds: float) -> dict[str, str]:
        # Probing must finish well inside open_timeout, or the interrupt kills the open.
        seconds = min(seconds, 0.6 * open_timeout)
        return {"analyzeduration": _us(seconds), "probesize": "5000000"}

    udp_options = {
        "overrun_nonfatal": "1",  # a full ring buffer drops data instead of failing the read
        "fifo_size": str(UDP_FIFO_PACKETS),
        "buffer_size": str(UDP_SOCKET_BUFFER),
        "timeout": backstop,  # udp: µs without data before EIO (rw_timeout is ignored)
        "reuse": "1",  # a reconnect may rebind before the old socket is gone
    }

    if scheme in ("rtmp", "rtmps", "rtmpt", "rtmpe", "rtmpte", "rtmpts"):
        # fpsprobesize=0: FLV clears its "streams may still appear" flag once audio and
        # video exist, so the probe can end right after the first keyframe instead of
        # also counting 20 frames for a rate estimate (1.9 s instead of 3.3 s to open).
        options = {"rtmp_live": "live", "rw_timeout": backstop, **probe(3.0), "fpsprobesize": "0"}
        return InputPlan("rtmp", url, None, options)
    if scheme == "udp":
        return InputPlan("udp", url, None, {**udp_options, **probe(1.0)})
    if scheme == "rtp":
        # Raw rtp:// works for static payload types (MPEG-TS over RTP, PT 33); H.264 and
        # other dynamic payloads need the sender's .sdp file instead.
        options = {"timeout": backstop, "buffer_size": str(UDP_SOCKET_BUFFER), **probe(1.0)}
        return InputPlan("rtp", url, "rtp", options)
    if scheme == "srt":
        if shutil.which(SRT_BRIDGE) is None:
            raise MediaError(f"{url}: SRT input needs {SRT_BRIDGE} (Debian package srt-tools)")
        check_srt_options(url)
        port = bridge_port or free_udp_port()
        local = f"udp://127.0.0.1:{port}"
        # The URL goes to the bridge as given: its query (passphrase, pbkeylen, latency,
        # streamid, ...) sets the SRT socket options. A caller's bridge exits when the far
        # end goes away (-a:no) and the input starts a new one; a listener's listens again
        # for the next caller (-a:yes) and is kept across callers (see StreamSource).
        again = "-a:yes" if srt_listens(url) else "-a:no"
        bridge = [SRT_BRIDGE, again, "-loglevel:error", url, local]
        return InputPlan("srt", local, "mpegts", {**udp_options, **probe(1.0)}, bridge=bridge)
    if scheme in ("http", "https"):
        options = {"rw_timeout": backstop, **probe(1.0)}
        if parts.path.lower().endswith(".m3u8"):
            # Start at the newest segment, not three segments back: less latency.
            options["live_start_index"] = "-1"
            return InputPlan("hls", url, "hls", options)
        return InputPlan("http", url, None, options)
    if scheme in ("", "file") or len(scheme) == 1:  # len 1: a Windows drive letter
        path = parts.path if scheme == "file" else url
        if path.startswith("/dev/video"):
            return _plan_v4l2(path, probe(0.5))
        if path.lower().endswith(".sdp"):
            options = {"protocol_whitelist": "file,udp,rtp", **probe(1.0)}
            return InputPlan("sdp", path, "sdp", options)
        return InputPlan("file", path, None, {}, live=False)
    if "://" in url:
        # Anything else FFmpeg knows (rtsp, tcp, ...): only the generic bounds.
        return InputPlan("url", url, None, {"rw_timeout": backstop, **probe(1.0)})
    raise MediaError(f"{url}: not a URL or file path facecast can read")


def _plan_v4l2(path: str, probe: dict[str, str]) -> InputPlan:
    """A V4L2 camera: ``/dev/video0?video_size=1280x720&framerate=30&input_format=mjpeg``.

    The query becomes demuxer options. ``fflags=nonblock`` makes a frame that is not ready
    come back as EAGAIN (retried by the reader every few ms) instead of blocking inside
    VIDIOC_DQBUF, where no interrupt callback or timeout can reach it.
    """
    device, _, query = path.partition("?")
    options = {**probe, "fflags": "nonblock"}
    options.update(parse_qsl(query, keep_blank_values=False))
    return InputPlan("v4l2", device, "v4l2", options)


def free_udp_port() -> int:
    """A loopback UDP port nobody is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redact(url: str) -> str:
    """``url`` for logs: user:password@ is dropped and every query value is masked.

    Secrets ride in query strings (a stream key or token, an SRT passphrase, the secret
    facecast's own workers add as ``?facecast=``) and a value's name does not tell which
    ones are secret, so none is shown; the names stay, to show which options were given.
    """
    parts = urlsplit(url)
    if parts.password is None and parts.username is None and not parts.query:
        return url
    netloc = parts.netloc
    if parts.password is not None or parts.username is not None:
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host  # IPv6 keeps its brackets
        netloc = f"{host}:{parts.port}" if parts.port else host
    # a bare item (no "=") may be a value on its own: masked as well
    query = "&".join(
        f"{item.split('=', 1)[0]}=…" if "=" in item else "…"
        for item in parts.query.split("&")
        if item
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


# ---------------------------------------------------------------------------- SRT URLs


def srt_query(url: str) -> dict[str, str]:
    """An SRT URL's query as srt-live-transmit reads it: ``key=value`` pairs, undecoded."""
    items = (item.partition("=") for item in urlsplit(url).query.split("&") if item)
    return {key: value for key, _, value in items}


def srt_listens(url: str) -> bool:
    """Whether srt-live-transmit waits for a caller on ``url``: ``mode=listener`` (or its
    other name, ``server``), or no mode and no host (``srt://:9000``)."""
    mode = srt_query(url).get("mode")
    return mode in ("listener", "server") or (mode is None and not urlsplit(url).hostname)


def srt_listen_address(url: str) -> str:
    """``HOST:PORT`` a listener binds: the ``adapter`` option, else the URL's host (none:
    every interface)."""
    parts = urlsplit(url)
    host = srt_query(url).get("adapter") or parts.hostname or "0.0.0.0"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{host}:{port if port is not None else '?'}"


def check_srt_options(url: str) -> None:
    """A MediaError, in words, for an SRT URL srt-live-transmit would refuse (it says only
    "Bad parameters" or "Invalid mode", and exits): no port, an unknown mode, a passphrase
    libsrt does not take, a key length it does not know. Other options pass through as
    given; srt-live-transmit ignores names it does not know."""
    name = redact(url)
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None or port == 0:
        raise MediaError(f"{name}: an SRT URL needs a port, e.g. srt://0.0.0.0:9000?mode=listener")
    query = srt_query(url)
    mode = query.get("mode")
    if mode is not None and mode not in SRT_MODES:
        raise MediaError(f"{name}: SRT mode must be caller, listener or rendezvous, not {mode!r}")
    low, high = SRT_PASSPHRASE_CHARS
    passphrase = query.get("passphrase")
    if passphrase is not None and not low <= len(passphrase) <= high:
        # the value itself is a secret: only its length is said
        raise MediaError(
            f"{name}: an SRT passphrase must be {low} to {high} characters long, "
            f"not {len(passphrase)}"
        )
    key = query.get("pbkeylen")
    if key is not None and key not in SRT_KEY_LENGTHS:
        raise MediaError(f"{name}: SRT pbkeylen must be 0, 16, 24 or 32 (bytes), not {key!r}")


def check_srt_endpoint(url: str) -> None:
    """At start, before any bridge runs: a listener whose port another program holds is a
    MediaError now (srt-live-transmit would only say "srt_bind: Connection setup failure"
    and exit, and a live input would retry that forever). A latency that looks like
    FFmpeg's microseconds gets a warning: srt-live-transmit counts milliseconds."""
    name = redact(url)
    for key in ("latency", "rcvlatency", "peerlatency"):
        value = srt_query(url).get(key, "")
        if value.isdigit() and int(value) > SRT_LATENCY_WARN_MS:
            log.warning(
                "%s: %s=%s means %g s here: facecast's SRT URLs count milliseconds "
                "(srt-live-transmit), FFmpeg and OBS count microseconds",
                name,
                key,
                value,
                int(value) / 1000,
            )
    problem = srt_listen_problem(url)
    if problem:
        raise MediaError(f"{name}: {problem}")


def srt_listen_problem(url: str) -> str | None:
    """Why an SRT listener on ``url`` could not listen now (a bind to its UDP port fails:
    another program holds it), in words; None if it could, or if ``url`` is a caller."""
    if not srt_listens(url):
        return None
    where = srt_listen_address(url)
    host, _, port = where.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, int(port)))
        except (OSError, ValueError) as exc:  # ValueError: no port (check_srt_options says)
            in_use = getattr(exc, "errno", None) == errno.EADDRINUSE
            why = "in use by another program" if in_use else _describe(exc)
            return f"cannot listen on {where} ({why})"
    return None


# ---------------------------------------------------------------------------- SRT bridge


class Bridge:
    """A supervised helper process that moves a stream between SRT and loopback UDP.

    Its stderr goes to a temporary file (a pipe nobody reads would fill and block it), and
    its last line explains an exit. ``stop()`` is bounded: SIGTERM, then SIGKILL.

    The SRT side's state is read from the same file, where srt-live-transmit says it: a
    caller's "SRT source connected" / "SRT target connected", a listener's "Accepted SRT
    source connection" / "Accepted SRT target connection" (no "connected" in it), and
    "SRT source disconnected" / "SRT target disconnected" when the peer goes. ``calls``
    counts the connections so far, ``hangups`` the disconnections (with ``-a:yes`` a
    listener takes the next caller after one leaves, so both keep counting).
    """

    _UP = re.compile(
        rb"(?:Accepted SRT (?:source|target) connection|SRT (?:source|target) connected)"
    )
    _DOWN = re.compile(rb"SRT (?:source|target) disconnected")

    def __init__(self, command: list[str]):
        self.command = command
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self._proc: subprocess.Popen[bytes] | None = None
        self._srt = next((arg for arg in command if arg.startswith("srt://")), "")
        self._lock = threading.Lock()
        self._read_at = 0  # how much of the log has been scanned
        self._partial = b""  # a line not finished yet
        self._calls = 0
        self._hangups = 0

    def listen_problem(self) -> str | None:
        """Before ``start``: why this bridge's SRT listener could not listen (its port is
        held), or None. srt-live-transmit itself would only exit with "srt_bind:
        Connection setup failure"."""
        return srt_listen_problem(self._srt) if self._srt else None

    def start(self) -> None:
        try:
            self._proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._log,
            )
        except OSError as exc:
            raise MediaError(f"cannot start {self.command[0]} ({exc})") from exc

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def calls(self) -> int:
        """SRT connections made (caller) or accepted (listener) so far."""
        self._scan()
        return self._calls

    @property
    def hangups(self) -> int:
        """SRT connections that ended so far."""
        self._scan()
        return self._hangups

    def peer_up(self) -> bool:
        """Whether the SRT side is connected now (a listener: a caller is on)."""
        self._scan()
        return self._calls > self._hangups

    def _scan(self) -> None:
        # pread: the child writes through the same open file, so this file's offset is
        # its offset too, and must not move back under it.
        with self._lock:
            if self._log.closed:
                return
            fd = self._log.fileno()
            while chunk := os.pread(fd, 65536, self._read_at):
                self._read_at += len(chunk)
                self._partial += chunk
            *lines, self._partial = self._partial.split(b"\n")
            for line in lines:
                if self._UP.fullmatch(line.strip()):
                    self._calls += 1
                elif self._DOWN.fullmatch(line.strip()):
                    self._hangups += 1

    def _text(self) -> str:
        with self._lock:
            if self._log.closed:
                return ""
            fd, chunks, at = self._log.fileno(), [], 0
            while chunk := os.pread(fd, 65536, at):
                chunks.append(chunk)
                at += len(chunk)
        return b"".join(chunks).decode(errors="replace")

    def exit_reason(self) -> str:
        code = self._proc.poll() if self._proc else None
        if code is not None and code < 0:
            return f"{self.command[0]} was killed (signal {-code})"
        lines = [ln for ln in self._text().splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else ""
        if "srt_bind" in last and srt_listens(self._srt):
            # "srt_bind: Connection setup failure: unable to create/configure SRT socket"
            return f"cannot listen on {srt_listen_address(self._srt)} (in use by another program?)"
        if "ConfigurePre" in last or "Invalid mode" in last:
            return f"{self.command[0]} refused the SRT options in the URL ({last})"
        return f"{self.command[0]} exited with code {code}" + (f": {last}" if last else "")

    def wait_connected(self, timeout: float, halted: Halted) -> bool:
        """Wait until the SRT side is connected (``peer_up``); False if the bridge exits,
        time runs out or ``halted()``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and not halted():
            if self.peer_up():
                return True
            if not self.alive():
                return False
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 1.0) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) does not die", self.command[0], proc.pid)
        with self._lock:
            self._log.close()


# ---------------------------------------------------------------------------- hand-off


class _Handoff:
    """Reader → consumer. Bounded: a live input drops its oldest waiting video frame when
    the consumer falls behind (latency must not pile up; audio is kept, it is tiny and must
    stay continuous); a file read as fast as possible waits for room instead (no drops)."""

    def __init__(self, capacity: int, drop: bool):
        self._items: deque[Frame | AudioChunk] = deque()
        self._cond = threading.Condition()
        self.capacity, self.drop = capacity, drop
        self.dropped = 0
        self.finished = False  # the reader is done: nothing more will come
        self.closed = False  # the consumer is gone

    def put(self, item: Frame | AudioChunk, halted: Halted) -> bool:
        """False when the consumer is gone or the reader must stop."""
        with self._cond:
            while len(self._items) >= self.capacity:
                if self.closed or halted():
                    return False
                if self.drop:
                    self._drop_oldest()
                    break
                self._cond.wait(0.1)
            if self.closed:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def _drop_oldest(self) -> None:
        for i, old in enumerate(self._items):
            if isinstance(old, Frame):
                del self._items[i]
                self.dropped += 1
                return
        self._items.popleft()  # only audio waiting: the consumer is not reading at all

    def get(self, timeout: float) -> Frame | AudioChunk | None:
        with self._cond:
            if not self._items and not self.finished:
                self._cond.wait(timeout)
            if self._items:
                item = self._items.popleft()
                self._cond.notify_all()
                return item
            return None

    def finish(self) -> None:
        with self._cond:
            self.finished = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._items.clear()
            self._cond.notify_all()


# ---------------------------------------------------------------------------- the source


class _OpenFailed(Exception):
    """An open that failed, with its reason in words. ``absent``: the server (or a listening
    socket) is there but nothing is published yet, so the next look can come soon."""

    def __init__(self, reason: str, absent: bool = False):
        super().__init__(reason)
        self.absent = absent


@dataclass
class _Session:
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


_LOOP = "end of file (looping)"
_END = "end of stream"


class StreamSource:
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

        self.connected = False
        self.state_since = time.monotonic()
        self.reconnects = 0
        self.bad_packets = 0
        self.frames = 0
        self.audio_chunks = 0
        self.last_frame_at: float | None = None
        self.width: int | None = None
        self.height: int | None = None
        self.fps: Fraction | None = None
        self._audio: AudioParams | None = None
        self._handoff: _Handoff | None = None
        self._reader: threading.Thread | None = None
        self._halt = threading.Event()
        self._last_failure = ""
        self._news = False  # the last failure was logged as news (not a repeat)
        self._ever_connected = False
        self._down_since: float | None = None  # monotonic; None while up (or never tried)
        self._down_attempts = 0  # failed attempts since then
        self._next_summary = 0.0  # when the next "still waiting" line is due
        self.bridge_pid: int | None = None  # the SRT bridge of the current connection
        # An SRT listener's bridge, kept across callers while the reader runs: the port
        # stays open, so a caller that comes back (OBS reconnecting) is taken at once.
        self._listener: Bridge | None = None
        self._listener_plan: InputPlan | None = None

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
        self._handoff = handoff = _Handoff(BUFFER_ITEMS, drop=drop)

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

    def _read_loop(self, halted: Halted, handoff: _Handoff) -> None:
        attempts = 0
        try:
            while not halted():
                if attempts:
                    self.reconnects += 1
                attempts += 1
                try:
                    session = self._open(halted)
                except _OpenFailed as exc:
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
                if reason is _LOOP:
                    attempts = 0  # a loop of a file is not a reconnect
                    continue
                self._set_down(f"lost ({reason})")
                if session.frames and reason != _END:
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
            if self._listener is not None:  # an SRT listener stops listening with its reader
                self._listener.stop()
                self._listener = None
            handoff.finish()
            # the last thing this thread does: its container is closed (see join())
            log.debug("%s: input reader done", self.name)

    def _open(self, halted: Halted) -> _Session:
        plan = self.plan
        bridge = None
        keep, call = False, 0  # an SRT listener's bridge is kept (see _srt_bridge)
        if plan.bridge:
            plan, bridge, keep, call = self._srt_bridge(halted)
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
                reason, absent = _explain_open(exc, plan.kind, self.url)
            if bridge is not None:
                if not bridge.alive():
                    reason, absent = bridge.exit_reason(), False
                elif keep:
                    # still listening: this caller sent nothing readable, or went away
                    absent = True
                    if not bridge.peer_up():
                        reason = "the SRT caller went away"
                self._drop_bridge(bridge, keep)
            raise _OpenFailed(reason, absent=absent) from exc
        try:
            if not container.streams.video:
                found = ", ".join(s.type for s in container.streams) or "nothing"
                raise _OpenFailed(
                    f"no video stream (found {found} in {time.monotonic() - started:.1f} s)"
                )
            video = container.streams.video[0]
            # Slice threads only: frame threading holds back one frame per thread.
            video.thread_type = "SLICE"
            audio = container.streams.audio[0] if container.streams.audio else None
        except BaseException:
            container.close()
            if bridge is not None:
                self._drop_bridge(bridge, keep)
            raise
        return _Session(container, video, audio, bridge, keep_bridge=keep, call=call)

    def _srt_bridge(self, halted: Halted) -> tuple[InputPlan, Bridge, bool, int]:
        """The SRT bridge for one attempt, once its SRT side is connected: the plan that
        reads it, the bridge, whether it is kept after the attempt, and its caller count.

        A caller's bridge is new on every attempt (a fresh port and process: the bridge
        restarts with the input). A listener's is started once and kept listening across
        callers and attempts (``-a:yes``): stopping it while nobody calls would close the
        port in the face of a caller coming back (OBS retrying: it got an I/O error).
        """
        listens = srt_listens(self.url)
        bridge, plan = (self._listener, self._listener_plan) if listens else (None, None)
        if bridge is None or plan is None or not bridge.alive():
            if bridge is not None:
                bridge.stop()  # it died: its reason was given when the input was lost
            self._listener = None
            plan = plan_input(
                self.url, open_timeout=self.open_timeout, stall_timeout=self.stall_timeout
            )
            assert plan.bridge is not None
            bridge = Bridge(plan.bridge)
            try:
                bridge.start()
            except MediaError as exc:
                raise _OpenFailed(str(exc)) from exc
            if listens:
                self._listener, self._listener_plan = bridge, plan
        # Only read once the SRT side is up: a caller with no listener fails here in
        # the bridge's own connect timeout, and a stop is seen within 50 ms, instead
        # of waiting out PyAV's open timeouts on a UDP port nobody sends to.
        if not bridge.wait_connected(self.open_timeout, halted):
            if listens and bridge.alive():
                # A listener that nobody called is the SRT form of "nothing published".
                # It goes on listening; the retry wakes as soon as a caller is taken.
                raise _OpenFailed("no SRT caller yet", absent=True)
            reason = "SRT connect timed out" if bridge.alive() else bridge.exit_reason()
            self._drop_bridge(bridge, False)
            raise _OpenFailed(reason)
        return plan, bridge, listens, bridge.calls

    def _drop_bridge(self, bridge: Bridge, keep: bool) -> None:
        """After a failed attempt: a caller's bridge is stopped, a listener's only if it
        died (the next attempt starts another)."""
        if keep and bridge.alive():
            return
        bridge.stop()
        if bridge is self._listener:
            self._listener = None

    def _caller_waiting(self) -> bool:
        """An SRT listener has taken a caller that no session reads yet."""
        bridge = self._listener
        return bridge is not None and bridge.peer_up()

    def _set_up(self, session: _Session) -> None:
        video, audio = session.video, session.audio
        self.fps = _stream_fps(video, prefer_guess=self.plan.kind == "rtmp")
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
            if self._caller_waiting():
                called.append(True)
                return True
            return False

        return not _sleep(delay, woken) or bool(called)

    def _pump(self, session: _Session, halted: Halted, handoff: _Handoff) -> str | None:
        """Read until the input fails: the reason, or None when halted or a file ended."""
        container, video, audio = session.container, session.video, session.audio
        streams: list[av.VideoStream | av.AudioStream] = [video]
        if audio is not None:
            streams.append(audio)
        live = self.plan.live
        pace = _Pacer() if self.realtime and not live else None
        # AAC with no configuration in the stream (MPEG-TS, raw .aac) is ADTS: each packet
        # must then be whole ADTS frames, which tells a damaged packet from a good one
        adts = audio is not None and _is_adts(audio)
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
                        if chunk is not None and adts and not _whole_adts_frames(chunk.data):
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
                if _sleep(0.005, halted):
                    return None
            except OSError as exc:
                # I/O failure (PyAV's errno errors subclass OSError): the link is gone.
                return None if halted() else _explain_read(exc, self.plan.kind)
            except av.FFmpegError as exc:
                # Damaged data: the demuxer resyncs after it, so skip and read on.
                errors += 1
                self._bad(f"read error ({_describe(exc)})")
                if errors >= MAX_CONSECUTIVE_READ_ERRORS:
                    return f"{errors} read errors in a row ({_describe(exc)})"
            if live:
                reason = self._stalled(session, last_video)
                if reason:
                    return reason

    def _stalled(self, session: _Session, last_video: float) -> str | None:
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
            return _END
        return _LOOP if self.loop_file else None

    def _decode(self, video: av.VideoStream, packet: av.Packet, quiet: bool) -> Iterator[Frame]:
        if is_lone_aud(packet):
            return  # the delimiter that ends a low-delay MPEG-TS stream: no frame in it
        try:
            decoded = video.decode(packet)
        except av.FFmpegError as exc:
            if quiet:
                self.bad_packets += 1
            else:
                self._bad(f"undecodable video packet ({_describe(exc)})")
            return
        for vf in decoded:
            try:
                image = vf.to_ndarray(format="bgr24")
            except (av.FFmpegError, ValueError) as exc:
                self._bad(f"unconvertible video frame ({exc})")
                continue
            now = time.monotonic()
            frame = Frame(
                image=np.ascontiguousarray(image),
                index=self.frames,
                pts=vf.pts,
                time_base=Fraction(vf.time_base) if vf.time_base else None,
                t_ingest=now,
            )
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
        return delay <= 0 or not _sleep(delay, halted)


def _sleep(seconds: float, halted: Halted) -> bool:
    """Sleep ``seconds`` in short steps; True if halted meanwhile."""
    end = time.monotonic() + seconds
    while True:
        if halted():
            return True
        left = end - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(left, 0.05))


def _chunk(packet: av.Packet) -> AudioChunk | None:
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


def _is_adts(audio: av.AudioStream) -> bool:
    ctx = audio.codec_context
    return ctx.name == "aac" and not ctx.extradata


def _whole_adts_frames(data: bytes) -> bool:
    """Whether ``data`` is one or more complete ADTS frames: each starts with the sync word
    and its header's frame length (13 bits, header included) lands on the next one or
    exactly on the end."""
    at = 0
    while at < len(data):
        header = data[at : at + 7]
        if len(header) < 7 or header[0] != 0xFF or header[1] & 0xF6 != 0xF0:
            return False  # no sync word (or layer != 0): not the start of a frame
        length = (header[3] & 0x03) << 11 | header[4] << 3 | header[5] >> 5
        if length < 7:
            return False
        at += length
    return at == len(data) and at > 0


def _stream_fps(video: av.VideoStream, prefer_guess: bool) -> Fraction | None:
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


def _describe(exc: BaseException) -> str:
    """A one-line reason without PyAV's repeated URL."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text).split(": '", 1)[0]


def _explain_open(exc: BaseException, kind: str, url: str) -> tuple[str, bool]:
    """Why an open failed, in words that say what is wrong (FFmpeg's errno text often does
    not), and whether it means "absent": the server is up but nothing is published there."""
    code = getattr(exc, "errno", None)
    if kind == "rtmp" and code == errno.EPERM:
        # FFmpeg's RTMP client returns -1, which is AVERROR(EPERM) ("Operation not
        # permitted"), when the server answers with an error status. nginx-rtmp answers the
        # play of a key nobody publishes on with NetStream.Play.StreamNotFound ("No such
        # stream") and closes; FFmpeg only logs that text, PyAV does not pass it on.
        return "no publisher on this key (the server refused to play it)", True
    if kind in ("hls", "http") and isinstance(exc, av.error.HTTPNotFoundError):
        return "not found (HTTP 404): nothing published there yet", True
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    if code == errno.ECONNREFUSED:
        return f"connection refused: no server listening on {where}", False
    if code == errno.EIO and parts.hostname and _unresolvable(parts.hostname):
        # FFmpeg reports a failed name lookup as a bare EIO.
        return f"cannot resolve host name {parts.hostname!r}", False
    if kind == "rtmp" and code == errno.EIO:
        # Fast EIO (a timeout is reported before this is reached): nginx-rtmp hangs up this
        # way on an application name it does not have.
        return f"the server at {where} closed the connection (unknown application?)", False
    return _describe(exc), False


def _explain_read(exc: BaseException, kind: str) -> str:
    """Why a read failed. RTMP reports its TCP connection closing as EIO: nginx-rtmp closes
    its readers' connections when the publisher leaves (``idle_streams off``)."""
    if kind == "rtmp" and getattr(exc, "errno", None) == errno.EIO:
        return "server closed the connection: publisher gone?"
    return f"read error ({_describe(exc)})"


def _unresolvable(host: str) -> bool:
    """True if ``host`` is a name the resolver does not know (an IP literal never is)."""
    try:
        ipaddress.ip_address(host)
        return False
    except ValueError:
        pass
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror:
        return True
    except OSError:
        return False
    return False


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
