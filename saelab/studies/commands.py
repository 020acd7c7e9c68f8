"""`saelab study ...`: the sub-app every study mounts its command on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from saelab.console import JsonFlag, console, emit_json, user_errors

study_app = typer.Typer(help="End-to-end studies: lists (when does a list end), synthetic "
                             "(are SAE-built activations realistic), dictionaries (several sizes on a small model).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Mount `saelab study` and the studies' commands on `app`."""
    for module in _STUDY_COMMANDS:
        __import__(module, fromlist=["register"]).register(study_app)
    app.add_typer(study_app, name="study")
    app.command()(demo)


# One module per study, each with `register(study_app)`; a study adds itself here.
_STUDY_COMMANDS: list[str] = ["saelab.studies.lists_commands", "saelab.studies.synthetic_commands",
                               "saelab.studies.dictionaries_commands"]


@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Run folder (a second run reuses what is done).")] = Path("runs/demo"),
    samples: Annotated[int, typer.Option(help="Lists per topic and template.")] = 2,
    json: JsonFlag = False,
) -> None:
    """The main job: the list study's quick preset on the embedded model (`saelab study lists`)."""
    from saelab.studies.lists_commands import print_summary, run_with_progress
    from saelab.studies.lists_config import ListsConfig

    cfg = ListsConfig.preset_config("quick", samples=samples)
    console.print(f"saelab demo: when does a list end? {cfg.model}, {len(cfg.topics)} topics x "
                  f"{len(cfg.templates)} templates x {cfg.samples} lists, SAEs at "
                  f"{', '.join(cfg.sites or ())} -> {out}")
    results = run_with_progress(cfg, out, json=json)
    if json:
        return emit_json(results)
    print_summary(results, out)
