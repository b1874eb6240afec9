"""The command line: ``facecast swap | demo | stream | probe | verify | serve | web | models |
consent | bench``, one module per plane of commands (``base`` holds the app and its habits).

Habits of the field's tools, kept on purpose: ``--version``; ``--log-level`` (or ``-v`` /
``-q``) that changes what is printed; help that reads at 80 columns; and every mistake a
user can make ends in one line, ``error: ...``, and exit code 2 (``main`` turns click's own
usage errors into that line too).
"""

from __future__ import annotations

import faulthandler
import importlib
import sys

import typer

from facecast.cli.base import app, click_errors, console

# importing each module registers its commands on the app, in this order in the help
for _module in ("files", "live", "serve", "consent", "models", "bench"):
    importlib.import_module(f"facecast.cli.{_module}")

__all__ = ["app", "main"]


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
