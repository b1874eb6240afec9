"""The ingest server for real: nginx + nginx-rtmp on loopback, ffmpeg publishing, PyAV reading.

Every wait is bounded and every process is stopped by a fixture, so a broken nginx fails these
tests within seconds instead of hanging them.
"""

from __future__ import annotations

import http.server
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import pytest

from facecast.errors import FacecastError
from facecast.serve.ingest import IngestError, IngestServer, free_port, free_ports, port_accepts
from tests import live_helpers
from tests.conftest import MEDIA, REPO
from tests.live_helpers import (
    FAST_GOP_ARGS,
    codecs,
    grab_frames,
    open_stream,
    probe,
    process_log,
    publish,
    stop_process,
    wait_for_http,
    wait_for_stream,
    wait_until,
)

CLIP = MEDIA / "short_hamilton_clip.mp4"

# Fixtures, bound by name for pytest (an import would trip ruff's F811 on every use).
ingest_server = live_helpers.ingest_server
ingest_factory = live_helpers.ingest_factory
live_procs = live_helpers.live_procs


def test_template_renders_loopback_config(tmp_path: Path) -> None:
    server = IngestServer(2935, 9088, prefix=tmp_path, on_publish_url="http://127.0.0.1:1/auth")
    text = server.render()
    assert not re.search(r"@[A-Z_]+@", text)  # no placeholder left
    assert "listen 127.0.0.1:2935;" in text
    assert "listen 127.0.0.1:9088;" in text
    assert "on_publish http://127.0.0.1:1/auth;" in text
    assert f"hls_path {tmp_path.resolve()}/hls;" in text
    assert "load_module /" in text and "ngx_rtmp_module.so;" in text
    assert "\ndaemon" not in text  # given on the command line; a duplicate is an error
    off = IngestServer(2935, 9088, prefix=tmp_path).render()
    assert "\n            on_publish" not in off


def test_live_round_trip_gives_h264_frames_and_aac(ingest_server, live_procs) -> None:
    url = ingest_server.rtmp_url("live", "cam1")
    pub = live_procs.add(publish(url, CLIP, loop=True))
    wait_for_stream(url, timeout=10)
    with open_stream(url, timeout=10) as container:
        kinds = {s.type: s.codec_context.name for s in container.streams}
        assert kinds == {"video": "h264", "audio": "aac"}, kinds
        video = container.streams.video[0]
        frames = []
        for packet in container.demux(video):
            frames += [f.to_ndarray(format="bgr24") for f in packet.decode()]
            if len(frames) >= 5:
                break
    assert len(frames) >= 5
    assert frames[0].shape == (360, 640, 3)
    assert frames[-1].std() > 10  # a picture, not a blank frame
    assert pub.poll() is None, process_log(pub)


def test_swapped_is_served_as_hls(ingest_server, live_procs) -> None:
    key = "show"
    pub = live_procs.add(
        publish(ingest_server.rtmp_url("swapped", key), CLIP, loop=True, codec_args=FAST_GOP_ARGS)
    )
    started = time.monotonic()
    playlist = wait_for_http(ingest_server.hls_url(key), timeout=10).decode()
    appeared = time.monotonic() - started
    assert playlist.startswith("#EXTM3U"), playlist
    assert "#EXT-X-TARGETDURATION:1" in playlist, playlist  # 1 s fragments
    assert appeared < 6, f"HLS took {appeared:.1f} s"
    info = probe(ingest_server.hls_url(key), timeout=10)
    assert codecs(info) == {"video": "h264", "audio": "aac"}
    assert pub.poll() is None, process_log(pub)


def test_reader_is_dropped_when_the_publisher_leaves(ingest_server, live_procs) -> None:
    """idle_streams off: nginx ends a reader's session when its publisher goes, so facecast
    sees an error at once instead of a silent stall."""
    url = ingest_server.rtmp_url("live", "short")
    pub = live_procs.add(publish(url, CLIP, loop=True))
    wait_for_stream(url, timeout=10)
    with open_stream(url, timeout=10) as container, pytest.raises(OSError) as err:
        left = None
        for n, _packet in enumerate(container.demux()):
            if n == 10:
                stop_process(pub)
                left = time.monotonic()
    assert left is not None
    gone_after = time.monotonic() - left
    # Not PyAV's read timeout (5 s, ExitError): nginx closed the session.
    assert not isinstance(err.value, av.ExitError), err.value
    assert gone_after < 2, f"reader noticed after {gone_after:.1f} s"


def test_reading_a_key_nobody_publishes_fails_fast(ingest_server) -> None:
    started = time.monotonic()
    with pytest.raises(OSError), open_stream(ingest_server.rtmp_url("live", "nobody"), 5):
        pass
    assert time.monotonic() - started < 3


def test_restart_mid_publish(ingest_server, live_procs) -> None:
    url = ingest_server.rtmp_url("live", "cam2")
    # a 0.5 s GOP: a reader (the probe, the grab) joins at the next keyframe
    pub = live_procs.add(publish(url, CLIP, loop=True, codec_args=FAST_GOP_ARGS))
    wait_for_stream(url, timeout=10)
    old_pid = ingest_server.pid
    started = time.monotonic()
    ingest_server.restart()
    assert time.monotonic() - started < 5
    assert port_accepts(ingest_server.rtmp_port)
    assert ingest_server.is_running and ingest_server.pid != old_pid
    # The publisher's connection was cut: ffmpeg gives up (a real publisher would reconnect).
    pub.wait(timeout=5)
    pub2 = live_procs.add(publish(url, CLIP, loop=True, codec_args=FAST_GOP_ARGS))
    assert len(grab_frames(url, 3, timeout=10)) == 3, process_log(pub2)  # retries until up


