"""The command line's habits, checked by running it as a user does: version, log levels,
help at 80 columns, one-line errors, refusals of easy mistakes, video quality options and
where the benchmarks write.

Every call is ``python -m facecast.cli`` in a fresh interpreter (see ``test_cli.facecast``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from facecast import __version__
from facecast.bench.swap import update_docs, write_results
from facecast.cli import app

from .conftest import REPO
from .media_helpers import make_moving_face_video, make_two_people_video, probe_streams
from .test_cli import VIDEO_TIMEOUT, assert_ok, assert_usage_error, facecast, summary, swap

# ---------------------------------------------------------------------------- helpers


def help_text(*command: str) -> str:
    """``facecast COMMAND --help`` as a user sees it in an 80-column terminal."""
    env = {**os.environ, "COLUMNS": "80"}
    result = subprocess.run(
        [sys.executable, "-m", "facecast.cli", *command, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def all_commands() -> list[tuple[str, ...]]:
    """Every command path, sub-commands included: ('swap',), ('bench', 'live'), ..."""
    root = typer.main.get_command(app)
    paths: list[tuple[str, ...]] = [()]

    def walk(group, prefix: tuple[str, ...]) -> None:
        for name, command in group.commands.items():
            paths.append((*prefix, name))
            if hasattr(command, "commands"):
                walk(command, (*prefix, name))

    walk(root, ())
    return paths


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single stderr line of a refused call (exit 2, no traceback, nothing else)."""
    detail = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, detail
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, detail
    assert lines[0].startswith("error: "), detail
    return lines[0]


@pytest.fixture(scope="module")
def face_clip(tmp_path_factory) -> Path:
    """A short real-face video (30 frames, 320x180) for the video options."""
    return make_moving_face_video(tmp_path_factory.mktemp("habits") / "face.mp4", frames=20)


# ---------------------------------------------------------------------------- version, logs


def test_version_prints_the_package_version():
    result = facecast("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"facecast {__version__}"


def test_log_level_changes_what_is_printed(tmp_path, media):
    target, source = media / "two_people.jpg", media / "obama.jpg"
    normal = swap(source, target, tmp_path / "a.png")
    quiet = facecast("-q", "swap", "-s", source, "-t", target, "-o", tmp_path / "b.png")
    debug = facecast(
        "--log-level", "debug", "swap", "-s", source, "-t", target, "-o", tmp_path / "c.png"
    )
    for result, output in ((normal, "a.png"), (quiet, "b.png"), (debug, "c.png")):
        assert_ok(result, tmp_path / output)
    assert "wrote" in normal.stderr and "DEBUG" not in normal.stderr
    # quiet: nothing but the output path on stdout, nothing at all on stderr
    assert quiet.stderr.strip() == "", quiet.stderr
    assert "DEBUG" in debug.stderr, debug.stderr


def test_litert_chatter_is_not_printed(tmp_path, media):
    """LiteRT's C++ runtime writes 'Created TensorFlow Lite XNNPACK delegate' on fd 2."""
    result = swap(media / "obama.jpg", media / "biden.jpg", tmp_path / "o.png")
    assert_ok(result, tmp_path / "o.png")
    assert "XNNPACK" not in result.stderr and "TensorFlow" not in result.stderr, result.stderr


def test_bad_log_level_is_one_line():
    line = one_line_error(facecast("--log-level", "loud", "models"))
    assert "--log-level" in line and "debug" in line


# ---------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", all_commands(), ids=lambda c: " ".join(c) or "facecast")
def test_help_reads_well_at_80_columns(command):
    text = help_text(*command)
    for line in text.splitlines():
        assert len(line) <= 80, f"{len(line)} columns: {line!r}"
        assert line == line.rstrip(), f"trailing space: {line!r}"
    # type tags such as <bool>, <str>, <list[str]> say nothing a user needs
    assert not re.search(r"<(bool|str|int|float|path|list\[\w+\])>", text), text
    # stray spaces before punctuation (rich once ate "[env ...]" as markup and left "models .")
    assert not re.search(r"\w [.,;:](\s|$)", text), text


@pytest.mark.parametrize("command", all_commands()[1:], ids=" ".join)
def test_every_option_is_described(command):
    node = typer.main.get_command(app)
    for name in command:
        node = node.commands[name]  # type: ignore[attr-defined]
    for param in node.params:
        if param.param_type_name == "option":
            assert (param.help or "").strip(), f"{' '.join(command)} {param.opts} has no help"


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "args",
    [
        ("swap", "-s", "x.jpg", "-o", "o.png"),  # missing --target
        ("swap", "--nonsense"),
        ("stream", "--keyint", "many"),
        ("bench", "swap", "--results"),
    ],
    ids=["missing-option", "unknown-option", "bad-value", "option-without-value"],
)
def test_usage_errors_are_one_line_with_exit_2(args):
    line = one_line_error(facecast(*args))
    assert "--help" in line  # says where to look


