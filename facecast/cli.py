"""The command line: ``facecast swap | demo | models | bench``."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from facecast.errors import FacecastError

app = typer.Typer(
    help="Face swap for live video, video files and images — offline, on a CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks; results go to bench/results/.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console(stderr=True, soft_wrap=True)  # one message, one line, whatever the width
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# Which model does each job: shared by swap and stream. None leaves the environment's
# FACECAST_* value, or the embedded default.
ModelsDirFlag = Annotated[
    Path | None,
    typer.Option("--models-dir", help="Folder with your ONNX models [env FACECAST_MODELS_DIR]."),
]
DetectorFlag = Annotated[
    str | None, typer.Option(help="blazeface (embedded), scrfd, retinaface, yoloface or a file.")
]
RecogniserFlag = Annotated[str | None, typer.Option(help="dlib (embedded) or arcface.")]
SwapperFlag = Annotated[str | None, typer.Option(help="mesh (embedded) or inswapper.")]
EnhancerFlag = Annotated[
    str | None, typer.Option(help="gfpgan (any 512x512 face restorer) after the swap.")
]
ProvidersFlag = Annotated[
    list[str] | None,
    typer.Option(
        "--execution-provider", help="cpu, cuda or tensorrt; repeat for a fallback order."
    ),
]
Fp16Flag = Annotated[bool | None, typer.Option("--fp16/--fp32", help="TensorRT half precision.")]
MemoryFlag = Annotated[
    str | None,
    typer.Option("--memory-strategy", help="strict, moderate (default) or tolerant."),
]


def model_flags(
    models_dir: Path | None,
    detector: str | None,
    recogniser: str | None,
    swapper: str | None,
    enhancer: str | None,
    providers: list[str] | None,
    fp16: bool | None,
    memory: str | None,
) -> dict[str, object]:
    """The model flags that were given, as ModelSettings fields."""
    given = {
        "models_dir": models_dir,
        "detector": detector,
        "recogniser": recogniser,
        "swapper": swapper,
        "enhancer": enhancer,
        "execution_providers": providers,
        "fp16": fp16,
        "memory_strategy": memory,
    }
    return {k: v for k, v in given.items() if v is not None}


def fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs.")] = False):
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
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
    )


def parse_references(texts: list[str], source: Path) -> tuple[tuple[Path, Path], ...]:
    """``PHOTO`` (swap that person with the source face) or ``PHOTO=FACE`` (with FACE)."""
    from facecast.config import parse_reference

    try:
        pairs = [parse_reference(text) for text in texts]
    except ValueError as exc:
        raise fail(str(exc)) from None
    return tuple((photo, face or source) for photo, face in pairs)


def run_swap(
    source: Path,
    target: Path,
    output: Path,
    faces: str,
    blend: str,
    label: bool,
    references: tuple[tuple[Path, Path], ...] = (),
    models: dict[str, object] | None = None,
) -> None:
    """Shared by ``swap`` and ``demo``: one place turns FacecastErrors into exit code 2."""
    from facecast.config import ModelSettings
    from facecast.faces.select import Selection
    from facecast.modelset import ModelChoice
    from facecast.pipeline import EngineOptions, swap_file
    from facecast.swap.mesh_swapper import SwapOptions

    try:
        selection = Selection.parse(faces)
        choice = ModelChoice.from_settings(ModelSettings(**(models or {})))
    except (ValueError, FacecastError) as exc:
        raise fail(str(exc)) from None
    if blend not in ("feather", "poisson"):
        raise fail(f"unknown blend {blend!r}: use feather or poisson")
    options = EngineOptions(
        selection=selection,
        swap=SwapOptions(blend=blend),  # type: ignore[arg-type]
        label=label,
        references=references,
        models=choice,
    )
    progress = _progress()
    task = progress.add_task(target.name, total=None, fps=0.0)
    started = [0.0]

    def on_frame(done: int, total: int | None) -> None:
        if done == 1:  # the bar appears with the first frame, after the inputs were checked
            progress.start()
            started[0] = time.perf_counter()
        elapsed = time.perf_counter() - started[0]
        progress.update(task, completed=done, total=total, fps=done / max(elapsed, 1e-6))

    try:
        stats = swap_file(source, target, output, options, on_frame)
    except FacecastError as exc:
        raise fail(str(exc)) from None
    finally:
        progress.stop()
    console.print(
        f"wrote [bold]{output}[/]: {stats.frames} frame(s), {stats.faces_swapped} face(s) swapped,"
        f" {stats.frames_without_face} frame(s) without a face passed through",
        highlight=False,
    )
    print(output)


@app.command()
def swap(
    source: Annotated[Path, typer.Option("--source", "-s", help="Photo of the face to put in.")],
    target: Annotated[Path, typer.Option("--target", "-t", help="Image or video file to change.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the result.")],
    faces: Annotated[str, typer.Option(help="Which faces: all, largest or index:N.")] = "all",
    blend: Annotated[str, typer.Option(help="feather (default) or poisson.")] = "feather",
    label: Annotated[
        bool, typer.Option("--label/--no-label", help="Visible 'AI-generated' label.")
    ] = True,
    reference: Annotated[
        list[str] | None,
        typer.Option(
            help="Swap only this person: PHOTO (gets the source face) or PHOTO=FACE. "
            "Repeat for several people; anyone else is left untouched."
        ),
    ] = None,
    models_dir: ModelsDirFlag = None,
    detector: DetectorFlag = None,
    recogniser: RecogniserFlag = None,
    swapper: SwapperFlag = None,
    enhancer: EnhancerFlag = None,
    execution_provider: ProvidersFlag = None,
    fp16: Fp16Flag = None,
    memory_strategy: MemoryFlag = None,
) -> None:
    """Swap the face from SOURCE onto the chosen faces of an image or a video file."""
    models = model_flags(
        models_dir,
        detector,
        recogniser,
        swapper,
        enhancer,
        execution_provider,
        fp16,
        memory_strategy,
    )
    references = parse_references(reference or [], source)
    run_swap(source, target, output, faces, blend, label, references, models)


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("out/demo.mp4"),
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
        Path | None, typer.Option("--source", "-s", help="Face photo [env SOURCE_IMAGE].")
    ] = None,
    input_url: Annotated[
        str | None,
        typer.Option(
            "--input",
            "-i",
            help="rtmp://, udp://, rtp (.sdp), .m3u8, srt://, "
            "/dev/videoN or a file [env TARGET_STREAM].",
        ),
    ] = None,
    output_url: Annotated[
        str | None,
        typer.Option(
            "--output", "-o", help="rtmp://, udp://, rtp://, srt:// or a file [env OUTPUT_STREAM]."
        ),
    ] = None,
    faces: Annotated[str | None, typer.Option(help="all, largest or index:N.")] = None,
    reference: Annotated[
        list[str] | None,
        typer.Option(
            help="Swap only this person: PHOTO (gets the source face) or PHOTO=FACE. "
            "Repeat for more people [env FACECAST_REFERENCES, a JSON list]."
        ),
    ] = None,
    blend: Annotated[str | None, typer.Option(help="feather or poisson.")] = None,
    label: Annotated[bool | None, typer.Option("--label/--no-label")] = None,
    realtime: Annotated[
        bool | None, typer.Option("--realtime/--as-fast", help="Pace a file input in real time.")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="x264 preset (ultrafast).")] = None,
    keyint: Annotated[int | None, typer.Option(help="Frames between keyframes.")] = None,
    bitrate: Annotated[str | None, typer.Option(help="Video bitrate, e.g. 2500k.")] = None,
    stall_timeout: Annotated[
        float | None, typer.Option(help="Seconds without a frame before reconnecting.")
    ] = None,
    models_dir: ModelsDirFlag = None,
    detector: DetectorFlag = None,
    recogniser: RecogniserFlag = None,
    swapper: SwapperFlag = None,
    enhancer: EnhancerFlag = None,
    execution_provider: ProvidersFlag = None,
    fp16: Fp16Flag = None,
    memory_strategy: MemoryFlag = None,
) -> None:
    """Swap faces in a live stream and publish the result, until stopped (SIGINT/SIGTERM)."""
    from facecast.config import StreamSettings
    from facecast.live import run_stream

    flags = {
        "source_image": source,
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
        )
    )
    try:
        settings = StreamSettings(**{k: v for k, v in flags.items() if v is not None})
    except (ValueError, FacecastError) as exc:
        raise fail(str(exc)) from None
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
    try:
        run_stream(settings)
    except FacecastError as exc:
        raise fail(str(exc)) from None


@app.command()
def probe(
    publish: Annotated[str, typer.Option(help="Where to publish the stamped test stream.")],
    read: Annotated[str, typer.Option(help="The swapped stream to read back.")],
    seconds: Annotated[float, typer.Option(help="How long to measure, after the warm-up.")] = 20.0,
    fps: Annotated[float, typer.Option()] = 30.0,
    size: Annotated[str, typer.Option(help="WIDTHxHEIGHT")] = "1280x720",
    face: Annotated[Path, typer.Option(help="Face photo shown in the test stream.")] = EXAMPLES
    / "obama.jpg",
    warmup: Annotated[
        float, typer.Option(help="Seconds after the first stamp that are left out.")
    ] = 2.0,
) -> None:
    """Glass-to-glass latency of a running `facecast stream`: p50/p95/p99."""
    import json

    from facecast.probe import LatencyProbe, load_probe_face

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
def serve(
    profiles: Annotated[
        Path | None,
        typer.Option(envvar="FACECAST_PROFILES", help="YAML: stream key -> source face, options."),
    ] = None,
    host: Annotated[str, typer.Option(help="HTTP listen address (loopback without a token).")] = (
        "0.0.0.0"
    ),
    http_port: Annotated[int, typer.Option(help="HTTP control plane port.")] = 8080,
    rtmp_port: Annotated[int, typer.Option(help="RTMP ingest port.")] = 1935,
    hls_port: Annotated[int, typer.Option(help="HLS port of the ingest server.")] = 8088,
) -> None:
    """Service mode: ingest server + HTTP plane; every stream published to live/KEY comes out
    swapped with KEY's profile at swapped/KEY. Token: FACECAST_API_TOKEN."""
    import os
    import threading

    from facecast.live import _stop_on_signals
    from facecast.service import Service, load_profiles

    try:
        table = load_profiles(profiles) if profiles else {}
        if not table:
            console.print("[yellow]no profiles: every publisher will be refused[/]")
        service = Service(
            table,
            token=os.environ.get("FACECAST_API_TOKEN") or None,
            host=host,
            http_port=http_port,
            rtmp_port=rtmp_port,
            hls_port=hls_port,
        )
        stop = threading.Event()
        with _stop_on_signals(stop):
            service.run(stop)
    except FacecastError as exc:
        raise fail(str(exc)) from None


