"""`saelab train`: SAEs from one activation stream, also under torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from saelab.checks import ABSURD, integer
from saelab.console import JsonFlag, ModelOpt, console, emit_json, user_errors
from saelab.errors import SaelabError


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SaelabError(f"--{name} takes comma-separated integers, got {text!r}") from None


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SaelabError(f"--groups takes comma-separated fractions, got {text!r}") from None


@user_errors
def train(
    out: Annotated[Path, typer.Option(help="Run folder: run.json, metrics.jsonl, one folder per SAE.")],
    sites: Annotated[str, typer.Option(help="Sites, comma separated, globs ok (resid_post.*): one SAE per site x width x k. With --kind transcoder: MLPs (mlp.12, mlp.*: mlp_in.L -> mlp_out.L) or pairs INPUT>TARGET.")] = "resid_post.12",
    kind: Annotated[str, typer.Option(help="sae, or transcoder: read one site, predict another (the MLP's output from its input).")] = "sae",
    skip: Annotated[bool, typer.Option(help="Transcoders: also learn an affine skip x @ W_skip.T (a skip transcoder).")] = False,
    model: ModelOpt = "smollm2-135m-instruct",
    cache: Annotated[Path | None, typer.Option(help="Train from this activation cache instead of streaming from the model.")] = None,
    arch: Annotated[str, typer.Option(help="relu, jumprelu, topk, batchtopk or matryoshka_batchtopk.")] = "batchtopk",
    width: Annotated[str, typer.Option(help="Latents; several comma separated.")] = "4608",
    k: Annotated[str, typer.Option(help="Active latents per token (top-k family); several ok.")] = "32",
    l1: Annotated[float, typer.Option(help="L1 coefficient (relu).")] = 0.1,
    l0_coef: Annotated[float, typer.Option(help="L0 coefficient (jumprelu).")] = 1e-2,
    groups: Annotated[str, typer.Option(help="matryoshka_batchtopk: fractions of the width per nested group, comma separated, summing to 1 (default 1/32,1/16,1/8,1/4,17/32).")] = "",
    tokens: Annotated[int, typer.Option(help="Training tokens.")] = 2_000_000,
    corpus: Annotated[str, typer.Option(help="Corpus to stream when no --cache is given.")] = "builtin",
    context: Annotated[int, typer.Option(help="Tokens per context when streaming.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Tokens per optimizer step.")] = 4096,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default depends on arch, width).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and data order.")] = 0,
    dtype: Annotated[str, typer.Option(help="SAE compute dtype: auto, float32, bfloat16.")] = "auto",
    kernel: Annotated[str, typer.Option(help="Sparse kernels of the top-k family: auto (on CUDA the faster of torch and triton, timed on each SAE's shape), torch, triton.")] = "auto",
    checkpoint_every: Annotated[int, typer.Option(help="Tokens between checkpoints (0: only at the end).")] = 500_000,
    deterministic: Annotated[bool, typer.Option(help="Deterministic kernels (exact resume).")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out.")] = False,
    shard_sites: Annotated[bool, typer.Option(help="Under torchrun: each rank trains its own SAEs.")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda: where the model and the SAEs run.")] = "cpu",
    save_cache: Annotated[Path | None, typer.Option(help="While streaming, also write the activations to this cache folder.")] = None,
    memory_budget: Annotated[str | None, typer.Option(help="Bytes the SAEs and buffers may use (e.g. 2GB); more SAEs train in successive passes. Default: 80% of free device memory / RAM.")] = None,
    buffer_tokens: Annotated[int, typer.Option(help="Rows per site in the shuffling buffer.")] = 65_536,
    log_every: Annotated[int, typer.Option(help="Steps between metrics reads (metrics.jsonl, progress).")] = 10,
    forward_batch: Annotated[int | None, typer.Option(help="Contexts per model forward when streaming (default 16 on CPU, 256 on CUDA); a --cache is re-cut into the same chunks.")] = None,
    json: JsonFlag = False,
) -> None:
    """Train SAEs (or transcoders): several sites, widths or k from one activation stream.

    `--kind transcoder --sites 'mlp.*'` trains one transcoder per layer, reading
    mlp_in.L and predicting mlp_out.L, every layer from the same forward.

    Without --cache the model runs inside the training loop (one forward for
    every site of a site group, stopped after the deepest) and nothing is
    written to disk but the run (--save-cache writes the activations too).
    Under `torchrun --nproc-per-node N -m saelab train ...` training is data
    parallel (each rank streams its own slice of the corpus, or reads its
    share of every batch of a --cache), or site sharded with --shard-sites.
    """
    from saelab.checks import choice
    from saelab.train.config import TOPK_ARCHS, SAESpec, TrainConfig
    from saelab.train.distributed import from_env
    from saelab.train.trainer import Stream, fmt_progress, parse_bytes, resolve_device
    from saelab.train.trainer import train as run_train

    choice("--kind", kind, ("sae", "transcoder"))
    if skip and kind != "transcoder":
        raise SaelabError("--skip is for transcoders (--kind transcoder): an SAE has no skip")
    site_list = [s.strip() for s in sites.split(",") if s.strip()]

    def config(site_names: list) -> TrainConfig:
        # site_names: sites, or (input, target) pairs for transcoders.
        # k means nothing to relu/jumprelu; min(32, w) keeps the spec valid at any width.
        pairs = [(p, None) if isinstance(p, str) else p for p in site_names]
        specs = tuple(SAESpec(site, arch=arch, width=w, k=kk, l1=l1, l0_coef=l0_coef,
                              groups=_fractions(groups), target=target, skip=skip)
                      for site, target in pairs for w in _ints(width, "width")
                      for kk in (_ints(k, "k") if arch in TOPK_ARCHS
                                 else [min(32, w)]))
        return TrainConfig(saes=specs, tokens=tokens, batch_size=batch_size, lr=lr, seed=seed,
                           dtype=dtype, kernel=kernel, checkpoint_every=checkpoint_every,
                           deterministic=deterministic, buffer_tokens=buffer_tokens,
                           log_every=log_every, chunk_contexts=forward_batch if forward_batch is not None
                           else (256 if device.startswith("cuda") and cache is None else 16))

    if not site_list:
        raise SaelabError(f"--sites={sites!r}: give at least one site, e.g. resid_post.12")
    if tokens < batch_size:  # before any model is loaded or token streamed
        raise SaelabError(f"--tokens {tokens} is less than one batch (--batch-size "
                          f"{batch_size}); ask for more tokens or a smaller batch.")
    # every option is checked before a model or cache is read
    config(site_list if kind == "sae" else [("mlp_in.0", "mlp_out.0")])
    integer("--context", context, low=2, high=ABSURD)
    if cache is not None and save_cache is not None:
        raise SaelabError("--save-cache writes the activations of a streaming run; with "
                          "--cache they are on disk already. Drop one of them.")
    budget = parse_bytes(memory_budget) if memory_budget else None
    resolve_device(device)
    dist = from_env(device)
    cache_per_rank = False
    if cache is None:
        from saelab.models.limits import check_positions, config_max_positions
        from saelab.models.load import load_model
        from saelab.models.sites import resolve_sites

        check_positions("--context", context, config_max_positions(model), model)
        lm = load_model(model, device=device)
        if kind == "transcoder":
            from saelab.train.pairs import resolve_pairs

            canonical = resolve_pairs(
                site_list, lambda t: [s.name for s in resolve_sites(lm.arch, t)])
        else:
            canonical = [s.name for s in resolve_sites(lm.arch, site_list)]
        if save_cache is not None and dist.active and not shard_sites:
            save_cache = save_cache / f"rank_{dist.rank}"  # each rank streams its own slice
        data = Stream(lm, corpus=corpus, context=context, save_cache=save_cache)
    else:
        from saelab.data.store import ActivationStore

        available = ActivationStore(cache, verify=False).sites
        if kind == "transcoder":
            import fnmatch

            from saelab.train.pairs import resolve_pairs

            def in_cache(text: str) -> list[str]:
                if any(c in text for c in "*?["):
                    return [s for s in available if fnmatch.fnmatchcase(s, text)]
                return _canonical_sites([text], available)

            canonical = resolve_pairs(site_list, in_cache)
        else:
            canonical = _canonical_sites(site_list, available)
        data = cache
    cfg = config(canonical)
    from saelab.console import progress

    with progress() as bar:
        task = None  # added at the first update: an error before it stays one line

        def update(done: int, total: int, info: dict) -> None:
            nonlocal task
            if task is None:
                task = bar.add_task("train", total=total, info="", visible=dist.is_main)
            bar.update(task, completed=done, total=total, info=fmt_progress(info))

        result = run_train(cfg, data, out, resume=resume, on_progress=update, dist=dist,
                           shard_sites=shard_sites, cache_per_rank=cache_per_rank,
                           device=device, memory_budget=budget)
    if not dist.is_main:
        return
    summary = {"out": str(out), "tokens_per_s": result.tokens_per_second,
               "already_finished": result.already_finished, "site_groups": result.groups,
               "saes": {label: {"dir": str(result.sae_dirs[label]), **result.final.get(label, {})}
                        for label in result.sae_dirs}}
    if json:
        return emit_json(summary)
    if result.already_finished:
        console.print(f"the run in {out} had already finished; nothing was trained or "
                      "changed. Its SAEs:")
    elif len(result.groups) > 1:
        console.print(f"trained in {len(result.groups)} site groups (memory budget): "
                      + "; ".join(", ".join(g) for g in result.groups))
    title = ("finished earlier" if result.already_finished
             else f"trained at {result.tokens_per_second:,.0f} tokens/s")
    table = Table("SAE", "L0", "FVU", "dead", "folder", title=title)
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
