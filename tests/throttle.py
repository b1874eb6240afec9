"""A TCP relay whose upstream direction runs at a set byte rate: a real, slow link.

facecast's RTMP output connects to the relay, the relay to nginx. While throttled, the
relay reads from facecast only as fast as the rate allows and keeps its receive window
small, so facecast's socket fills and its writes block, as on a congested uplink.

It runs as its own process (``RelayProcess``), as a real link would: in the same process
it would share facecast's GIL, which PyAV holds while an output connects (avio_open and
the RTMP handshake), and the handshake through it could never finish.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

CHUNK = 4096


class ThrottledRelay:
    def __init__(self, target_port: int, rate: float | None, host: str = "127.0.0.1") -> None:
        """``rate``: bytes per second upstream (client → target); None is unlimited."""
        self.target = (host, target_port)
        self.rate = rate
        self.forwarded = 0
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # set before listen(): accepted sockets inherit it, so the window stays small
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        self._listener.bind((host, 0))
        self._listener.listen(4)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def set_rate(self, rate: float | None) -> None:
        self.rate = rate

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(2)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            upstream = socket.create_connection(self.target, timeout=5)
            for args in ((client, upstream, True), (upstream, client, False)):
                thread = threading.Thread(target=self._pump, args=args, daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, src: socket.socket, dst: socket.socket, throttled: bool) -> None:
        src.settimeout(0.2)
        try:
            while not self._stop.is_set():
                rate = self.rate if throttled else None
                size = CHUNK if rate is None else max(1, min(CHUNK, int(rate * 0.05)))
                try:
                    data = src.recv(size)
                except TimeoutError:
                    continue
                if not data:
                    break
                dst.sendall(data)
                if throttled:
                    self.forwarded += len(data)
                    if rate is not None:
                        time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


class RelayProcess:
    """A ThrottledRelay in a child process; ``set_rate`` reaches it through a file."""

    def __init__(self, target_port: int, folder: Path, rate: float | None = None) -> None:
        self.control = folder / "relay-rate"
        self.counter = folder / "relay-forwarded"
        self.set_rate(rate)
        cmd = [sys.executable, __file__, str(target_port), str(self.control), str(self.counter)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def set_rate(self, rate: float | None) -> None:
        self.control.write_text("" if rate is None else str(rate))

    @property
    def forwarded(self) -> int:
        text = self.counter.read_text() if self.counter.exists() else ""
        return int(text or 0)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _serve(target_port: int, control: Path, counter: Path) -> None:
    relay = ThrottledRelay(target_port, rate=None)
    print(relay.port, flush=True)
    while True:
        text = control.read_text().strip() if control.exists() else ""
        relay.set_rate(float(text) if text else None)
        counter.write_text(str(relay.forwarded))
        time.sleep(0.2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target_port", type=int)
    parser.add_argument("control", type=Path)
    parser.add_argument("counter", type=Path)
    args = parser.parse_args()
    _serve(args.target_port, args.control, args.counter)
