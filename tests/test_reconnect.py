"""A live input whose publisher goes away and comes back (issue 13).

The real path: ``StreamSource`` with the defaults ``facecast stream`` gives it (``Backoff()``,
5 s stall and open timeouts) reading ``rtmp://127.0.0.1:PORT/live/KEY`` from a real nginx-rtmp,
fed by Debian ffmpeg. The publisher is killed, stays away long enough for an exponential
backoff to grow to several seconds, and is started again; the input must show frames again
within ``RETURN_LIMIT_S`` of that start, and its log must say why it waits (not FFmpeg's
"Operation not permitted"), without a line per attempt.
"""

from __future__ import annotations

import logging
import random
import shutil
import threading
import time
from collections.abc import Iterator

import pytest

from facecast.media import live_source
from facecast.media.backoff import Backoff
from facecast.media.frame import Frame
from facecast.media.live_source import StreamSource, _OpenFailed
from tests import live_helpers
from tests.conftest import MEDIA
from tests.live_helpers import FAST_GOP_ARGS, process_log, publish, wait_until

CLIP = MEDIA / "short_hamilton_clip.mp4"
ABSENCE_S = 8.0  # today's backoff has grown to 4-8 s waits by then (its 5th, U[4, 8] s,
# starts 3.75-7.5 s in, plus the attempts themselves)
ROUNDS = 2  # the backoff's jitter can land a retry just in time: measure more than once
# Poll (≤ 1 s) + the publisher's next keyframe (nginx-rtmp starts a new reader there; the
# publisher re-encodes with a 0.5 s GOP) + ffmpeg's own start-up, on loopback.
RETURN_LIMIT_S = 2.0

needs_live = pytest.mark.skipif(
    shutil.which("ffmpeg") is None or shutil.which("nginx") is None,
    reason="needs Debian ffmpeg and nginx with the rtmp module (scripts/setup)",
)

# Fixtures, bound by name for pytest (an import would trip ruff's F811 on every use).
ingest_server = live_helpers.ingest_server
live_procs = live_helpers.live_procs

LOGGER = "facecast.media.live_source"


class FrameTimes:
    """``source.items()`` on a thread, keeping each frame's arrival time (not its pixels)."""

    def __init__(self, source: StreamSource):
        self.source = source
        self.stop = threading.Event()
        self.times: list[float] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for item in self.source.items(self.stop):
            if isinstance(item, Frame):
                self.times.append(time.monotonic())

    def close(self) -> None:
        self.stop.set()
        self.thread.join(3)
        self.source.join(5)


@pytest.fixture
def readers() -> Iterator[list[FrameTimes]]:
    made: list[FrameTimes] = []
    yield made
    for reader in made:
        reader.close()


@pytest.mark.slow
@needs_live
def test_rtmp_input_is_back_soon_after_its_publisher_returns(
    ingest_server, live_procs, readers, caplog
):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    url = ingest_server.rtmp_url("live", "comeback")

    def start_publisher():
        return live_procs.add(publish(url, CLIP, loop=True, codec_args=FAST_GOP_ARGS))

    publisher = start_publisher()
    source = StreamSource(url)  # what `facecast stream` builds: default backoff and timeouts
    reader = FrameTimes(source)
    readers.append(reader)
    assert wait_until(lambda: len(reader.times) >= 30, 15), process_log(publisher)

    returns: list[float] = []
    absent_records: list[logging.LogRecord] = []
    for _ in range(ROUNDS):
        publisher.kill()  # a crash or a cut link: no goodbye to the server
        publisher.wait(5)
        gone = time.monotonic()
        assert wait_until(lambda: not source.connected, 3), "the loss was not noticed"
        first_record = len(caplog.records)
        time.sleep(max(0.0, gone + ABSENCE_S - time.monotonic()))
        absent_records += caplog.records[first_record:]

        seen = len(reader.times)
        back = time.monotonic()
        publisher = start_publisher()
        assert wait_until(lambda n=seen: len(reader.times) > n, 20), process_log(publisher)
        returns.append(reader.times[seen] - back)
        assert wait_until(lambda: source.connected, 2)

    print(f"\nfirst frame after the publisher's return: {', '.join(f'{t:.2f}' for t in returns)} s")
    assert max(returns) <= RETURN_LIMIT_S, f"back after {returns} s (limit {RETURN_LIMIT_S} s)"

    # What the log said while nothing was published: a reason a person can act on.
    shown = [r.getMessage() for r in absent_records if r.levelno >= logging.INFO]
    print("\n".join(shown))
    assert not any("Operation not permitted" in m for m in shown), shown
    assert any("no publisher" in m and url in m for m in shown), shown
    # ... once when it changes, not once per attempt: ~11 attempts in 8 s, a handful of lines.
    attempts = sum("no publisher" in r.getMessage() for r in absent_records)
    assert attempts >= 5, "expected a quick poll while the publisher is away"
    assert len(shown) <= 4 * ROUNDS, shown
    assert not any(r.exc_info for r in caplog.records)


