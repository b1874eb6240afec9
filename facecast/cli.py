"""The command line: ``facecast swap | demo | stream | probe | verify | serve | web | models |
bench``.

Habits of the field's tools, kept on purpose: ``--version``; ``--log-level`` (or ``-v`` /
``-q``) that changes what is printed; help that reads at 80 columns; and every mistake a
user can make ends in one line, ``error: ...``, and exit code 2 (``main`` turns click's own
usage errors into that line too).
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from facecast import __version__
from facecast.errors import FacecastError

if TYPE_CHECKING:
    from facecast.safety.consent import ConsentRegistry
    from facecast.safety.provenance import SigningKey
    from facecast.serve.store import ClusterStore

try:  # Typer 0.2x carries its own copy of click; its usage errors are that copy's classes
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older Typer on the click package
    from click import exceptions as click_errors  # type: ignore[no-redef]

# rich_markup_mode=None: click's plain help, which rewraps paragraphs to the terminal and
# shows no type tags; the rich panels broke sentences mid-line at 80 columns.
app = typer.Typer(
    help="Face swap for live video, video files and images — offline, on a CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
bench_app = typer.Typer(
    help="Speed benchmarks; JSON results go to --results.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(bench_app, name="bench")
consent_app = typer.Typer(
    help="The consent registry: people who agreed to their face being used.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(consent_app, name="consent")
console = Console(stderr=True, soft_wrap=True)  # one message, one line, whatever the width
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
log = logging.getLogger("facecast")


LOG_LEVELS = ("debug", "info", "warning", "error")


class Role(StrEnum):
    """What one ``facecast serve`` process does (see docs/deploy.md)."""

    all = "all"
    ingest = "ingest"
    worker = "worker"


# Streams a worker takes by default: `facecast bench capacity` on 2 cores (docs/benchmarks.md).
DEFAULT_CAPACITY = 2


# Libraries that log at INFO about their own workings; a user wants facecast's lines.
_CHATTY_LOGGERS = ("aioice", "aiortc", "uvicorn.error", "asyncio", "httpx")

# Which model does each job: shared by swap and stream. None leaves the environment's
# FACECAST_* value, or the embedded default.
ModelsDirFlag = Annotated[
    Path | None,
    typer.Option(
        "--models-dir",
        metavar="DIR",
        help="Folder with your ONNX models [env FACECAST_MODELS_DIR].",
    ),
]
DetectorFlag = Annotated[
    str | None,
    typer.Option(
        metavar="NAME",
        help="Face detector: blazeface (embedded, default), scrfd, retinaface, yoloface, "
        "or a file in --models-dir.",
    ),
]
RecogniserFlag = Annotated[
    str | None,
    typer.Option(metavar="NAME", help="Identity model: dlib (embedded, default) or arcface."),
]
SwapperFlag = Annotated[
    str | None,
    typer.Option(
        metavar="NAME",
        help="Swapper: mesh (embedded, default), or a learned family from --models-dir: "
        "inswapper, hyperswap, simswap, ghost, blendswap, uniface, hififace (or a file name).",
    ),
]
SwapSizeFlag = Annotated[
    int | None,
    typer.Option(
        metavar="PX",
        help="A learned swapper's face size: 128, 256, 384 or 512; a multiple k of the "
        "model's own (inswapper 128, the others 256) runs it k x k times on sub-pixel "
        "shifts, interleaved: sharper, that many times dearer [env FACECAST_SWAP_SIZE].",
    ),
]
EnhancerFlag = Annotated[
    str | None,
    typer.Option(
        metavar="NAME",
        help="Face restorer after the swap: gfpgan (any 512x512 one); off by default.",
    ),
]
ProvidersFlag = Annotated[
    list[str] | None,
    typer.Option(
        "--execution-provider",
        metavar="NAME",
        help="For ONNX models: cpu (default), cuda or tensorrt; repeat for a fallback order.",
    ),
]
Fp16Flag = Annotated[
    bool | None,
    typer.Option("--fp16/--fp32", help="TensorRT half precision [default: fp32]."),
]
MemoryFlag = Annotated[
    str | None,
    typer.Option(
        "--memory-strategy",
        metavar="NAME",
        help="ONNX sessions: strict, moderate (default) or tolerant.",
    ),
]
ReferenceFlag = Annotated[
    list[str] | None,
    typer.Option(
        metavar="PHOTO[=FACE]",
        help="Swap only this person: PHOTO (gets the source face) or PHOTO=FACE. Repeat for "
        "several people; anyone else is left untouched.",
    ),
]
RequireConsentFlag = Annotated[
    bool,
    typer.Option(
        "--require-consent",
        envvar="FACECAST_REQUIRE_CONSENT",
        help="Refuse a source face that matches no person in the consent registry "
        "(facecast consent add) [env FACECAST_REQUIRE_CONSENT].",
    ),
]
ConsentDirFlag = Annotated[
    Path | None,
    typer.Option(
        "--consent-dir",
        envvar="FACECAST_STATE_DIR",
        metavar="DIR",
        help="Folder of the consent registry: serve's state folder [default: "
        "$XDG_STATE_HOME/facecast, else ~/.local/state/facecast; env FACECAST_STATE_DIR].",
    ),
]
ResultsFlag = Annotated[
    Path,
    typer.Option(metavar="DIR", help="Folder for the JSON results."),
]
UpdateDocsFlag = Annotated[
    bool,
    typer.Option(
        "--update-docs", help="Also rewrite this benchmark's table in docs/benchmarks.md."
    ),
]
C2paCertFlag = Annotated[
    Path | None,
    typer.Option(
        "--c2pa-cert",
        envvar="FACECAST_C2PA_CERT",
        metavar="PEM",
        help="Certificate chain (PEM, signer first) that signs a file output's C2PA "
        "manifest; with --c2pa-key [default: a local TEST key; env FACECAST_C2PA_CERT].",
    ),
]
C2paKeyFlag = Annotated[
    Path | None,
    typer.Option(
        "--c2pa-key",
        envvar="FACECAST_C2PA_KEY",
        metavar="PEM",
        help="Private key (PEM) of --c2pa-cert [env FACECAST_C2PA_KEY].",
    ),
]
HostFlag = Annotated[
    str,
    typer.Option(metavar="ADDRESS", help="Listen address; loopback only unless a token is set."),
]
# A clone keeps its results beside its code; an installed package (site-packages) has no
# such folder, so there they go to bench/results under the working folder.
DEFAULT_RESULTS = (
    REPO / "bench" / "results" if (REPO / "pyproject.toml").is_file() else Path("bench/results")
)


def model_flags(
    models_dir: Path | None,
    detector: str | None,
    recogniser: str | None,
    swapper: str | None,
    enhancer: str | None,
    providers: list[str] | None,
    fp16: bool | None,
    memory: str | None,
    swap_size: int | None = None,
) -> dict[str, object]:
    """The model flags that were given, as ModelSettings fields."""
    given = {
        "models_dir": models_dir,
        "detector": detector,
        "recogniser": recogniser,
        "swapper": swapper,
        "swap_size": swap_size,
        "enhancer": enhancer,
        "execution_providers": providers,
        "fp16": fp16,
        "memory_strategy": memory,
    }
    return {k: v for k, v in given.items() if v is not None}


def in_words(exc: Exception) -> str:
    """One line for a bad setting: pydantic's ValidationError, multi-line with a link, as
    "field: reason; ..."; anything else as it says itself."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    return "; ".join(
        f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()
    )


def fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)


def warn(message: str) -> None:
    console.print(f"[bold yellow]warning:[/] {message}", highlight=False)


def chatty() -> bool:
    """Progress bars and summaries are INFO: ``-q`` / ``--log-level warning`` hides them."""
    return log.isEnabledFor(logging.INFO)


def _print_version(value: bool) -> None:
    if value:
        print(f"facecast {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level", metavar="LEVEL", help="debug, info (default), warning or error."
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Same as --log-level debug.")
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="Same as --log-level warning: no progress bar or summary, only warnings "
            "and errors.",
        ),
    ] = False,
) -> None:
    if log_level is not None:
        level = log_level.lower()
        if level not in LOG_LEVELS:
            raise fail(f"--log-level {log_level!r}: use {', '.join(LOG_LEVELS)}")
    else:
        level = "debug" if verbose else "warning" if quiet else "info"
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    if level != "debug":
        for name in _CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def main() -> None:
    """The ``facecast`` command. Click's usage errors (a missing or unknown option, a bad
    value) become the same one line as facecast's own: ``error: ...``, exit code 2."""
    # A crash in native code (FFmpeg, the model runtimes) prints every thread's Python
    # stack, not only an exit status of 139.
    faulthandler.enable()
    try:
        code = app(standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:  # bare `facecast` or `facecast bench`
        print(exc.ctx.get_help() if exc.ctx else exc.format_message())
        sys.exit(2)
    except click_errors.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "facecast"
        message = exc.format_message().rstrip(".")
        console.print(f"[bold red]error:[/] {message} (see {where} --help)", highlight=False)
        sys.exit(2)
    except typer.Abort:  # EOF while click itself was waiting (Typer 0.2x has no click Abort)
        console.print("[bold red]error:[/] interrupted", highlight=False)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


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

    try:
        registry = ConsentRegistry.in_folder(consent_dir or default_state_dir())
        registry.check_photos(source_photos(photos), "--require-consent")
    except FacecastError as exc:
        raise fail(str(exc)) from None


def sign_output(output: Path, signing: SigningKey) -> None:
    """The finished ``output``'s C2PA manifest, signed into a temporary copy that replaces
    it; said in words when the format cannot carry one or the signing fails (exit 2: the
    file itself is whole and kept)."""
    from facecast.safety.provenance import sign_file

    try:
        signed = sign_file(output, signing)
    except FacecastError as exc:
        raise fail(str(exc)) from None
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
    from facecast.engine.pipeline import EngineOptions, Stopped, swap_file
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
    models_dir: ModelsDirFlag = None,
    detector: DetectorFlag = None,
    recogniser: RecogniserFlag = None,
    swapper: SwapperFlag = None,
    swap_size: SwapSizeFlag = None,
    enhancer: EnhancerFlag = None,
    execution_provider: ProvidersFlag = None,
    fp16: Fp16Flag = None,
    memory_strategy: MemoryFlag = None,
    c2pa_cert: C2paCertFlag = None,
    c2pa_key: C2paKeyFlag = None,
    require_consent: RequireConsentFlag = False,
    consent_dir: ConsentDirFlag = None,
) -> None:
    """Swap a face into an image or a video file.

    The face in SOURCE goes onto the chosen faces of TARGET; the result is written to
    OUTPUT with the target's frames, timing and audio.
    """
    models = model_flags(
        models_dir,
        detector,
        recogniser,
        swapper,
        enhancer,
        execution_provider,
        fp16,
        memory_strategy,
        swap_size,
    )
    references = parse_references(reference or [], source[0])
    if require_consent:  # every face put on someone: the sources and the references' own
        check_consent(consent_dir, [*source, *(face for _, face in references)])
    quality = {"encoder": output_video_encoder, "crf": crf, "preset": preset}
    c2pa = (c2pa_cert, c2pa_key)
    run_swap(source, target, output, faces, blend, label, references, models, quality, c2pa)


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