def test_output_equal_to_target_is_refused_and_the_target_kept(tmp_path, media):
    target = tmp_path / "photo.jpg"
    target.write_bytes((media / "biden.jpg").read_bytes())
    before = target.read_bytes()
    # the same file spelled differently: a relative path with a detour
    same = Path(os.path.relpath(tmp_path, REPO)) / ".." / tmp_path.name / "photo.jpg"
    result = swap(media / "obama.jpg", target, same)
    assert "is the target itself" in one_line_error(result)
    assert target.read_bytes() == before


def test_index_past_the_faces_on_an_image_exits_2_and_writes_nothing(tmp_path, media):
    output = tmp_path / "o.png"
    result = swap(media / "obama.jpg", media / "two_people.jpg", output, "--faces", "index:5")
    line = one_line_error(result)
    assert "index:5" in line and "shows 2" in line and "index:1" in line
    assert not output.exists()


@pytest.mark.parametrize(
    ("role", "make", "size"),
    [
        ("target", "png", (60000, 60000)),  # past OpenCV's own cap: a cv2.error traceback
        ("target", "jpeg", (65000, 65000)),
        ("target", "png", (20000, 20000)),  # under OpenCV's cap: decoded at 1.7 GB
        ("source", "jpeg", (65000, 65000)),
    ],
    ids=["target-png-60k", "target-jpeg-65k", "target-png-20k", "source-jpeg-65k"],
)
def test_an_image_over_the_pixel_cap_exits_2_from_its_header(tmp_path, media, role, make, size):
    """Files get the uploads' pixel cap, read from the header before anything is decoded."""
    from .test_hostile_http import jpeg_claiming, png_claiming

    huge = tmp_path / f"huge.{'png' if make == 'png' else 'jpg'}"
    huge.write_bytes((png_claiming if make == "png" else jpeg_claiming)(*size))
    source, target = (
        (huge, media / "biden.jpg") if role == "source" else (media / "obama.jpg", huge)
    )
    output = tmp_path / "o.png"
    line = one_line_error(swap(source, target, output))
    assert str(huge) in line and f"{size[0]}x{size[1]}" in line and "pixels" in line, line
    assert not output.exists()


def test_index_past_the_faces_in_a_video_warns(tmp_path, media):
    target = make_two_people_video(tmp_path / "two.mp4", frames=12)
    output = tmp_path / "o.mp4"
    result = swap(media / "obama.jpg", target, output, "--faces", "index:2", timeout=VIDEO_TIMEOUT)
    assert_ok(result, output)
    frames, swapped, _ = summary(result)
    assert swapped == 0
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "index:2" in warning[0] and f"of {frames} frame" in warning[0]
    # index:1 exists in every frame: no warning
    ok = swap(media / "obama.jpg", target, tmp_path / "p.mp4", "--faces", "index:1")
    assert "warning:" not in ok.stderr


def test_gpu_provider_with_only_embedded_models_warns(tmp_path, media):
    output = tmp_path / "o.png"
    result = swap(media / "obama.jpg", media / "biden.jpg", output, "--execution-provider", "cuda")
    assert_ok(result, output)
    assert "warning: --execution-provider cuda has no effect" in result.stderr
    plain = swap(media / "obama.jpg", media / "biden.jpg", tmp_path / "p.png")
    assert "warning" not in plain.stderr


