"""Scene cuts on the real sample clip (checked against FFmpeg's own scene scores), and none
on clips without cuts that still have motion."""

from __future__ import annotations

import subprocess

import av

from facecast.media.scene import SceneCutDetector

from .conftest import MEDIA
from .media_helpers import make_moving_face_video, make_two_people_video

CLIP = MEDIA / "short_hamilton_clip.mp4"


def cuts_in(path) -> list[int]:
    detector = SceneCutDetector()
    with av.open(str(path)) as container:
        return [
            i
            for i, frame in enumerate(container.decode(video=0))
            if detector.is_cut(frame.to_ndarray(format="bgr24"))
        ]


def ffmpeg_scene_frames(path, threshold: float) -> list[int]:
    """Frames FFmpeg's scene filter scores above ``threshold`` (an independent opinion)."""
    done = subprocess.run(
        ["ffmpeg", "-hide_banner", "-i", str(path), "-an", "-vf",
         "select='gte(scene,0)',metadata=print", "-f", "null", "-"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    scores = [
        float(line.split("=")[1]) for line in done.stderr.splitlines() if "scene_score" in line
    ]
    return [i + 1 for i, score in enumerate(scores[1:]) if score > threshold]


def test_the_sample_clip_cuts_are_found_and_nothing_else():
    found = cuts_in(CLIP)
    print("cuts at frames", found)
    assert found == ffmpeg_scene_frames(CLIP, 0.15)
    assert len(found) == 3


def test_motion_without_a_cut_is_not_a_cut(tmp_path):
    moving = make_moving_face_video(tmp_path / "moving.mp4", frames=60, audio=False)
    two = make_two_people_video(tmp_path / "two.mp4", frames=60, audio=False)
    assert cuts_in(moving) == [] and cuts_in(two) == []
