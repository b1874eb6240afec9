"""The RTMP/HLS ingest server: a private nginx + nginx-rtmp instance on loopback, run and
supervised as a child process.

Publishers push to ``rtmp://127.0.0.1:PORT/live/KEY``; facecast reads that and publishes
``rtmp://127.0.0.1:PORT/swapped/KEY``, which nginx also serves as HLS at
``http://127.0.0.1:HTTP_PORT/hls/KEY.m3u8``. The config (``facecast.serve.nginx_conf``: the
template, and who may do what) is rendered into a prefix directory that holds everything the
instance writes (pid, logs, temp files, HLS fragments), so it needs no system paths and
several can run side by side.

nginx runs in the foreground (``daemon off``) as our child, in its own process group, so
``stop()`` can always take down the master *and* its worker even if the master is killed.
With ``supervise=True`` a watcher thread notices when nginx dies (a crash, the OOM killer,
``kill -9``), says so (``problems()``, for readiness), and starts it again with backoff,
counting the restarts.

Command line (used by ``scripts/ingest``; see ``facecast.serve.ingest_cli``)::

    python -m facecast.serve.ingest start|stop|status [--rtmp-port N] [--http-port N] [--prefix DIR]
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from facecast.media.backoff import Backoff
from facecast.serve.nginx_conf import (
    FIX,
    HOST,
    LOCAL_ONLY,
    TEMPLATE,
    IngestAccess,
    IngestError,
    NginxConfig,
    find_rtmp_module,
    play_token,
)

# The config's names, importable from here as before it had a module of its own.
__all__ = [
    "HOST",
    "TEMPLATE",
    "IngestAccess",
    "IngestError",
    "IngestServer",
    "find_rtmp_module",
    "free_port",
    "free_ports",
    "play_token",
    "port_accepts",
]

log = logging.getLogger(__name__)

# How often the supervisor looks at nginx, and its restart pacing (seconds).
WATCH_INTERVAL = 0.2
RESTART_BACKOFF = (0.5, 10.0)


def free_port() -> int:
    """A TCP port on loopback that is free right now (the OS picks it; racy but fine locally)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports. The sockets stay bound until all are picked, so the
    OS cannot hand out the same port twice (two free_port() calls could collide)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_accepts(port: int, host: str = HOST, timeout: float = 0.2) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _port_bindable(port: int) -> bool:
    # nginx sets SO_REUSEADDR on its listeners, so match it: a port in TIME_WAIT is usable.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class IngestServer(NginxConfig):
    """A loopback nginx-rtmp instance: ``live`` in, ``swapped`` out (RTMP + HLS), running
    its config (``NginxConfig``: ports, publish hook, ``access``, which nginx).

    Use as a context manager, or start()/stop(). ``prefix=None`` uses a temporary directory
    that stop() removes; a given prefix is kept (its logs help when a test fails).
    ``supervise``: restart nginx when it dies; ``on_exit(reason)`` is called (from the
    watcher thread) each time it is found dead, before it is started again.
    """

    def __init__(
        self,
        rtmp_port: int = 1935,
        http_port: int = 8088,
        prefix: Path | None = None,
        on_publish_url: str | None = None,
        *,
        access: IngestAccess = LOCAL_ONLY,
        supervise: bool = False,
        on_exit: Callable[[str], None] | None = None,
        nginx: str = "nginx",
        rtmp_module: Path | None = None,
        template: Path = TEMPLATE,
    ) -> None:
        super().__init__(rtmp_port, http_port, on_publish_url, access, nginx, rtmp_module, template)
        self.supervise = supervise
        self.on_exit = on_exit
        self._given_prefix = Path(prefix) if prefix is not None else None
        self._prefix: Path | None = self._given_prefix
        self._proc: subprocess.Popen[bytes] | None = None
        # start/stop/restart/reload and the supervisor's restarts, one at a time: the
        # supervisor must not take a deliberate restart's gap for a death.
        self._lock = threading.RLock()
        self._wanted = False  # between start() and stop(): nginx should be running
        self._halt = threading.Event()
        self._watcher: threading.Thread | None = None
        self.restarts = 0  # times the supervisor started nginx again after it died
        self.down_reason: str | None = None  # why it is down, while the supervisor retries

    # ------------------------------------------------------------------ properties

    @property
    def prefix(self) -> Path:
        """The instance's directory (nginx.conf, nginx.pid, logs/, temp/, hls/)."""
        if self._prefix is None:
            self._prefix = Path(tempfile.mkdtemp(prefix="facecast-ingest-"))
        return self._prefix

    @property
    def conf_path(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.prefix / "logs" / "error.log"

    @property
    def pid(self) -> int | None:
        """The nginx master's pid while it runs."""
        return self._proc.pid if self.is_running and self._proc else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def render(self) -> str:
        """The config for this instance, as ``start`` writes it."""
        return self.render_for(self.prefix)

    # ------------------------------------------------------------------ config

    def _write_config(self) -> None:
        for sub in ("logs", "temp", "hls"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        # The config holds the hook URL's secret and the play secret, and the error log
        # records each play's and publish's arguments (facecast's per-run secret among
        # them): both for this user only, whatever the umask.
        (self.prefix / "logs").chmod(0o700)
        text = self.render()
        fd = os.open(self.conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        with os.fdopen(fd, "w") as conf:
            conf.write(text)

    def _base_cmd(self, binary: str) -> list[str]:
        return [binary, "-p", str(self.prefix), "-c", str(self.conf_path)]

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10) -> IngestServer:
        """Render the config, start nginx and wait until the RTMP and HTTP ports accept.
        With ``supervise``, the watcher starts too."""
        with self._lock:
            self._start(timeout)
            self._wanted = True
            self.down_reason = None
            self._halt.clear()
            if self.supervise and (self._watcher is None or not self._watcher.is_alive()):
                self._watcher = threading.Thread(
                    target=self._watch, name="ingest-supervisor", daemon=True
                )
                self._watcher.start()
        return self

    def _start(self, timeout: float = 10) -> None:
        if self.is_running:
            return
        binary = self.check_install()
        for port in (self.rtmp_port, self.http_port):
            # Checked first: else our readiness probe could talk to whoever holds the port.
            if not _port_bindable(port):
                raise IngestError(f"port {HOST}:{port} is in use: pick another (free_port())")
        self._write_config()
        stderr_path = self.prefix / "logs" / "nginx.stderr"
        with open(stderr_path, "wb") as err:
            # A file, not a pipe: nobody reads nginx's output while it runs, and a full pipe
            # would block it. Own session: stop() signals the whole group (master + worker).
            self._proc = subprocess.Popen(
                [*self._base_cmd(binary), "-g", "daemon off;"],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise IngestError(self._failure("nginx exited at start", stderr_path))
            if port_accepts(self.rtmp_port) and port_accepts(self.http_port):
                return
            time.sleep(0.05)
        self._kill()
        raise IngestError(self._failure(f"nginx did not listen within {timeout:g} s", stderr_path))

    def _failure(self, what: str, stderr_path: Path) -> str:
        out = _tail(stderr_path) or _tail(self.error_log)
        hint = ""
        if any(s in out for s in ("ngx_rtmp_module", "dlopen", 'unknown directive "rtmp"')):
            hint = f"\n{FIX}"
        return f"{what} (prefix {self.prefix}):\n{out}{hint}"

    def stop(self, timeout: float = 5) -> None:
        """Stop nginx (fast shutdown, then SIGKILL to the group after ``timeout``), and the
        supervisor first, so it does not start nginx again."""
        self._wanted = False
        self._halt.set()
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout + 15)  # it may be in the middle of a start (10 s at most)
        with self._lock:
            self._stop(timeout)
        if self._given_prefix is None and self._prefix is not None:
            shutil.rmtree(self._prefix, ignore_errors=True)
            self._prefix = None

    def _stop(self, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            # SIGTERM = nginx's fast shutdown: open RTMP sessions are cut, not drained (SIGQUIT
            # would wait for publishers to leave).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        # Kill whatever is left of the group: a worker survives its master's SIGKILL.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)

    def _kill(self) -> None:
        self._stop(0.5)

    def restart(self, timeout: float = 10) -> IngestServer:
        """Stop and start again on the same ports and prefix (every session is cut)."""
        with self._lock:  # the supervisor waits: this gap is not a death
            self._stop(5)
            return self.start(timeout)

    # ------------------------------------------------------------------ supervision

    def problems(self) -> list[str]:
        """Why the ingest server is not serving (empty when it is, or was never started):
        for readiness."""
        if not self._wanted:
            return []
        reason = self.down_reason
        if reason is None and not self.is_running:
            reason = "nginx exited"  # the watcher has not looked yet
        return [] if reason is None else [f"ingest server down: {reason}"]

    def _watch(self) -> None:
        """The supervisor: look at nginx every WATCH_INTERVAL; when it has died, kill what
        is left of its group, tell ``on_exit``, and start it again with backoff until it
        runs or stop() is called."""
        backoff = Backoff(*RESTART_BACKOFF)
        died = ""  # how it died, from the look that noticed it to the restart
        while not self._halt.wait(WATCH_INTERVAL):
            with self._lock:
                if not self._wanted:
                    return
                if self.is_running:
                    continue
                noticed = self.down_reason is None
                if noticed:
                    code = self._proc.returncode if self._proc is not None else None
                    died = self.down_reason = _exit_reason(code)
                    # A worker outlives its killed master and keeps the ports: clear the
                    # group, or the restart would find them taken.
                    self._stop(0.5)
            if noticed:
                log.error("ingest server: %s; restarting it", died)
                if self.on_exit is not None:
                    try:
                        self.on_exit(died)
                    except Exception:  # the restart matters more than the callback
                        log.exception("ingest server: on_exit failed")
            if not backoff.wait(self._halt):
                return
            with self._lock:
                if not self._wanted:
                    return
                try:
                    self._start()
                except IngestError as exc:
                    first = str(exc).splitlines()[0]
                    self.down_reason = f"{died}; restart failed: {first}"
                    log.error("ingest server: %s", self.down_reason)
                    continue
                self.restarts += 1
                self.down_reason = None
            backoff.reset()
            log.warning("ingest server: running again (restart %d)", self.restarts)

    def reload(self, timeout: float = 10, *, keep_sessions: bool = False) -> None:
        """Re-render the config (e.g. after changing ``on_publish_url``) and SIGHUP nginx.

        The new config is checked with ``nginx -t`` first, so a bad one raises here instead of
        being silently ignored by the running nginx. Returns once new workers serve and the
        old ones no longer accept, so a connection made afterwards sees the new config.

        Live sessions: nginx-rtmp ignores worker_shutdown_timeout, so an old worker keeps its
        publishers and readers for as long as they stay connected, and its streams are
        invisible to the new worker (a new reader of such a key is refused). So by default
        the old workers are terminated, cutting every session: publishers and readers must
        reconnect, as after restart() (but the master, its pid and the ports stay).
        ``keep_sessions=True`` leaves them running on the old config instead.
        """
        with self._lock:  # the supervisor waits until the new workers serve
            self._reload(timeout, keep_sessions)

    def _reload(self, timeout: float, keep_sessions: bool) -> None:
        if not self.is_running or self._proc is None:
            raise IngestError("reload(): the ingest server is not running")
        binary = self.check_install()
        self._write_config()
        check = subprocess.run(
            [*self._base_cmd(binary), "-t", "-q"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check.returncode != 0:
            raise IngestError(f"new nginx config rejected:\n{check.stderr.strip()}")
        old = set(self._workers())
        self._proc.send_signal(signal.SIGHUP)
        # SIGHUP returns at once, and until the master has started new workers and told the
        # old ones to quit, an old worker still accepts connections with the old config.
        deadline = time.monotonic() + timeout
        while True:
            serving = {pid for pid, title in self._workers().items() if "shutting" not in title}
            if serving and not (serving & old) and port_accepts(self.rtmp_port):
                break
            if time.monotonic() > deadline or not self.is_running:
                raise IngestError(
                    self._failure("nginx did not come back after reload", self.error_log)
                )
            time.sleep(0.05)
        if keep_sessions:
            return
        for pid in old & set(self._workers()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # a worker's fast exit: closes its sessions
        while old & set(self._workers()) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _workers(self) -> dict[int, str]:
        """The master's live worker processes, pid -> title (Linux /proc). A worker told to
        quit closes its listeners and retitles itself "worker process is shutting down"."""
        if self._proc is None:
            return {}
        master = self._proc.pid
        workers: dict[int, str] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] == "Z" or int(fields[1]) != master:
                    continue  # exited (not yet reaped), or not ours
                title = (entry / "cmdline").read_bytes().decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
            if "worker process" in title:
                workers[int(entry.name)] = title
        return workers

    def __enter__(self) -> IngestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"IngestServer(rtmp={self.rtmp_port}, http={self.http_port}, {state})"


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "nginx exited"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"nginx was killed ({name})"
    return f"nginx exited with code {code}"


if __name__ == "__main__":  # python -m facecast.serve.ingest: see facecast.serve.ingest_cli
    from facecast.serve.ingest_cli import main

    sys.exit(main())