# ---------------------------------------------------------------------------- video quality


@pytest.mark.parametrize(
    ("encoder", "codec", "suffix"),
    [("libx264", "h264", ".mp4"), ("libx265", "hevc", ".mp4"), ("libvpx-vp9", "vp9", ".mkv")],
)
def test_output_video_encoder_is_used(tmp_path, media, face_clip, encoder, codec, suffix):
    output = tmp_path / f"o{suffix}"
    result = swap(
        media / "obama.jpg",
        face_clip,
        output,
        "--output-video-encoder",
        encoder,
        "--preset",
        "ultrafast",
        timeout=VIDEO_TIMEOUT,
    )
    assert_ok(result, output)
    streams = probe_streams(output)["streams"]
    video = [s for s in streams if s["codec_type"] == "video"]
    assert [s["codec_name"] for s in video] == [codec]
    assert any(s["codec_type"] == "audio" for s in streams)  # the audio still comes along


def test_crf_changes_the_quality(tmp_path, media, face_clip):
    sizes = {}
    for crf in (14, 40):
        output = tmp_path / f"crf{crf}.mp4"
        result = swap(media / "obama.jpg", face_clip, output, "--crf", crf, timeout=VIDEO_TIMEOUT)
        assert_ok(result, output)
        sizes[crf] = output.stat().st_size
    print(f"crf 14: {sizes[14]} bytes, crf 40: {sizes[40]} bytes")
    assert sizes[14] > 2 * sizes[40]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--output-video-encoder", "libxvid"), "video encoder 'libxvid'"),
        (("--crf", "70"), "crf 70"),
        (("--preset", "ludicrous"), "preset 'ludicrous'"),
    ],
)
def test_bad_video_options_exit_2(tmp_path, media, face_clip, args, expected):
    output = tmp_path / "o.mp4"
    result = swap(media / "obama.jpg", face_clip, output, *args)
    assert_usage_error(result, expected)
    assert not output.exists()


# ---------------------------------------------------------------------------- benchmarks


def test_bench_writes_only_where_told(tmp_path, monkeypatch):
    """Results go to the folder given; the docs page changes only when one is passed, and
    never in the folder the command runs in."""
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "elsewhere"
    path = write_results("swap", {"bench": "swap"}, results)
    assert path.parent == results and (results / "swap-latest.json").is_file()
    update_docs("swap", "| table |", None)
    assert not (tmp_path / "docs").exists()
    page = tmp_path / "page.md"
    page.write_text("# Benchmarks\n\n<!-- bench:swap:start -->\nold\n<!-- bench:swap:end -->\n")
    update_docs("swap", "| new |", page)
    assert "| new |" in page.read_text() and "old" not in page.read_text()


def test_bench_update_docs_outside_a_clone_is_refused(monkeypatch):
    from facecast.cli import bench as cli

    monkeypatch.setattr(cli, "REPO", Path("/nonexistent-clone"))
    with pytest.raises(typer.Exit) as caught:
        cli.docs_for(True)
    assert caught.value.exit_code == 2
    assert cli.docs_for(False) is None


def test_index_past_the_faces_is_logged_by_the_engine_now_and_then(media, caplog):
    """Streams and the web page have no summary line: the engine says it in the log, once a
    minute at most (a stream runs for hours)."""
    from facecast.engine.pipeline import EngineOptions, SwapEngine
    from facecast.faces.select import Selection
    from facecast.media.image_io import read_image

    engine = SwapEngine(EngineOptions(selection=Selection.parse("index:3"), tiles=True))
    engine.load_source(read_image(media / "obama.jpg"))
    with caplog.at_level("WARNING", logger="facecast.engine.pipeline"):
        for _ in range(3):
            engine.process(read_image(media / "two_people.jpg"))
    lines = [r.getMessage() for r in caplog.records if "chooses no face" in r.getMessage()]
    assert lines == ["--faces index:3 chooses no face: 2 in view (index:0 to index:1)"]
