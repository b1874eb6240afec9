"""Glass to glass over WebRTC for ``facecast bench live``: the probe pattern published over
WHIP into ``facecast serve`` and watched back over WHEP, on loopback.

The publisher and the viewer are aiortc peers in this process, on an event loop of their
own; the service (its ingest, hook, pipeline and WHEP reader) runs as it does for users.
The publisher stamps each frame with the clock (``probe_pattern``); the viewer reads the
stamp off each decoded frame, so a latency is the whole path: WebRTC in, the relay into
the ingest, the pipeline's swap and encode, RTMP out of nginx, and WebRTC back.
"""

from __future__ import annotations

import asyncio
import fractions
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from av import VideoFrame

from facecast.live.probe import ProbeResult, now_ms, probe_scene
from facecast.live.probe_pattern import draw_timestamp, read_timestamp
from facecast.media.image_io import read_image
from facecast.serve.ingest import free_ports
from facecast.serve.profiles import Profile

KEY = "glass"
FPS = 30


class ProbeTrack(VideoStreamTrack):
    """The probe scene at FPS, each frame stamped with the clock as it leaves."""

    def __init__(self, scene: Any, result: ProbeResult) -> None:
        super().__init__()
        self.scene, self.result = scene, result
        self.start: float | None = None
        self.index = 0

    async def recv(self) -> VideoFrame:
        self.start = self.start or time.monotonic()
        due = self.start + self.index / FPS
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        frame = VideoFrame.from_ndarray(draw_timestamp(self.scene.copy(), now_ms()), "bgr24")
        frame.pts, frame.time_base = self.index, fractions.Fraction(1, FPS)
        self.index += 1
        self.result.sent += 1
        return frame


async def _offer(pc: RTCPeerConnection, http: httpx.AsyncClient, url: str) -> str:
    """POST ``pc``'s offer to a WHIP/WHEP URL, apply the answer; the session's Location."""
    await pc.setLocalDescription(await pc.createOffer())
    reply = await http.post(
        url, content=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}
    )
    reply.raise_for_status()
    await pc.setRemoteDescription(RTCSessionDescription(reply.text, "answer"))
    return reply.headers["location"]


async def _run(base: str, face: Any, size: tuple[int, int], seconds: float, warmup: float):
    result = ProbeResult()
    publisher, viewer = RTCPeerConnection(), RTCPeerConnection()
    publisher.addTransceiver(ProbeTrack(probe_scene(face, size), result), direction="sendonly")
    viewer.addTransceiver("video", direction="recvonly")
    track: asyncio.Future = asyncio.get_running_loop().create_future()
    viewer.on("track", lambda t: track.done() or track.set_result(t))
    async with httpx.AsyncClient(base_url=base, timeout=20) as http:
        try:
            await _offer(publisher, http, f"/whip/{KEY}")
            await asyncio.sleep(3.0)  # the key's pipeline starts and publishes swapped/KEY
            await _offer(viewer, http, f"/whep/{KEY}")
            incoming = await asyncio.wait_for(track, 20)
            first, last_stamp = None, None
            end = time.monotonic() + warmup + seconds + 20
            while time.monotonic() < end:
                frame = await asyncio.wait_for(incoming.recv(), 10)
                result.received += 1
                stamp = read_timestamp(frame.to_ndarray(format="bgr24"))
                if stamp is None or stamp == last_stamp:
                    result.repeated += stamp is not None
                    continue
                last_stamp = stamp
                first = first or time.monotonic()
                if time.monotonic() - first < warmup:
                    result.warmup_skipped += 1
                    continue
                result.latencies_ms.append(float((now_ms() - stamp) & 0xFFFFFFFF))
                if time.monotonic() - first >= warmup + seconds:
                    break
        finally:
            await publisher.close()
            await viewer.close()
    return result


def whip_to_whep(
    face: Path, seconds: float, warmup: float, size: tuple[int, int] = (640, 360)
) -> dict[str, Any]:
    """Latency through ``facecast serve`` from a WHIP publisher to a WHEP viewer."""
    from facecast.serve.service import Service

    http_port, rtmp_port, hls_port = free_ports(3)
    with tempfile.TemporaryDirectory(prefix="facecast-bench-webrtc-") as tmp:
        service = Service(
            {KEY: Profile(face)},
            token=None,
            host="127.0.0.1",
            http_port=http_port,
            rtmp_port=rtmp_port,
            hls_port=hls_port,
            prefix=Path(tmp) / "ingest",
        ).start()
        try:
            base = f"http://127.0.0.1:{http_port}"
            result = asyncio.run(_run(base, read_image(face), size, seconds, warmup))
        finally:
            service.stop()
    return {"relay": "facecast serve, WHIP in, WHEP out", **result.summary()}
