"""Provenance that survives: the in-band SEI mark, the C2PA manifest and ``facecast verify``.

On real media: ``facecast swap`` on the real clip (once per module), Debian's ffmpeg for the
remuxes and the RTMP restream through nginx, and c2pa-python's Reader for the manifest. The
SEI is checked by FFmpeg's own H.264 decoder, which hands a "user data unregistered" SEI to
the frame it belongs to: so the mark is counted on exactly the frames that are keyframes,
and a message that sits after the slice (where it would belong to the next frame) fails.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import av
import c2pa
import pytest
from av.sidedata.sidedata import Type as SideDataType
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from facecast.media.frame import Frame
from facecast.media.live_sink import StreamSink
from facecast.media.mark import (
    IPTC_COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
    SEI_UUID_BYTES,
    make_mark,
    parse_sei_text,
    read_mark,
    sei_text,
)
from facecast.media.sink import VideoFileSink
from facecast.safety.provenance import TEST_ORGANIZATION, scan_sei, sign_file

from . import live_helpers
from .conftest import REPO
from .live_helpers import FFMPEG, publish, wait_for_stream
from .media_helpers import CLIP

ingest_server = live_helpers.ingest_server
live_procs = live_helpers.live_procs

TIMEOUT = 120
USER_SIGNER = "Test Newsroom signer"


# ---------------------------------------------------------------------------- helpers


def facecast(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "facecast.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
    )


def detail(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def keyframes_and_marks(path: Path) -> tuple[list[int], list[int], int]:
    """(pts of key frames, pts of frames carrying facecast's SEI, frames), as FFmpeg's
    decoder sees them."""
    keys, marked, frames = [], [], 0
    with av.open(str(path)) as container:
        decoded = []
        for packet in container.demux(video=0):
            # a live MPEG-TS output ends on a lone access unit delimiter (docs/live-media.md,
            # "Latency"): nothing to decode in it
            if bytes(packet) != b"\x00\x00\x00\x01\x09\xf0":
                decoded.extend(packet.decode())
        for frame in decoded:
            frames += 1
            if frame.key_frame:
                keys.append(frame.pts)
            for side in frame.side_data:
                if side.type == SideDataType.SEI_UNREGISTERED:
                    data = bytes(side)
                    if data[:16] == SEI_UUID_BYTES:
                        marked.append(frame.pts)
                        text = data[16:].rstrip(b"\0").decode("ascii")
                        assert parse_sei_text(text) is not None, text
    return keys, marked, frames


def clip_frames(count: int) -> list:
    """The first ``count`` frames of the real clip, BGR."""
    images = []
    with av.open(str(CLIP)) as container:
        for frame in container.decode(video=0):
            images.append(frame.to_ndarray(format="bgr24"))
            if len(images) == count:
                break
    return images


def make_identity(folder: Path, name: str) -> tuple[Path, Path]:
    """A root and a signer certificate (P-256), written as chain.pem and key.pem: what a
    user brings. Made here, independently of facecast's TEST key code."""
    now = datetime.datetime.now(datetime.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), False)
        .sign(root_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    signer = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Newsroom"),
                ]
            )
        )
        .issuer_name(root_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
        )
        .sign(root_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    chain, key_file = folder / "chain.pem", folder / "key.pem"
    pem = serialization.Encoding.PEM
    chain.write_bytes(signer.public_bytes(pem) + root.public_bytes(pem))
    key_file.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return chain, key_file


def manifest(path: Path, media: str) -> tuple[dict, str]:
    """The active manifest of ``path`` and the validation state, by c2pa-python's Reader."""
    with path.open("rb") as fh, c2pa.Reader(media, fh) as reader:
        store = json.loads(reader.json())
        state = reader.get_validation_state()
    return store["manifests"][store["active_manifest"]], state


def source_types(active: dict) -> list[str]:
    return [
        action.get("digitalSourceType")
        for assertion in active["assertions"]
        if assertion["label"].startswith("c2pa.actions")
        for action in assertion["data"]["actions"]
    ]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment for facecast runs: its state folder (the TEST key) in a temp dir."""
    folder = tmp_path_factory.mktemp("state")
    return {**os.environ, "FACECAST_STATE_DIR": str(folder), "FACECAST_C2PA_CERT": "",
            "FACECAST_C2PA_KEY": ""}  # fmt: skip


@pytest.fixture(scope="module")
def swapped(tmp_path_factory: pytest.TempPathFactory, state: dict[str, str]) -> Path:
    """``facecast swap`` on the real clip (275 frames, 3 keyframes in its output)."""
    output = tmp_path_factory.mktemp("swap") / "swapped.mp4"
    result = facecast(
        "swap", "-s", REPO / "tests/media/obama.jpg", "-t", CLIP, "-o", output, env=state
    )
    assert result.returncode == 0, detail(result)
    assert output.is_file()
    return output


# ---------------------------------------------------------------------------- the SEI mark


def test_sei_text_is_short_and_round_trips() -> None:
    mark = make_mark(generator="facecast 0.1.0", source_face="a b,c:d'e\\f.jpg", swapper="mesh",
                     faces="all", visible_label=True)  # fmt: skip
    text = sei_text(mark)
    assert text is not None and len(text) < 200, text
    # nothing FFmpeg's filter option syntax would take apart
    assert not set(text) & set(",:'\\\"; "), text
    payload = parse_sei_text(text)
    assert payload is not None
    assert payload["ai_generated"] is True and payload["visible_label"] is True
    assert payload["source_face"] == "a b,c:d'e\\f.jpg"
    assert payload["digital_source_type"] == IPTC_COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    assert parse_sei_text("not a mark") is None and sei_text({}) is None


def test_swap_marks_every_keyframe(swapped: Path) -> None:
    keys, marked, frames = keyframes_and_marks(swapped)
    assert frames == 275
    assert len(keys) >= 2, keys  # more than the first: the late-joiner case
    assert marked == keys  # on every keyframe, and on nothing else
    # the packets agree: the UUID is in each keyframe's packet and in no other
    with av.open(str(swapped)) as container:
        packets = [(p.is_keyframe, SEI_UUID_BYTES in bytes(p)) for p in container.demux(video=0)]
    assert [key for key, has in packets if has] == [True] * len(keys)


@pytest.mark.parametrize("suffix", [".mkv", ".ts"])
def test_sei_survives_a_remux(swapped: Path, tmp_path: Path, suffix: str) -> None:
    remuxed = tmp_path / f"copy{suffix}"
    subprocess.run(
        [FFMPEG, "-v", "error", "-i", swapped, "-map", "0", "-c", "copy", remuxed],
        check=True,
        timeout=60,
    )
    keys, marked, frames = keyframes_and_marks(remuxed)
    assert frames == 275
    assert len(keys) >= 2 and marked == keys
    with av.open(str(remuxed)) as container:
        report = scan_sei(container, max_keyframes=None)
        assert report.keyframes == report.marked == len(keys)
    with av.open(str(remuxed)) as container:  # no frame lost its timestamp to the SEI
        assert all(p.pts is not None for p in container.demux(video=0) if p.size)


@pytest.mark.parametrize("output", [".ts", ".flv", "udp"])
def test_live_outputs_mark_every_keyframe(tmp_path: Path, output: str) -> None:
    """StreamSink (``facecast stream``'s output): files, and live MPEG-TS over UDP (with
    its per-frame access unit delimiters), captured datagram by datagram as sent."""
    images = clip_frames(40)
    mark = make_mark(source_face="obama.jpg")
    path = tmp_path / f"live{output}"
    url = str(path)
    capture: list[bytes] = []
    done = threading.Event()
    receiver = None
    if output == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # room for the whole stream (~0.5 MB), so a busy machine cannot make it drop any
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.1)
        url = f"udp://127.0.0.1:{sock.getsockname()[1]}"
        path = tmp_path / "received.ts"

        def receive() -> None:
            with sock:
                while not done.is_set():
                    with contextlib.suppress(TimeoutError):
                        capture.append(sock.recv(65536))

        receiver = threading.Thread(target=receive, daemon=True)
        receiver.start()
    sink = StreamSink(url, width=640, height=360, fps=30, audio=None, keyint=10, mark=mark,
                      media_time=True)  # fmt: skip
    try:
        for i, image in enumerate(images):
            sink.write(Frame(image=image, pts=i * 3000, time_base=Fraction(1, 90000)))
    finally:
        sink.close()
    if receiver is not None:
        done.set()
        receiver.join(5)
        path.write_bytes(b"".join(capture))
    keys, marked, frames = keyframes_and_marks(path)
    assert frames >= 35 and len(keys) >= 3, (frames, keys)
    assert marked == keys


# ---------------------------------------------------------------------------- C2PA


def test_c2pa_manifest_says_ai_and_test_key(swapped: Path, state: dict[str, str]) -> None:
    active, validation = manifest(swapped, "video/mp4")
    assert source_types(active) == [IPTC_COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA]
    info = active["signature_info"]
    assert info["issuer"] == TEST_ORGANIZATION and "TEST" in info["common_name"]
    # the very certificate cached in the state folder
    cached = (Path(state["FACECAST_STATE_DIR"]) / "c2pa-test" / "signer-chain.pem").read_bytes()
    assert int(info["cert_serial_number"]) == x509.load_pem_x509_certificate(cached).serial_number
    assert validation == "Valid"  # signature and hashes check out; the signer is untrusted
    marks = [a["data"] for a in active["assertions"] if a["label"] == "org.facecast.mark"]
    assert marks and marks[0]["ai_generated"] is True
    assert read_mark(swapped)  # the container mark is still there after signing


def test_user_key_signs_and_bad_keys_fail(tmp_path: Path, state: dict[str, str]) -> None:
    chain, key = make_identity(tmp_path / "mine", USER_SIGNER)
    photo, face = REPO / "tests/media/biden.jpg", REPO / "tests/media/obama.jpg"
    png = tmp_path / "out.png"
    result = facecast("swap", "-s", face, "-t", photo, "-o", png, "--c2pa-cert", chain,
                      "--c2pa-key", key, env=state)  # fmt: skip
    assert result.returncode == 0, detail(result)
    active, _ = manifest(png, "image/png")
    assert active["signature_info"]["common_name"] == USER_SIGNER
    assert source_types(active) == [IPTC_COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA]
    # the same through the environment, into a JPEG
    jpg = tmp_path / "out.jpg"
    env = {**state, "FACECAST_C2PA_CERT": str(chain), "FACECAST_C2PA_KEY": str(key)}
    result = facecast("swap", "-s", face, "-t", photo, "-o", jpg, env=env)
    assert result.returncode == 0, detail(result)
    assert manifest(jpg, "image/jpeg")[0]["signature_info"]["common_name"] == USER_SIGNER
    # a key that is not the certificate's: refused before any work, nothing written
    _, other_key = make_identity(tmp_path / "other", "someone else")
    bad = tmp_path / "bad.png"
    result = facecast("swap", "-s", face, "-t", photo, "-o", bad, "--c2pa-cert", chain,
                      "--c2pa-key", other_key, env=state)  # fmt: skip
    assert result.returncode == 2, detail(result)
    assert result.stderr.strip().startswith("error:") and len(result.stderr.splitlines()) == 1
    assert not bad.exists()


def test_a_stream_recorded_to_a_file_is_signed_when_it_stops(
    tmp_path: Path, state: dict[str, str]
) -> None:
    """``facecast stream`` into an .mp4, stopped by SIGTERM as a recording is: the file is
    whole, marked in every keyframe and signed; a bad key is refused before it starts."""
    chain, key = make_identity(tmp_path / "mine", USER_SIGNER)
    out = tmp_path / "recording.mp4"
    cmd = [sys.executable, "-m", "facecast.cli", "stream", "-s", REPO / "tests/media/obama.jpg"]
    cmd += ["-i", CLIP, "--realtime", "-o", out, "--c2pa-cert", chain, "--c2pa-key", key]
    proc = subprocess.Popen(
        [str(a) for a in cmd], cwd=REPO, env=state, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert live_helpers.wait_until(lambda: out.is_file() and out.stat().st_size > 50_000, 60)
        proc.send_signal(signal.SIGTERM)
        said, _ = proc.communicate(timeout=60)
    finally:
        live_helpers.stop_process(proc)
    assert proc.returncode == 0, said[-3000:]
    active, validation = manifest(out, "video/mp4")
    assert active["signature_info"]["common_name"] == USER_SIGNER
    assert source_types(active) == [IPTC_COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA]
    assert validation == "Valid"
    keyframes, marked, frames = keyframes_and_marks(out)
    assert frames > 10 and keyframes and marked == keyframes
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    _, other_key = make_identity(tmp_path / "other", "someone else")
    bad = tmp_path / "bad.mp4"
    result = facecast("stream", "-s", REPO / "tests/media/obama.jpg", "-i", CLIP, "-o", bad,
                      "--c2pa-cert", chain, "--c2pa-key", other_key, env=state)  # fmt: skip
    assert result.returncode == 2, detail(result)
    assert len(result.stderr.strip().splitlines()) == 1 and not bad.exists()


def test_unsignable_format_keeps_the_file(tmp_path: Path) -> None:
    out = tmp_path / "out.mkv"
    with VideoFileSink(out, width=640, height=360, fps=Fraction(25), mark=make_mark()) as sink:
        for image in clip_frames(5):
            sink.write(Frame(image=image))
    before = out.read_bytes()
    assert sign_file(out, None) is False  # type: ignore[arg-type]  (never reaches the key)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.mkv"]  # no temporary left behind


# ---------------------------------------------------------------------------- verify


def test_verify_reports_all_three_marks(swapped: Path, state: dict[str, str]) -> None:
    result = facecast("verify", swapped, env=state)
    assert result.returncode == 0, detail(result)
    lines = result.stdout.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["sei", "container", "c2pa"]
    assert all(": found" in line for line in lines), lines
    result = facecast("verify", swapped, "--json", "--keyframes", "0", env=state)
    assert result.returncode == 0, detail(result)
    found = json.loads(result.stdout)
    assert found["sei"]["keyframes_marked"] == found["sei"]["keyframes_read"] >= 2
    assert found["sei"]["mark"]["ai_generated"] is True
    assert found["container"]["mark"]["ai_generated"] is True
    assert found["c2pa"]["found"] and found["c2pa"]["test_key"]


def test_verify_finds_the_sei_on_an_rtmp_restream(
    swapped: Path, state: dict[str, str], ingest_server, live_procs
) -> None:
    url = ingest_server.rtmp_url("live", "provenance")
    live_procs.add(publish(url, swapped, loop=True))  # -c copy: the bitstream as it is
    wait_for_stream(url, timeout=15)
    result = facecast("verify", url, "--json", "--keyframes", "1", "--seconds", "15", env=state)
    assert result.returncode == 0, detail(result)
    found = json.loads(result.stdout)
    assert found["kind"] == "stream" and found["c2pa"] is None
    assert found["sei"]["found"] and found["sei"]["mark"]["ai_generated"] is True


def test_verify_bad_input_and_no_mark(tmp_path: Path, state: dict[str, str]) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    for target in (tmp_path / "missing.mp4", text):
        result = facecast("verify", target, env=state)
        assert result.returncode == 2, detail(result)
        assert result.stdout == ""
        assert result.stderr.startswith("error:") and len(result.stderr.splitlines()) == 1
    result = facecast("verify", CLIP, env=state)  # the untouched clip: no mark at all
    assert result.returncode == 1, detail(result)
    assert [line.split(":", 1)[1].strip() for line in result.stdout.splitlines()][1:] == [
        "none",
        "none",
    ]
