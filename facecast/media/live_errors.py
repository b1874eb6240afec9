"""Live inputs' and outputs' failures in words: a one-line reason for an exception, why an
input could not be opened or read (FFmpeg's errno text often does not say), and the
``OpenFailed`` an input's open raises."""

from __future__ import annotations

import errno
import ipaddress
import socket
from urllib.parse import urlsplit

import av


class OpenFailed(Exception):
    """An open that failed, with its reason in words. ``absent``: the server (or a listening
    socket) is there but nothing is published yet, so the next look can come soon."""

    def __init__(self, reason: str, absent: bool = False):
        super().__init__(reason)
        self.absent = absent


def describe(exc: BaseException) -> str:
    """A one-line reason without PyAV's repeated URL."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text).split(": '", 1)[0]


def explain_open(exc: BaseException, kind: str, url: str) -> tuple[str, bool]:
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
    if code == errno.EIO and parts.hostname and unresolvable(parts.hostname):
        # FFmpeg reports a failed name lookup as a bare EIO.
        return f"cannot resolve host name {parts.hostname!r}", False
    if kind == "rtmp" and code == errno.EIO:
        # Fast EIO (a timeout is reported before this is reached): nginx-rtmp hangs up this
        # way on an application name it does not have.
        return f"the server at {where} closed the connection (unknown application?)", False
    return describe(exc), False


def explain_read(exc: BaseException, kind: str) -> str:
    """Why a read failed. RTMP reports its TCP connection closing as EIO: nginx-rtmp closes
    its readers' connections when the publisher leaves (``idle_streams off``)."""
    if kind == "rtmp" and getattr(exc, "errno", None) == errno.EIO:
        return "server closed the connection: publisher gone?"
    return f"read error ({describe(exc)})"


def unresolvable(host: str) -> bool:
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


__all__ = ["OpenFailed", "describe", "explain_open", "explain_read", "unresolvable"]