@app.command()
def stream(
    source: Annotated[
        list[Path] | None,
        typer.Option(
            "--source",
            "-s",
            metavar="PHOTO",
            help="Face photo [env SOURCE_IMAGE]; repeat it, or name a folder, for several "
            "photos of the person.",
        ),
    ] = None,
    input_url: Annotated[
        str | None,
        typer.Option(
            "--input",
            "-i",
            metavar="URL",
            help="rtmp://, udp://, an .sdp file (RTP), .m3u8, srt://, whip-listen://HOST:PORT/"
            "PATH, /dev/videoN, gst:... or a file [env TARGET_STREAM].",
        ),
    ] = None,
    output_url: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="URL",
            help="rtmp://, udp://, rtp://, srt://, gst:... or a file [env OUTPUT_STREAM].",
        ),
    ] = None,
    faces: Annotated[
        str | None,
        typer.Option(metavar="WHICH", help="Which faces: all (default), largest or index:N."),
    ] = None,
    reference: ReferenceFlag = None,
    blend: Annotated[
        str | None, typer.Option(metavar="MODE", help="feather (default) or poisson.")
    ] = None,
    label: Annotated[
        bool | None,
        typer.Option(
            "--label/--no-label", help="Draw the visible 'AI-generated' label [default: label]."
        ),
    ] = None,
    realtime: Annotated[
        bool | None,
        typer.Option(
            "--realtime/--as-fast",
            help="Pace a file input at its frame rate, or read it flat out [default: as-fast].",
        ),
    ] = None,
    preset: Annotated[
        str | None, typer.Option(metavar="NAME", help="x264 preset [default: ultrafast].")
    ] = None,
    keyint: Annotated[
        int | None,
        typer.Option(metavar="N", help="Frames between keyframes [default: about 1 s]."),
    ] = None,
    bitrate: Annotated[
        str | None,
        typer.Option(
            metavar="RATE", help="Video bitrate, e.g. 2500k [default: from the frame size]."
        ),
    ] = None,
    stall_timeout: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS", help="Reconnect after this long without a frame [default: 5]."
        ),
    ] = None,
    models_dir: ModelsDirFlag = None,
    detector: DetectorFlag = None,
    recogniser: RecogniserFlag = None,
    swapper: SwapperFlag = None,
    swap_size: SwapSizeFlag = None,
    enhancer: EnhancerFlag = None,
    execution_provider: ProvidersFlag = None,
    fp16: Fp16Flag = None,
    memory_strategy: MemoryFlag = None,
    c2pa_cert: C2paCertFlag = None,
    c2pa_key: C2paKeyFlag = None,
    require_consent: RequireConsentFlag = False,
    consent_dir: ConsentDirFlag = None,
) -> None:
    """Swap faces in a live stream and publish it, until stopped.

    Runs until SIGINT or SIGTERM, reconnecting a lost input or output. References also
    come from FACECAST_REFERENCES (a JSON list).
    """
    from facecast.config import StreamSettings
    from facecast.live.pipeline import run_stream
    from facecast.models.choice import ModelChoice

    flags = {
        "source_image": source[0] if source else None,
        "extra_sources": source[1:] if source else None,
        "input": input_url,
        "output": output_url,
        "faces": faces,
        "references": reference,
        "blend": blend,
        "label": label,
        "realtime": realtime,
        "preset": preset,
        "keyint": keyint,
        "bitrate": bitrate,
        "stall_timeout": stall_timeout,
    }
    flags.update(
        model_flags(
            models_dir,
            detector,
            recogniser,
            swapper,
            enhancer,
            execution_provider,
            fp16,
            memory_strategy,
            swap_size,
        )
    )
    try:
        settings = StreamSettings(**{k: v for k, v in flags.items() if v is not None})
        ignored = ModelChoice.from_settings(settings).ignored_runtime()
    except (ValueError, FacecastError) as exc:
        raise fail(in_words(exc)) from None
    missing = [
        f"{flag} (or {env})"
        for flag, env, value in (
            ("--source", "SOURCE_IMAGE", settings.source_image),
            ("--input", "TARGET_STREAM", settings.input),
            ("--output", "OUTPUT_STREAM", settings.output),
        )
        if not value
    ]
    if missing:
        raise fail("missing " + ", ".join(missing))
    if require_consent:
        assert settings.source_image is not None
        faces = [face for _, face in settings.references if face is not None]
        check_consent(consent_dir, [settings.source_image, *settings.extra_sources, *faces])
    if ignored:
        warn(ignored)
    from facecast.media import gst
    from facecast.media.live_sink import plan_output
    from facecast.safety.provenance import load_signing_key

    assert settings.output is not None
    try:
        # a file output is signed once whole (C2PA); a live one carries the SEI mark only
        plan = None if gst.is_gst(settings.output) else plan_output(settings.output)
        output_file = Path(plan.target) if plan is not None and plan.kind == "file" else None
        signing = load_signing_key(c2pa_cert, c2pa_key) if output_file else None
        run_stream(settings)
    except FacecastError as exc:
        raise fail(str(exc)) from None
    if output_file is not None and signing is not None and output_file.is_file():
        sign_output(output_file, signing)


