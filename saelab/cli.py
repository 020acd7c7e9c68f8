"""The `saelab` command: one subcommand per stage, each defined in its stage's `commands.py`.

The root only creates the app, sets torch's threads and registers the stages;
no stage imports this module.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from typer.core import TyperGroup


class OneLineErrors(TyperGroup):
    """The parser's own errors (`--tokens nan` for an integer option, an unknown option)
    as one line and exit 2, like every other bad input (saelab/console.py), instead of a
    usage box. typer vendors click privately, so its exceptions are recognised by their
    click interface (`exit_code`, `format_message`), not imported."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except Exception as err:
            names = {c.__name__ for c in type(err).__mro__}
            if "NoArgsIsHelpError" in names or "ClickException" not in names:
                if "ClickException" in names:  # `saelab study` alone: its help, as click does
                    err.show()
                    sys.exit(err.exit_code)
                if "Abort" in names:
                    sys.exit(130)
                raise
            from saelab.console import error_line

            where = getattr(getattr(err, "ctx", None), "command_path", None) or "saelab"
            error_line(f"{err.format_message()} (see {where} --help)")
            sys.exit(err.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(help="Sparse-autoencoder interpretability of language models, offline on a CPU.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  cls=OneLineErrors)


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
           "saelab.attribution.commands", "saelab.graphs.commands", "saelab.interventions.commands",
           "saelab.studies.commands", "saelab.scope.commands", "saelab.scope.export_commands")


def _register_commands() -> None:
    import importlib

    for name in _STAGES:
        importlib.import_module(name).register(app)


_register_commands()


def main() -> None:  # `python -m saelab`
    app(prog_name="saelab")


if __name__ == "__main__":
    sys.exit(main())
