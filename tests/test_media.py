"""The file media layer: kind detection, image I/O with the mark, label, video transcode."""

from __future__ import annotations

import itertools
import shutil
import struct
import subprocess
import zlib
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from facecast.errors import MediaError
from facecast.media.frame import Frame
from facecast.media.image_io import read_image, read_image_mark, write_image
from facecast.media.kind import detect_kind
from facecast.media.mark import MARK_KEY, make_mark, parse_mark, read_mark, read_video_mark
from facecast.media.overlay import draw_label, label_box
from facecast.media.sink import TranscodeStats, VideoFileSink, VideoQuality, transcode
from facecast.media.source import VideoFileSource

from .media_helpers import (
    CLIP,
    MEDIA,
    corrupted_copy,
    faststart_copy,
    make_moving_face_video,
    make_still_face_video,
    make_two_people_video,
    numbered_frames,
    probe_streams,
    read_numbered_index,
    truncated_copy,
    write_video,
)

CLIP_FRAMES = 275  # ffprobe -count_frames on short_hamilton_clip.mp4
CLIP_FPS = Fraction(2997, 100)


def copy_as(tmp_path: Path, name: str, new_name: str) -> Path:
    dst = tmp_path / new_name
    shutil.copyfile(MEDIA / name, dst)
    return dst


