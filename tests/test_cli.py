"""End to end: the ``facecast`` command run as a subprocess on the real photos and clip.

Every call goes through ``python -m facecast.cli`` with a timeout, exactly as a user runs it;
the checks read the outputs back with OpenCV, PyAV, ffprobe and the dlib embedder.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import wave
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from facecast.faces.embed import face_distance
from facecast.media.image_io import read_image_mark
from facecast.media.mark import parse_mark, read_mark

from .conftest import REPO, load
from .media_helpers import (
    CLIP,
    blurred_background,
    head_crop,
    paste_soft,
    probe_streams,
    read_numbered_index,
    truncated_copy,
    write_video,
)

IMAGE_TIMEOUT = 120  # one photo: ~2 s, most of it start-up
VIDEO_TIMEOUT = 300  # the real clip: ~8 s
CLIP_FRAMES = 275  # ffprobe -count_frames on short_hamilton_clip.mp4
FPS_RE = re.compile(r"\d+(?:\.\d+)? fps")
BIDEN_FACE = np.array([427, 230, 751, 554])  # FaceAnalyser(tiles=True) on biden.jpg


# ---------------------------------------------------------------------------- running


def facecast_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "facecast.cli", *map(str, args)]


def facecast(
    *args: object, timeout: float = IMAGE_TIMEOUT, **options: object
) -> subprocess.CompletedProcess:
    """``facecast ARGS`` in a fresh interpreter, from the repository root; ``options`` go to
    subprocess.run (``env``, ``preexec_fn``...)."""
    return subprocess.run(
        facecast_command(*args),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        **options,  # type: ignore[arg-type]
    )


def swap(
    source: Path, target: Path, output: Path, *options: object, timeout: float = IMAGE_TIMEOUT
) -> subprocess.CompletedProcess:
    args = ["swap", "--source", source, "--target", target, "--output", output, *options]
    return facecast(*args, timeout=timeout)


def assert_ok(result: subprocess.CompletedProcess, output: Path) -> None:
    detail = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, detail
    assert "Traceback" not in result.stderr, detail
    assert output.is_file() and output.stat().st_size > 0, detail
    # stdout carries only the output path (logs and progress go to stderr): scriptable
    assert result.stdout.strip().splitlines()[-1] == str(output), detail


def assert_usage_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    """Exit 2, a one-line reason on stderr naming ``expected``, no Python traceback."""
    detail = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, detail
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, detail
    for text in expected:
        assert text.lower() in result.stderr.lower(), f"{text!r} not in stderr\n{detail}"


def summary(result: subprocess.CompletedProcess) -> tuple[int, int, int]:
    """(frames, faces swapped, frames without a face) from the CLI's closing line."""
    m = re.search(
        r"(\d+) frame\(s\), (\d+) face\(s\) swapped, (\d+) frame\(s\) without a face passed",
        result.stderr,
    )
    assert m, f"no summary line in stderr:\n{result.stderr}"
    frames, swapped, without = (int(g) for g in m.groups())
    return frames, swapped, without


def copy_media(media: Path, name: str, dst: Path) -> Path:
    shutil.copyfile(media / name, dst)
    return dst


# ---------------------------------------------------------------------------- reading back


def read_png(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"cannot read {path}"
    return image


def changed(a: np.ndarray, b: np.ndarray, threshold: int = 0) -> np.ndarray:
    """Per-pixel mask of where two same-size BGR images differ by more than ``threshold``."""
    assert a.shape == b.shape
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2) > threshold


def box_fraction(mask: np.ndarray, box: np.ndarray) -> float:
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    return float(mask[y0:y1, x0:x1].mean())


