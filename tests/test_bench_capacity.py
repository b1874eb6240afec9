"""``facecast bench capacity``: its measurement runs for real, short (1 and 2 streams at
360p through a private nginx-rtmp, real publishers, pipelines and readers), and what it
reports is checked for shape and for frames that really came back; no timing asserts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from facecast.bench.capacity import (
    capacity_table,
    max_streams_at,
    measure,
    prepare_input,
    rig,
    summary_lines,
)
from facecast.bench.swap import update_docs

from .conftest import REPO

EXAMPLES = REPO / "examples"
SECONDS, WARMUP = 1.5, 0.5


def _ours(work: Path) -> list[str]:
    """Command lines of processes still running that were started for ``work``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(work) in cmdline and state != "Z":
            found.append(cmdline)
    return found


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> list[dict]:
    """N = 1 and N = 2 at 640x360, a 1.5 s window each; what was left running after each
    run and after the rig closed is recorded too."""
    work = tmp_path_factory.mktemp("capacity")
    clip = prepare_input(EXAMPLES / "short_hamilton_clip.mp4", 640, 360, work)
    runs = []
    with rig(work) as bench_rig:
        for n in (1, 2):
            run = measure(bench_rig, clip, EXAMPLES / "obama.jpg", n, SECONDS, WARMUP)
            # after a run only the ingest's nginx may be left (the rig owns it)
            run["_left"] = [c for c in _ours(work) if "nginx" not in c]
            runs.append(run)
    runs[-1]["_left_after_rig"] = _ours(work)
    return runs


def test_each_stream_sends_real_swapped_frames_back(measured):
    for n, run in zip((1, 2), measured, strict=True):
        assert run["errors"] == [], run
        assert run["streams"] == n and len(run["per_stream"]) == n
        assert len({s["key"] for s in run["per_stream"]}) == n
        assert run["window_s"] >= SECONDS * 0.9
        for stream in run["per_stream"]:
            # frames came in over RTMP, were swapped, and reached a reader of swapped/KEY
            assert stream["fps_in"] > 0, stream
            assert stream["frames_swapped_whole_run"] > 0, stream
            assert stream["frames_out"] > 0, stream
            assert stream["frames_delivered"] > 0, stream
            assert stream["fps"] > 0, stream
            # what the reader got, less repeats of the last frame, over the window
            fresh = stream["frames_delivered"] - stream["frames_held"]
            assert stream["fps"] == pytest.approx(fresh / run["window_s"], rel=0.01)
        fps = [s["fps"] for s in run["per_stream"]]
        assert run["fps_min"] == min(fps) and run["fps_max"] == max(fps)
        assert run["fps_min"] <= run["fps_median"] <= run["fps_max"]
        assert run["worker_cores"] > 0 and run["worker_rss_mb"] > 0
        assert run["latency_p50_ms"] is not None and run["latency_p50_ms"] > 0


def test_every_process_it_started_is_stopped(measured):
    for run in measured:
        assert run["_left"] == [], run["_left"]
    assert measured[-1]["_left_after_rig"] == [], measured[-1]["_left_after_rig"]


def test_the_report_counts_streams_held_from_the_measured_runs(measured, tmp_path):
    runs = [{k: v for k, v in run.items() if not k.startswith("_")} for run in measured]
    # both runs delivered frames, so both hold a rate just above zero
    assert max_streams_at(runs, 0.01) == 2
    assert max_streams_at(runs, 1000.0) == 0
    payload = {
        "sizes": [
            {
                "size": "640x360",
                "runs": runs,
                "max_streams": {"25": max_streams_at(runs, 25), "15": max_streams_at(runs, 15)},
                "capped": {"25": False, "15": False},
            }
        ],
        "handoff": {"kill_s": 3.2, "term_s": 2.4},
    }
    table = capacity_table(payload)
    assert table.count("| 640x360 |") == 2
    lines = summary_lines(payload)
    assert lines[0].startswith("640x360: ")
    assert lines[-1].endswith(
        "3.2 s after a SIGKILL, 2.4 s after a SIGTERM (drain), output back at the ingest"
    )
    docs = tmp_path / "benchmarks.md"
    docs.write_text(
        "# Benchmarks\n\n<!-- bench:capacity:start -->\nold\n<!-- bench:capacity:end -->\n"
    )
    update_docs("capacity", table, docs)
    assert "old" not in docs.read_text() and table in docs.read_text()


def test_streams_held_stop_at_the_first_run_under_the_rate():
    runs = [
        {"streams": 1, "fps_min": 30.0},
        {"streams": 2, "fps_min": 24.0},
        {"streams": 3, "fps_min": 26.0},  # a lucky run after a failure does not count
    ]
    assert max_streams_at(runs, 25) == 1
    assert max_streams_at(runs, 15) == 3
    assert max_streams_at([{"streams": 2, "fps_min": 30.0}], 15) == 0  # N = 1 never ran


def test_the_command_is_there():
    result = subprocess.run(
        [sys.executable, "-m", "facecast.cli", "bench", "capacity", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert result.returncode == 0, result.stderr
    for option in ("--seconds", "--max-streams", "--results", "--update-docs"):
        assert option in result.stdout, result.stdout
