"""`facecast swap` and `facecast demo`: images and video files."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from facecast.errors import FacecastError

if TYPE_CHECKING:
    from facecast.safety.provenance import SigningKey

from facecast.cli.base import (
    EXAMPLES,
    app,
    chatty,
    console,
    fail,
    in_words,
    one_line_errors,
    warn,
)
from facecast.cli.options import (
    EngineFlags,
    ReferenceFlag,
    with_engine_options,
)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[fps]:.1f} fps"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not chatty(),
    )


def parse_references(texts: list[str], source: Path) -> tuple[tuple[Path, Path], ...]:
    """``PHOTO`` (swap that person with the source face) or ``PHOTO=FACE`` (with FACE)."""
    from facecast.config import parse_reference

    try:
        pairs = [parse_reference(text) for text in texts]
    except ValueError as exc:
        raise fail(str(exc)) from None
    return tuple((photo, face or source) for photo, face in pairs)


def check_consent(consent_dir: Path | None, photos: list[Path]) -> None:
    """``--require-consent``: every photo's face (a folder: each photo in it) is in the
    consent registry, else exit 2 naming the photo."""
    from facecast.safety.consent import ConsentRegistry
    from facecast.serve.profiles import default_state_dir
    from facecast.swap.sources import source_photos

    with one_line_errors():
        registry = ConsentRegistry.in_folder(consent_dir or default_state_dir())
        registry.check_photos(source_photos(photos), "--require-consent")


def sign_output(output: Path, signing: SigningKey) -> None:
    """The finished ``output``'s C2PA manifest, signed into a temporary copy that replaces
    it; said in words when the format cannot carry one or the signing fails (exit 2: the
    file itself is whole and kept)."""
    from facecast.safety.provenance import sign_file

    with one_line_errors():
        signed = sign_file(output, signing)
    if not signed:
        warn(
            f"{output}: C2PA cannot sign {output.suffix or 'this'} files (it signs .mp4, "
            ".mov, .jpg and .png); the file keeps its other marks and no manifest"
        )
    elif signing.test and chatty():
        console.print(
            f"C2PA manifest signed with the local TEST key ({signing.where}), which no "
            "validator trusts; sign as yourself with --c2pa-cert and --c2pa-key",
            highlight=False,
        )


def run_swap(
    source: Path | list[Path],
    target: Path,
    output: Path,
    faces: str,
    blend: str,
    label: bool,
    references: tuple[tuple[Path, Path], ...] = (),
    models: dict[str, object] | None = None,
    quality: dict[str, object] | None = None,
    c2pa: tuple[Path | None, Path | None] = (None, None),
) -> None:
    """Shared by ``swap`` and ``demo``: one place turns FacecastErrors into exit code 2.
    ``c2pa``: the certificate chain and key that sign the output's C2PA manifest (neither:
    the local TEST key)."""
    from facecast.config import ModelSettings
    from facecast.engine.files import Stopped, swap_file
    from facecast.engine.pipeline import EngineOptions
    from facecast.faces.select import Selection
    from facecast.live.pipeline import _stop_on_signals
    from facecast.media.sink import VideoQuality
    from facecast.models.choice import ModelChoice
    from facecast.safety.provenance import load_signing_key
    from facecast.swap.mesh_swapper import SwapOptions

    try:
        selection = Selection.parse(faces)
        choice = ModelChoice.from_settings(ModelSettings(**(models or {})))
        video_quality = VideoQuality(**(quality or {}))  # type: ignore[arg-type]
        signing = load_signing_key(*c2pa)  # before the work: a key C2PA refuses fails here
    except (ValueError, FacecastError) as exc:
        raise fail(in_words(exc)) from None
    if blend not in ("feather", "poisson"):
        raise fail(f"unknown blend {blend!r}: use feather or poisson")
    if ignored := choice.ignored_runtime():
        warn(ignored)
    options = EngineOptions(
        selection=selection,
        swap=SwapOptions(blend=blend),  # type: ignore[arg-type]
        label=label,
        references=references,
        models=choice,
    )
    progress = _progress()
    task = progress.add_task(target.name, total=None, fps=0.0)
    started: list[float] = []  # set when the bar appears

    def on_frame(done: int, total: int | None) -> None:
        if not started:  # the bar appears with the first frame, after the inputs were checked
            progress.start()
            started.append(time.perf_counter())
        elapsed = time.perf_counter() - started[0]
        progress.update(task, completed=done, total=total, fps=done / max(elapsed, 1e-6))

    def stop_bar() -> None:
        if started:  # stopping a bar that never showed would print an empty line
            progress.stop()
            started.clear()

    stop = threading.Event()
    try:
        # SIGINT/SIGTERM end the run between frames, which removes the unfinished output
        with _stop_on_signals(stop) as received:
            stats = swap_file(source, target, output, options, on_frame, video_quality, stop)
    except FacecastError as exc:
        stop_bar()  # the bar's last state first, then the one line that says why
        raise fail(str(exc)) from None
    except Stopped:
        stop_bar()
        signum = received[0] if received else signal.SIGTERM
        name = signal.Signals(signum).name
        console.print(f"[bold red]error:[/] stopped by {name}; nothing written", highlight=False)
        # the shell's convention for a command ended by a signal: 128 + its number
        raise typer.Exit(code=128 + signum) from None
    finally:
        stop_bar()
    sign_output(output, signing)
    if chatty():
        console.print(
            f"wrote [bold]{output}[/]: {stats.frames} frame(s), {stats.faces_swapped} face(s) "
            f"swapped, {stats.frames_without_face} frame(s) without a face passed through",
            highlight=False,
        )
    if selection.mode == "index" and stats.frames_none_chosen:
        warn(
            f"--faces {selection} chose no face in {stats.frames_none_chosen} of "
            f"{stats.frames} frame(s) that showed faces (at most {stats.most_faces} at once: "
            f"index:0 to index:{stats.most_faces - 1})"
        )
    print(output)


@app.command()
@with_engine_options
def swap(
    source: Annotated[
        list[Path],
        typer.Option(
            "--source",
            "-s",
            metavar="PHOTO",
            help="Photo of the face to put in. Repeat it, or name a folder, for several photos "
            "of the person: each face gets the one nearest its expression.",
        ),
    ],
    target: Annotated[
        Path,
        typer.Option("--target", "-t", metavar="FILE", help="Image or video file to change."),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Where to write the result: .png/.jpg for an image, .mp4/.mkv/.mov for a "
            "video. Never the target itself.",
        ),
    ],
    faces: Annotated[
        str,
        typer.Option(
            metavar="WHICH",
            help="Which faces: all, largest or index:N (N counts from 0, left to right).",
        ),
    ] = "all",
    blend: Annotated[
        str, typer.Option(metavar="MODE", help="Blending: feather or poisson.")
    ] = "feather",
    label: Annotated[
        bool, typer.Option("--label/--no-label", help="Draw the visible 'AI-generated' label.")
    ] = True,
    reference: ReferenceFlag = None,
    crf: Annotated[
        float | None,
        typer.Option(
            "--crf",
            "--video-quality",
            metavar="N",
            help="Video: constant quality, lower is better (x264 0-51, default 20; x265 "
            "default 24; vp9 0-63, default 32).",
        ),
    ] = None,
    preset: Annotated[
        str,
        typer.Option(
            metavar="NAME",
            help="Video: encoder speed, ultrafast to veryslow (slower is smaller).",
        ),
    ] = "veryfast",
    output_video_encoder: Annotated[
        str,
        typer.Option(
            "--output-video-encoder", metavar="NAME", help="Video: libx264, libx265 or libvpx-vp9."
        ),
    ] = "libx264",
    engine: EngineFlags | None = None,
) -> None:
    """Swap a face into an image or a video file.

    The face in SOURCE goes onto the chosen faces of TARGET; the result is written to
    OUTPUT with the target's frames, timing and audio.
    """
    assert engine is not None  # given by with_engine_options
    references = parse_references(reference or [], source[0])
    if engine.require_consent:  # every face put on someone: the sources and the references' own
        check_consent(engine.consent_dir, [*source, *(face for _, face in references)])
    quality = {"encoder": output_video_encoder, "crf": crf, "preset": preset}
    run_swap(
        source, target, output, faces, blend, label, references, engine.models, quality,
        engine.c2pa,
    )  # fmt: skip


@app.command()
def demo(
    output: Annotated[
        Path, typer.Option("--output", "-o", metavar="FILE", help="Where to write the video.")
    ] = Path("out/demo.mp4"),
) -> None:
    """Swap the bundled sample face into the bundled sample clip."""
    source, target = EXAMPLES / "obama.jpg", EXAMPLES / "short_hamilton_clip.mp4"
    if not source.is_file() or not target.is_file():
        raise fail(f"sample media not found in {EXAMPLES}: run from a clone of the repository")
    output.parent.mkdir(parents=True, exist_ok=True)
    run_swap(source, target, output, "all", "feather", True)
