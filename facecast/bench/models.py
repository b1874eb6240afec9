"""``facecast bench models``: every model a models folder holds, timed on each execution
provider asked for (issue 18, point 5).

For each file ``facecast models`` recognises: one session per provider, inputs of the shape
the adapters feed (batch 1; a detector's dynamic size at 640x640; a scalar weight 0.5),
two warm-up runs, then ``iterations`` timed runs. Reported per model and provider: the
provider the session really ran on (a missing one falls back to the CPU, and the row says
so), ms per run (mean, p50, p90), and the process's peak resident memory after the runs.
A swapper's row also gives ms per face at each ``--swap-size`` (k x k runs). On stand-in
graphs the numbers time the runtime's overhead, not a real model's work: the point there
is that every family loads and runs on every provider asked for.
"""

from __future__ import annotations

import resource
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from facecast.bench.swap import machine, update_docs, write_results
from facecast.config import SWAP_SIZES
from facecast.errors import FacecastError
from facecast.models.runtime import (
    PROVIDERS,
    OnnxModel,
    ProviderName,
    RuntimeOptions,
    fixed_dim,
)
from facecast.models.user import FoundModel, scan

WARMUP_RUNS = 2
DETECTOR_SIZE = 640  # a detector's dynamic input: the adapters' default
DEFAULT_SIDE = 512  # any other dynamic image side (restorers)


def feeds_for(model: OnnxModel, found: FoundModel) -> dict[str, np.ndarray]:
    """Inputs of the shapes the adapters feed, filled with a fixed pseudo-random pattern."""
    rng = np.random.default_rng(0)
    feeds = {}
    for name, shape in model.inputs:
        if len(shape) <= 1 and found.kind == "enhancer":  # CodeFormer's fidelity weight
            feeds[name] = np.full([1] * len(shape), 0.5, np.float32)
            continue
        dims = []
        for axis, dim in enumerate(shape):
            size = fixed_dim(dim)
            if size is None:
                if axis == 0:
                    size = 1
                else:
                    size = DETECTOR_SIZE if found.kind == "detector" else DEFAULT_SIDE
            dims.append(size)
        feeds[name] = rng.uniform(-1.0, 1.0, dims).astype(np.float32)
    return feeds


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_model(found: FoundModel, provider: ProviderName, iterations: int) -> dict[str, Any]:
    """One model on one provider: see the module docstring."""
    model = OnnxModel(found.path, RuntimeOptions(providers=(provider,)))
    ran_on = model.providers[0]
    feeds = feeds_for(model, found)
    for _ in range(WARMUP_RUNS):
        model.run(feeds)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        model.run(feeds)
        times.append(1000.0 * (time.perf_counter() - start))
    row: dict[str, Any] = {
        "file": found.file,
        "kind": found.kind,
        "family": found.family,
        "name": found.name,
        "asked": provider,
        "ran_on": ran_on,
        "fell_back": ran_on != PROVIDERS[provider],
        "ms_mean": float(np.mean(times)),
        "ms_p50": float(np.percentile(times, 50)),
        "ms_p90": float(np.percentile(times, 90)),
        "peak_rss_mb": peak_rss_mb(),
        "iterations": iterations,
    }
    if found.kind == "swapper":
        own = found.swapper_size  # 128 for inswapper, 256 or 512 for the others
        row["ms_per_face_by_swap_size"] = {
            str(size): row["ms_mean"] * (size // own) ** 2
            for size in SWAP_SIZES
            if size >= own and size % own == 0
        }
    model.release()
    return row


def run_models_bench(
    folder: Path,
    providers: tuple[ProviderName, ...],
    iterations: int,
    results_dir: Path,
    console: Console,
    docs: Path | None = None,
) -> dict[str, Any]:
    if iterations < 1:
        raise FacecastError("--iterations must be at least 1")
    found = [m for m in scan(folder) if m.recognised]
    if not found:
        raise FacecastError(f"{folder}: no model facecast recognises (see facecast models)")
    rows = []
    for model in found:
        for provider in providers:
            console.print(f"bench models: {model.file} on {provider}")
            rows.append(time_model(model, provider, iterations))
    payload = {
        "bench": "models",
        "machine": machine(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "facecast bench models",
        "folder": str(folder),
        "providers": list(providers),
        "rows": rows,
    }
    path = write_results("models", payload, results_dir)
    _print(rows, console)
    update_docs("models", models_table(rows) + f"\n\nMeasured {payload['when']}.", docs)
    console.print(f"results: {path}")
    return payload


def models_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| file | family | provider (ran on) | ms mean | p50 | p90 | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ran = r["ran_on"].removesuffix("ExecutionProvider")
        lines.append(
            f"| {r['file']} | {r['family']} | {r['asked']} ({ran}) | {r['ms_mean']:.2f} | "
            f"{r['ms_p50']:.2f} | {r['ms_p90']:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def _print(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="facecast bench models")
    for column in ("file", "family", "asked", "ran on", "ms mean", "p50", "p90"):
        table.add_column(column)
    for r in rows:
        ran = r["ran_on"].removesuffix("ExecutionProvider") + (
            " (fallback)" if r["fell_back"] else ""
        )
        table.add_row(
            r["file"], str(r["family"]), r["asked"], ran,
            f"{r['ms_mean']:.2f}", f"{r['ms_p50']:.2f}", f"{r['ms_p90']:.2f}",
        )  # fmt: skip
    console.print(table)
