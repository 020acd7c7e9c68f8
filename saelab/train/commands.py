"""`saelab train`: SAEs from one activation stream, also under torchrun."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from saelab.console import JsonFlag, ModelOpt, console, emit_json, user_errors
from saelab.data.commands import harvest_with_progress
from saelab.errors import SaelabError


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SaelabError(f"--{name} takes comma-separated integers, got {text!r}") from None


@user_errors
def train(
    out: Annotated[Path, typer.Option(help="Run folder: run.json, metrics.jsonl, one folder per SAE.")],
    sites: Annotated[str, typer.Option(help="Sites, comma separated (one SAE per site x width x k).")] = "resid_post.12",
    model: ModelOpt = "smollm2-135m-instruct",
    cache: Annotated[Path | None, typer.Option(help="Train from this activation cache instead of harvesting.")] = None,
    arch: Annotated[str, typer.Option(help="relu, jumprelu, topk or batchtopk.")] = "batchtopk",
    width: Annotated[str, typer.Option(help="Latents; several comma separated.")] = "4608",
    k: Annotated[str, typer.Option(help="Active latents per token (top-k family); several ok.")] = "32",
    l1: Annotated[float, typer.Option(help="L1 coefficient (relu).")] = 0.1,
    l0_coef: Annotated[float, typer.Option(help="L0 coefficient (jumprelu).")] = 1e-2,
    tokens: Annotated[int, typer.Option(help="Training tokens.")] = 2_000_000,
    corpus: Annotated[str, typer.Option(help="Corpus to harvest when no --cache is given.")] = "builtin",
    context: Annotated[int, typer.Option(help="Tokens per context when harvesting.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Tokens per optimizer step.")] = 4096,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default depends on arch, width).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and data order.")] = 0,
    dtype: Annotated[str, typer.Option(help="SAE compute dtype: auto, float32, bfloat16.")] = "auto",
    checkpoint_every: Annotated[int, typer.Option(help="Tokens between checkpoints (0: only at the end).")] = 500_000,
    deterministic: Annotated[bool, typer.Option(help="Deterministic kernels (exact resume).")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out.")] = False,
    shard_sites: Annotated[bool, typer.Option(help="Under torchrun: each rank trains its own SAEs.")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    json: JsonFlag = False,
) -> None:
    """Train SAEs: several sites, widths or k from one activation stream.

    Under `torchrun --nproc-per-node N -m saelab train ...` training is data
    parallel (each rank harvests and trains on its own slice of the corpus),
    or site sharded with --shard-sites.
    """
    from saelab.train.config import SAESpec, TrainConfig
    from saelab.train.distributed import from_env
    from saelab.train.trainer import fmt_stats
    from saelab.train.trainer import train as run_train

    dist = from_env(device)
    site_list = [s.strip() for s in sites.split(",") if s.strip()]

    def config(site_names: list[str]) -> TrainConfig:
        # k means nothing to relu/jumprelu; min(32, w) keeps the spec valid at any width.
        specs = tuple(SAESpec(site, arch=arch, width=w, k=kk, l1=l1, l0_coef=l0_coef)
                      for site in site_names for w in _ints(width, "width")
                      for kk in (_ints(k, "k") if arch in ("topk", "batchtopk")
                                 else [min(32, w)]))
        return TrainConfig(saes=specs, tokens=tokens, batch_size=batch_size, lr=lr, seed=seed,
                           dtype=dtype, checkpoint_every=checkpoint_every,
                           deterministic=deterministic)

    if not site_list:
        raise SaelabError(f"--sites={sites!r}: give at least one site, e.g. resid_post.12")
    config(site_list)  # every option is checked before a model or cache is read
    cache_per_rank = cache is None and dist.active and not shard_sites
    if cache is None:
        from saelab.data.harvest import HarvestConfig
        from saelab.models.limits import check_positions, config_max_positions
        from saelab.models.load import load_model

        harvest_cfg = HarvestConfig(sites=tuple(site_list), corpus=corpus, tokens=tokens,
                                    context=context, store_dtype="bfloat16")
        check_positions("--context", context, config_max_positions(model), model)
        # Data parallel: rank r harvests contexts r, r+N, ... into its own cache, its
        # share of the tokens. bf16 storage halves the disk a training cache takes; SAE
        # training does not notice the rounding (about 3 significant digits).
        cache = out / "cache" / (f"rank_{dist.rank}" if cache_per_rank else "")
        if cache_per_rank:
            harvest_cfg = dataclasses.replace(harvest_cfg, tokens=tokens // dist.world_size)
        if cache_per_rank or dist.is_main:
            harvest_with_progress(
                load_model(model, device=device), harvest_cfg, cache,
                rank=dist.rank if cache_per_rank else 0,
                world_size=dist.world_size if cache_per_rank else 1)
        dist.barrier()
    from saelab.data.store import ActivationStore

    store_sites = ActivationStore(cache, verify=False).sites
    cfg = config(_canonical_sites(site_list, store_sites))
    from saelab.console import progress

    with progress() as bar:
        task = None  # added at the first update: an error before it stays one line

        def update(done: int, total: int, stats: dict) -> None:
            nonlocal task
            if task is None:
                task = bar.add_task("train", total=cfg.steps * cfg.batch_size, info="",
                                    visible=dist.is_main)
            bar.update(task, completed=done, info=fmt_stats(stats))

        result = run_train(cfg, cache, out, resume=resume, on_progress=update, dist=dist,
                           shard_sites=shard_sites, cache_per_rank=cache_per_rank)
    if not dist.is_main:
        return
    summary = {"out": str(out), "tokens_per_s": result.tokens_per_second,
               "saes": {label: {"dir": str(result.sae_dirs[label]), **result.final.get(label, {})}
                        for label in result.sae_dirs}}
    if json:
        return emit_json(summary)
    table = Table("SAE", "L0", "FVU", "dead", "folder", title=f"trained at {result.tokens_per_second:,.0f} tokens/s")
    for label, row in summary["saes"].items():
        table.add_row(label, f"{row.get('l0', 0):.1f}", f"{row.get('fvu', 0):.3f}",
                      f"{row.get('dead', 0):.3f}", row["dir"])
    console.print(table)


def _canonical_sites(names: list[str], available: dict[str, int]) -> list[str]:
    """Map user site names (aliases included) onto the cache's canonical names."""
    from saelab.errors import SiteError
    from saelab.models.sites import Site

    out = []
    for name in names:
        if name in available:
            out.append(name)
            continue
        try:
            site = Site.parse(name)
        except SiteError:
            site = None
        if site is None or site.name not in available:
            raise SaelabError(f"site {name!r} is not in the activation cache, which holds "
                              f"{', '.join(available)}.")
        out.append(site.name)
    return out


def register(app: typer.Typer) -> None:
    """Mount `train` on the root app."""
    app.command()(train)