def grown(box: np.ndarray, factor: float, shape: tuple[int, ...]) -> np.ndarray:
    """``box`` grown by ``factor`` x its size on every side, clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = x1 - x0, y1 - y0
    return np.array(
        [
            max(0.0, x0 - factor * w),
            max(0.0, y0 - factor * h),
            min(shape[1], x1 + factor * w),
            min(shape[0], y1 + factor * h),
        ]
    )


def outside(mask: np.ndarray, box: np.ndarray) -> np.ndarray:
    """``mask`` with ``box`` cleared."""
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    out = mask.copy()
    out[y0:y1, x0:x1] = False
    return out


def nearest_face(analyser, image: np.ndarray, box: np.ndarray):
    faces = analyser.analyse(image)
    assert faces, "no face found in the output"
    centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    return min(faces, key=lambda f: float(np.linalg.norm(f.center - centre)))


def identity_distances(analyser, embedder, source: np.ndarray, target: np.ndarray, out):
    """(d(out, source), d(out, target)) for the largest face of source and target."""
    src_face = analyser.analyse(source)[0]
    tgt_face = analyser.analyse(target)[0]
    out_face = nearest_face(analyser, out, tgt_face.box)
    e_out = embedder.embed(out, out_face)
    d_src = face_distance(e_out, embedder.embed(source, src_face))
    d_tgt = face_distance(e_out, embedder.embed(target, tgt_face))
    return d_src, d_tgt


def decode_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]


def video_facts(path: Path) -> dict:
    """Codecs, counted frames and video duration (s) of a file, by ffprobe."""
    info = probe_streams(path, count_frames=True)
    video = next(s for s in info["streams"] if s["codec_type"] == "video")
    audio = [s for s in info["streams"] if s["codec_type"] == "audio"]
    return {
        "video_codec": video["codec_name"],
        "audio_codecs": [s["codec_name"] for s in audio],
        "frames": int(video["nb_read_frames"]),
        "duration": float(video.get("duration") or info["format"]["duration"]),
        "fps": Fraction(video["avg_frame_rate"]),
    }


def assert_marked(path: Path, visible_label: bool, source: str, faces: str = "all") -> dict:
    """The file's facecast mark (read back by content, image or video) says what was done."""
    payload = parse_mark(read_mark(path))
    assert payload is not None, f"no facecast mark in {path}"
    assert payload["ai_generated"] is True
    assert payload["visible_label"] is visible_label, payload
    assert payload["source_face"] == source, payload
    assert payload["faces"] == faces, payload
    assert payload["digital_source_type"].endswith("/compositeWithTrainedAlgorithmicMedia"), payload
    return payload


# ---------------------------------------------------------------------------- test media


BAND = 48  # width of the frame-number band on the left of the helper videos


