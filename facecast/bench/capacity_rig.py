"""The rig ``facecast bench capacity`` measures on: an ingest server (nginx), ffmpeg
publishers feeding it the prepared clips, readers counting each swapped output's frames,
and the CPU and memory readings from /proc. Everything it starts, it stops."""

from __future__ import annotations

import contextlib
import re
import secrets
import subprocess
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from facecast.bench.handoff import stop_process
from facecast.live.cpu import CLOCK_TICKS, stat_seconds
from facecast.serve.ingest import IngestAccess, IngestServer, free_ports

STATS_PERIOD_S = 0.25  # how often the readers report their frame count


def _spawn(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as sink:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink)


def tail(path: Path, limit: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""


class OutputReader:
    """A viewer of ``swapped/KEY``: ffmpeg copying its video to nowhere, nothing decoded,
    reporting its frame count every STATS_PERIOD_S. Started again when it exits (nginx
    refuses a key nobody publishes yet); the frames of every try add up."""

    def __init__(self, url: str, folder: Path, name: str) -> None:
        self.url, self.folder, self.name = url, folder, name
        self.proc: subprocess.Popen[bytes] | None = None
        self.tries = 0
        self._done_frames = 0  # frames of the tries that ended
        self._last_start = 0.0

    @property
    def _progress(self) -> Path:
        return self.folder / f"{self.name}.{self.tries}.progress"

    def start(self) -> None:
        self.tries += 1
        self._last_start = time.monotonic()
        cmd = [
            "ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error",
            "-progress", str(self._progress), "-stats_period", f"{STATS_PERIOD_S}",
            # without a short probe ffmpeg listens to a live RTMP stream for seconds first
            "-rw_timeout", "5000000", "-rtmp_live", "live", "-fflags", "nobuffer",
            "-analyzeduration", "500000", "-probesize", "200000", "-i", self.url,
            "-map", "0:v:0", "-c", "copy", "-f", "null", "-",
        ]  # fmt: skip
        self.proc = _spawn(cmd, self.folder / f"{self.name}.log")

    def poll(self) -> None:
        """Start it again if it exited (at most every half second)."""
        if self.proc is None or self.proc.poll() is None:
            return
        if time.monotonic() - self._last_start < 0.5:
            return
        self._done_frames += self._frames_of_try()
        self.start()

    def _frames_of_try(self) -> int:
        try:
            text = self._progress.read_text(errors="replace")
        except OSError:
            return 0
        found = re.findall(r"^frame=(\d+)", text, re.MULTILINE)
        return int(found[-1]) if found else 0

    def frames(self) -> int:
        return self._done_frames + self._frames_of_try()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


@dataclass
class Rig:
    """The ingest server and every process the bench starts, all stopped by ``close``."""

    work: Path
    ingest: IngestServer = field(init=False)
    publishers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    readers: list[OutputReader] = field(default_factory=list)

    def __post_init__(self) -> None:
        rtmp_port, http_port = free_ports(2)
        # a worker secret, as `facecast serve` runs it: the pipelines read and publish with it
        self.ingest = IngestServer(
            rtmp_port,
            http_port,
            self.work / "ingest",
            access=IngestAccess(worker_secret=secrets.token_urlsafe(16)),
        )

    def start(self) -> Rig:
        self.ingest.start(timeout=10)
        return self

    def publish(self, key: str, clip: Path) -> subprocess.Popen[bytes]:
        cmd = [
            "ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error",
            "-re", "-stream_loop", "-1", "-i", str(clip), "-c", "copy",
            "-f", "flv", "-flvflags", "no_duration_filesize", self.ingest.rtmp_url("live", key),
        ]  # fmt: skip
        proc = _spawn(cmd, self.work / f"publish-{key}.log")
        self.publishers.append(proc)
        return proc

    def reader(self, key: str) -> OutputReader:
        reader = OutputReader(self.ingest.rtmp_url("swapped", key), self.work, f"read-{key}")
        self.readers.append(reader)
        reader.start()
        return reader

    def published(self, app: str) -> set[str]:
        """Keys with a publisher on ``app`` now (nginx-rtmp's /stat)."""
        try:
            with urllib.request.urlopen(self.ingest.stat_url, timeout=2) as reply:
                root = ET.fromstring(reply.read())
        except (urllib.error.URLError, OSError, ET.ParseError):
            return set()
        keys: set[str] = set()
        for application in root.iter("application"):
            if application.findtext("name") != app:
                continue
            for stream in application.iter("stream"):
                if stream.find("publishing") is not None:
                    keys.add(stream.findtext("name") or "")
        return keys

    def stop_processes(self) -> None:
        for reader in self.readers:
            reader.stop()
        for proc in self.publishers:
            stop_process(proc)
        self.readers.clear()
        self.publishers.clear()

    def helper_pids(self) -> list[int]:
        """nginx (master and workers), the publishers and the readers that run now."""
        pids = [p.pid for p in self.publishers if p.poll() is None]
        pids += [r.pid for r in self.readers if r.pid is not None]
        master = self.ingest.pid
        if master is not None:
            pids.append(master)
            pids += _children(master)
        return pids

    def close(self) -> None:
        try:
            self.stop_processes()
        finally:
            self.ingest.stop()


@contextlib.contextmanager
def rig(work: Path) -> Iterator[Rig]:
    """A started ``Rig``; everything it started is stopped on the way out (an error, a
    Ctrl-C, or the end)."""
    bench_rig = Rig(work)
    try:
        yield bench_rig.start()
    finally:
        bench_rig.close()


# ---------------------------------------------------------------------------- CPU


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 if it is gone)."""
    return stat_seconds(Path(f"/proc/{pid}/stat")) or 0.0


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[1] == str(pid):
                found.append(int(entry.name))
    return found


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (not idle, not waiting on I/O) so far."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return float("nan")
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLOCK_TICKS


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


# ---------------------------------------------------------------------------- one run