@app.command()
def web(
    host: Annotated[str, typer.Option(help="HTTP listen address (loopback without a token).")] = (
        "0.0.0.0"
    ),
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8080,
    max_sessions: Annotated[int, typer.Option(help="Browser sessions open at once.")] = 4,
) -> None:
    """The browser page alone: camera in, swapped video back over WebRTC, at
    http://HOST:PORT/web/. Token: FACECAST_API_TOKEN."""
    import os
    import threading

    from facecast.config import StreamSettings
    from facecast.live import _stop_on_signals, engine_options
    from facecast.web import WebServer
    from facecast.webrtc import WebSessions

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
    """List the model files and check each one (presence and sha256); with a models folder,
    also what each ONNX file there was recognised as."""
    from facecast.models import REGISTRY
    from facecast.models import check as check_model

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
    from facecast.usermodels import describe, scan
    from facecast.usermodels import models_dir as resolve_dir

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
def bench_swap(
    results: Annotated[Path, typer.Option(help="Folder for the JSON results.")] = Path(
        "bench/results"
    ),
) -> None:
    """File→file fps and per-stage ms on the sample clip at 360p and 720p, beside a plain
    decode+encode of the same file (the limit)."""
    from facecast.bench import run_swap_bench

    run_swap_bench(EXAMPLES, results, console)


@bench_app.command("live")
def bench_live(
    results: Annotated[Path, typer.Option(help="Folder for the JSON results.")] = Path(
        "bench/results"
    ),
    seconds: Annotated[float, typer.Option(help="Measured seconds per run.")] = 15.0,
) -> None:
    """Live latency on 720p30: the pipeline vs a serial loop, at the input rate, flat out,
    and at twice the sustainable rate; glass-to-glass with the probe over loopback UDP."""
    from facecast.bench_live import run_live_bench

    try:
        run_live_bench(EXAMPLES, results, console, seconds)
    except FacecastError as exc:
        raise fail(str(exc)) from None


@bench_app.command("faces")
def bench_faces(
    results: Annotated[Path, typer.Option(help="Folder for the JSON results.")] = Path(
        "bench/results"
    ),
) -> None:
    """Face analysis per 720p frame, detecting every frame vs every 3rd (time saved, faces
    lost), and the temporal layer's cost: cuts, tracks, embeddings."""
    from facecast.bench_faces import run_faces_bench

    try:
        run_faces_bench(EXAMPLES, results, console)
    except FacecastError as exc:
        raise fail(str(exc)) from None


if __name__ == "__main__":
    app()