@app.command()
def probe(
    publish: Annotated[
        str, typer.Option(metavar="URL", help="Where to publish the stamped test stream.")
    ],
    read: Annotated[str, typer.Option(metavar="URL", help="The swapped stream to read back.")],
    seconds: Annotated[
        float, typer.Option(metavar="SECONDS", help="How long to measure, after the warm-up.")
    ] = 20.0,
    fps: Annotated[
        float, typer.Option(metavar="RATE", help="Frame rate of the test stream.")
    ] = 30.0,
    size: Annotated[
        str, typer.Option(metavar="WxH", help="Frame size of the test stream.")
    ] = "1280x720",
    face: Annotated[
        Path, typer.Option(metavar="PHOTO", help="Face photo shown in the test stream.")
    ] = EXAMPLES / "obama.jpg",
    warmup: Annotated[
        float,
        typer.Option(metavar="SECONDS", help="Seconds after the first stamp that are left out."),
    ] = 2.0,
) -> None:
    """Glass-to-glass latency of a running stream: p50/p95/p99.

    Publishes a stamped test stream, reads the swapped one back and prints the latency
    figures as JSON.
    """
    import json

    from facecast.live.probe import LatencyProbe, load_probe_face

    try:
        width, height = (int(v) for v in size.lower().split("x"))
        photo = load_probe_face(face)
    except ValueError:
        raise fail(f"size {size!r}: use WIDTHxHEIGHT, e.g. 1280x720") from None
    except FacecastError as exc:
        raise fail(str(exc)) from None
    prober = LatencyProbe(publish, read, photo, (width, height), fps, warmup=warmup)
    result = prober.run(seconds + warmup)
    summary = result.summary()
    print(json.dumps(summary))
    if not result.latencies_ms:
        raise fail(f"no stamped frame came back from {read} in {seconds:.0f} s")


@app.command()
def verify(
    target: Annotated[
        str,
        # described in the docstring: Typer lists an argument with a type tag (<str>)
        typer.Argument(metavar="FILE|URL", show_default=False, hidden=True),
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of one line each.")
    ] = False,
    seconds: Annotated[
        float,
        typer.Option(metavar="SECONDS", help="A live stream: read it for at most this long."),
    ] = 10.0,
    keyframes: Annotated[
        int,
        typer.Option(metavar="N", help="Keyframes to check for the in-band mark (0: all)."),
    ] = 5,
) -> None:
    """Look for facecast's marks: in-band (SEI), container tags and C2PA.

    FILE|URL is an image or video file, or a live stream (rtmp://, udp://, srt://...).

    Prints one line per mark. Exit code 0 if any mark is found, 1 if none.
    """
    import json

    from facecast.safety.provenance import verify as find_marks

    if seconds <= 0:
        raise fail(f"--seconds {seconds:g}: must be positive")
    if keyframes < 0:
        raise fail(f"--keyframes {keyframes}: use 0 (all) or more")
    try:
        found = find_marks(target, seconds=seconds, keyframes=keyframes or None)
    except FacecastError as exc:
        raise fail(str(exc)) from None
    if as_json:
        print(json.dumps(found.as_json()))
    else:
        for line in found.lines():
            print(line)
    if not found.found:
        raise typer.Exit(code=1)


