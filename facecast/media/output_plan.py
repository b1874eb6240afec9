"""How each kind of live output is opened: the muxer, target and options for RTMP, UDP, RTP,
SRT (through its bridge) or a file, with the framing and flushing a live reader needs."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from urllib.parse import urlsplit

from facecast.errors import MediaError
from facecast.media.srt_bridge import SRT_BRIDGE, check_srt_options, srt_listens
from facecast.media.urls import free_udp_port, with_query

MS = Fraction(1, 1000)
TICKS_90K = Fraction(1, 90000)
UDP_PAYLOAD = 1316  # 7 TS packets: fits one Ethernet frame with IP/UDP (and SRT) headers

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


__all__ = ["MS", "TICKS_90K", "UDP_PAYLOAD", "OutputPlan", "plan_output"]