def numbered_face_video(
    path: Path, frames: int = 24, size: tuple[int, int] = (320, 180), photo: str = "obama.jpg"
) -> tuple[Path, list[np.ndarray]]:
    """A real face swaying over a blurred real scene, with audio, and a band on the left
    whose grey level is 30 + 20 * (i % 10) so each output frame's index can be read back.
    Returns the path and the face box (x0, y0, x1, y1) of every frame."""
    width, height = size
    head = head_crop(photo)
    scale = height * 0.7 / head.shape[0]
    head = cv2.resize(head, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    background = blurred_background(size)
    images, boxes = [], []
    for i in range(frames):
        cx = width * 0.55 + 12 * np.sin(2 * np.pi * i / frames)
        canvas = background.copy()
        paste_soft(canvas, head, cx, height / 2)
        canvas[:, :BAND] = 30 + 20 * (i % 10)
        images.append(canvas)
        hw, hh = head.shape[1] * 0.25, head.shape[0] * 0.3  # the inner face, not the hair
        boxes.append(np.array([cx - hw, height / 2 - hh, cx + hw, height / 2 + hh]))
    write_video(path, images, 30, audio=True)
    return path, boxes


def numbered_background_video(path: Path, frames: int = 20) -> Path:
    """No face anywhere: a heavily blurred real scene plus the frame-number band."""
    background = blurred_background((320, 180))
    images = []
    for i in range(frames):
        canvas = background.copy()
        canvas[:, :BAND] = 30 + 20 * (i % 10)
        images.append(canvas)
    return write_video(path, images, 30, audio=True)


def band_index(image: np.ndarray) -> int:
    # read_numbered_index averages columns width/6 .. width/2: all inside the band
    return read_numbered_index(np.ascontiguousarray(image[:, :BAND]))


def no_face_crop(dst: Path) -> Path:
    """The bottom of biden.jpg: jacket, arms and floor, no face."""
    image = load("biden.jpg")
    cv2.imwrite(str(dst), image[1500:2150, :])
    return dst


# ---------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def biden_runs(tmp_path_factory, media):
    """obama.jpg onto biden.jpg, with the default label and with --no-label."""
    tmp = tmp_path_factory.mktemp("biden")
    labelled, plain = tmp / "labelled.png", tmp / "plain.png"
    return {
        "labelled": (swap(media / "obama.jpg", media / "biden.jpg", labelled), labelled),
        "plain": (
            swap(media / "obama.jpg", media / "biden.jpg", plain, "--no-label"),
            plain,
        ),
    }


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, media):
    """The real clip, copied to ``clip.jpg``: treated as a video by its content."""
    tmp = tmp_path_factory.mktemp("clip")
    target = copy_media(media, CLIP.name, tmp / "clip.jpg")
    output = tmp / "out.mp4"
    result = swap(media / "obama.jpg", target, output, timeout=VIDEO_TIMEOUT)
    return result, target, output


@pytest.fixture(scope="module")
def face_video_run(tmp_path_factory, media):
    tmp = tmp_path_factory.mktemp("facevideo")
    target, boxes = numbered_face_video(tmp / "face.mp4")
    output = tmp / "out.mp4"
    result = swap(media / "biden.jpg", target, output, timeout=VIDEO_TIMEOUT)
    return result, target, output, boxes


# ---------------------------------------------------------------------------- 1. image


def test_image_swap_carries_the_source_identity(biden_runs, analyser, embedder):
    result, output = biden_runs["labelled"]
    assert_ok(result, output)
    assert summary(result) == (1, 1, 0)
    source, target, out = load("obama.jpg"), load("biden.jpg"), read_png(output)
    assert out.shape == target.shape
    d_src, d_tgt = identity_distances(analyser, embedder, source, target, out)
    print(f"obama.jpg -> biden.jpg: d(out, source)={d_src:.3f} d(out, target)={d_tgt:.3f}")
    assert d_src < d_tgt


# ---------------------------------------------------------------------------- 2. kind by content


def test_jpeg_named_mp4_is_swapped_as_an_image(tmp_path, media):
    target = copy_media(media, "biden.jpg", tmp_path / "target.mp4")
    output = tmp_path / "out.png"
    result = swap(media / "obama.jpg", target, output, "--no-label")
    assert_ok(result, output)
    assert summary(result) == (1, 1, 0)
    original, out = load("biden.jpg"), read_png(output)
    assert out.shape == original.shape
    assert box_fraction(changed(out, original, 8), BIDEN_FACE) > 0.3


def test_clip_named_jpg_is_swapped_as_a_video(clip_run):
    result, _, output = clip_run
    assert_ok(result, output)
    facts = video_facts(output)
    assert facts["video_codec"] == "h264"
    assert facts["frames"] == CLIP_FRAMES


# ---------------------------------------------------------------------------- 3. video


def assert_video_like(
    output: Path, target: Path, result: subprocess.CompletedProcess, source: str
) -> dict:
    """Same frame count and duration (within a frame), H.264 + AAC, the mark, fps shown."""
    want, got = video_facts(target), video_facts(output)
    print(f"{target.name}: in {want}\n{' ' * len(target.name)}  out {got}")
    assert got["frames"] == want["frames"]
    assert abs(got["duration"] - want["duration"]) <= 1 / float(want["fps"])
    assert got["video_codec"] == "h264"
    assert got["audio_codecs"] == ["aac"]
    assert_marked(output, visible_label=True, source=source)
    assert FPS_RE.search(result.stderr), f"no fps in the progress output:\n{result.stderr}"
    assert summary(result)[0] == want["frames"]
    return got


