"""SRT through a helper process: PyAV's FFmpeg has no libsrt, so ``srt-live-transmit``
moves the stream between SRT and loopback UDP. The SRT URL checks (in words, before the
helper would refuse them) and the supervised helper process (``Bridge``) that inputs and
outputs share."""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
from urllib.parse import urlsplit

from facecast.errors import MediaError
from facecast.media.handoff import Halted
from facecast.media.live_errors import describe
from facecast.media.urls import redact

log = logging.getLogger(__name__)

SRT_BRIDGE = "srt-live-transmit"  # Debian package srt-tools; PyAV's FFmpeg has no libsrt
# What srt-live-transmit (libsrt) accepts in an SRT URL's query; anything else it refuses
# with "ConfigurePre: Operation not supported: Bad parameters" or "Invalid mode".
SRT_MODES = ("caller", "client", "listener", "server", "rendezvous")
SRT_PASSPHRASE_CHARS = (10, 79)
SRT_KEY_LENGTHS = ("0", "16", "24", "32")
# srt-live-transmit counts latency in ms, FFmpeg and OBS in µs: a value past this many ms
# (10 s) is most likely meant as µs, and gets a warning.
SRT_LATENCY_WARN_MS = 10_000


def srt_query(url: str) -> dict[str, str]:
    """An SRT URL's query as srt-live-transmit reads it: ``key=value`` pairs, undecoded."""
    items = (item.partition("=") for item in urlsplit(url).query.split("&") if item)
    return {key: value for key, _, value in items}


def srt_listens(url: str) -> bool:
    """Whether srt-live-transmit waits for a caller on ``url``: ``mode=listener`` (or its
    other name, ``server``), or no mode and no host (``srt://:9000``)."""
    mode = srt_query(url).get("mode")
    return mode in ("listener", "server") or (mode is None and not urlsplit(url).hostname)


def srt_listen_address(url: str) -> str:
    """``HOST:PORT`` a listener binds: the ``adapter`` option, else the URL's host (none:
    every interface)."""
    parts = urlsplit(url)
    host = srt_query(url).get("adapter") or parts.hostname or "0.0.0.0"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{host}:{port if port is not None else '?'}"


def check_srt_options(url: str) -> None:
    """A MediaError, in words, for an SRT URL srt-live-transmit would refuse (it says only
    "Bad parameters" or "Invalid mode", and exits): no port, an unknown mode, a passphrase
    libsrt does not take, a key length it does not know. Other options pass through as
    given; srt-live-transmit ignores names it does not know."""
    name = redact(url)
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None or port == 0:
        raise MediaError(f"{name}: an SRT URL needs a port, e.g. srt://0.0.0.0:9000?mode=listener")
    query = srt_query(url)
    mode = query.get("mode")
    if mode is not None and mode not in SRT_MODES:
        raise MediaError(f"{name}: SRT mode must be caller, listener or rendezvous, not {mode!r}")
    low, high = SRT_PASSPHRASE_CHARS
    passphrase = query.get("passphrase")
    if passphrase is not None and not low <= len(passphrase) <= high:
        # the value itself is a secret: only its length is said
        raise MediaError(
            f"{name}: an SRT passphrase must be {low} to {high} characters long, "
            f"not {len(passphrase)}"
        )
    key = query.get("pbkeylen")
    if key is not None and key not in SRT_KEY_LENGTHS:
        raise MediaError(f"{name}: SRT pbkeylen must be 0, 16, 24 or 32 (bytes), not {key!r}")


def check_srt_endpoint(url: str) -> None:
    """At start, before any bridge runs: a listener whose port another program holds is a
    MediaError now (srt-live-transmit would only say "srt_bind: Connection setup failure"
    and exit, and a live input would retry that forever). A latency that looks like
    FFmpeg's microseconds gets a warning: srt-live-transmit counts milliseconds."""
    name = redact(url)
    for key in ("latency", "rcvlatency", "peerlatency"):
        value = srt_query(url).get(key, "")
        if value.isdigit() and int(value) > SRT_LATENCY_WARN_MS:
            log.warning(
                "%s: %s=%s means %g s here: facecast's SRT URLs count milliseconds "
                "(srt-live-transmit), FFmpeg and OBS count microseconds",
                name,
                key,
                value,
                int(value) / 1000,
            )
    problem = srt_listen_problem(url)
    if problem:
        raise MediaError(f"{name}: {problem}")


def srt_listen_problem(url: str) -> str | None:
    """Why an SRT listener on ``url`` could not listen now (a bind to its UDP port fails:
    another program holds it), in words; None if it could, or if ``url`` is a caller."""
    if not srt_listens(url):
        return None
    where = srt_listen_address(url)
    host, _, port = where.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, int(port)))
        except (OSError, ValueError) as exc:  # ValueError: no port (check_srt_options says)
            in_use = getattr(exc, "errno", None) == errno.EADDRINUSE
            why = "in use by another program" if in_use else describe(exc)
            return f"cannot listen on {where} ({why})"
    return None


