"""CPU time per thread, grouped by what the thread does: where a live stream's cores go.

Wall time per stage (``StageClock``) says how long a frame waits; CPU time says what the
box pays. Python threads are found by their native id; the rest of the process's threads
are native ones (FFmpeg's decoder and x264's encoder threads, the ML runtimes' pools) and
are counted together. Linux only (``/proc/self/task``); elsewhere nothing is read.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

# thread name (suffix) -> the stage it works for
ROLES = (
    ("facecast-input", "decode (reader)"),
    ("-in", "input (slot)"),
    ("-swap", "analyse + swap"),
    ("-out", "output (slot, changed boxes to YUV)"),
    ("facecast-output", "encode + mux"),
)
NATIVE = "native threads (codec, runtimes)"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def role_of(name: str) -> str:
    for suffix, role in ROLES:
        if name.endswith(suffix):
            return role
    return "other Python threads"


def stat_seconds(stat: Path) -> float | None:
    """User + system CPU seconds from a /proc ``stat`` file (a process's or a thread's);
    None when it cannot be read (the process or thread is gone)."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def cpu_by_role() -> dict[str, float]:
    """CPU seconds each role's threads have used so far (ended threads are not counted:
    take the difference of two readings while the same threads run)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return {}
    named = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    totals: dict[str, float] = {}
    for entry in tasks.iterdir():
        tid = int(entry.name)
        seconds = stat_seconds(entry / "stat")  # None: the thread ended meanwhile
        if seconds is None:
            continue
        role = role_of(named[tid]) if tid in named else NATIVE
        totals[role] = totals.get(role, 0.0) + seconds
    return totals


def cores_used(before: dict[str, float], after: dict[str, float], seconds: float) -> dict:
    """Cores each role kept busy between two ``cpu_by_role`` readings ``seconds`` apart,
    and their total."""
    used = {
        role: round((after.get(role, 0.0) - before.get(role, 0.0)) / max(seconds, 1e-6), 3)
        for role in after
    }
    used = {role: value for role, value in used.items() if value > 0}
    used["total"] = round(sum(used.values()), 3)
    return used
