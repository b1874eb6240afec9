"""Hostile networks: a UDP input that arrives out of order, a UDP output squeezed on this
host's own egress, and secrets that ride in stream URLs.

Reordering is done in userspace (``ReorderingRelay``): the kernel's netem is not available
everywhere. The squeezed link is a ``tbf`` qdisc on the loopback of a private network
namespace, so these tests need root and ``ip``/``tc``; they skip, saying why, without them.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from facecast.engine.pipeline import SwapEngine
from facecast.live.pipeline import LivePipeline
from facecast.live.rate import RateController
from facecast.media.frame import AudioChunk, Frame
from facecast.media.live_sink import StreamSink, udp_send_queue
from facecast.media.live_source import AudioParams, StreamSource, free_udp_port, redact
from facecast.media.planes import ColourTags
from tests import live_helpers
from tests.live_helpers import FFMPEG, process_log, publish, stop_process, wait_until

from .conftest import MEDIA, REPO

live_procs = live_helpers.live_procs

CLIP = MEDIA / "short_hamilton_clip.mp4"  # 10 s, H.264 + AAC
FACE = REPO / "examples" / "obama.jpg"
UNIT = 1316  # what the publisher puts in one datagram: 7 TS packets


# ------------------------------------------------------------------------ reordering


class ReorderPlan:
    """Which units of a stream go late, and by how many units. Seeded: the same stream
    always comes out in the same order, so a plan found offline replays exactly."""

    def __init__(self, seed: int, share: float = 0.3, most: int = 8) -> None:
        self._rng = random.Random(seed)
        self.share, self.most = share, most
        self._held: list[list] = []  # [unit, units still to wait]
        self.late = 0

    def push(self, unit: bytes) -> list[bytes]:
        """The units to send now that ``unit`` has come in."""
        if self._rng.random() < self.share:
            self._held.append([unit, self._rng.randint(1, self.most)])
            return []
        out = [unit]
        for held in self._held:
            held[1] -= 1
        out += [held[0] for held in self._held if held[1] <= 0]
        self.late += sum(held[1] <= 0 for held in self._held)
        self._held = [held for held in self._held if held[1] > 0]
        return out

    def flush(self) -> list[bytes]:
        out = [held[0] for held in self._held]
        self._held.clear()
        return out


def reordered(data: bytes, plan: ReorderPlan) -> bytes:
    out: list[bytes] = []
    for at in range(0, len(data), UNIT):
        out += plan.push(data[at : at + UNIT])
    return b"".join(out + plan.flush())


class UdpListener:
    """A UDP socket on loopback with a thread that hands every datagram to ``received``
    (subclasses say what to do with it) until ``close``."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.on_datagram(data)

    def on_datagram(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class ReorderingRelay(UdpListener):
    """A UDP relay that cuts what it receives into ``UNIT``-byte pieces (by stream offset,
    whatever sizes the sender's datagrams had) and forwards them in ``plan``'s order."""

    def __init__(self, target: tuple[str, int], plan: ReorderPlan) -> None:
        self.target, self.plan = target, plan
        self.received = bytearray()
        self._pending = bytearray()
        self._outbound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        super().__init__()

    def on_datagram(self, data: bytes) -> None:
        self.received += data
        self._pending += data
        while len(self._pending) >= UNIT:
            unit = bytes(self._pending[:UNIT])
            del self._pending[:UNIT]
            for out in self.plan.push(unit):
                self._outbound.sendto(out, self.target)

    def close(self) -> None:
        super().close()
        self._outbound.close()


def refused_audio(stream: bytes, after_s: float) -> int:
    """How many of the audio packets FFmpeg's demuxer makes of ``stream`` FFmpeg's MPEG-TS
    muxer refuses ("Invalid data"), counting those ``after_s`` seconds or more in and later
    than every packet before them (an earlier one is dropped by the sink as a replay)."""
    with av.open(io.BytesIO(stream), format="mpegts") as demuxer:
        audio = demuxer.streams.audio[0]
        template_container, template = AudioParams.from_stream(audio).open_template()
        with av.open(io.BytesIO(), "w", format="mpegts") as muxer:
            out = muxer.add_stream_from_template(template)
            template_container.close()
            muxer.start_encoding()
            refused, latest, first, ticks = 0, None, None, 0
            for packet in demuxer.demux(audio):
                if not packet.size or packet.pts is None:
                    continue
                first = packet.pts if first is None else first
                seconds = float((packet.pts - first) * packet.time_base)
                ahead = latest is None or packet.pts > latest
                latest = packet.pts if latest is None else max(latest, packet.pts)
                copy = av.Packet(bytes(packet))
                copy.stream, copy.time_base = out, out.time_base
                ticks += 2048
                copy.pts = copy.dts = ticks
                try:
                    muxer.mux(copy)
                except av.error.InvalidDataError:
                    refused += ahead and seconds >= after_s
    return refused


def udp_port_bound(port: int) -> bool:
    """Whether a UDP socket of this network namespace is bound to ``port``."""
    for table in ("/proc/self/net/udp", "/proc/self/net/udp6"):
        with open(table) as rows:
            next(rows)
            if any(int(row.split()[1].rsplit(":", 1)[1], 16) == port for row in rows):
                return True
    return False


class Viewer(UdpListener):
    """A UDP receiver that keeps everything it is sent, for decoding afterwards."""

    def __init__(self) -> None:
        self.data = bytearray()
        super().__init__()

    def on_datagram(self, data: bytes) -> None:
        self.data += data

    def video_frames(self) -> int:
        """How many video frames a player decodes of what came (skipping what it cannot,
        as players do: the stream's last access unit delimiter has no frame after it)."""
        frames = 0
        with av.open(io.BytesIO(bytes(self.data)), format="mpegts") as container:
            for packet in container.demux(video=0):
                try:
                    frames += len(packet.decode())
                except av.error.InvalidDataError:
                    continue
        return frames


def test_reordered_udp_input_never_resets_the_output(tmp_path, live_procs):
    # What the publisher will send, made first by the same ffmpeg with the same options:
    # MPEG-TS over UDP is these bytes, cut into datagrams.
    published = tmp_path / "published.ts"
    make = [FFMPEG, "-v", "error", "-i", str(CLIP), "-c", "copy"]
    subprocess.run([*make, "-f", "mpegts", str(published)], check=True, timeout=30)
    stream = published.read_bytes()
    # A reordering under which FFmpeg's demuxer hands on an audio packet that FFmpeg's
    # MPEG-TS muxer refuses (seen: one byte long): rare (about one a minute of heavy
    # reordering), so found here, offline, and then replayed exactly.
    seed = next(
        (s for s in range(400) if refused_audio(reordered(stream, ReorderPlan(s)), 4.0)),
        None,
    )
    assert seed is not None, "no reordering of the clip makes an audio packet FFmpeg refuses"

    viewer = Viewer()
    in_port = free_udp_port()
    relay = ReorderingRelay(("127.0.0.1", in_port), ReorderPlan(seed))
    source = StreamSource(f"udp://127.0.0.1:{in_port}")
    sinks: list[StreamSink] = []

    def open_sink(
        width: int, height: int, fps: float, audio: AudioParams | None, colours: ColourTags
    ) -> StreamSink:
        sink = StreamSink(
            f"udp://127.0.0.1:{viewer.port}",
            width=width,
            height=height,
            fps=fps,
            audio=audio,
            colours=colours,
        )
        sinks.append(sink)
        return sink

    pipeline = LivePipeline(SwapEngine(), source, open_sink, status_interval=5)
    pipeline.swapping = False  # the network is under test, not the swap
    stop = threading.Event()
    runner = threading.Thread(target=pipeline.run, args=(stop,), daemon=True)
    runner.start()
    try:
        assert wait_until(lambda: udp_port_bound(in_port), 15), "the input never listened"
        publisher = live_procs.add(publish(f"udp://127.0.0.1:{relay.port}", CLIP, loop=True))
        assert wait_until(lambda: len(relay.received) >= len(stream), 35), process_log(publisher)
        time.sleep(0.5)  # the last of it through the pipeline
    finally:
        stop.set()
        runner.join(20)
        relay.close()
        viewer.close()
    assert relay.received[: len(stream)] == stream, "the publisher sent another stream"
    print(
        f"seed {seed}: {relay.plan.late} units sent late; input: {source.bad_packets} bad "
        f"packets skipped; output: {sinks[0].audio_packets} audio packets sent, "
        f"{sinks[0].audio_dropped} dropped"
    )
    sink = sinks[0]
    stats = pipeline.stats
    assert len(sinks) == 1 and sink.reconnects == 0, "the output was reopened"
    assert sink.dropped == 0, f"{sink.dropped} frames were not sent"
    # every frame the input gave (or a holding frame) went out: the heavy reordering
    # costs the input frames, the output loses none of what is left
    assert sink.frames == stats.frames_out >= stats.frames_processed > 100
    assert stats.frames_rate_skipped == 0
    assert sink.audio_packets > 150  # the audio went on too
    # what a viewer got: every frame sent, none lost to a reset of the stream
    decoded = viewer.video_frames()
    assert decoded >= sink.frames - 2, f"a viewer decoded {decoded} of {sink.frames} frames"


def test_an_audio_packet_the_muxer_refuses_costs_the_output_nothing(tmp_path, caplog):
    """The sink's own guard, whatever hands it such a packet (the input above now drops
    it first): a refused packet is dropped and counted, the connection carries on."""
    clip_ts = tmp_path / "clip.ts"
    make = [FFMPEG, "-v", "error", "-i", str(CLIP), "-t", "3", "-c", "copy", "-f", "mpegts"]
    subprocess.run([*make, str(clip_ts)], check=True, timeout=30)
    with av.open(str(clip_ts)) as container:
        audio = container.streams.audio[0]
        params = AudioParams.from_stream(audio)
        chunks = [
            AudioChunk(bytes(p), p.pts, p.dts, Fraction(p.time_base), p.duration or None)
            for p in container.demux(audio)
            if p.size and p.pts is not None
        ]
    with av.open(str(clip_ts)) as container:
        images = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)][:60]
    # in place of one real packet: the one-byte fragment the demuxer gave for a
    # reordered stream (its place on the timeline is fine; its content is not)
    damaged = len(chunks) // 2
    chunks[damaged].data = b"\x07"
    first = chunks[0].pts

    viewer = Viewer()
    sink = StreamSink(f"udp://127.0.0.1:{viewer.port}", width=640, height=360, fps=30, audio=params)
    try:
        assert wait_until(lambda: sink.connected, 5)
        start = time.monotonic()
        pending = list(chunks)
        for index, image in enumerate(images):
            due = index / 30
            time.sleep(max(0.0, start + due - time.monotonic()))
            while pending and float((pending[0].pts - first) * pending[0].time_base) <= due:
                chunk = pending.pop(0)
                chunk.t_ingest = time.monotonic()
                sink.write_audio(chunk)
            sink.write(Frame(image=image, index=index, t_ingest=time.monotonic()))
    finally:
        sink.close()
        viewer.close()
    assert not [r.getMessage() for r in caplog.records if "output lost" in r.getMessage()]
    assert sink.reconnects == 0 and sink.dropped == 0
    assert sink.frames == len(images)
    assert sink.audio_damaged == 1


