"""``python -m facecast.serve.ingest start|stop|status``: the local ingest server by hand
(``scripts/ingest``).

``start`` leaves nginx running after Python exits (it is in its own session); the state file
in the prefix records its pid and ports for ``stop`` and ``status``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from facecast.serve.ingest import IngestServer, port_accepts
from facecast.serve.nginx_conf import HOST, IngestError

STATE_FILE = "ingest.json"


def default_prefix() -> Path:
    """The prefix used unless ``--prefix`` is given: under XDG_RUNTIME_DIR, else /tmp."""
    return Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / "facecast-ingest"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # An orphaned nginx that nobody reaped yet is a zombie: it answers kill(0) but is gone.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_state(prefix: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((prefix / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if _alive(int(state["pid"])) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m facecast.serve.ingest", description="Local nginx-rtmp ingest server."
    )
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--rtmp-port", type=int, default=1935)
    parser.add_argument("--http-port", type=int, default=8088)
    parser.add_argument("--prefix", type=Path, default=default_prefix())
    parser.add_argument("--on-publish-url", default=None)
    args = parser.parse_args(argv)
    prefix: Path = args.prefix
    state = _read_state(prefix)

    try:
        if args.command == "status":
            if state is None:
                print(f"ingest: not running (prefix {prefix})")
                return 3  # LSB "program is not running"
            up = port_accepts(state["rtmp_port"])
            print(
                f"ingest: {'running' if up else 'NOT LISTENING'} pid {state['pid']}\n"
                f"  publish  rtmp://{HOST}:{state['rtmp_port']}/live/KEY\n"
                f"  swapped  rtmp://{HOST}:{state['rtmp_port']}/swapped/KEY\n"
                f"  HLS      http://{HOST}:{state['http_port']}/hls/KEY.m3u8\n"
                f"  logs     {prefix / 'logs'}"
            )
            return 0 if up else 1
        if args.command == "stop":
            if state is None:
                print("ingest: not running")
                return 0
            pid = int(state["pid"])
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            (prefix / STATE_FILE).unlink(missing_ok=True)
            print("ingest: stopped")
            return 0
        # start
        if state is not None:
            print(f"ingest: already running, pid {state['pid']} (scripts/ingest status)")
            return 0
        prefix.mkdir(parents=True, exist_ok=True)
        server = IngestServer(args.rtmp_port, args.http_port, prefix, args.on_publish_url)
        server.start()
        (prefix / STATE_FILE).write_text(
            json.dumps(
                {"pid": server.pid, "rtmp_port": args.rtmp_port, "http_port": args.http_port}
            )
        )
        print(
            f"ingest: running, pid {server.pid}\n"
            f"  publish  {server.rtmp_url('live', 'KEY')}\n"
            f"  swapped  {server.rtmp_url('swapped', 'KEY')}\n"
            f"  HLS      {server.hls_url('KEY')}\n"
            f"  logs     {prefix / 'logs'}"
        )
        # Deliberately no stop(): nginx keeps running after we exit.
        return 0
    except IngestError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
