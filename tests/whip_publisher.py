"""A WHIP publisher that is not facecast's code: FFmpeg's own ``whip`` muxer (the FFmpeg
inside PyAV), run as its own process, publishing a video file looped at its pace until
SIGTERM, when it closes the muxer (which DELETEs its session) and exits 0.

    python -m tests.whip_publisher URL VIDEO TOKEN CERT KEY

Its own process because PyAV holds the GIL through the muxer's HTTP exchange: in the
process that serves the WHIP endpoint it would wait forever for its own answer. FFmpeg's
DTLS (GnuTLS here) needs an ECDSA P-256 certificate (CERT, KEY) to shake hands with aiortc:
the one it makes itself ends the handshake with a fatal alert (docs/webrtc.md).
"""

from __future__ import annotations

import signal
import sys
import threading
import time

import av


def publish(url: str, video: str, token: str, cert: str, key: str, stop: threading.Event) -> None:
    options = {"authorization": token, "cert_file": cert, "key_file": key}
    with av.open(url, "w", format="whip", options=options) as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        stream.options = {"preset": "ultrafast", "tune": "zerolatency", "bf": "0", "g": "30"}
        start, index = time.monotonic(), 0
        while not stop.is_set():
            with av.open(video) as clip:
                for frame in clip.decode(video=0):
                    if stop.is_set():
                        break
                    # a fresh frame: the clip's own timestamps and time base stay behind
                    image = frame.to_ndarray(width=640, height=360, format="yuv420p")
                    sent = av.VideoFrame.from_ndarray(image, format="yuv420p")
                    sent.pts = index
                    for packet in stream.encode(sent):
                        out.mux(packet)
                    index += 1
                    time.sleep(max(0.0, start + index / 30 - time.monotonic()))
        for packet in stream.encode():
            out.mux(packet)


def main() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    publish(*sys.argv[1:6], stop=stop)
    print("published", flush=True)


if __name__ == "__main__":
    main()
