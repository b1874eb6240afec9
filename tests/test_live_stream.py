"""`facecast stream` end to end, on a real nginx-rtmp server with ffmpeg as the publisher.

facecast runs as its own process (as a user runs it); its log is read for reconnect lines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from facecast.serve.ingest import free_port
from tests import live_helpers
from tests.live_helpers import (
    codecs,
    grab_frames,
    probe,
    publish,
    stop_process,
    wait_for_stream,
    wait_until,
)

from .conftest import MEDIA, REPO, load
from .media_helpers import identity_distances
from .test_hostile_network import udp_port_bound

ingest_server = live_helpers.ingest_server
live_procs = live_helpers.live_procs

CLIP = MEDIA / "short_hamilton_clip.mp4"
FACE = REPO / "examples" / "obama.jpg"


def start_stream(
    input_url: str, output_url: str, log_path: Path, *extra: str, env: dict | None = None
) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [
        sys.executable,
        "-m",
        "facecast.cli",
        "stream",
        "--source",
        str(FACE),
        "--input",
        input_url,
        "--output",
        output_url,
        "--stall-timeout",
        "2",
        *extra,
    ]
    log = log_path.open("wb")
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
    )


def log_text(path: Path) -> str:
    return path.read_text(errors="replace")


def terminate(proc: subprocess.Popen, timeout: float = 5.0) -> tuple[int | None, float]:
    """SIGTERM; the exit code and how long it took (None if it had to be killed)."""
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        code = None
    return code, time.monotonic() - start


_ANALYSING = threading.Lock()


# The sample clip's singer fills 12-16 % of the frame's width in the shots that show him
# alone; the audience scene's one-face frames are small profiles (9-11 %).
SINGER_WIDTH = 0.12


def grab_face_frames(url: str, analyser, n: int, timeout: float, min_width: float = 0.0) -> list:
    """``n`` frames of a live URL that show one face: the clip's singer, facing the camera.
    Its faceless stretch is skipped, and so is its audience scene, whose small profiles judge
    identity poorly (the largest of them, half swapped in profile, is nearest nobody); with
    ``min_width`` (of the frame's width, e.g. ``SINGER_WIDTH``) so are faces smaller than
    that, which a frame of the audience with one face detected would slip through. Grabs
    may run on several threads at once (``in_parallel``): one analysis at a time."""

    def one_face(image) -> bool:
        with _ANALYSING:
            faces = analyser.analyse(image)
        if len(faces) != 1:
            return False
        x0, _, x1, _ = faces[0].box
        return (x1 - x0) >= min_width * image.shape[1]

    return grab_frames(url, n, timeout, keep=one_face)


def face_distance_to_source(analyser, embedder, frames, source_embedding) -> float:
    """Median identity distance of the largest faces in ``frames`` to the source photo."""
    return identity_distances(analyser, embedder, frames, {"": source_embedding})[""]


def test_rtmp_in_rtmp_out_swaps_faces_and_keeps_audio(
    ingest_server, live_procs, tmp_path, analyser, embedder
):
    live_in = ingest_server.rtmp_url("live", "cam1")
    swapped = ingest_server.rtmp_url("swapped", "cam1")
    live_procs.add(publish(live_in, CLIP, loop=True))
    wait_for_stream(live_in, timeout=15)
    facecast = live_procs.add(start_stream(live_in, swapped, tmp_path / "stream.log"))
    wait_for_stream(swapped, timeout=30, need=("video", "audio"))
    info = codecs(probe(swapped, timeout=15))
    assert info.get("video") == "h264" and info.get("audio") == "aac", info

    source_photo = load("obama.jpg")
    source_embedding = embedder.embed(source_photo, analyser.analyse(source_photo)[0])
    before = face_distance_to_source(
        analyser, embedder, grab_face_frames(live_in, analyser, 15, 30), source_embedding
    )
    after = face_distance_to_source(
        analyser, embedder, grab_face_frames(swapped, analyser, 15, 30), source_embedding
    )
    print(f"median distance to the source face: input {before:.3f}, output {after:.3f}")
    assert after < before
    code, seconds = terminate(facecast)
    assert code == 0 and seconds < 5, log_text(tmp_path / "stream.log")[-3000:]


def test_survives_nginx_restart_and_publisher_reconnect(ingest_server, live_procs, tmp_path):
    live_in = ingest_server.rtmp_url("live", "cam2")
    swapped = ingest_server.rtmp_url("swapped", "cam2")
    log_path = tmp_path / "stream.log"
    publisher = live_procs.add(publish(live_in, CLIP, loop=True))
    wait_for_stream(live_in, timeout=15)
    facecast = live_procs.add(start_stream(live_in, swapped, log_path))
    wait_for_stream(swapped, timeout=30)

    # 1. the ingest server restarts: every session is cut, the publisher comes back
    ingest_server.restart()
    stop_process(publisher)
    publisher = live_procs.add(publish(live_in, CLIP, loop=True))
    restarted = time.monotonic()
    assert grab_frames(swapped, 3, timeout=20)
    print(f"output back {time.monotonic() - restarted:.1f} s after the nginx restart")
    assert facecast.poll() is None, log_text(log_path)[-3000:]

    # 2. the publisher leaves for a while and comes back
    stop_process(publisher)
    time.sleep(3)
    live_procs.add(publish(live_in, CLIP, loop=True))
    assert grab_frames(swapped, 3, timeout=20)
    assert facecast.poll() is None

    code, _ = terminate(facecast)
    text = log_text(log_path)
    assert code == 0, text[-3000:]
    assert "Traceback" not in text
    assert text.lower().count("reconnect") >= 2, text[-3000:]


def test_garbage_on_the_udp_input_is_survived(live_procs, tmp_path):
    in_port = free_port()
    udp_in = f"udp://127.0.0.1:{in_port}"
    out_file = tmp_path / "out.ts"
    log_path = tmp_path / "stream.log"
    facecast = live_procs.add(start_stream(udp_in, str(out_file), log_path))
    # the garbage must reach facecast's input: sent once it listens
    assert wait_until(lambda: udp_port_bound(in_port), 30), log_text(log_path)[-3000:]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(300):
            sock.sendto(
                os.urandom(1316) if i % 3 else b"\x47" + os.urandom(187) * 7, ("127.0.0.1", in_port)
            )
            time.sleep(0.002)
    assert facecast.poll() is None, log_text(log_path)[-3000:]
    publisher = live_procs.add(publish(udp_in, CLIP, loop=False))
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline and (
        not out_file.exists() or out_file.stat().st_size < 200_000
    ):
        time.sleep(0.5)
    stop_process(publisher)
    code, _ = terminate(facecast)
    assert code == 0, log_text(log_path)[-3000:]
    assert out_file.stat().st_size > 200_000, log_text(log_path)[-3000:]
    assert codecs(probe(str(out_file)))["video"] == "h264"


def test_unreachable_input_retries_quietly_and_stops_on_sigterm(live_procs, tmp_path):
    log_path = tmp_path / "stream.log"
    # a status line a second: it counts the input's attempts
    facecast = live_procs.add(
        start_stream(
            "rtmp://127.0.0.1:9/live/nobody",
            str(tmp_path / "out.ts"),
            log_path,
            env={"FACECAST_STATUS_INTERVAL": "1"},
        )
    )
    # still running after several attempts (a few seconds of backing off)
    attempts = re.compile(r"reconnects in ([3-9]|\d\d+) ")
    assert wait_until(lambda: attempts.search(log_text(log_path)), 30), log_text(log_path)[-3000:]
    assert facecast.poll() is None
    code, seconds = terminate(facecast)
    text = log_text(log_path)
    assert code == 0 and seconds < 5, text[-3000:]
    assert "Traceback" not in text
    assert "retry" in text.lower() or "reconnect" in text.lower(), text[-2000:]


def test_sigterm_leaves_a_playable_file(live_procs, tmp_path):
    out_file = tmp_path / "out.mp4"
    log_path = tmp_path / "stream.log"
    facecast = live_procs.add(start_stream(str(CLIP), str(out_file), log_path, "--realtime"))
    # the output is open (the models are loaded), then 2 s (~50 frames) are recorded
    assert wait_until(lambda: "output opened" in log_text(log_path), 30), log_text(log_path)
    time.sleep(2)
    code, seconds = terminate(facecast)
    assert code == 0 and seconds < 5, log_text(log_path)[-3000:]
    info = probe(str(out_file))
    assert codecs(info)["video"] == "h264"
    frames = grab_frames(str(out_file), 10, timeout=10)
    assert len(frames) == 10


def test_probe_measures_glass_to_glass_through_a_running_stream(live_procs, tmp_path):
    """`facecast probe` publishes stamped frames into a running `facecast stream` over
    loopback UDP and reads the swapped output back; every stamp it reads is a latency."""
    in_port = free_port()
    udp_in, udp_out = (f"udp://127.0.0.1:{port}" for port in (in_port, free_port()))
    log_path = tmp_path / "stream.log"
    facecast = live_procs.add(start_stream(udp_in, udp_out, log_path))
    # the engine loads its models before it listens
    assert wait_until(lambda: udp_port_bound(in_port), 30), log_text(log_path)[-3000:]
    cmd = [sys.executable, "-m", "facecast.cli", "probe", "--publish", udp_in, "--read", udp_out]
    cmd += ["--seconds", "8", "--size", "480x270", "--warmup", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print("probe:", summary)
    assert summary["sent"] >= 200
    # most stamped frames come back (a few are lost at the start and in the warm-up)
    assert summary["stamped"] + summary["warmup_skipped"] >= 0.6 * summary["sent"], summary
    # latencies are real clock differences: positive and ordered; the median is far below a
    # second even on a loaded machine (the tail is not: it is for `facecast bench live`)
    assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"], summary
    assert summary["p50_ms"] < 1000, summary
    code, _ = terminate(facecast)
    assert code == 0, log_text(log_path)[-3000:]
