"""Test videos built from the real photos in tests/media, plus file-damage helpers.

Everything here uses PyAV, OpenCV and ffprobe directly, never ``facecast.media``, so the
tests of the media layer do not check that code against itself. Defaults are tiny
(320x180, 30 frames, ultrafast) so a helper call costs well under a second.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

MEDIA = Path(__file__).resolve().parent / "media"
CLIP = MEDIA / "short_hamilton_clip.mp4"

# Face boxes (x, y, w, h) measured once with YuNet (yuface), so building a test video does
# not depend on the detectors under test.
FACE_BOXES: dict[str, tuple[int, int, int, int]] = {
    "obama.jpg": (373, 95, 232, 319),
    "biden.jpg": (428, 177, 277, 380),
    "alex-lacamoire.png": (177, 102, 149, 220),
    "lin-manuel-miranda.png": (257, 126, 262, 375),
    "obama-720p.jpg": (585, 61, 157, 217),
}

AUDIO_RATE = 44100


# ---------------------------------------------------------------------------- pictures


def load_photo(name: str) -> np.ndarray:
    """A photo from the test media as BGR (RGBA PNGs composited on white)."""
    image = cv2.imread(str(MEDIA / name), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise FileNotFoundError(MEDIA / name)
    if image.ndim == 3 and image.shape[2] == 4:
        alpha = image[:, :, 3:].astype(np.float32) / 255.0
        image = (image[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return image


def head_crop(name: str, margin: float = 0.45) -> np.ndarray:
    """The head around the known face box, with ``margin`` x box size on every side."""
    image = load_photo(name)
    x, y, w, h = FACE_BOXES[name]
    mx, my = round(w * margin), round(h * margin)
    x0, y0 = max(0, x - mx), max(0, y - my)
    x1, y1 = min(image.shape[1], x + w + mx), min(image.shape[0], y + h + my)
    return image[y0:y1, x0:x1].copy()


def blurred_background(size: tuple[int, int], photo: str = "group_t1.jpg") -> np.ndarray:
    """A heavily blurred photo: a real-looking scene with no detectable face in it."""
    width, height = size
    small = cv2.resize(
        load_photo(photo), (max(8, width // 8), max(8, height // 8)), interpolation=cv2.INTER_AREA
    )
    small = cv2.GaussianBlur(small, (0, 0), 2.0)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


def paste_soft(canvas: np.ndarray, patch: np.ndarray, cx: float, cy: float) -> None:
    """Paste ``patch`` centred at (cx, cy) through a feathered ellipse, clipped to the frame."""
    ph, pw = patch.shape[:2]
    mask = np.zeros((ph, pw), np.float32)
    cv2.ellipse(mask, (pw // 2, ph // 2), (int(pw * 0.46), int(ph * 0.48)), 0, 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), max(1.0, min(pw, ph) * 0.04))[:, :, None]
    x0, y0 = round(cx - pw / 2), round(cy - ph / 2)
    cx0, cy0 = max(0, x0), max(0, y0)
    cx1, cy1 = min(canvas.shape[1], x0 + pw), min(canvas.shape[0], y0 + ph)
    if cx1 <= cx0 or cy1 <= cy0:
        return
    region = canvas[cy0:cy1, cx0:cx1].astype(np.float32)
    src = patch[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0].astype(np.float32)
    m = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    canvas[cy0:cy1, cx0:cx1] = (src * m + region * (1.0 - m)).astype(np.uint8)


def _scaled(patch: np.ndarray, height: float) -> np.ndarray:
    scale = max(4.0, height) / patch.shape[0]
    size = (max(4, round(patch.shape[1] * scale)), max(4, round(patch.shape[0] * scale)))
    return cv2.resize(patch, size, interpolation=cv2.INTER_AREA)


# ---------------------------------------------------------------------------- writing


def write_video(
    path: str | Path,
    images: Iterable[np.ndarray],
    fps: int | Fraction = 30,
    *,
    times: Sequence[float] | None = None,
    audio: bool = True,
    audio_codec: str = "aac",
    tone_hz: float = 440.0,
    rotation: int = 0,
) -> Path:
    """Encode BGR ``images`` with libx264 (ultrafast), plus a sine tone as long as the video.

    ``times`` gives each frame's timestamp in seconds (variable frame rate); by default
    frame i is at i / fps. ``rotation`` stores a display-matrix rotation (degrees
    counter-clockwise), as phones do. ``audio_codec`` picks the tone's codec (e.g.
    "pcm_u8" for a codec mp4 cannot hold; use .mkv then).
    """
    path = Path(path)
    frames = list(images)
    fps = Fraction(fps)
    tb = Fraction(1, 90000)
    if times is None:
        times = [i / fps for i in range(len(frames))]
    if len(times) != len(frames):
        raise ValueError("one timestamp per frame")
    end = float(times[-1]) + float(1 / fps) if frames else 0.0
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "23"})
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.time_base = tb
        if rotation:
            video.set_display_rotation(rotation)
        tone = _add_tone_stream(out, audio_codec) if audio else None
        audio_frames = _tone_frames(tone, end, tone_hz) if tone is not None else iter(())
        pending = next(audio_frames, None)
        for image, t in zip(frames, times, strict=True):
            # Interleave by time so the muxer never has to buffer a long stretch.
            while pending is not None and pending.pts / AUDIO_RATE <= t:
                out.mux(tone.encode(pending))  # type: ignore[union-attr]
                pending = next(audio_frames, None)
            vf = av.VideoFrame.from_ndarray(image, format="bgr24")
            vf.pts, vf.time_base = round(t / tb), tb
            out.mux(video.encode(vf))
        while pending is not None:
            out.mux(tone.encode(pending))  # type: ignore[union-attr]
            pending = next(audio_frames, None)
        out.mux(video.encode(None))
        if tone is not None:
            out.mux(tone.encode(None))
    return path


def _add_tone_stream(out: av.container.OutputContainer, codec: str) -> av.AudioStream:
    stream = out.add_stream(codec, rate=AUDIO_RATE)
    stream.layout = "stereo"
    return stream


def _tone_frames(stream: av.AudioStream, seconds: float, hz: float):
    fmt = stream.codec_context.format.name if stream.codec_context.format else "fltp"
    chunk = 1024
    total = round(seconds * AUDIO_RATE)
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        t = (np.arange(start, start + n) / AUDIO_RATE).astype(np.float64)
        wave = (0.2 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(np.stack([wave, wave]), format="fltp", layout="stereo")
        if fmt != "fltp":
            frame = _convert_audio(frame, fmt)
        frame.sample_rate = AUDIO_RATE
        frame.pts = start
        frame.time_base = Fraction(1, AUDIO_RATE)
        yield frame


def _convert_audio(frame: av.AudioFrame, fmt: str) -> av.AudioFrame:
    resampler = av.AudioResampler(format=fmt, layout="stereo", rate=AUDIO_RATE)
    frame.sample_rate = AUDIO_RATE
    out = resampler.resample(frame)
    return out[0]


# ---------------------------------------------------------------------------- scenes


def make_moving_face_video(
    path: str | Path,
    photo: str = "obama.jpg",
    size: tuple[int, int] = (320, 180),
    frames: int = 30,
    fps: int | Fraction = 30,
    audio: bool = True,
    background: str = "group_t1.jpg",
) -> Path:
    """One face crossing the frame left to right while growing from 40 % to 75 % of the
    frame height, over a blurred real scene."""
    width, height = size
    head = head_crop(photo)
    bg = blurred_background(size, background)
    images = []
    for i in range(frames):
        s = i / max(1, frames - 1)
        patch = _scaled(head, height * (0.40 + 0.35 * s))
        canvas = bg.copy()
        paste_soft(canvas, patch, width * (0.3 + 0.4 * s), height * (0.5 + 0.05 * np.sin(6 * s)))
        images.append(canvas)
    return write_video(path, images, fps, audio=audio)


def make_two_people_video(
    path: str | Path,
    photos: tuple[str, str] = ("obama.jpg", "biden.jpg"),
    size: tuple[int, int] = (320, 180),
    frames: int = 30,
    fps: int | Fraction = 30,
    audio: bool = True,
    background: str = "group_t1.jpg",
) -> Path:
    """Two faces side by side, swaying in opposite directions (they never overlap)."""
    width, height = size
    heads = [_scaled(head_crop(p), height * 0.6) for p in photos]
    bg = blurred_background(size, background)
    images = []
    for i in range(frames):
        sway = 0.05 * width * np.sin(2 * np.pi * i / max(1, frames))
        canvas = bg.copy()
        paste_soft(canvas, heads[0], width * 0.27 + sway, height * 0.5)
        paste_soft(canvas, heads[1], width * 0.73 - sway, height * 0.5)
        images.append(canvas)
    return write_video(path, images, fps, audio=audio)


def make_still_face_video(
    path: str | Path,
    photo: str = "obama.jpg",
    size: tuple[int, int] = (320, 180),
    frames: int = 30,
    fps: int | Fraction = 30,
    audio: bool = True,
    background: str = "group_t1.jpg",
) -> Path:
    """One face that does not move (for shimmer / temporal-stability tests)."""
    width, height = size
    canvas = blurred_background(size, background)
    paste_soft(canvas, _scaled(head_crop(photo), height * 0.7), width / 2, height / 2)
    return write_video(path, [canvas] * frames, fps, audio=audio)


def numbered_frames(count: int, size: tuple[int, int] = (160, 96)) -> list[np.ndarray]:
    """Frames whose index (mod 10) can be read back after lossy coding: the left half's
    grey level is 30 + 20 * (i % 10), steps x264 cannot quantise away; a white block
    marks the top-left corner (for orientation checks)."""
    width, height = size
    out = []
    for i in range(count):
        image = np.full((height, width, 3), 128, np.uint8)
        image[:, : width // 2] = 30 + 20 * (i % 10)
        image[: height // 6, : width // 6] = 255
        out.append(image)
    return out


def read_numbered_index(image: np.ndarray) -> int:
    width = image.shape[1]
    level = float(image[:, width // 6 : width // 2].mean())
    return round((level - 30) / 20)


# ---------------------------------------------------------------------------- damage


def truncated_copy(src: str | Path, dst: str | Path, fraction: float = 0.5) -> Path:
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def corrupted_copy(
    src: str | Path,
    dst: str | Path,
    hits: int = 40,
    size: int = 200,
    seed: int = 1,
    skip: int = 20000,
) -> Path:
    """Overwrite ``hits`` runs of ``size`` random bytes after the first ``skip`` bytes
    (past the mp4 header of a faststart file, so only media data is damaged)."""
    rng = random.Random(seed)
    data = bytearray(Path(src).read_bytes())
    for _ in range(hits):
        at = rng.randrange(skip, len(data) - size)
        data[at : at + size] = rng.randbytes(size)
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def faststart_copy(src: str | Path, dst: str | Path) -> Path:
    """Remux (no re-encode) with the mp4 index at the front, as web uploads often are."""
    options = {"movflags": "+faststart"}
    with av.open(str(src)) as inp, av.open(str(dst), "w", options=options) as out:
        mapping = {
            s.index: out.add_stream_from_template(s)
            for s in inp.streams
            if s.type in ("video", "audio")
        }
        for packet in inp.demux(*[s for s in inp.streams if s.index in mapping]):
            if packet.dts is None:
                continue
            packet.stream = mapping[packet.stream.index]
            out.mux(packet)
    return Path(dst)


# ---------------------------------------------------------------------------- ffprobe


def ffprobe(path: str | Path, *args: str) -> dict:
    exe = shutil.which("ffprobe")
    if exe is None:
        raise RuntimeError("ffprobe not found on PATH")
    cmd = [exe, "-v", "error", "-of", "json", *args, str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60)
    return json.loads(result.stdout)


def probe_streams(path: str | Path, count_frames: bool = False) -> dict:
    args = ["-show_streams", "-show_format"] + (["-count_frames"] if count_frames else [])
    return ffprobe(path, *args)


def video_frame_times(path: str | Path) -> list[float]:
    """Presentation times (s) of every video frame, in display order."""
    info = ffprobe(path, "-select_streams", "v:0", "-show_entries", "frame=pts_time")
    return [float(f["pts_time"]) for f in info["frames"]]


# ---------------------------------------------------------------------------- fake camera


def swaying_face_frames(
    photo: str = "lin-manuel-miranda.png",
    size: tuple[int, int] = (640, 360),
    frames: int = 45,
    background: str = "group_t1.jpg",
) -> list[np.ndarray]:
    """A face at ~70 % of the frame height swaying a little around the centre, as a person
    in front of a webcam does. One full period, so a player that loops it never jumps."""
    width, height = size
    head = head_crop(photo)
    bg = blurred_background(size, background)
    images = []
    for i in range(frames):
        phase = 2 * np.pi * i / frames
        patch = _scaled(head, height * (0.70 + 0.03 * np.sin(phase)))
        canvas = bg.copy()
        paste_soft(canvas, patch, width * (0.5 + 0.03 * np.sin(phase)), height * 0.52)
        images.append(canvas)
    return images


def write_y4m(path: str | Path, images: Iterable[np.ndarray], fps: int = 15) -> Path:
    """Raw 4:2:0 YUV4MPEG2 from BGR images: what Chromium's fake camera reads
    (``--use-file-for-fake-video-capture``; it loops the file). PyAV's swscale does the
    conversion (BT.601, limited range, as a camera's I420)."""
    path = Path(path)
    frames = list(images)
    height, width = frames[0].shape[:2]
    if width % 2 or height % 2:
        raise ValueError("4:2:0 needs even width and height")
    with path.open("wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420mpeg2\n".encode())
        for image in frames:
            if image.shape[:2] != (height, width):
                raise ValueError("every frame must have the first frame's size")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
            planes = frame.reformat(format="yuv420p").to_ndarray()  # (h * 3 / 2, w): Y, U, V
            out.write(b"FRAME\n")
            out.write(np.ascontiguousarray(planes).tobytes())
    return path


def read_y4m(path: str | Path) -> list[np.ndarray]:
    """The frames of a 4:2:0 YUV4MPEG2 file as BGR (OpenCV's I420 conversion, so reading
    back does not go through the writer's code)."""
    data = Path(path).read_bytes()
    header_end = data.index(b"\n")
    fields = data[:header_end].split()
    if fields[0] != b"YUV4MPEG2":
        raise ValueError(f"{path}: not a YUV4MPEG2 file")
    width = int(next(f[1:] for f in fields if f.startswith(b"W")))
    height = int(next(f[1:] for f in fields if f.startswith(b"H")))
    frame_bytes = width * height * 3 // 2
    images = []
    at = header_end + 1
    while at < len(data):
        line_end = data.index(b"\n", at)
        if not data[at:line_end].startswith(b"FRAME"):
            raise ValueError(f"{path}: bad frame header at byte {at}")
        start = line_end + 1
        raw = np.frombuffer(data[start : start + frame_bytes], np.uint8)
        images.append(cv2.cvtColor(raw.reshape(height * 3 // 2, width), cv2.COLOR_YUV2BGR_I420))
        at = start + frame_bytes
    return images


# ---------------------------------------------------------------------------- identity


def identity_distances(
    analyser, embedder, frames: Sequence[np.ndarray], refs: dict, min_share: float = 0.0
) -> dict[str, float]:
    """Per named reference embedding, the median identity distance of the largest face in
    ``frames`` to it (the swap checks: nearer the source than the original face). At least
    one frame, and ``min_share`` of them, must show a face."""
    from facecast.faces.embed import face_distance

    embeddings = []
    for image in frames:
        faces = analyser.analyse(image)
        if faces:
            embeddings.append(embedder.embed(image, faces[0]))
    assert embeddings, "no face in any frame"
    assert len(embeddings) >= min_share * len(frames), (
        f"a face in only {len(embeddings)} of {len(frames)} frames"
    )
    return {
        name: float(np.median([face_distance(e, ref) for e in embeddings]))
        for name, ref in refs.items()
    }