def test_real_clip_keeps_frames_timing_audio_and_mark(clip_run):
    result, target, output = clip_run
    assert_ok(result, output)
    assert_video_like(output, target, result, source="obama.jpg")
    frames, swapped, without = summary(result)
    print(f"clip: {frames} frames, {swapped} faces swapped, {without} without a face")
    assert swapped > frames // 2
    assert 0 < without < frames  # the clip has shots with nobody in them


def test_helper_video_every_frame_swapped_in_order(face_video_run):
    result, target, output, boxes = face_video_run
    assert_ok(result, output)
    assert_video_like(output, target, result, source="biden.jpg")
    frames, swapped, without = summary(result)
    assert (frames, swapped, without) == (len(boxes), len(boxes), 0)
    before, after = decode_frames(target), decode_frames(output)
    assert len(after) == len(before) == len(boxes)
    order = [band_index(image) for image in after]
    assert order == [i % 10 for i in range(len(boxes))], order
    for i, (a, b, box) in enumerate(zip(before, after, boxes, strict=True)):
        x0, y0, x1, y1 = (round(float(v)) for v in box)
        face_diff = np.abs(a[y0:y1, x0:x1].astype(np.int16) - b[y0:y1, x0:x1]).mean()
        band_diff = np.abs(a[:, :BAND].astype(np.int16) - b[:, :BAND]).mean()
        assert face_diff > 8, f"frame {i}: face not changed (mean diff {face_diff:.1f})"
        assert band_diff < 3, f"frame {i}: band changed (mean diff {band_diff:.1f})"


# ---------------------------------------------------------------------------- 4. --faces


@pytest.fixture(scope="module")
def two_faces(analyser):
    """The two faces of two_people.jpg, left to right (the right-hand one is larger)."""
    faces = sorted(analyser.analyse(load("two_people.jpg")), key=lambda f: float(f.center[0]))
    assert len(faces) == 2
    assert faces[1].area > faces[0].area
    return [f.box for f in faces]


@pytest.mark.parametrize(
    ("faces", "expected"),
    [("largest", {1}), ("all", {0, 1}), ("index:0", {0}), ("index:1", {1})],
)
def test_faces_option_chooses_the_faces(tmp_path, media, two_faces, faces, expected):
    output = tmp_path / "out.png"
    result = swap(
        media / "obama.jpg", media / "two_people.jpg", output, "--faces", faces, "--no-label"
    )
    assert_ok(result, output)
    assert summary(result) == (1, len(expected), 0)
    target, out = load("two_people.jpg"), read_png(output)
    diff = changed(out, target)
    fractions = [box_fraction(diff, box) for box in two_faces]
    print(f"--faces {faces}: changed fraction of [left, right] face box = {fractions}")
    for i in range(len(two_faces)):
        if i in expected:
            assert fractions[i] > 0.3, f"face {i} not changed with --faces {faces}"
        else:
            assert fractions[i] == 0.0, f"face {i} changed with --faces {faces}"
    # nothing changed anywhere else either (PNG is lossless)
    rest = diff.copy()
    for i in expected:
        rest = outside(rest, grown(two_faces[i], 0.6, target.shape))
    assert not rest.any()


@pytest.mark.parametrize("faces", ["index:x", "index:", "biggest", "index:-1"])
def test_invalid_faces_value_exits_2(tmp_path, media, faces):
    output = tmp_path / "out.png"
    result = swap(media / "obama.jpg", media / "biden.jpg", output, "--faces", faces)
    assert_usage_error(result, "face selection", faces)
    assert not output.exists()


