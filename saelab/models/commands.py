"""`saelab models`, `saelab models pull`, `saelab sites`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from saelab.console import JsonFlag, console, emit_json, user_errors

models_app = typer.Typer(help="Embedded models: list them, make them ready.",
                         invoke_without_command=True)


@models_app.callback()
@user_errors
def models(ctx: typer.Context, json: JsonFlag = False) -> None:
    """List the embedded models: installed? cached? size, layers, width, how to get them."""
    if ctx.invoked_subcommand:
        return
    from saelab.models.catalog import CATALOG, DEFAULT_MODEL
    from saelab.models.load import is_cached

    rows = [{"name": e.name, "default": e.name == DEFAULT_MODEL, "installed": e.installed,
             "cached": is_cached(e.name), "architecture": e.architecture, "params": e.n_params,
             "layers": e.n_layers, "d_model": e.d_model, "chat": e.chat, "install": e.install}
            for e in CATALOG.values()]
    if json:
        return emit_json(rows)
    table = Table("model", "installed", "cached", "params", "layers", "d_model", "get it with")
    for r in rows:
        table.add_row(r["name"] + (" (default)" if r["default"] else ""),
                      "yes" if r["installed"] else "no", "yes" if r["cached"] else "no",
                      f"{r['params'] / 1e6:.0f}M", str(r["layers"]), str(r["d_model"]),
                      f"saelab models pull {r['name']}" if r["installed"] else r["install"])
    console.print(table)


@models_app.command("pull")
@user_errors
def models_pull(name: str) -> None:
    """Make an embedded model ready: verify its package files, dequantize, cache."""
    from saelab.models.load import pull

    with console.status(f"preparing {name} (dequantizing once takes about half a minute)"):
        folder = pull(name)
    console.print(f"{name} is ready: {folder}")


@user_errors
def sites(model: Annotated[str, typer.Argument(help="Embedded name, HF id, folder or .gguf.")],
          json: JsonFlag = False) -> None:
    """Every site of a model with its width."""
    from saelab.models.load import load_model
    from saelab.models.sites import list_sites

    lm = load_model(model)
    rows = [{"site": s.name, "alias": s.tl_name, "width": w} for s, w in list_sites(lm.arch)]
    if json:
        return emit_json(rows)
    table = Table("site", "TransformerLens name", "width", title=f"{model}: {lm.arch.family}, "
                  f"{lm.arch.n_layers} layers, d_model {lm.arch.d_model}")
    for r in rows:
        table.add_row(r["site"], r["alias"], str(r["width"]))
    console.print(table)


def register(app: typer.Typer) -> None:
    """Mount `models` and `sites` on the root app."""
    app.add_typer(models_app, name="models")
    app.command()(sites)