# ------------------------------------------------------------------------ squeezed output


def _netns_or_skip(name: str) -> None:
    """Make network namespace ``name`` with its loopback up, or skip saying why not."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a network namespace and a tbf qdisc shape the link")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (iproute2) to shape a link")
    for command in (["ip", "netns", "add", name], ["ip", "netns", "exec", name, "ip", "link",
                    "set", "lo", "up"]):  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot make a network namespace: {done.stderr.strip()}")


def _status_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(errors="replace").splitlines() if " rate x" in line]


def test_a_udp_output_squeezed_on_this_host_steps_its_rate_down(tmp_path):
    namespace = f"facecast-test-{os.getpid()}"
    _netns_or_skip(namespace)
    log_path = tmp_path / "stream.log"
    proc = None
    try:
        long_clip = tmp_path / "long.mp4"  # 40 s: the run must not reach its end
        make = [FFMPEG, "-v", "error", "-stream_loop", "3", "-i", str(CLIP), "-c", "copy"]
        subprocess.run([*make, str(long_clip)], check=True, timeout=30)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "FACECAST_STATUS_INTERVAL": "1"}
        command = ["ip", "netns", "exec", namespace, sys.executable, "-m", "facecast.cli"]
        command += ["stream", "--source", str(FACE), "--input", str(long_clip), "--realtime"]
        command += ["--output", "udp://127.0.0.1:5004"]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env
            )

        # an open link: the full rate holds
        assert wait_until(lambda: len(_status_lines(log_path)) >= 3, 30), log_path.read_text()
        assert all("rate x1.00" in line for line in _status_lines(log_path))

        # this host's egress squeezed to 300 kb/s under a ~0.7 Mb/s stream: the qdisc
        # holds a standing backlog, and the output steps down
        shape = ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "300kbit"]
        shape += ["burst", "10kb", "latency", "200ms"]
        done = subprocess.run(
            ["ip", "netns", "exec", namespace, *shape], capture_output=True, text=True, timeout=10
        )
        if done.returncode != 0:
            pytest.skip(f"cannot add a tbf qdisc: {done.stderr.strip()}")
        squeezed, since = len(_status_lines(log_path)), time.monotonic()
        assert wait_until(
            lambda: any("rate x1.00" not in s for s in _status_lines(log_path)[squeezed:]), 25
        ), log_path.read_text()[-3000:]
        print(f"stepped down {time.monotonic() - since:.1f} s after the squeeze")
        assert "output backed up" in log_path.read_text()
    finally:
        if proc is not None:
            stop_process(proc, 10)
        subprocess.run(["ip", "netns", "del", namespace], timeout=10, check=False)


def test_a_udp_output_reads_its_own_send_queue():
    """Without root: the sink finds FFmpeg's socket (by the local port it chose, or the
    one the URL names) and reads an empty queue on an open loopback."""
    viewer = Viewer()
    image = np.zeros((360, 640, 3), np.uint8)
    named = free_udp_port()
    try:
        for url, port in (
            (f"udp://127.0.0.1:{viewer.port}", None),
            (f"udp://127.0.0.1:{viewer.port}?localport={named}", named),
        ):
            with StreamSink(url, width=640, height=360, fps=30, audio=None) as sink:
                assert wait_until(lambda s=sink: s.connected, 5)
                for index in range(5):
                    sink.write(Frame(image=image, index=index))
                assert sink.send_queue == 0 and not sink.backed_up
                if port is not None:
                    assert udp_send_queue(port) == 0  # the URL's own port was used
    finally:
        viewer.close()
    assert len(viewer.data) > 0


def test_a_standing_backlog_steps_the_rate_down_and_an_empty_queue_lets_it_recover():
    controller = RateController(window=10, recover_after=1.0)
    interval, now = 1 / 30, 0.0
    # writes are quick (UDP never blocks): only the backlog tells
    for _ in range(10):
        assert controller.observe(0.002, interval, now) is None
    levels = [controller.observe(0.002, interval, now, backed_up=True) for _ in range(10)]
    assert 1 in levels and controller.level == 1
    for _ in range(60):  # 2 s of an empty queue
        now += interval
        controller.observe(0.002, interval, now)
    assert controller.level == 0


# ------------------------------------------------------------------------ secrets in URLs


def test_redact_masks_query_values_and_passwords():
    url = "rtmp://127.0.0.1:1935/live/alice?facecast=s3cr3t&pkt_size=1316"
    shown = redact(url)
    assert "s3cr3t" not in shown and "1316" not in shown
    assert shown.startswith("rtmp://127.0.0.1:1935/live/alice?facecast=")
    assert "pkt_size=" in shown  # which options were given still shows
    assert redact("srt://me:pw@host:9000?passphrase=hunter22") == "srt://host:9000?passphrase=…"
    assert redact("udp://127.0.0.1:5000") == "udp://127.0.0.1:5000"
    assert redact("/tmp/out.mp4") == "/tmp/out.mp4"


def test_a_url_secret_stays_out_of_the_stream_log(tmp_path):
    """`facecast stream` with a worker URL whose key carries a secret, at a server that is
    down: every line it logs about that input names it without the secret."""
    port = free_udp_port()  # nothing listens on it over TCP either
    secret = "s3cr3t-" + os.urandom(6).hex()
    url = f"rtmp://127.0.0.1:{port}/live/alice?facecast={secret}"
    log_path = tmp_path / "stream.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "facecast.cli", "stream", "--source", str(FACE)]
    command += ["--input", url, "--output", str(tmp_path / "out.ts")]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        assert wait_until(lambda: "retry in" in log_path.read_text(errors="replace"), 30), (
            log_path.read_text(errors="replace")
        )
    finally:
        stop_process(proc, 10)
    text = log_path.read_text(errors="replace")
    assert "live/alice" in text  # the input is named...
    assert secret not in text, text  # ...without its secret