@app.command()
def serve(
    profiles: Annotated[
        Path | None,
        typer.Option(
            envvar="FACECAST_PROFILES",
            metavar="YAML",
            help="Stream key -> source face and options [env FACECAST_PROFILES].",
        ),
    ] = None,
    host: HostFlag = "0.0.0.0",
    http_port: Annotated[int, typer.Option(metavar="PORT", help="HTTP control plane port.")] = 8080,
    rtmp_port: Annotated[int, typer.Option(metavar="PORT", help="RTMP ingest port.")] = 1935,
    hls_port: Annotated[
        int, typer.Option(metavar="PORT", help="HLS port of the ingest server.")
    ] = 8088,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="FACECAST_STATE_DIR",
            metavar="DIR",
            help="Where profile changes made through the API are kept across restarts, "
            "laid over --profiles [default: $XDG_STATE_HOME/facecast, else "
            "~/.local/state/facecast; env FACECAST_STATE_DIR].",
        ),
    ] = None,
    viewer_auth: Annotated[
        bool | None,
        typer.Option(
            "--viewer-auth/--no-viewer-auth",
            help="Viewers of swapped/KEY and its HLS need the key's play token "
            "(GET /api/play/KEY) [default: on unless --host is loopback].",
        ),
    ] = None,
    role: Annotated[
        Role,
        typer.Option(
            envvar="FACECAST_ROLE",
            help="all: one box does everything; ingest: nginx and the API, streams go to "
            "workers; worker: runs the streams the store assigns it.",
        ),
    ] = Role.all,
    store: Annotated[
        str | None,
        typer.Option(
            envvar="FACECAST_STORE",
            metavar="URL",
            help="Redis URL of the cluster's store, e.g. redis://store:6379/0; needed by "
            "ingest and worker.",
        ),
    ] = None,
    advertise: Annotated[
        str | None,
        typer.Option(
            envvar="FACECAST_ADVERTISE",
            metavar="HOST",
            help="Ingest: the host name workers reach its RTMP port at [default: this "
            "machine's name].",
        ),
    ] = None,
    capacity: Annotated[
        int,
        typer.Option(
            envvar="FACECAST_CAPACITY",
            metavar="N",
            min=1,
            help="Worker: the most streams it runs at once.",
        ),
    ] = DEFAULT_CAPACITY,
    require_consent: Annotated[
        bool,
        typer.Option(
            "--require-consent",
            envvar="FACECAST_REQUIRE_CONSENT",
            help="Accept a source face only if it matches a person in the consent "
            "registry (facecast consent add), profiles included [env "
            "FACECAST_REQUIRE_CONSENT].",
        ),
    ] = False,
    moderation_url: Annotated[
        str | None,
        typer.Option(
            envvar="FACECAST_MODERATION_URL",
            metavar="URL",
            help="Webhook that allows or denies each new source face or reference; an "
            "error or no answer denies [env FACECAST_MODERATION_URL].",
        ),
    ] = None,
    moderation_timeout: Annotated[
        float,
        typer.Option(
            envvar="FACECAST_MODERATION_TIMEOUT",
            metavar="SECONDS",
            min=0.1,
            help="How long the webhook has to answer [env FACECAST_MODERATION_TIMEOUT].",
        ),
    ] = 5.0,
    audit_log: Annotated[
        Path | None,
        typer.Option(
            envvar="FACECAST_AUDIT_LOG",
            metavar="FILE",
            help="JSON lines of every face change attempt [default: audit.log in the "
            "state folder; env FACECAST_AUDIT_LOG].",
        ),
    ] = None,
) -> None:
    """Service mode: ingest server, HTTP API and one pipeline per key.

    Every stream published to rtmp://HOST/live/KEY comes out swapped with KEY's profile at
    rtmp://HOST/swapped/KEY. The API token is read from FACECAST_API_TOKEN. With --role
    ingest and workers (--role worker) sharing a --store, the streams run on the workers.
    """
    import os
    import threading

    from facecast.live.pipeline import _stop_on_signals
    from facecast.serve.profiles import resolve_state_dir
    from facecast.serve.service import Service, load_profiles

    token = os.environ.get("FACECAST_API_TOKEN") or None
    if role is not Role.all and not store:
        raise fail(f"--role {role.value} needs --store URL (a Redis URL)")
    try:
        stop = threading.Event()
        cluster_store = _open_store(store) if role is not Role.all else None
        # consent, moderation and the audit log: the same on every role that takes faces
        gate: dict[str, Any] = {
            "require_consent": require_consent,
            "moderation_url": moderation_url,
            "moderation_timeout": moderation_timeout,
            "audit_log": audit_log,
        }
        if role is Role.worker:
            from facecast.serve.worker import Worker

            assert cluster_store is not None
            worker = Worker(
                cluster_store,
                capacity=capacity,
                token=token,
                host=host,
                http_port=http_port,
                **gate,
            )
            with _stop_on_signals(stop):
                worker.run(stop)
            return
        table = load_profiles(profiles) if profiles else {}
        if not table and role is Role.all:
            warn("no profiles: every publisher will be refused")
        service = Service(
            table,
            token=token,
            host=host,
            http_port=http_port,
            rtmp_port=rtmp_port,
            hls_port=hls_port,
            state_dir=resolve_state_dir(state_dir) if cluster_store is None else None,
            viewer_auth=viewer_auth,
            store=cluster_store,
            advertise=advertise,
            **gate,
        )
        with _stop_on_signals(stop):
            service.run(stop)
    except FacecastError as exc:
        raise fail(str(exc)) from None


