"""Hand-off time between workers (``facecast bench capacity``), and the pieces of a cluster
on one machine that the bench and the tests share.

The measure: an ingest (``serve --role ingest``, in this process), a Redis store of its
own and worker processes (``serve --role worker``); one key published. The worker that runs
it is killed (SIGKILL), and the time until ``swapped/KEY`` has a new publisher sending
video at the ingest is the hand-off after a death; then a fresh worker joins, the one now
running the key gets SIGTERM (it drains), and the same time is the hand-off of a drain.
Measured at the ingest (nginx-rtmp's /stat), before any viewer's wait for a keyframe.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from facecast.errors import FacecastError
from facecast.serve.ingest import free_ports, port_accepts
from facecast.serve.profiles import Profile

REDIS_SERVER = "redis-server"


class RedisServer:
    """A redis-server of our own on a free loopback port, with an append-only file in
    ``folder`` so that a restart keeps its data (as a deployment runs it)."""

    def __init__(self, folder: Path, binary: str = REDIS_SERVER) -> None:
        found = shutil.which(binary)
        if found is None:
            raise FacecastError(f"{binary} is not installed (Debian: apt install redis-server)")
        self.binary = found
        self.folder = folder
        self.port = free_ports(1)[0]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        cmd += ["--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "always"]
        cmd += ["--save", ""]
        with (self.folder / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not port_accepts(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise FacecastError(f"redis-server did not start (see {self.folder}/redis.log)")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, (signal.SIGTERM, signal.SIGKILL), 5)
            self.proc = None


def stop_process(
    proc: subprocess.Popen[bytes],
    signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL),
    timeout: float = 3.0,
) -> None:
    """Each of ``signals`` in turn until ``proc`` exits, each wait bounded (ffmpeg closes
    its output cleanly on SIGINT; a facecast worker drains on SIGTERM)."""
    for sig in signals:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)


def publisher_since(stat_url: str, app: str, key: str) -> float | None:
    """How long (s) ``app/KEY`` has had its publisher, if it has one sending data now."""
    with urllib.request.urlopen(stat_url, timeout=2) as reply:
        root = ET.fromstring(reply.read())
    for application in root.iter("application"):
        if application.findtext("name") != app:
            continue
        for stream in application.iter("stream"):
            ours = stream.findtext("name") == key and stream.find("publishing") is not None
            if ours and int(stream.findtext("bytes_in") or 0) > 0:
                return int(stream.findtext("time") or 0) / 1000
    return None


def output_back_after(stat_url: str, key: str, started: float, timeout: float) -> float:
    """Seconds from ``started`` (monotonic) until ``swapped/KEY`` has a publisher that
    began after ``started`` and sends video. Raises FacecastError after ``timeout``."""
    deadline = started + timeout
    while time.monotonic() < deadline:
        with_us = time.monotonic() - started
        try:
            since = publisher_since(stat_url, "swapped", key)
        except (urllib.error.URLError, OSError, ET.ParseError):
            since = None
        if since is not None and since < with_us:
            return time.monotonic() - started
        time.sleep(0.05)
    raise FacecastError(f"swapped/{key}: no new publisher within {timeout:g} s")


def start_worker(
    store_url: str, log_path: Path, capacity: int = 1, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """``facecast serve --role worker`` as a process on loopback; (process, HTTP port)."""
    port = free_ports(1)[0]
    cmd = [sys.executable, "-m", "facecast.cli", "serve", "--role", "worker"]
    cmd += ["--store", store_url, "--capacity", str(capacity)]
    cmd += ["--host", "127.0.0.1", "--http-port", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, port


def wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/readyz"
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise FacecastError(f"worker {proc.pid} not ready within {timeout:g} s")


def measure_handoff(
    work: Path, clip: Path, face: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    """``{"kill_s": ..., "term_s": ...}``: see the module's docstring. ``clip``: a live-ready
    input (short keyframe interval) the publisher loops; ``face``: the key's source."""
    from facecast.serve.service import Service
    from facecast.serve.store import ClusterStore

    store = RedisServer(work / "store").start()
    workers: list[subprocess.Popen[bytes]] = []
    publisher: subprocess.Popen[bytes] | None = None
    service: Service | None = None
    try:
        client = ClusterStore(store.url)
        http_port, rtmp_port, hls_port = free_ports(3)
        service = Service(
            {"handoff": Profile(face)},
            token=None,
            host="127.0.0.1",
            http_port=http_port,
            rtmp_port=rtmp_port,
            hls_port=hls_port,
            prefix=work / "handoff-ingest",
            store=client,
            advertise="127.0.0.1",
        ).start()
        stat = service.ingest.stat_url

        def add_worker(n: int) -> None:
            proc, port = start_worker(store.url, work / f"handoff-worker-{n}.log")
            workers.append(proc)
            wait_ready(proc, port)

        def holder() -> subprocess.Popen[bytes]:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                owner = client.owners().get("handoff")
                for proc in workers:
                    if owner and f"-{proc.pid}-" in owner and proc.poll() is None:
                        return proc
                time.sleep(0.1)
            raise FacecastError("no worker took the key within 30 s")

        progress("hand-off: starting an ingest, a store and two workers")
        for n in (1, 2):
            add_worker(n)
        cmd = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-re"]
        cmd += ["-stream_loop", "-1", "-i", str(clip), "-c", "copy", "-f", "flv"]
        cmd += [service.ingest.rtmp_url("live", "handoff")]
        publisher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        output_back_after(stat, "handoff", time.monotonic(), 60)
        killed = holder()
        started = time.monotonic()
        killed.kill()
        kill_s = output_back_after(stat, "handoff", started, 30)
        progress(f"hand-off after SIGKILL: {kill_s:.2f} s")
        add_worker(3)
        leaving = holder()
        started = time.monotonic()
        leaving.send_signal(signal.SIGTERM)
        term_s = output_back_after(stat, "handoff", started, 30)
        progress(f"hand-off after SIGTERM (drain): {term_s:.2f} s")
        return {"kill_s": round(kill_s, 2), "term_s": round(term_s, 2)}
    finally:
        for proc in [*([publisher] if publisher else []), *workers]:
            stop_process(proc, (signal.SIGTERM, signal.SIGKILL), 20)
        if service is not None:
            service.stop()
        store.stop()