# ---------------------------------------------------------------------------- SRT bridge


class Bridge:
    """A supervised helper process that moves a stream between SRT and loopback UDP.

    Its stderr goes to a temporary file (a pipe nobody reads would fill and block it), and
    its last line explains an exit. ``stop()`` is bounded: SIGTERM, then SIGKILL.

    The SRT side's state is read from the same file, where srt-live-transmit says it: a
    caller's "SRT source connected" / "SRT target connected", a listener's "Accepted SRT
    source connection" / "Accepted SRT target connection" (no "connected" in it), and
    "SRT source disconnected" / "SRT target disconnected" when the peer goes. ``calls``
    counts the connections so far, ``hangups`` the disconnections (with ``-a:yes`` a
    listener takes the next caller after one leaves, so both keep counting).
    """

    _UP = re.compile(
        rb"(?:Accepted SRT (?:source|target) connection|SRT (?:source|target) connected)"
    )
    _DOWN = re.compile(rb"SRT (?:source|target) disconnected")

    def __init__(self, command: list[str]):
        self.command = command
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self._proc: subprocess.Popen[bytes] | None = None
        self._srt = next((arg for arg in command if arg.startswith("srt://")), "")
        self._lock = threading.Lock()
        self._read_at = 0  # how much of the log has been scanned
        self._partial = b""  # a line not finished yet
        self._calls = 0
        self._hangups = 0

    def listen_problem(self) -> str | None:
        """Before ``start``: why this bridge's SRT listener could not listen (its port is
        held), or None. srt-live-transmit itself would only exit with "srt_bind:
        Connection setup failure"."""
        return srt_listen_problem(self._srt) if self._srt else None

    def start(self) -> None:
        try:
            self._proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._log,
            )
        except OSError as exc:
            raise MediaError(f"cannot start {self.command[0]} ({exc})") from exc

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def calls(self) -> int:
        """SRT connections made (caller) or accepted (listener) so far."""
        self._scan()
        return self._calls

    @property
    def hangups(self) -> int:
        """SRT connections that ended so far."""
        self._scan()
        return self._hangups

    def peer_up(self) -> bool:
        """Whether the SRT side is connected now (a listener: a caller is on)."""
        self._scan()
        return self._calls > self._hangups

    def _scan(self) -> None:
        # pread: the child writes through the same open file, so this file's offset is
        # its offset too, and must not move back under it.
        with self._lock:
            if self._log.closed:
                return
            fd = self._log.fileno()
            while chunk := os.pread(fd, 65536, self._read_at):
                self._read_at += len(chunk)
                self._partial += chunk
            *lines, self._partial = self._partial.split(b"\n")
            for line in lines:
                if self._UP.fullmatch(line.strip()):
                    self._calls += 1
                elif self._DOWN.fullmatch(line.strip()):
                    self._hangups += 1

    def _text(self) -> str:
        with self._lock:
            if self._log.closed:
                return ""
            fd, chunks, at = self._log.fileno(), [], 0
            while chunk := os.pread(fd, 65536, at):
                chunks.append(chunk)
                at += len(chunk)
        return b"".join(chunks).decode(errors="replace")

    def exit_reason(self) -> str:
        code = self._proc.poll() if self._proc else None
        if code is not None and code < 0:
            return f"{self.command[0]} was killed (signal {-code})"
        lines = [ln for ln in self._text().splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else ""
        if "srt_bind" in last and srt_listens(self._srt):
            # "srt_bind: Connection setup failure: unable to create/configure SRT socket"
            return f"cannot listen on {srt_listen_address(self._srt)} (in use by another program?)"
        if "ConfigurePre" in last or "Invalid mode" in last:
            return f"{self.command[0]} refused the SRT options in the URL ({last})"
        return f"{self.command[0]} exited with code {code}" + (f": {last}" if last else "")

    def wait_connected(self, timeout: float, halted: Halted) -> bool:
        """Wait until the SRT side is connected (``peer_up``); False if the bridge exits,
        time runs out or ``halted()``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and not halted():
            if self.peer_up():
                return True
            if not self.alive():
                return False
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 1.0) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) does not die", self.command[0], proc.pid)
        with self._lock:
            self._log.close()


__all__ = [
    "SRT_BRIDGE",
    "Bridge",
    "check_srt_endpoint",
    "check_srt_options",
    "srt_listen_address",
    "srt_listen_problem",
    "srt_listens",
    "srt_query",
]