def _open_store(url: str | None) -> ClusterStore:
    """The cluster's store, checked to answer now: a wrong URL fails at start, not later."""
    from facecast.serve.store import ClusterStore

    store = ClusterStore(url or "")
    store.ping()
    return store


# ---------------------------------------------------------------------------- consent

ConsentStateFlag = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        envvar="FACECAST_STATE_DIR",
        metavar="DIR",
        help="serve's state folder, which keeps the registry [default: $XDG_STATE_HOME/"
        "facecast, else ~/.local/state/facecast; env FACECAST_STATE_DIR].",
    ),
]
ConsentStoreFlag = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="FACECAST_STORE",
        metavar="URL",
        help="A cluster's Redis store: the registry is kept there instead [env FACECAST_STORE].",
    ),
]
ConsentAuditFlag = Annotated[
    Path | None,
    typer.Option(
        "--audit-log",
        envvar="FACECAST_AUDIT_LOG",
        metavar="FILE",
        help="Where the change is logged [default: audit.log in the state folder; env "
        "FACECAST_AUDIT_LOG].",
    ),
]


def _consent_registry(
    state_dir: Path | None, store: str | None
) -> tuple[ConsentRegistry, Path | None]:
    """(the registry, the state folder it is in; None in a store)."""
    from facecast.safety.consent import ConsentRegistry
    from facecast.serve.profiles import default_state_dir

    if store:
        return ConsentRegistry.in_store(_open_store(store)), None
    folder = state_dir or default_state_dir()
    return ConsentRegistry.in_folder(folder), folder


def _consent_audit(audit_log: Path | None, folder: Path | None, entry: dict[str, object]) -> None:
    """A consent change in the audit log ``serve`` keeps, as the API's changes are."""
    import getpass

    from facecast.safety.audit import AUDIT_FILE, AuditLog

    path = audit_log or (folder / AUDIT_FILE if folder is not None else None)
    if path is None:
        return
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    AuditLog(path).write({**entry, "token": None, "client": f"cli:{user}"})


@consent_app.command("add")
def consent_add(
    photos: Annotated[
        list[Path],
        # hidden: Typer would tag it <list[Path]> in the help; the text below says it
        typer.Argument(metavar="PHOTO", hidden=True, show_default=False),
    ],
    name: Annotated[str, typer.Option("--name", metavar="NAME", help="Who they are, as listed.")],
    state_dir: ConsentStateFlag = None,
    store: ConsentStoreFlag = None,
    audit_log: ConsentAuditFlag = None,
) -> None:
    """Enrol a person who agreed to their face being used.

    Each PHOTO is a photo of the person (its largest face is used). The registry keeps each
    photo's face descriptor and SHA-256, not the photo. A name already enrolled gets the
    photos added: several photos of a person make a miss less likely.
    """
    from facecast.media.image_io import read_image
    from facecast.safety.audit import image_sha256
    from facecast.safety.consent import check_name

    try:
        check_name(name)
        registry, folder = _consent_registry(state_dir, store)
        images = [(read_image(photo), str(photo)) for photo in photos]
    except FacecastError as exc:
        raise fail(str(exc)) from None
    faces = [{"role": label, "sha256": image_sha256(image)} for image, label in images]
    entry: dict[str, object] = {"change": "consent_add", "person": name, "faces": faces}
    try:
        added = registry.add(name, images)
    except FacecastError as exc:
        _consent_audit(
            audit_log, folder, {**entry, "allowed": False, "outcome": "failed", "reason": str(exc)}
        )
        raise fail(str(exc)) from None
    _consent_audit(
        audit_log, folder, {**entry, "allowed": True, "outcome": "allowed", "reason": None}
    )
    if chatty():
        console.print(
            f"{name}: enrolled, {added['photos']} photo(s) in {registry.where}", highlight=False
        )


@consent_app.command("list")
def consent_list(state_dir: ConsentStateFlag = None, store: ConsentStoreFlag = None) -> None:
    """List the enrolled people: name, photos, when added."""
    try:
        registry, _ = _consent_registry(state_dir, store)
        people = registry.people()
    except FacecastError as exc:
        raise fail(str(exc)) from None
    table = Table("name", "photos", "added", "sha256 of each photo (first 12)")
    for person in people:
        hashes = " ".join(photo["sha256"][:12] for photo in person["photos"])
        table.add_row(person["name"], str(len(person["photos"])), person["added"] or "", hashes)
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    if chatty():
        console.print(f"{len(people)} person(s) in {registry.where}", highlight=False)


