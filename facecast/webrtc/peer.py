"""aiortc peer-connection plumbing that the browser page, WHIP, WHEP and whip-listen
share: setting an offer and closing a connection with timeouts, the one video transceiver
answered, the end of a session when its connection is lost, and a loopback ICE candidate
on hosts that have no other interface."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from aioice import ice as aioice_ice
from aiortc import RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription

from facecast.errors import FacecastError

CLOSE_TIMEOUT = 5.0  # for each step of closing a session
NEGOTIATE_TIMEOUT = 15.0  # reading the offer and gathering our candidates (STUN may be slow)


class BadOfferError(FacecastError):
    """The SDP offer cannot be answered (malformed, no video, not sendrecv)."""


class NegotiationTimeout(FacecastError):
    """The answer could not be made in time (the server is overloaded, or a STUN server
    does not answer)."""


def _with_loopback_fallback(find: Callable[[bool, bool], list[str]]) -> Callable:
    """aioice gathers host candidates from every interface except loopback. On a host or
    container that has nothing else (CI sandboxes, a network namespace), it would offer no
    candidate at all and no browser could connect; there, offer 127.0.0.1."""

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        found = find(use_ipv4, use_ipv6)
        return found or (["127.0.0.1"] if use_ipv4 else [])

    host_addresses.facecast_fallback = True  # type: ignore[attr-defined]
    return host_addresses


if not getattr(aioice_ice.get_host_addresses, "facecast_fallback", False):
    aioice_ice.get_host_addresses = _with_loopback_fallback(aioice_ice.get_host_addresses)


def video_transceiver(transceivers: list[RTCRtpTransceiver]) -> RTCRtpTransceiver:
    """The offer's first video transceiver; every other one is answered inactive, so no
    media comes that nobody reads."""
    video = None
    for transceiver in transceivers:
        if transceiver.kind == "video" and video is None:
            video = transceiver
        else:
            transceiver.direction = "inactive"
    if video is None:
        raise BadOfferError("the offer has no video")
    return video


def end_on_connection_loss(pc: RTCPeerConnection, end: Callable[[str], None]) -> None:
    """``end(reason)`` once ``pc`` fails or closes (the peer left, or ICE/DTLS broke)."""

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState in ("failed", "closed"):
            end(f"connection {pc.connectionState}")


async def set_offer(pc: RTCPeerConnection, sdp: str) -> None:
    """``pc``'s remote description from an SDP offer: BadOfferError (in words) for one
    aiortc cannot use, NegotiationTimeout if it takes too long."""
    try:
        await timed(pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer")))
    except NegotiationTimeout:
        raise
    except Exception as exc:  # aiortc raises several kinds for a malformed offer
        raise BadOfferError(f"cannot use the offer: {exc}") from None


async def timed(step: Awaitable[None]) -> None:
    try:
        await asyncio.wait_for(step, NEGOTIATE_TIMEOUT)
    except TimeoutError:
        raise NegotiationTimeout(
            f"could not answer the offer within {NEGOTIATE_TIMEOUT:.0f} s: try again"
        ) from None


async def close_quietly(pc: RTCPeerConnection) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(pc.close(), CLOSE_TIMEOUT)