def packet_times(path: Path, kind: str = "video") -> list[float]:
    """Sorted presentation times of a stream's packets (no decoding needed)."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0] if kind == "video" else c.streams.audio[0]
        return sorted(float(p.pts * p.time_base) for p in c.demux(stream) if p.pts is not None)


def audio_payloads(path: Path) -> list[bytes]:
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.audio[0]) if p.size]


# ---------------------------------------------------------------------------- kind


def test_jpeg_renamed_mp4_is_an_image(tmp_path):
    assert detect_kind(copy_as(tmp_path, "obama.jpg", "obama.mp4")) == "image"


def test_rgba_png_without_suffix_is_an_image(tmp_path):
    assert detect_kind(copy_as(tmp_path, "alex-lacamoire.png", "alex")) == "image"


def test_clip_renamed_jpg_is_a_video(tmp_path):
    assert detect_kind(copy_as(tmp_path, "short_hamilton_clip.mp4", "clip.jpg")) == "video"


def test_mkv_with_unknown_frame_count_is_a_video(tmp_path):
    # Matroska stores no frame count, so this goes through the decode-two-frames path.
    path = write_video(tmp_path / "v.mkv", numbered_frames(5), 10, audio=False)
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0
    assert detect_kind(path) == "video"


def test_single_frame_video_is_an_image_and_readable(tmp_path):
    path = write_video(tmp_path / "one.mp4", numbered_frames(1), 10, audio=False)
    assert detect_kind(path) == "image"
    image = read_image(path)
    assert image.shape == (96, 160, 3) and image.dtype == np.uint8


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty"),
        (bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8)), "not a"),
        (b"BM this is a text file that starts like a bitmap\n" * 20, "not a"),
    ],
    ids=["empty", "random-bytes", "text-starting-BM"],
)
def test_bad_files_raise_media_error_naming_file(tmp_path, content, reason):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(MediaError) as err:
        detect_kind(path)
    assert "bad.mp4" in str(err.value) and reason in str(err.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        detect_kind(tmp_path / "nope.mp4")
    with pytest.raises(MediaError, match="directory"):
        detect_kind(tmp_path)


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "tone.m4a"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=44100)
        stream.layout = "mono"
        for i in range(20):
            samples = np.sin(np.arange(1024) * 0.05 + i).astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with pytest.raises(MediaError, match="no video stream"):
        detect_kind(path)


# ---------------------------------------------------------------------------- images


def test_read_rgba_png_composites_on_white(tmp_path):
    bgra = np.zeros((20, 30, 4), np.uint8)
    bgra[:, :, 2] = 200  # red
    bgra[:, :15, 3] = 255  # left half opaque, right half transparent
    path = tmp_path / "cut.png"
    cv2.imwrite(str(path), bgra)
    image = read_image(path)
    assert image.shape == (20, 30, 3)
    assert tuple(image[5, 5]) == (0, 0, 200)
    assert tuple(image[5, 25]) == (255, 255, 255)


def test_read_real_rgba_photo(tmp_path):
    image = read_image(MEDIA / "lin-manuel-miranda.png")
    assert image.shape == (612, 704, 3) and image.dtype == np.uint8


def test_read_gray_and_16bit(tmp_path):
    gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (8, 1))
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    image = read_image(tmp_path / "g.png")
    assert image.shape == (8, 25, 3) and (image[:, :, 0] == gray).all()
    deep = (gray.astype(np.uint16) * 257)[:, :, None].repeat(3, axis=2)
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    assert (read_image(tmp_path / "d.png")[:, :, 1] == gray).all()


def test_corrupt_images_raise(tmp_path):
    data = (MEDIA / "tom_hanks.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 3])
    with pytest.raises(MediaError, match=r"cut\.png.*corrupt"):
        read_image(tmp_path / "cut.png")
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 500)
    with pytest.raises(MediaError, match=r"junk\.jpg"):
        read_image(tmp_path / "junk.jpg")


def png_chunks_with_valid_crc(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, types = 8, []
    while pos < len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(ctype + body), f"bad CRC in {ctype!r}"
        types.append(ctype)
        pos += 12 + length
    return types


def test_png_round_trip_with_mark(tmp_path):
    image = read_image(MEDIA / "obama.jpg")
    mark = make_mark(source_face="biden.jpg", visible_label=True)
    out = tmp_path / "o.png"
    write_image(out, image, mark)
    assert (read_image(out) == image).all()  # PNG is lossless
    assert png_chunks_with_valid_crc(out)[:2] == [b"IHDR", b"tEXt"]
    back = read_image_mark(out)
    assert back == mark
    payload = parse_mark(back)
    assert payload is not None
    assert payload["ai_generated"] is True and payload["source_face"] == "biden.jpg"
    assert payload["generator"].startswith("facecast ")
    assert read_mark(out) == mark


def test_png_non_latin1_mark_uses_itxt(tmp_path):
    out = tmp_path / "u.png"
    mark = {"facecast": '{"ai_generated":true}', "note": "顔の入れ替え"}
    write_image(out, np.zeros((4, 4, 3), np.uint8), mark)
    assert b"iTXt" in png_chunks_with_valid_crc(out)
    assert read_image_mark(out) == mark


def test_jpeg_round_trip_with_mark(tmp_path):
    image = read_image(MEDIA / "biden.jpg")
    mark = make_mark(swapper="mesh")
    out = tmp_path / "o.jpg"
    write_image(out, image, mark, jpeg_quality=92)
    back = read_image(out)
    assert back.shape == image.shape
    assert cv2.PSNR(back, image) > 35
    assert read_image_mark(out) == mark
    assert parse_mark(read_mark(out))["ai_generated"] is True  # type: ignore[index]
    data = out.read_bytes()
    # COM comes after the JFIF APP0 segment, never before it.
    assert data.index(b"\xff\xe0") < data.index(b"\xff\xfe") < data.index(b"\xff\xda")


def test_foreign_jpeg_comment_and_unmarked_files(tmp_path):
    ok, buf = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    assert ok
    data = buf.tobytes()
    comment = b"Created with GIMP"
    data = data[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + data[2:]
    (tmp_path / "g.jpg").write_bytes(data)
    assert read_image_mark(tmp_path / "g.jpg") == {"comment": "Created with GIMP"}
    assert read_image_mark(MEDIA / "obama.jpg") == {}
    assert parse_mark({}) is None


def test_write_image_refuses_formats_without_mark_and_bad_dirs(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(MediaError, match=r"\.webp"):
        write_image(tmp_path / "x.webp", image, make_mark())
    with pytest.raises(MediaError, match="cannot write"):
        write_image(tmp_path / "missing-dir" / "x.png", image, make_mark())
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


def test_mark_cannot_drop_ai_generated():
    payload = parse_mark(make_mark(ai_generated=False, faces="all"))
    assert payload is not None and payload["ai_generated"] is True and payload["faces"] == "all"


# ---------------------------------------------------------------------------- label


@pytest.mark.parametrize(("w", "h"), [(640, 360), (1920, 1080), (360, 640)])
def test_label_touches_only_the_bottom_right_corner(w, h):
    rng = np.random.default_rng(1)
    image = rng.integers(60, 200, (h, w, 3), dtype=np.uint8)
    before = image.copy()
    changed = draw_label(image)  # in place
    ys, xs = np.nonzero((image != before).any(axis=2))
    assert len(xs) > 0
    assert xs.min() > w / 2 and ys.min() > h * 0.8
    x0, y0, x1, y1 = label_box(w, h, "AI-generated")[:4]
    assert changed == (x0, y0, x1, y1)
    assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
    box = image[y0:y1, x0:x1]
    assert (box > 235).all(axis=2).sum() > 20  # white text
    assert box.mean() < before[y0:y1, x0:x1].mean()  # darkened box


def test_label_scales_with_frame_height():
    small = label_box(640, 360, "AI-generated")
    large = label_box(1920, 1080, "AI-generated")
    h_small, h_large = small[3] - small[1], large[3] - large[1]
    assert h_small >= 18  # readable at 360p
    assert 2.5 < h_large / h_small < 3.5


def test_label_on_tiny_frame_does_not_crash():
    image = np.zeros((10, 12, 3), np.uint8)
    draw_label(image)


# ---------------------------------------------------------------------------- source


def test_source_properties():
    with VideoFileSource(CLIP) as src:
        assert (src.width, src.height) == (640, 360)
        assert src.fps == CLIP_FPS
        assert src.frame_count == CLIP_FRAMES
        assert src.duration == pytest.approx(9.1758, abs=0.01)
        assert src.has_audio and src.audio_stream is not None
        assert src.audio_stream.codec_context.name == "aac"


def test_source_yields_every_frame_with_its_timestamp(tmp_path):
    times = [0.0, 0.04, 0.05, 0.2, 0.21, 0.5, 0.9, 0.95]  # variable frame rate
    path = write_video(tmp_path / "vfr.mp4", numbered_frames(len(times)), 25, times=times)
    with VideoFileSource(path) as src:
        items = list(src.demux())
        # Inside the block: a packet's .stream points into the container (PyAV segfaults
        # when it is touched after close).
        audio_only = all(x.stream.type == "audio" for x in items if isinstance(x, av.Packet))
    frames = [x for x in items if isinstance(x, Frame)]
    packets = [x for x in items if isinstance(x, av.Packet)]
    assert [f.index for f in frames] == list(range(len(times)))
    assert [read_numbered_index(f.image) for f in frames] == list(range(len(times)))
    assert [f.seconds for f in frames] == pytest.approx(times, abs=1e-4)
    assert packets and audio_only
    assert frames[0].image.flags["C_CONTIGUOUS"] and frames[0].image.shape == (96, 160, 3)


def test_source_applies_display_rotation(tmp_path):
    path = write_video(tmp_path / "rot.mp4", numbered_frames(3), 10, audio=False, rotation=90)
    with VideoFileSource(path) as src:
        assert (src.width, src.height) == (96, 160)
        first = next(src.frames())
    assert first.image.shape == (160, 96, 3)
    # ffmpeg's own autorotate is the reference for which way is up.
    ref = tmp_path / "ref.png"
    cmd = ["ffmpeg", "-v", "error", "-i", str(path), "-frames:v", "1", str(ref)]
    subprocess.run(cmd, check=True, timeout=30)
    expected = cv2.imread(str(ref))
    assert expected.shape == first.image.shape
    assert np.abs(expected.astype(int) - first.image).mean() < 6


def test_source_errors(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        VideoFileSource(tmp_path / "x.mp4")
    (tmp_path / "g.mp4").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(MediaError, match=r"g\.mp4"):
        VideoFileSource(tmp_path / "g.mp4")


# ---------------------------------------------------------------------------- transcode


@pytest.fixture(scope="module")
def clip_transcode(tmp_path_factory):
    """short_hamilton_clip.mp4 → labelled mp4, once for the tests below."""
    tmp = tmp_path_factory.mktemp("transcode")
    src = tmp / "clip.mp4"
    shutil.copyfile(CLIP, src)
    dst = tmp / "out.mp4"
    seen: list[tuple[int, int | None]] = []
    progress: list[int] = []

    def process(frame: Frame) -> np.ndarray:
        seen.append((frame.index, frame.pts))
        draw_label(frame.image)
        return None

    mark = make_mark(source_face="obama.jpg")
    stats = transcode(src, dst, process, progress=progress.append, mark=mark)
    return src, dst, stats, seen, progress, mark


def test_transcode_keeps_every_frame_in_order(clip_transcode):
    _, dst, stats, seen, progress, _ = clip_transcode
    assert stats.frames == CLIP_FRAMES and stats.bad_packets == 0
    assert [i for i, _ in seen] == list(range(CLIP_FRAMES))
    pts = [p for _, p in seen]
    assert all(b > a for a, b in itertools.pairwise(pts))  # type: ignore[operator]
    assert progress == list(range(1, CLIP_FRAMES + 1))
    info = probe_streams(dst, count_frames=True)
    video = next(s for s in info["streams"] if s["codec_type"] == "video")
    assert int(video["nb_read_frames"]) == CLIP_FRAMES
    assert video["codec_name"] == "h264" and video["pix_fmt"] == "yuv420p"
    assert (video["width"], video["height"]) == (640, 360)


def test_transcode_keeps_timing_and_duration(clip_transcode):
    src, dst, *_ = clip_transcode
    src_info, dst_info = probe_streams(src), probe_streams(dst)
    frame = 1 / float(CLIP_FPS)
    for kind in ("video", "audio"):
        a = next(s for s in src_info["streams"] if s["codec_type"] == kind)
        b = next(s for s in dst_info["streams"] if s["codec_type"] == kind)
        assert float(b["duration"]) == pytest.approx(float(a["duration"]), abs=frame)
        assert float(b["start_time"]) == pytest.approx(float(a["start_time"]), abs=0.002)
    assert packet_times(dst) == pytest.approx(packet_times(src), abs=1e-4)


def test_transcode_remuxes_audio_untouched(clip_transcode):
    src, dst, *_ = clip_transcode
    audio = next(s for s in probe_streams(dst)["streams"] if s["codec_type"] == "audio")
    assert audio["codec_name"] == "aac"
    assert audio_payloads(dst) == audio_payloads(src)  # same bytes: not re-encoded
    assert packet_times(dst, "audio") == pytest.approx(packet_times(src, "audio"), abs=1e-4)


def test_transcode_writes_the_mark(clip_transcode):
    _, dst, _, _, _, mark = clip_transcode
    tags = probe_streams(dst)["format"]["tags"]
    assert tags[MARK_KEY] == mark[MARK_KEY] and tags["comment"] == mark[MARK_KEY]
    assert read_video_mark(dst) == mark
    assert read_mark(dst) == mark
    assert parse_mark(mark)["ai_generated"] is True  # type: ignore[index]


def test_transcode_reports_stage_times(clip_transcode):
    stats: TranscodeStats = clip_transcode[2]
    assert stats.decode_s > 0 and stats.process_s > 0 and stats.encode_s > 0
    assert stats.decode_s + stats.process_s + stats.encode_s <= stats.wall_s
    assert stats.audio_packets == 431
    assert 0 < stats.ms_per_frame("encode") < 1000


def test_transcode_vfr_to_mkv_keeps_timestamps(tmp_path):
    times = [0.0, 0.033, 0.1, 0.133, 0.3, 0.31, 0.5, 0.7, 0.733, 1.0]
    src = write_video(tmp_path / "vfr.mp4", numbered_frames(len(times)), 30, times=times)
    src_audio_start = packet_times(src, "audio")[0]
    for suffix in (".mp4", ".mkv", ".mov"):
        dst = tmp_path / f"out{suffix}"
        stats = transcode(src, dst, lambda f: None)
        assert stats.frames == len(times)
        # Matroska cannot store the AAC priming packet's negative time, so the muxer
        # shifts both streams by the same amount: compare against audio, i.e. check sync.
        shift = packet_times(dst, "audio")[0] - src_audio_start
        assert shift == pytest.approx(0, abs=1e-6) or suffix == ".mkv"
        expected = [t + shift for t in times]
        assert packet_times(dst) == pytest.approx(expected, abs=1.5e-3)  # mkv: 1 ms ticks
        with VideoFileSource(dst) as out:
            indices = [read_numbered_index(f.image) for f in out.frames()]
        assert indices == list(range(len(times)))
        assert parse_mark(read_video_mark(dst)) is not None


def test_audio_the_output_cannot_hold_is_reencoded(tmp_path):
    src = write_video(tmp_path / "u8.mkv", numbered_frames(15), 15, audio_codec="pcm_u8")
    dst = tmp_path / "out.mp4"
    transcode(src, dst, lambda f: None)
    streams = probe_streams(dst, count_frames=True)["streams"]
    audio = next(s for s in streams if s["codec_type"] == "audio")
    assert audio["codec_name"] == "aac"
    assert float(audio["duration"]) == pytest.approx(1.0, abs=0.1)


def test_helper_videos_are_real_and_have_audio(tmp_path):
    for make in (make_moving_face_video, make_two_people_video, make_still_face_video):
        path = make(tmp_path / f"{make.__name__}.mp4", frames=12)
        with VideoFileSource(path) as src:
            assert src.frame_count == 12 and (src.width, src.height) == (320, 180)
            assert src.has_audio
            images = [f.image for f in src.frames()]
        assert len(images) == 12 and images[0].std() > 10
    moving = [f.image for f in VideoFileSource(tmp_path / "make_moving_face_video.mp4").frames()]
    assert np.abs(moving[0].astype(int) - moving[-1]).mean() > 5


def test_output_format_errors(tmp_path):
    src = write_video(tmp_path / "v.mp4", numbered_frames(3), 10, audio=False)
    with pytest.raises(MediaError, match="webm"):
        transcode(src, tmp_path / "o.webm", lambda f: None)
    with pytest.raises(MediaError, match="unknown video format"):
        transcode(src, tmp_path / "o.zzz", lambda f: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_failed_run_leaves_no_output(tmp_path):
    src = write_video(tmp_path / "v.mp4", numbered_frames(5), 10)

    def boom(frame: Frame) -> None:
        if frame.index == 3:
            raise RuntimeError("swap failed")

    with pytest.raises(RuntimeError, match="swap failed"):
        transcode(src, tmp_path / "o.mp4", boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


@pytest.mark.parametrize("fps", [Fraction(24), Fraction(30000, 1001)])
def test_sink_without_timestamps_and_with_odd_size(tmp_path, fps):
    out = tmp_path / "gen.mp4"
    with VideoFileSink(out, width=161, height=97, fps=fps, mark=make_mark()) as sink:
        for image in numbered_frames(6, size=(161, 97)):
            sink.write(Frame(image=image))
    info = probe_streams(out, count_frames=True)["streams"][0]
    assert (info["width"], info["height"]) == (160, 96)
    assert int(info["nb_read_frames"]) == 6
    assert Fraction(info["avg_frame_rate"]) == fps
    assert packet_times(out) == pytest.approx([i / float(fps) for i in range(6)], abs=1e-4)


def test_truncated_clip_with_index_at_end_is_a_media_error(tmp_path):
    # The clip's moov box is at the end: cut in half, nothing says where frames are.
    src = truncated_copy(CLIP, tmp_path / "half.mp4")
    with pytest.raises(MediaError, match=r"half\.mp4"):
        transcode(src, tmp_path / "out.mp4", lambda f: None)
    assert not (tmp_path / "out.mp4").exists()


def test_truncated_faststart_clip_transcodes_the_readable_part(tmp_path):
    full = faststart_copy(CLIP, tmp_path / "fs.mp4")
    src = truncated_copy(full, tmp_path / "fs_half.mp4")
    dst = tmp_path / "out.mp4"
    stats = transcode(src, dst, lambda f: None, quality=VideoQuality(preset="ultrafast"))
    assert 100 < stats.frames < CLIP_FRAMES
    video = probe_streams(dst, count_frames=True)["streams"][0]
    assert int(video["nb_read_frames"]) == stats.frames


def test_corrupted_clip_is_skipped_over_not_fatal(tmp_path):
    full = faststart_copy(CLIP, tmp_path / "fs.mp4")
    src = corrupted_copy(full, tmp_path / "bad.mp4", hits=40)
    quality = VideoQuality(preset="ultrafast")
    stats = transcode(src, tmp_path / "out.mp4", lambda f: None, quality=quality)
    assert stats.frames > CLIP_FRAMES * 0.9
    assert stats.bad_packets > 0


class FlakyContainer:
    """Wraps a PyAV input container so demux() raises a read error on chosen calls, the
    way a flaky disk or a damaged index does mid-file."""

    def __init__(self, real: av.container.InputContainer, fail_at: int, always: bool = False):
        self._real, self._fail_at, self._always = real, fail_at, always
        self.raised = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def demux(self, *streams):
        for i, packet in enumerate(self._real.demux(*streams)):
            if self._always or (i == self._fail_at and not self.raised):
                self.raised += 1
                raise av.error.InvalidDataError(1094995529, "Invalid data found")
            yield packet


def test_read_error_mid_file_is_skipped(tmp_path):
    path = write_video(tmp_path / "v.mp4", numbered_frames(30), 10)
    with VideoFileSource(path) as src:
        src._container = FlakyContainer(src._container, fail_at=12)  # type: ignore[assignment]
        frames = list(src.frames())
        assert src.bad_packets == 1
    # One lost packet costs at most its frame (later ones may show drift until the next
    # keyframe), and reading goes on to the end of the file.
    assert 28 <= len(frames) <= 30
    assert frames[-1].seconds == pytest.approx(2.9)


def test_endless_read_errors_end_the_stream_instead_of_hanging(tmp_path):
    path = write_video(tmp_path / "v.mp4", numbered_frames(10), 10, audio=False)
    with VideoFileSource(path) as src:
        src._container = FlakyContainer(src._container, 0, always=True)  # type: ignore[assignment]
        assert list(src.frames()) == []
        assert src.bad_packets == 32