@consent_app.command("remove")
def consent_remove(
    name: Annotated[
        str, typer.Argument(metavar="NAME", hidden=True, show_default=False)  # see add's
    ],
    state_dir: ConsentStateFlag = None,
    store: ConsentStoreFlag = None,
    audit_log: ConsentAuditFlag = None,
) -> None:
    """Remove a person: their face is refused from then on.

    NAME is the person as listed. Profiles and running streams that already use their face
    are not changed; with --require-consent, serve refuses to start while a profile does.
    """
    entry: dict[str, object] = {"change": "consent_remove", "person": name, "faces": []}
    try:
        registry, folder = _consent_registry(state_dir, store)
        registry.remove(name)
    except FacecastError as exc:
        raise fail(str(exc)) from None
    _consent_audit(
        audit_log, folder, {**entry, "allowed": True, "outcome": "allowed", "reason": None}
    )
    if chatty():
        console.print(f"{name}: removed from {registry.where}", highlight=False)


@app.command()
def web(
    host: HostFlag = "0.0.0.0",
    port: Annotated[int, typer.Option(metavar="PORT", help="HTTP port.")] = 8080,
    max_sessions: Annotated[
        int, typer.Option(metavar="N", help="Browser sessions open at once.")
    ] = 4,
) -> None:
    """The browser page alone: camera in, swapped video back.

    Serves http://HOST:PORT/web/ over WebRTC. The token is read from FACECAST_API_TOKEN.
    """
    import os
    import threading

    from facecast.config import StreamSettings
    from facecast.live.pipeline import _stop_on_signals, engine_options
    from facecast.serve.web import WebServer
    from facecast.webrtc.page import WebSessions

    try:
        sessions = WebSessions(engine_options(StreamSettings()), limit=max_sessions)
        server = WebServer(
            sessions, token=os.environ.get("FACECAST_API_TOKEN") or None, host=host, port=port
        )
        stop = threading.Event()
        with _stop_on_signals(stop):
            server.run(stop)
    except FacecastError as exc:
        raise fail(str(exc)) from None


@app.command()
def models(
    check: Annotated[bool, typer.Option("--check", help="Exit 2 if any file is bad.")] = False,
    models_dir: ModelsDirFlag = None,
) -> None:
    """List the model files and check each one.

    Checks presence and sha256 of the embedded models; with a models folder, also shows
    what each ONNX file there was recognised as.
    """
    from facecast.models.registry import REGISTRY
    from facecast.models.registry import check as check_model

    table = Table("name", "file", "package", "licence", "input", "status")
    problems = []
    for model in REGISTRY.values():
        problem = check_model(model)
        if problem:
            problems.append(problem)
        status = "[green]ok[/]" if not problem else "[red]missing/corrupt[/]"
        table.add_row(
            model.name, model.filename, model.package, model.licence, model.input_size, status
        )
    # piped output keeps whole lines (no wrapping at 80 columns), so it can be grepped
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    for problem in problems:
        console.print(f"[red]{problem}[/]", highlight=False)
    try:
        problems += _user_models(models_dir)
    except FacecastError as exc:
        raise fail(str(exc)) from None
    if problems and check:
        raise typer.Exit(code=2)


def _user_models(models_dir: Path | None) -> list[str]:
    """Print the models folder's ONNX files as recognised; the unrecognised ones."""
    from facecast.models.user import describe, scan
    from facecast.models.user import models_dir as resolve_dir

    folder = resolve_dir(models_dir)
    if folder is None:
        return []
    found = scan(folder)
    table = Table("file", "kind", "family", "identified by", "sha256", "inputs", "outputs", "note")
    for row in describe(found):
        table.add_row(
            row["file"],
            row["kind"],
            row["family"],
            row["identified_by"],
            row["sha256_full"],
            row["inputs"],
            row["outputs"],
            row["note"],
        )
    Console(width=None if sys.stdout.isatty() else 250).print(table)
    if not found:
        console.print(f"[yellow]{folder}: no .onnx files[/]", highlight=False)
    return [f"{m.file}: {m.reason}" for m in found if not m.recognised]


@bench_app.command("swap")
def bench_swap(results: ResultsFlag = DEFAULT_RESULTS, update_docs: UpdateDocsFlag = False) -> None:
    """File to file fps and per-stage ms at 360p and 720p.

    Runs the sample clip and a 720p copy, beside a plain decode and encode of the same
    file (the limit).
    """
    from facecast.bench.swap import run_swap_bench

    try:
        run_swap_bench(EXAMPLES, results, console, docs_for(update_docs))
    except FacecastError as exc:
        raise fail(str(exc)) from None


