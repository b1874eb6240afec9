"""How each kind of live input is opened: the protocol, demuxer and options ``av.open`` is
given for a URL or path (RTMP, UDP, RTP/SDP, SRT through its bridge, HLS/HTTP, V4L2, files).

Timeouts. Protocol options are backstops, one second after PyAV's own interrupt callback
(see live_source): ``rw_timeout`` (µs) for RTMP and HTTP, ``timeout`` (µs) for UDP/RTP.
Never pass ``timeout`` to RTMP: there it is the *listen* timeout and turns the client into
a server ("Address already in use").

Probing. ``fflags=nobuffer`` is *not* used: it discards the packets read while probing, and
with them the keyframe that ended the probe, so decoding starts one GOP later (+2 s on the
test clip). ``fpsprobesize=0`` lets the probe end as soon as every stream has codec
parameters instead of also counting frames for a frame-rate estimate. The RTMP probe window
must exceed the publisher's keyframe interval: nginx-rtmp forwards video to a new reader
only from the next keyframe, and FLV creates its video stream on the first video packet,
so a short probe (the often-quoted ``analyzeduration=500000, probesize=65536``) opens the
stream with audio only, and PyAV never delivers packets of streams that appear later.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from facecast.errors import MediaError
from facecast.media.srt_bridge import SRT_BRIDGE, check_srt_options, srt_listens
from facecast.media.urls import free_udp_port

UDP_FIFO_PACKETS = 50_000  # FFmpeg's UDP ring buffer, in 188-byte units (~9 MB)
UDP_SOCKET_BUFFER = 4 << 20  # kernel receive buffer: a 1 s hiccup of a 20 Mb/s stream
LISTENING_KINDS = frozenset({"udp", "rtp", "sdp"})  # the open itself waits for a sender


def _us(seconds: float) -> str:
    """An FFmpeg duration option: integer microseconds as text."""
    return str(max(1, round(seconds * 1_000_000)))


@dataclass
class InputPlan:
    """How to open one input: what ``av.open`` is given, and what kind of input it is."""

    kind: str  # rtmp | udp | rtp | sdp | srt | hls | http | v4l2 | file | url
    target: str
    format: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    live: bool = True
    bridge: list[str] | None = None  # SRT: the bridge command; ``target`` is its UDP side


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


__all__ = ["LISTENING_KINDS", "InputPlan", "plan_input"]
