"""The Typer app, its global options (--version, --log-level) and the one-line errors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from facecast import __version__
from facecast.errors import FacecastError

# Typer 0.2x carries its own copy of click; its usage errors are that copy's classes
# (``main`` in facecast/cli/__init__.py catches them)
try:
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older Typer on the click package
    from click import exceptions as click_errors  # type: ignore[no-redef]  # noqa: F401

# rich_markup_mode=None: click's plain help, which rewraps paragraphs to the terminal and
# shows no type tags; the rich panels broke sentences mid-line at 80 columns.
app = typer.Typer(
    help="Face swap for live video, video files and images — offline, on a CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


console = Console(stderr=True, soft_wrap=True)  # one message, one line, whatever the width


REPO = Path(__file__).resolve().parents[2]  # the clone (facecast/cli/base.py)


EXAMPLES = REPO / "examples"


log = logging.getLogger("facecast")


LOG_LEVELS = ("debug", "info", "warning", "error")


# Libraries that log at INFO about their own workings; a user wants facecast's lines.
_CHATTY_LOGGERS = ("aioice", "aiortc", "uvicorn.error", "asyncio", "httpx")


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


@contextmanager
def one_line_errors() -> Iterator[None]:
    """A FacecastError inside ends the command the usual way: one line, exit code 2."""
    try:
        yield
    except FacecastError as exc:
        raise fail(str(exc)) from None


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


def sub_app(name: str, help: str) -> typer.Typer:
    """A command group (``facecast NAME ...``) on the app."""
    group = typer.Typer(help=help, no_args_is_help=True, rich_markup_mode=None)
    app.add_typer(group, name=name)
    return group