def test_reload_cuts_live_sessions_so_they_reconnect(ingest_server, live_procs) -> None:
    """A publisher left on an old worker would be invisible to new readers: reload() cuts it."""
    url = ingest_server.rtmp_url("live", "cam3")
    pub = live_procs.add(publish(url, CLIP, loop=True, codec_args=FAST_GOP_ARGS))
    wait_for_stream(url, timeout=10)
    pid = ingest_server.pid
    ingest_server.reload()
    assert ingest_server.pid == pid
    pub.wait(timeout=5)  # cut, as after restart()
    live_procs.add(publish(url, CLIP, loop=True, codec_args=FAST_GOP_ARGS))
    assert len(grab_frames(url, 1, timeout=10)) == 1


def test_supervisor_restarts_nginx_when_its_master_is_killed(ingest_factory, live_procs) -> None:
    """kill -9 of the master alone leaves its worker running, holding the ports: the
    supervisor clears the group, starts nginx again and says it was down meanwhile."""
    exits: list[str] = []
    server = ingest_factory(supervise=True, on_exit=exits.append)
    assert server.problems() == [] and server.restarts == 0
    workers = set(server._workers())
    assert workers
    old_pid = server.pid
    os.kill(old_pid, signal.SIGKILL)
    assert wait_until(lambda: server.restarts == 1 and server.is_running, 20), server.problems()
    assert server.pid != old_pid and not workers & set(server._workers())
    assert exits == ["nginx was killed (SIGKILL)"]
    assert server.problems() == []
    url = server.rtmp_url("live", "again")
    live_procs.add(publish(url, CLIP, loop=True, codec_args=FAST_GOP_ARGS))
    assert len(grab_frames(url, 1, timeout=10)) == 1
    server.stop()
    assert not server.is_running and server.problems() == []


class _AuthHandler(http.server.BaseHTTPRequestHandler):
    calls: list[str]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        self.calls.append(body)
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def deny_all() -> Iterator[tuple[str, list[str]]]:
    """An on_publish endpoint that refuses every stream key; (URL, request bodies)."""
    handler = type("Deny", (_AuthHandler,), {"calls": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/auth", handler.calls
    finally:
        server.shutdown()
        server.server_close()


def test_on_publish_callback_and_reload(ingest_factory, live_procs, deny_all) -> None:
    auth_url, calls = deny_all
    server = ingest_factory(on_publish_url=auth_url)
    url = server.rtmp_url("live", "secret")
    pub = live_procs.add(publish(url, CLIP, loop=True))
    assert pub.wait(timeout=10) != 0, "a refused publisher should exit with an error"
    assert any("name=secret" in body for body in calls), calls
    # Turn the callback off and reload in place: the same key is accepted now.
    server.on_publish_url = None
    pid = server.pid
    server.reload()
    assert server.pid == pid
    live_procs.add(publish(url, CLIP, loop=True))
    wait_for_stream(url, timeout=10)


def test_missing_module_names_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "ngx_rtmp_module.so"
    server = IngestServer(*free_ports(2), prefix=tmp_path, rtmp_module=missing)
    with pytest.raises(IngestError, match="scripts/setup") as err:
        server.start()
    assert isinstance(err.value, FacecastError)
    assert str(missing) in str(err.value)
    assert not server.is_running


def test_broken_module_reports_nginx_error(tmp_path: Path) -> None:
    bogus = tmp_path / "ngx_rtmp_module.so"
    bogus.write_bytes(b"not a shared object")
    server = IngestServer(*free_ports(2), prefix=tmp_path / "p", rtmp_module=bogus)
    with pytest.raises(IngestError, match="dlopen") as err:
        server.start(timeout=5)
    assert "scripts/setup" in str(err.value)
    assert not server.is_running


def test_missing_nginx_names_the_fix(tmp_path: Path) -> None:
    server = IngestServer(*free_ports(2), prefix=tmp_path, nginx="nginx-not-installed")
    with pytest.raises(IngestError, match=r"nginx not found.*scripts/setup"):
        server.start()


def test_port_in_use_is_refused(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = IngestServer(taken.getsockname()[1], free_port(), prefix=tmp_path)
        with pytest.raises(IngestError, match="in use"):
            server.start()


def test_context_manager_with_temporary_prefix() -> None:
    with IngestServer(*free_ports(2)) as server:
        prefix = server.prefix
        assert (prefix / "nginx.pid").is_file()
        assert port_accepts(server.http_port)
    assert not server.is_running
    assert not prefix.exists()
    assert not port_accepts(server.rtmp_port)


def test_scripts_ingest_start_status_stop(tmp_path: Path) -> None:
    rtmp_port, http_port = free_ports(2)
    env = {**os.environ, "FACECAST_INGEST_PREFIX": str(tmp_path / "cli")}
    script = str(REPO / "scripts" / "ingest")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [script, *args], env=env, capture_output=True, text=True, timeout=20, check=False
        )

    try:
        started = run("start", "--rtmp-port", str(rtmp_port), "--http-port", str(http_port))
        assert started.returncode == 0, started.stderr
        assert f"rtmp://127.0.0.1:{rtmp_port}/live/KEY" in started.stdout
        assert port_accepts(rtmp_port)
        status = run("status")
        assert status.returncode == 0 and "running" in status.stdout, status
    finally:
        stopped = run("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not port_accepts(rtmp_port)
    assert run("status").returncode == 3
