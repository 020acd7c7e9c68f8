"""`saelab sae ...`: a typer sub-app for the lead's CLI to mount (app.add_typer(sae_app, name="sae"))."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from saelab.errors import SaelabError

app = typer.Typer(name="sae", help="Inspect and convert SAE files.", no_args_is_help=True)


def _fail(e: SaelabError) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(code=e.exit_code)


@app.command("info")
def info_cmd(
    path: Annotated[Path, typer.Argument(help="SAE folder or a file in it")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Format, architecture, widths, site, model and L0 (if recorded) of an SAE."""
    from saelab.sae.info import format_info, sae_info

    try:
        info = sae_info(path)
    except SaelabError as e:
        _fail(e)
    if as_json:
        json.dump(info, sys.stdout, indent=2, default=str)
        typer.echo()
    else:
        typer.echo(format_info(info))


@app.command("convert")
def convert_cmd(
    src: Annotated[Path, typer.Argument(help="SAE to read (any supported format)")],
    dst: Annotated[Path, typer.Argument(help="folder to write")],
    to: Annotated[
        str, typer.Option("--to", help="saelens | gemma-scope | gemma-scope-2 | sparsify")
    ],
    overwrite: Annotated[bool, typer.Option(help="write into a non-empty folder")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Convert an SAE between file formats (feature activations are preserved)."""
    from saelab.sae.info import convert_sae, format_info

    try:
        info = convert_sae(src, dst, to, overwrite=overwrite)
    except SaelabError as e:
        _fail(e)
    if as_json:
        json.dump(info, sys.stdout, indent=2, default=str)
        typer.echo()
    else:
        typer.echo(f"wrote {info['format']} SAE to {info['path']}\n" + format_info(info))


def register(root: typer.Typer) -> None:
    """Mount `saelab sae` on the root app."""
    root.add_typer(app, name="sae")
