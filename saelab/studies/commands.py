"""`saelab study ...`: the sub-app every study mounts its command on."""

from __future__ import annotations

import typer

study_app = typer.Typer(help="End-to-end studies: lists (when does a list end), synthetic "
                             "(are SAE-built activations realistic).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Mount `saelab study` and the studies' commands on `app`."""
    for module in _STUDY_COMMANDS:
        __import__(module, fromlist=["register"]).register(study_app)
    app.add_typer(study_app, name="study")


# One module per study, each with `register(study_app)`; a study adds itself here.
_STUDY_COMMANDS: list[str] = ["saelab.studies.lists_commands", "saelab.studies.synthetic_commands"]
