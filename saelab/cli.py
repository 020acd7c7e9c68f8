"""The `saelab` command: one subcommand per stage, each defined in its stage's `commands.py`.

The root only creates the app, sets torch's threads and registers the stages;
no stage imports this module.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

app = typer.Typer(help="Sparse-autoencoder interpretability of language models, offline on a CPU.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _threads(threads: Annotated[int | None, typer.Option(
        "--threads", help="CPU threads for torch; default the idle cores (SAELAB_THREADS also sets it).")] = None
             ) -> None:
    """Runs before every command: torch gets the idle cores (see saelab/threads.py)."""
    import os

    from saelab.console import exit_with
    from saelab.errors import SaelabError
    from saelab.threads import ENV, set_threads

    if threads is not None:
        os.environ[ENV] = str(threads)
    try:
        set_threads()
    except SaelabError as err:
        exit_with(err)


# The stages, in the order `saelab --help` lists them; each module has `register(app)`.
_STAGES = ("saelab.models.commands", "saelab.data.commands", "saelab.sae.commands",
           "saelab.train.commands", "saelab.evals.commands", "saelab.features.commands",
           "saelab.attribution.commands", "saelab.interventions.commands",
           "saelab.studies.commands")


def _register_commands() -> None:
    import importlib

    for name in _STAGES:
        importlib.import_module(name).register(app)


_register_commands()


def main() -> None:  # `python -m saelab`
    app(prog_name="saelab")


if __name__ == "__main__":
    sys.exit(main())