# ---------------------------------------------------------------------------- 5. --blend


def test_poisson_blend_swaps_the_face(tmp_path, media, analyser, embedder):
    output = tmp_path / "out.jpg"  # also: a JPEG output, marked with a COM segment
    result = swap(media / "obama.jpg", media / "biden.jpg", output, "--blend", "poisson")
    assert_ok(result, output)
    assert summary(result) == (1, 1, 0)
    target, out = load("biden.jpg"), read_png(output)
    assert box_fraction(changed(out, target, 12), BIDEN_FACE) > 0.3
    d_src, d_tgt = identity_distances(analyser, embedder, load("obama.jpg"), target, out)
    print(f"poisson: d(out, source)={d_src:.3f} d(out, target)={d_tgt:.3f}")
    assert d_src < d_tgt
    assert "facecast" in read_image_mark(output)  # a JPEG COM segment
    assert_marked(output, visible_label=True, source="obama.jpg")


def test_unknown_blend_exits_2(tmp_path, media):
    output = tmp_path / "out.png"
    result = swap(media / "obama.jpg", media / "biden.jpg", output, "--blend", "nonsense")
    assert_usage_error(result, "nonsense", "feather", "poisson")
    assert not output.exists()


# ---------------------------------------------------------------------------- 6. label + mark


CORNER_H, CORNER_W = 0.12, 0.7  # fractions of the height and width


def corner(image: np.ndarray) -> np.ndarray:
    """The bottom-right corner (last 12 % of the height, right 70 % of the width): where
    the label goes, far from the face of biden.jpg (in the top quarter). On this tall
    portrait photo the label's text is large and spans most of the width."""
    h, w = image.shape[:2]
    return image[h - round(CORNER_H * h) :, w - round(CORNER_W * w) :]


def test_label_is_drawn_by_default(biden_runs):
    result, output = biden_runs["labelled"]
    assert_ok(result, output)
    target, out = load("biden.jpg"), read_png(output)
    corner_diff = changed(corner(out), corner(target), 8)
    print(f"label: {int(corner_diff.sum())} corner pixels changed")
    assert corner_diff.sum() > 500
    # apart from the face, the label is the only change
    rest = outside(changed(out, target), grown(BIDEN_FACE, 0.6, target.shape))
    corner(rest)[:] = False
    assert not rest.any(), "pixels changed outside the face and the bottom-right corner"
    ys, xs = np.nonzero(changed(corner(out), corner(target)))
    assert xs.max() > corner(out).shape[1] * 0.9 and ys.max() > corner(out).shape[0] * 0.6
    assert "facecast" in read_image_mark(output)  # a PNG text chunk
    assert_marked(output, visible_label=True, source="obama.jpg")


def test_no_label_leaves_the_corner_alone(biden_runs):
    result, output = biden_runs["plain"]
    assert_ok(result, output)
    target, out = load("biden.jpg"), read_png(output)
    assert np.array_equal(corner(out), corner(target))
    assert box_fraction(changed(out, target, 8), BIDEN_FACE) > 0.3  # still swapped
    assert "facecast" in read_image_mark(output)  # a PNG text chunk
    assert_marked(output, visible_label=False, source="obama.jpg")


# ---------------------------------------------------------------------------- 7. bad input


def test_source_without_a_face_exits_2_naming_it(tmp_path, media):
    source = no_face_crop(tmp_path / "jacket.png")
    output = tmp_path / "out" / "result.png"
    output.parent.mkdir()
    result = swap(source, media / "biden.jpg", output)
    assert_usage_error(result, "jacket.png", "no face")
    assert list(output.parent.iterdir()) == []


