"""CPU time per thread role (facecast/live/cpu.py): a busy thread's time lands on its stage,
and an idle one's does not."""

from __future__ import annotations

import threading
import time

import pytest

from facecast.live.cpu import cores_used, cpu_by_role, role_of


def test_thread_names_map_to_their_stage():
    assert role_of("stream-swap") == "analyse + swap"
    assert role_of("bench-in") == "input (slot)"
    assert role_of("facecast-output") == "encode + mux"
    assert role_of("facecast-input") == "decode (reader)"
    assert role_of("uvicorn") == "other Python threads"


@pytest.mark.skipif(not cpu_by_role(), reason="needs /proc/self/task (Linux)")
def test_a_busy_stage_thread_is_counted_on_its_stage_and_an_idle_one_is_not():
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    busy = threading.Thread(target=spin, name="t-swap")
    idle = threading.Thread(target=stop.wait, name="t-out")
    busy.start()
    idle.start()
    try:
        before = cpu_by_role()
        started = time.monotonic()
        time.sleep(0.8)
        after = cpu_by_role()
        used = cores_used(before, after, time.monotonic() - started)
    finally:
        stop.set()
        busy.join()
        idle.join()
    print("cores used by role:", used)
    assert used.get("analyse + swap", 0.0) >= 0.1  # it spun (a share of a loaded core)
    assert used.get("output (slot, changed boxes to YUV)", 0.0) < 0.05  # it only waited
    assert used["total"] >= used["analyse + swap"]
