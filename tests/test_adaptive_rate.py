"""Adaptive output rate against a real slow link: facecast → throttled TCP relay → nginx."""

from __future__ import annotations

import threading
import time

from facecast.engine.pipeline import SwapEngine
from facecast.live.pipeline import LivePipeline
from facecast.live.rate import RateController
from facecast.media.live_sink import StreamSink
from facecast.media.live_source import StreamSource
from tests import live_helpers
from tests.live_helpers import wait_until
from tests.throttle import RelayProcess

from .conftest import MEDIA

ingest_server = live_helpers.ingest_server

CLIP = MEDIA / "short_hamilton_clip.mp4"
BITRATE = 8_000_000  # the more it sends, the sooner a slow link's buffers fill


def test_output_rate_steps_down_on_a_throttled_link_and_back_up(ingest_server, tmp_path):
    relay = RelayProcess(ingest_server.rtmp_port, tmp_path)
    url = f"rtmp://127.0.0.1:{relay.port}/swapped/throttled"

    def open_sink(width: int, height: int, fps: float, audio, colours) -> StreamSink:
        return StreamSink(
            url,
            width=width,
            height=height,
            fps=fps,
            audio=audio,
            bitrate=BITRATE,
            write_timeout=5,
            colours=colours,
        )

    source = StreamSource(str(CLIP), realtime=True, loop_file=True)
    # swapping off: the encoder and the link are all the work, so a step down can only be
    # the link's doing
    pipeline = LivePipeline(SwapEngine(), source, open_sink, bitrate=BITRATE, status_interval=1)
    pipeline.swapping = False
    pipeline.rate = RateController(window=15, recover_after=2.0)
    stop = threading.Event()
    runner = threading.Thread(target=pipeline.run, args=(stop,), daemon=True)
    runner.start()
    try:
        stats = pipeline.stats
        # an open link: the full rate holds
        assert wait_until(lambda: stats.frames_out > 90, 20), stats
        assert stats.rate_level == 1.0 and stats.rate_changes == 0

        # 1.2 Mb/s for an 8 Mb/s stream; the sender's socket buffer (~3.5 MB on Linux
        # loopback) fills in ~4 s, and then its writes block
        relay.set_rate(150_000)
        assert wait_until(lambda: stats.rate_level < 1.0, 45), stats
        stepped_down = time.monotonic()
        print(f"stepped down to x{stats.rate_level:.2f}")

        relay.set_rate(None)
        assert wait_until(lambda: stats.rate_level == 1.0, 60), stats
        print(f"back to full rate {time.monotonic() - stepped_down:.1f} s after the link opened")
        out_before = stats.frames_out
        time.sleep(2)
        assert stats.frames_out - out_before > 40  # and frames flow at the full rate again
    finally:
        stop.set()
        runner.join(15)
        relay.close()
    assert stats.rate_changes >= 2
    assert relay.forwarded > 100_000