@bench_app.command("live")
def bench_live(
    results: ResultsFlag = DEFAULT_RESULTS,
    update_docs: UpdateDocsFlag = False,
    seconds: Annotated[
        float, typer.Option(metavar="SECONDS", help="Measured seconds per run.")
    ] = 15.0,
) -> None:
    """Live latency on 720p30: pipeline vs serial, overload, probe.

    Runs the pipeline and a serial loop at the input rate, flat out and at twice the
    sustainable rate, and measures glass to glass with the probe over loopback UDP.
    """
    from facecast.bench.live import run_live_bench

    try:
        run_live_bench(EXAMPLES, results, console, seconds, docs_for(update_docs))
    except FacecastError as exc:
        raise fail(str(exc)) from None


@bench_app.command("capacity")
def bench_capacity(
    results: ResultsFlag = DEFAULT_RESULTS,
    update_docs: UpdateDocsFlag = False,
    seconds: Annotated[
        float, typer.Option(metavar="SECONDS", min=1.0, help="Measured seconds per run.")
    ] = 12.0,
    max_streams: Annotated[
        int, typer.Option(metavar="N", min=1, help="Most streams tried at each size.")
    ] = 8,
) -> None:
    """Streams per worker at 360p and 720p: how many hold 25 and 15 fps each.

    Runs N live pipelines in this process as a worker does (N = 1, 2, ...), fed over RTMP
    by a private ingest server and real-time publishers, until the slowest stream drops
    under 15 fps. Takes minutes.
    """
    from facecast.bench.capacity import run_capacity_bench

    try:
        run_capacity_bench(EXAMPLES, results, console, seconds, max_streams, docs_for(update_docs))
    except FacecastError as exc:
        raise fail(str(exc)) from None


@bench_app.command("faces")
def bench_faces(
    results: ResultsFlag = DEFAULT_RESULTS, update_docs: UpdateDocsFlag = False
) -> None:
    """Face analysis per 720p frame: detection every frame vs every 3rd.

    Reports the time saved and faces lost, and the temporal layer's cost: cuts, tracks,
    embeddings.
    """
    from facecast.bench.faces import run_faces_bench

    try:
        run_faces_bench(EXAMPLES, results, console, docs_for(update_docs))
    except FacecastError as exc:
        raise fail(str(exc)) from None


@bench_app.command("models")
def bench_models(
    models_dir: ModelsDirFlag = None,
    execution_provider: Annotated[
        list[str] | None,
        typer.Option(
            "--execution-provider",
            metavar="NAME",
            help="cpu, cuda or tensorrt; repeat to time each [default: every one available].",
        ),
    ] = None,
    iterations: Annotated[
        int, typer.Option(metavar="N", help="Timed runs per model and provider.")
    ] = 20,
    results: ResultsFlag = DEFAULT_RESULTS,
    update_docs: UpdateDocsFlag = False,
) -> None:
    """Every model in the models folder, timed on each execution provider.

    ms per run (mean, p50, p90) and peak memory per model and provider; a provider that is
    not there falls back to the CPU and the row says so.
    """
    from facecast.bench.models import run_models_bench
    from facecast.models.runtime import PROVIDERS, available_providers, parse_providers
    from facecast.models.user import models_dir as resolve_models_dir

    try:
        folder = resolve_models_dir(models_dir)
        if folder is None:
            raise FacecastError("name the models folder with --models-dir (or FACECAST_MODELS_DIR)")
        if execution_provider:
            providers = parse_providers(execution_provider)
        else:
            present = set(available_providers())
            providers = tuple(n for n, ort in PROVIDERS.items() if ort in present)  # type: ignore[misc]
        run_models_bench(folder, providers, iterations, results, console, docs_for(update_docs))
    except (ValueError, FacecastError) as exc:
        raise fail(in_words(exc)) from None


@bench_app.command("quality")
def bench_quality(
    results: ResultsFlag = DEFAULT_RESULTS,
    update_docs: UpdateDocsFlag = False,
    pairs: Annotated[
        str,
        typer.Option(
            metavar="WHICH",
            help="all, tune (pairs onto the tuning people) or held-out (onto the others).",
        ),
    ] = "all",
    video: Annotated[
        bool, typer.Option("--video/--no-video", help="Also measure flicker on the sample clip.")
    ] = True,
) -> None:
    """Swap quality on people the swap never saw, by two unrelated judges.

    Person A's photo 1 goes onto person B's photo 1; the output is judged against A's and
    B's other photos by dlib and by a recogniser of another family, beside the textbook
    Delaunay swap, with expression errors and contact sheets.
    """
    from facecast.bench.quality.bench import run_quality_bench

    try:
        run_quality_bench(
            REPO / "tests" / "media",
            EXAMPLES,
            results,
            console,
            docs_for(update_docs),
            video=video,
            pairs=pairs,
        )
    except FacecastError as exc:
        raise fail(str(exc)) from None


def docs_for(update_docs: bool) -> Path | None:
    """The benchmarks page to rewrite, only when asked: the clone's own, never a
    docs/ folder of wherever the command happens to run."""
    if not update_docs:
        return None
    docs = REPO / "docs" / "benchmarks.md"
    if not docs.is_file():
        raise fail(f"--update-docs: {docs} not found; run from a clone of the repository")
    return docs


if __name__ == "__main__":
    main()
