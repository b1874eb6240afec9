"""`facecast bench ...`: the benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from facecast.cli.base import (
    EXAMPLES,
    REPO,
    console,
    fail,
    in_words,
    one_line_errors,
    sub_app,
)
from facecast.cli.options import (
    ModelsDirFlag,
)
from facecast.errors import FacecastError

bench_app = sub_app("bench", "Speed benchmarks; JSON results go to --results.")


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


# A clone keeps its results beside its code; an installed package (site-packages) has no
# such folder, so there they go to bench/results under the working folder.
DEFAULT_RESULTS = (
    REPO / "bench" / "results" if (REPO / "pyproject.toml").is_file() else Path("bench/results")
)


@bench_app.command("swap")
def bench_swap(results: ResultsFlag = DEFAULT_RESULTS, update_docs: UpdateDocsFlag = False) -> None:
    """File to file fps and per-stage ms at 360p and 720p.

    Runs the sample clip and a 720p copy, beside a plain decode and encode of the same
    file (the limit).
    """
    from facecast.bench.swap import run_swap_bench

    with one_line_errors():
        run_swap_bench(EXAMPLES, results, console, docs_for(update_docs))


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

    with one_line_errors():
        run_live_bench(EXAMPLES, results, console, seconds, docs_for(update_docs))


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

    with one_line_errors():
        run_capacity_bench(EXAMPLES, results, console, seconds, max_streams, docs_for(update_docs))


@bench_app.command("faces")
def bench_faces(
    results: ResultsFlag = DEFAULT_RESULTS, update_docs: UpdateDocsFlag = False
) -> None:
    """Face analysis per 720p frame: detection every frame vs every 3rd.

    Reports the time saved and faces lost, and the temporal layer's cost: cuts, tracks,
    embeddings.
    """
    from facecast.bench.faces import run_faces_bench

    with one_line_errors():
        run_faces_bench(EXAMPLES, results, console, docs_for(update_docs))


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

    with one_line_errors():
        run_quality_bench(
            REPO / "tests" / "media",
            EXAMPLES,
            results,
            console,
            docs_for(update_docs),
            video=video,
            pairs=pairs,
        )


def docs_for(update_docs: bool) -> Path | None:
    """The benchmarks page to rewrite, only when asked: the clone's own, never a
    docs/ folder of wherever the command happens to run."""
    if not update_docs:
        return None
    docs = REPO / "docs" / "benchmarks.md"
    if not docs.is_file():
        raise fail(f"--update-docs: {docs} not found; run from a clone of the repository")
    return docs
