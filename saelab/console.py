"""The command line's console and progress bars (rich), in one place."""

from __future__ import annotations

import contextlib
import json
import sys

from rich.console import Console
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
