"""The command line's console and progress bars (rich), in one place."""

from __future__ import annotations

import contextlib
import functools
import json
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


def progress(*extra_columns) -> Progress:
    """A progress bar with count, ETA and any extra live fields (tokens/s, L0...)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
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


def user_errors(fn):
    """Print a SaelabError as a one-line message with its exit code, no traceback."""
    from saelab.errors import SaelabError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with quiet_transformers():
                return fn(*args, **kwargs)
        except SaelabError as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: complete work was kept; rerun to resume.")
            raise typer.Exit(130) from None

    return wrapper


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