# ------------------------------------------------------------------------ retry cadence


def _record_waits(monkeypatch, attempts: int) -> list[float]:
    """Make the reader's waits between attempts instant; the list fills with what they were
    meant to be, and the reader stops ("halted") after ``attempts`` of them."""
    delays: list[float] = []

    def sleep(seconds: float, halted: object) -> bool:
        delays.append(seconds)
        return len(delays) >= attempts

    monkeypatch.setattr(live_source, "_sleep", sleep)
    return delays


def _run_reader(source: StreamSource) -> None:
    source._read_loop(lambda: False, live_source._Handoff(4, drop=True))


def test_an_absent_stream_is_polled_quickly_and_a_down_server_backs_off(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    url = "rtmp://127.0.0.1:1935/live/key"
    failure: list[_OpenFailed] = []

    def fail(self: StreamSource, halted: object) -> None:
        raise failure[0]

    monkeypatch.setattr(StreamSource, "_open", fail)

    failure[:] = [_OpenFailed("no publisher on this key", absent=True)]
    absent = _record_waits(monkeypatch, 30)
    _run_reader(StreamSource(url, backoff=Backoff(_rng=random.Random(13))))
    assert max(absent) <= 1.0 and min(absent) >= 0.25, absent

    failure[:] = [_OpenFailed("connection refused")]
    refused = _record_waits(monkeypatch, 10)
    _run_reader(StreamSource(url, backoff=Backoff(_rng=random.Random(13))))
    assert refused[-1] >= 5.0, refused  # a server that is down is not hammered

    # 40 failed attempts, two distinct reasons: a few lines, not one (or two) per attempt.
    shown = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(shown) <= 8, shown

    # The summary that stands in for the repeats (due at once here: the waits are instant).
    caplog.clear()
    monkeypatch.setattr(live_source, "WAITING_SUMMARY_S", 0.0)
    failure[:] = [_OpenFailed("no publisher on this key", absent=True)]
    _record_waits(monkeypatch, 3)
    _run_reader(StreamSource(url))
    summaries = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
    assert summaries and summaries[-1].startswith(f"{url}: still waiting (3 failed attempts in")
    assert summaries[-1].endswith("s): no publisher on this key"), summaries


def test_a_udp_input_with_nobody_sending_listens_again_soon(monkeypatch, caplog):
    # Each open listens for open_timeout. Nobody is spared by waiting longer between listens,
    # and every second not listening is a second of the sender's stream lost when it returns.
    caplog.set_level(logging.INFO, logger=LOGGER)
    port = live_source.free_udp_port()
    delays = _record_waits(monkeypatch, 8)
    source = StreamSource(f"udp://127.0.0.1:{port}", open_timeout=0.2, stall_timeout=1.0)
    _run_reader(source)
    assert len(delays) == 8 and max(delays) <= 1.0, delays
    shown = [r.getMessage() for r in caplog.records]
    assert any(f"udp://127.0.0.1:{port}: no data arriving" in m for m in shown), shown
