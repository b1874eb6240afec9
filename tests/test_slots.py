import threading
import time

import pytest

from facecast.live.slots import Closed, DropOldestQueue, LatestSlot


def test_latest_slot_keeps_the_newest_and_counts_drops():
    slot: LatestSlot[int] = LatestSlot()
    assert slot.put(1) is False
    assert slot.put(2) is True
    assert slot.put(3) is True
    assert slot.get(0.01) == 3
    assert slot.dropped == 2
    assert slot.get(0.01) is None  # taken: empty again


def test_latest_slot_wakes_a_waiting_reader_and_closes():
    slot: LatestSlot[str] = LatestSlot()
    got = []

    def reader():
        got.append(slot.get(2.0))
        try:
            slot.get(2.0)
        except Closed:
            got.append("closed")

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.05)
    slot.put("frame")
    time.sleep(0.05)
    slot.close()
    thread.join(3)
    assert got == ["frame", "closed"]


def test_a_slow_consumer_never_sees_a_backlog():
    """Producer at ~1 kHz, consumer at ~50 Hz: every value the consumer gets is the newest
    (no stale backlog), and the difference is counted as drops."""
    slot: LatestSlot[int] = LatestSlot()
    stop = threading.Event()
    produced = [0]

    def producer():
        while not stop.is_set():
            produced[0] += 1
            slot.put(produced[0])
            time.sleep(0.001)

    thread = threading.Thread(target=producer)
    thread.start()
    lags = []
    for _ in range(10):
        value = slot.get(1.0)
        assert value is not None
        lags.append(produced[0] - value)
        time.sleep(0.02)
    stop.set()
    thread.join(2)
    assert max(lags) <= 2
    assert slot.dropped > 50


@pytest.mark.parametrize("capacity", [1, 3])
def test_drop_oldest_queue_is_bounded_and_ordered(capacity):
    queue: DropOldestQueue[int] = DropOldestQueue(capacity)
    for i in range(5):
        queue.put(i)
    assert queue.drain() == list(range(5 - capacity, 5))
    assert queue.dropped == 5 - capacity
    assert queue.drain() == []


def test_a_lossless_slot_makes_the_producer_wait_and_drops_nothing():
    slot: LatestSlot[int] = LatestSlot(lossless=True)
    got: list[int] = []

    def slow_consumer():
        try:
            while True:
                value = slot.get(1.0)
                if value is not None:
                    got.append(value)
                    time.sleep(0.005)
        except Closed:
            pass

    thread = threading.Thread(target=slow_consumer)
    thread.start()
    for i in range(50):
        slot.put(i)
    slot.close()
    thread.join(5)
    assert got == list(range(50))
    assert slot.dropped == 0


def test_closing_a_lossless_slot_releases_a_waiting_producer():
    slot: LatestSlot[int] = LatestSlot(lossless=True)
    slot.put(1)
    outcome: list[str] = []

    def producer():
        try:
            slot.put(2)
            outcome.append("stored")
        except Closed:
            outcome.append("closed")

    thread = threading.Thread(target=producer)
    thread.start()
    time.sleep(0.1)
    assert outcome == []  # still waiting for room
    slot.close()
    thread.join(2)
    assert outcome == ["closed"]
