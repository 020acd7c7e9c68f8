"""`saelab features` and `saelab serve`: plain functions, and `register(app)` to mount them.

    folders = run_features("runs/x", tokens=50_000, out="runs/feats")   # {name: index folder}

saelab/cli.py mounts it::

    from saelab.features.commands import register
    register(app)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from saelab.errors import SaelabError

DEFAULT_MODEL = "smollm2-135m-instruct"


def run_features(sae: str | os.PathLike, *, model: str | None = None,
                 out: str | os.PathLike | None = None, cache: str | os.PathLike | None = None,
                 compare: str | os.PathLike | None = None, device: str = "cpu",
                 on_stage: Any = None, **settings: Any) -> dict[str, Path]:
    """Build feature indexes for the SAE(s) at `sae`; settings are IndexConfig / CollectConfig fields."""
    from saelab.features.build import build_index, sae_entries
    from saelab.models.limits import check_positions, config_max_positions
    from saelab.models.load import load_model
    from saelab.sae import load_sae
    from saelab.train.distributed import from_env

    config = index_config(**settings)
    entries = sae_entries(sae)
    models = {e[0].cfg.model_name for e in entries.values()} - {None}
    if model is None and len(models) > 1:
        raise SaelabError(f"the SAEs under {sae} were trained on different models "
                          f"({', '.join(sorted(models))}); pass --model, or one SAE at a time.")
    model_name = model or next(iter(models), None) or DEFAULT_MODEL
    if cache is None:  # a cache's contexts were checked when it was harvested
        check_positions("--context", config.context, config_max_positions(model_name), model_name)
    store = None
    if cache is not None:
        from saelab.data.store import ActivationStore

        store = ActivationStore(cache)
    dist = from_env(device)
    lm = load_model(model_name, dtype="float32", device=device)
    if store is not None:
        check_cache(store.folder, store.manifest.identity, entries, lm)
    other = load_sae(compare, dtype="float32") if compare is not None else None
    out = Path(out) if out is not None else (Path(sae) if Path(sae).is_dir() else Path(sae).parent) / "features"
    entries = {name: (s.to(device), path) for name, (s, path) in entries.items()}
    return build_index(lm, entries, out, config, cache=store, compare=other, dist=dist,
                       on_stage=on_stage)


def check_cache(folder: Path, identity: dict, entries: dict[str, tuple[Any, Path]], lm: Any) -> None:
    """Refuse a --cache whose activations are not the SAEs' (another model, site or width).

    A model is the same when both sides record a weights hash and the hashes agree (names may
    be spelled differently: an embedded name, a folder); without hashes the names must agree.
    Raises SaelabError naming both sides.
    """
    cached = (identity.get("model"), identity.get("model_hash") or None)
    sides = [(f"SAE {name}", (sae.cfg.model_name, sae.cfg.metadata.get("model_hash") or None))
             for name, (sae, _) in entries.items()]
    sides.append(("the model loaded for the logit lens (--model)", (lm.name, lm.source_hash or None)))
    for who, (model, digest) in sides:
        if model is None and digest is None:
            continue  # an SAE that records no model: nothing to compare
        same = digest == cached[1] if digest and cached[1] else model == cached[0]
        if not same:
            raise SaelabError(
                f"the cache {folder} holds activations of model {cached[0]!r} (hash "
                f"{(cached[1] or 'none')[:12]}), but {who} is model {model!r} (hash "
                f"{(digest or 'none')[:12]}); harvest a cache of the SAE's model, or drop --cache.")
    widths = identity.get("sites") or {}
    for name, (sae, _) in entries.items():
        site = sae.cfg.site
        if site in widths and widths[site] != sae.cfg.d_in:
            raise SaelabError(f"the cache {folder} holds {site} {widths[site]} wide, but SAE "
                              f"{name} reads {sae.cfg.d_in}-wide inputs; it was trained on "
                              "another model. Harvest a cache of the SAE's model.")


def index_config(**settings: Any) -> Any:
    """The IndexConfig of `settings` (IndexConfig and CollectConfig fields), checked."""
    from saelab.features.build import IndexConfig
    from saelab.features.collect import CollectConfig

    collect_keys = set(CollectConfig.__dataclass_fields__)
    try:
        collect_cfg = CollectConfig(**{k: v for k, v in settings.items() if k in collect_keys})
        return IndexConfig(collect=collect_cfg,
                           **{k: v for k, v in settings.items() if k not in collect_keys})
    except ValueError as err:  # a library caller's plain ValueError, as one line
        raise SaelabError(str(err)) from None


def register(app: typer.Typer) -> None:
    """Add the `features` and `serve` commands to the saelab typer app."""
    from saelab.console import console, emit_json, escape, progress, user_errors

    @app.command("features")
    @user_errors
    def features_cmd(
        sae: Annotated[Path, typer.Argument(help="SAE folder, or a folder of SAE folders (e.g. a training run).")],
        model: Annotated[str | None, typer.Option("--model", "-m", help="Model; default the SAEs' recorded model.")] = None,
        tokens: Annotated[int, typer.Option(help="Tokens to collect over.")] = 50_000,
        out: Annotated[Path | None, typer.Option(help="Output run folder; default SAE/features.")] = None,
        corpus: Annotated[str, typer.Option(help="builtin, a .txt/.jsonl/.parquet file, hf:NAME")] = "builtin",
        cache: Annotated[Path | None, typer.Option(help="Read activations from this harvest cache instead.")] = None,
        context: Annotated[int, typer.Option(help="Tokens per context.")] = 128,
        batch_size: Annotated[int, typer.Option(help="Contexts per forward pass.")] = 16,
        top_k: Annotated[int, typer.Option(help="Top activating contexts per feature.")] = 20,
        bins: Annotated[int, typer.Option(help="Equal-width activation bins over (0, max].")] = 10,
        per_bin: Annotated[int, typer.Option(help="Examples drawn per bin.")] = 5,
        left: Annotated[int, typer.Option(help="Tokens shown before an example's token.")] = 16,
        right: Annotated[int, typer.Option(help="Tokens shown after it.")] = 8,
        ablate: Annotated[int, typer.Option(help="Features whose top and uniform examples get ablated text (token ablation).")] = 64,
        ablate_per_bin: Annotated[int, typer.Option(help="Uniform examples per bin ablated besides the top one (0: top only).")] = 1,
        cards: Annotated[int, typer.Option(help="Feature cards in dashboard.html (the list has all).")] = 128,
        compare: Annotated[Path | None, typer.Option("--compare-sae", help="Another SAE for cross-SAE neighbours.")] = None,
        seed: Annotated[int, typer.Option(help="Seed of the bin sampling.")] = 0,
        device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
        json: Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")] = False,
    ) -> None:
        """Feature dashboards: top and binned examples, histograms, logit lens, neighbours,
        ablated text of top and uniform examples, as Parquet tables plus a static
        dashboard.html per SAE.

        Under `torchrun --nproc-per-node N -m saelab features ...` each rank
        collects its share of the corpus and rank 0 merges the parts.
        """
        settings = dict(tokens=tokens, corpus=corpus, context=context, batch_size=batch_size,
                        top_k=top_k, n_bins=bins, per_bin=per_bin, left=left, right=right,
                        ablate=ablate, ablate_per_bin=ablate_per_bin, cards=cards, seed=seed)
        index_config(**settings)  # checked before anything is loaded
        bar = None  # started at the first stage, so an error before it is one line
        tasks: dict[str, Any] = {}

        def stage(name: str, done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = progress()
                bar.start()
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total, info="")
            info = f"{done:,} tokens" if name == "collect" else ""
            bar.update(tasks[name], completed=done, total=total, info=info)

        try:
            folders = run_features(sae, model=model, out=out, cache=cache, compare=compare,
                                   device=device, on_stage=stage, **settings)
        finally:
            if bar is not None:
                bar.stop()
        if not folders:  # a torchrun rank other than 0
            return
        summary = {name: str(path) for name, path in folders.items()}
        if json:
            return emit_json(summary)
        for name, path in summary.items():
            console.print(f"{name}: {path}/ (features.parquet, examples.parquet, dashboard.html)")
        run_dir = Path(next(iter(summary.values()))).parent
        console.print(f"browse with: saelab serve {run_dir}")

    from saelab.features.explain_commands import register as register_explain

    register_explain(app)

    @app.command("serve")
    @user_errors
    def serve_cmd(
        run_dir: Annotated[Path, typer.Argument(help="Folder holding feature indexes (from `saelab features`).")],
        port: Annotated[int, typer.Option(help="Port (0: any free port).")] = 8000,
        host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
        device: Annotated[str, typer.Option(help="cpu or cuda, for the live pages.")] = "cpu",
    ) -> None:
        """Browse features locally: SAE pages, feature pages, prompt search, steering."""
        from saelab.app.server import make_server
        from saelab.checks import integer

        integer("--port", port, low=0, high=65535)
        server = make_server(run_dir, host=host, port=port, device=device)
        host_shown, port_shown = server.server_address[:2]
        scope = server.app.scope
        what = (f"the scope of {scope.scope.model} ({len(scope.entries)} SAEs, "
                f"{len(server.app.saes)} feature indexes)" if scope else f"{len(server.app.saes)} SAE(s)")
        console.print(f"serving {escape(what)} from {run_dir} at "
                      f"http://{host_shown}:{port_shown}/  (Ctrl-C stops)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            console.print("stopped")
        finally:
            server.server_close()
