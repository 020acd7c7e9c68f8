"""The command line's console and progress bars (rich), in one place."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape as _markup_escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class _Progress(Progress):
    def stop(self) -> None:
        if self.tasks:
            super().stop()
        else:  # nothing was shown (an error came first): no blank line before the error
            self.live.stop()


def progress(*extra_columns) -> Progress:
    """A progress bar with count, ETA and any extra live fields (tokens/s, L0...)."""
    return _Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), *extra_columns, console=console)


def emit_json(obj) -> None:
    """Machine output goes to stdout alone, so `--json | jq` works."""
    sys.stdout.write(json.dumps(obj, indent=1, default=str) + "\n")


@contextlib.contextmanager
def quiet_transformers():
    """transformers' own tqdm bars and warnings would interleave with ours."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(verbosity)


JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Embedded name, HF id, folder or .gguf.")]


DEBUG_ENV = "SAELAB_DEBUG"  # SAELAB_DEBUG=1: unexpected errors keep their traceback

# Errors that, escaping a command, are an input no check caught (or a bug): the last line
# of defence prints one line instead of a traceback. Anything else keeps its traceback.
_UNEXPECTED = (ValueError, ZeroDivisionError, RuntimeError, OverflowError, KeyError)


def user_errors(fn):
    """Print a SaelabError as a one-line message with its exit code, no traceback.

    Inputs are checked where they enter (saelab/checks.py), so a ValueError, KeyError,
    RuntimeError, ZeroDivisionError or OverflowError reaching here was not foreseen: it
    is printed as one line naming the command and the error, with exit code 1, and
    SAELAB_DEBUG=1 shows its traceback.
    """
    from saelab.errors import SaelabError

    command = _command_name(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with quiet_transformers():
                return fn(*args, **kwargs)
        except SaelabError as err:
            exit_with(err)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: complete work was kept; rerun to resume.")
            raise typer.Exit(130) from None
        except _UNEXPECTED as err:
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            error_line(f"{command} failed: {type(err).__name__}: {err} "
                        f"(unexpected; rerun with {DEBUG_ENV}=1 for the traceback)")
            raise typer.Exit(1) from None

    return wrapper


def exit_with(err) -> None:
    """Print a SaelabError as one line and exit with its code."""
    error_line(str(err))
    raise typer.Exit(err.exit_code) from None


def error_line(message: str) -> None:
    """One line: a message's own line breaks are joined, and rich must not wrap it."""
    text = ""
    for part in (p.strip() for p in message.splitlines()):
        if part:  # "changed config:\n  a\n  b" -> "changed config: a; b"
            text += ("" if not text else " " if text.endswith((":", ";", ".")) else "; ") + part
    console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


def _command_name(fn) -> str:
    name = fn.__name__.removesuffix("_cmd")
    return f"saelab {'study ' if '.studies.' in fn.__module__ and name != 'demo' else ''}{name}"


def escape(text: str) -> str:
    """Model text is printed literally: rich markup in it must not be interpreted."""
    return _markup_escape(text)


def saelab_command() -> str:
    """How to run saelab again from the user's shell, for hints such as "browse: X serve DIR".

    `saelab` when that is on PATH and is the script running now; else the script's path
    (`.venv/bin/saelab` after `make demo`, which does not activate the venv); else
    `python -m saelab` with this interpreter (run as a module, or under a test runner).
    """
    import os
    import shlex
    import shutil
    from pathlib import Path

    def shown(path: Path) -> str:
        rel = os.path.relpath(path)
        return shlex.quote(path.as_posix() if rel.startswith("..") else
                           rel if os.sep in rel else f".{os.sep}{rel}")

    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is not None and script.name == "saelab" and script.is_file():
        found = shutil.which("saelab")
        if found and Path(found).resolve() == script.resolve():
            return "saelab"
        return shown(script.absolute())
    return f"{shown(Path(sys.executable))} -m saelab"