def test_source_with_several_faces_uses_the_largest(tmp_path, media, analyser, embedder):
    output = tmp_path / "out.png"
    result = swap(media / "two_people.jpg", media / "obama.jpg", output, "--no-label")
    assert_ok(result, output)
    assert re.search(r"two_people\.jpg shows 2 faces; using the largest", result.stderr), (
        result.stderr
    )
    # two_people.jpg: Obama on the left, Biden (the larger face) on the right
    group = load("two_people.jpg")
    left, right = sorted(analyser.analyse(group), key=lambda f: float(f.center[0]))
    assert right.area > left.area
    target, out = load("obama.jpg"), read_png(output)
    out_face = nearest_face(analyser, out, analyser.analyse(target)[0].box)
    e_out = embedder.embed(out, out_face)
    d_right = face_distance(e_out, embedder.embed(group, right))
    d_left = face_distance(e_out, embedder.embed(group, left))
    print(f"d(out, larger right face)={d_right:.3f} d(out, smaller left face)={d_left:.3f}")
    assert d_right < d_left


def write_tone(path: Path) -> Path:
    """An audio-only WAV file: a real media file with no picture in it."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        t = np.arange(8000) / 8000
        wav.writeframes((3000 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes())
    return path


def bad_file(kind: str, directory: Path, media: Path) -> tuple[Path, str]:
    """A bad input file of ``kind``, and a regex the error message must match."""
    if kind == "garbage":
        path = directory / "garbage.jpg"
        path.write_bytes(np.random.default_rng(7).integers(0, 256, 4096, np.uint8).tobytes())
        return path, UNREADABLE
    if kind == "empty":
        path = directory / "empty.png"
        path.write_bytes(b"")
        return path, "empty"
    if kind == "missing":
        return directory / "missing.jpg", "not found"
    if kind == "truncated-jpeg":
        return truncated_copy(media / "biden.jpg", directory / "truncated.jpg", 0.4), "corrupt"
    if kind == "text":
        path = directory / "notes.png"
        path.write_text("this is not a picture\n" * 20)
        return path, UNREADABLE
    if kind == "audio-only":
        return write_tone(directory / "tone.wav"), r"no video stream|not an image|no picture"
    if kind == "directory":
        path = directory / "folder.jpg"
        path.mkdir()
        return path, "directory"
    raise AssertionError(kind)


# FFmpeg probes random bytes as one format or another: the wording depends on which
UNREADABLE = r"not a readable|unrecognised|corrupt|no decodable"
BAD_KINDS = ["garbage", "empty", "missing", "truncated-jpeg", "text", "audio-only", "directory"]


@pytest.mark.parametrize("role", ["source", "target"])
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_exits_2_without_traceback_or_output(tmp_path, media, role, kind):
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad, reason = bad_file(kind, inputs, media)
    outdir = tmp_path / "out"
    outdir.mkdir()
    output = outdir / "result.png"
    if role == "source":
        result = swap(bad, media / "biden.jpg", output)
    else:
        result = swap(media / "obama.jpg", bad, output)
    assert_usage_error(result, bad.name)
    assert re.search(reason, result.stderr, re.IGNORECASE), result.stderr
    assert list(outdir.iterdir()) == [], "output (or a temporary file) left behind"


@pytest.mark.parametrize(
    ("target_kind", "output_name", "reason"),
    [("image", "result.mp4", ".png or .jpg"), ("video", "result.txt", "unknown video format")],
)
def test_unusable_output_name_exits_2_and_leaves_nothing(
    tmp_path, media, target_kind, output_name, reason
):
    if target_kind == "image":
        target = media / "biden.jpg"
    else:
        target = numbered_background_video(tmp_path / "target.mp4", frames=4)
    outdir = tmp_path / "out"
    outdir.mkdir()
    result = swap(media / "obama.jpg", target, outdir / output_name)
    assert_usage_error(result, output_name, reason)
    assert list(outdir.iterdir()) == []


def test_output_in_a_missing_folder_exits_2_image(tmp_path, media):
    output = tmp_path / "no-such-folder" / "result.png"
    result = swap(media / "obama.jpg", media / "biden.jpg", output)
    assert_usage_error(result, "result.png", "cannot write")
    assert list(tmp_path.iterdir()) == []


def test_output_in_a_missing_folder_fails_before_the_whole_video_is_processed(tmp_path, media):
    """The sink's first write fails after x264's first packet (a dozen frames in); the
    error must stop the run then (or be caught before it starts), not after every frame
    of a possibly hour-long file has been analysed and swapped."""
    frames = 150
    target = numbered_background_video(tmp_path / "target.mp4", frames=frames)
    output = tmp_path / "no-such-folder" / "result.mp4"
    result = swap(media / "obama.jpg", target, output, timeout=VIDEO_TIMEOUT)
    assert_usage_error(result, "result.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target.mp4"]
    # the progress bar's last "done/total" says how far the run went before it stopped
    done = [
        int(n) for n, total in re.findall(r"(\d+)/(\d+)", result.stderr) if int(total) == frames
    ]
    assert not done or max(done) < frames, (
        f"all {frames} frames were processed before the unwritable output was reported:\n"
        f"{result.stderr}"
    )


@pytest.mark.parametrize(
    ("output", "said"),
    [
        ("srt://127.0.0.1:9000?mode=speaker", "SRT mode must be caller, listener or rendezvous"),
        ("rtp://127.0.0.1", "an RTP output needs a host and a port"),
        ("{tmp}/out.xyz", "unknown output format .xyz"),
        ("ftp://example.net/out.ts", "unsupported output"),
    ],
)
def test_stream_refuses_a_bad_output_before_it_starts(tmp_path, media, output, said):
    """`facecast stream` with an output it cannot open: one line and exit 2 before any
    streaming starts (it used to start, load the models and fail at the first frame)."""
    output = output.format(tmp=tmp_path)
    clip = media / "short_hamilton_clip.mp4"
    result = facecast("stream", "-s", media / "obama.jpg", "-i", clip, "-o", output)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_video_frames_without_a_face_pass_through_unchanged(tmp_path, media):
    target = numbered_background_video(tmp_path / "background.mp4", frames=20)
    output = tmp_path / "out.mp4"
    result = swap(media / "obama.jpg", target, output, "--no-label", timeout=VIDEO_TIMEOUT)
    assert_ok(result, output)
    assert summary(result) == (20, 0, 20)
    assert "20 of 20 frames had no face and passed through unchanged" in result.stderr
    before, after = decode_frames(target), decode_frames(output)
    assert len(after) == len(before) == 20
    assert [band_index(image) for image in after] == [i % 10 for i in range(20)]
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        diff = np.abs(a.astype(np.int16) - b)
        assert diff.mean() < 1.5 and np.percentile(diff, 99.9) <= 12, (
            f"frame {i}: mean {diff.mean():.2f}, p99.9 {np.percentile(diff, 99.9)}"
        )
    assert_marked(output, visible_label=False, source="obama.jpg")


def test_image_without_a_face_passes_through_unchanged(tmp_path, media):
    target = no_face_crop(tmp_path / "jacket.png")
    output = tmp_path / "out.png"
    result = swap(media / "obama.jpg", target, output, "--no-label")
    assert_ok(result, output)
    assert summary(result) == (1, 0, 1)
    assert np.array_equal(read_png(output), read_png(target))


# ---------------------------------------------------------------------------- 8. demo


def test_demo_writes_the_file_and_prints_its_path(tmp_path):
    output = tmp_path / "new" / "folder" / "demo.mp4"
    result = facecast("demo", "--output", output, timeout=VIDEO_TIMEOUT)
    assert_ok(result, output)
    facts = video_facts(output)
    assert facts["frames"] == CLIP_FRAMES
    assert facts["video_codec"] == "h264" and facts["audio_codecs"] == ["aac"]
    assert_marked(output, visible_label=True, source="obama.jpg")
