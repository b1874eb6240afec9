"""`facecast models`: the embedded models and the user's models folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from facecast.cli.base import (
    app,
    console,
    fail,
)
from facecast.cli.options import (
    ModelsDirFlag,
)
from facecast.errors import FacecastError


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
