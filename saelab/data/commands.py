"""`saelab harvest`: record activations at sites into a cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from saelab.console import JsonFlag, ModelOpt, console, emit_json, user_errors


@user_errors
def harvest(
    sites: Annotated[str, typer.Option(help="Sites: names, aliases or globs, comma separated.")],
    out: Annotated[Path, typer.Option(help="Cache folder (rerun the same command to resume).")],
    model: ModelOpt = "smollm2-135m-instruct",
    corpus: Annotated[str, typer.Option(help="builtin, a .txt/.jsonl/.parquet file, hf:NAME")] = "builtin",
    tokens: Annotated[int, typer.Option(help="Tokens to record per site.")] = 100_000,
    context: Annotated[int, typer.Option(help="Tokens per context.")] = 128,
    batch_size: Annotated[int | None, typer.Option(
        help="Contexts per forward pass [default: 16 on the CPU; see --batch-tokens].")] = None,
    batch_tokens: Annotated[int | None, typer.Option(
        help="Tokens per forward pass [default on CUDA: sized from free memory].")] = None,
    dtype: Annotated[str, typer.Option(help="Compute dtype: auto, float32, bfloat16.")] = "auto",
    store_dtype: Annotated[str, typer.Option(help="Stored dtype.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    json: JsonFlag = False,
) -> None:
    """Record activations at sites into a sharded, checksummed cache."""
    from saelab.checks import choice
    from saelab.data.harvest import HarvestConfig
    from saelab.models.limits import check_positions, config_max_positions
    from saelab.models.load import load_model
    from saelab.precision import DTYPES

    config = HarvestConfig(sites=sites, corpus=corpus, tokens=tokens, context=context,
                           batch_size=batch_size, batch_tokens=batch_tokens,
                           store_dtype=store_dtype)
    check_positions("--context", context, config_max_positions(model), model)
    choice("--dtype", dtype, ("auto", *DTYPES))
    manifest = harvest_with_progress(load_model(model, dtype=dtype, device=device), config, out)
    summary = {"out": str(out), "tokens": manifest.n_tokens, "shards": len(manifest.shards),
               "sites": manifest.sites, "forward": manifest.forward}
    if json:
        return emit_json(summary)
    per = (manifest.forward or {}).get("batch_tokens")
    console.print(f"harvested {manifest.n_tokens:,} tokens at {', '.join(manifest.sites)} "
                  f"into {out} ({len(manifest.shards)} shards"
                  + (f", {per:,} tokens per forward)" if per else ")"))


def harvest_with_progress(lm, config, out: Path, rank: int = 0, world_size: int = 1):
    from saelab.console import progress
    from saelab.data.harvest import harvest as run_harvest

    with progress() as bar:
        task = None  # added at the first update: an error before it stays one line

        def update(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = bar.add_task("harvest", total=config.tokens, info="", visible=rank == 0)
            bar.update(task, completed=min(done, total), info=f"{done:,} tokens")

        return run_harvest(lm, config, out, on_progress=update, rank=rank,
                           world_size=world_size)


def register(app: typer.Typer) -> None:
    """Mount `harvest` on the root app."""
    app.command()(harvest)
