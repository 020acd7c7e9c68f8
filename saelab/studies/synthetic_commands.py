"""`saelab study synthetic`: are SAE-built activations as realistic as real ones?

    result = run_study(SyntheticConfig(n=50, steps=50), "runs/synthetic")   # no SAE: trains one
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from saelab.errors import SaelabError

Stage = Callable[[str, int], Callable[[int], None]]


def _no_stage(name: str, total: int) -> Callable[[int], None]:
    return lambda done: None


def run_study(cfg: Any, out: str | os.PathLike, *, sae: str | os.PathLike | None = None,
              device: str = "cpu", stage: Stage = _no_stage, lm: Any = None) -> dict:
    """Load the model (float32, unless a loaded `lm` is given) and the SAE - or train one into
    OUT/saes, reused by later runs with the same site, width, k and token count - then run
    the study into `out`."""
    from saelab.interventions.splice import one_site
    from saelab.models.load import load_model
    from saelab.sae import load_sae
    from saelab.studies.saes import SAEPlan, ensure_saes
    from saelab.studies.synthetic import run_synthetic

    out = Path(out)
    lm = lm if lm is not None else load_model(cfg.model, dtype="float32", device=device)
    site = one_site(lm.arch, cfg.site, "--site")
    if sae is None:
        plan = SAEPlan(sites=(site,), width=cfg.sae_width, k=cfg.sae_k, tokens=cfg.sae_tokens,
                       corpus=cfg.corpus)
        # Keyed by everything that shapes the SAE, so a changed option trains a new one
        # instead of tripping over the old run's harvest or checkpoint.
        folder = out / "saes" / f"{site}-w{cfg.sae_width}-k{cfg.sae_k}-t{cfg.sae_tokens}"
        sae = ensure_saes(lm, plan, folder, stage)[site]
    sae_obj = load_sae(sae, dtype="float32").to(device)
    return run_synthetic(lm, sae_obj, cfg, out, stage=stage, sae_path=str(sae))


def register(study_app: typer.Typer) -> None:
    """Add `synthetic` to the `saelab study` app."""
    from rich.table import Table

    from saelab.console import console, emit_json, user_errors

    @study_app.command("synthetic")
    @user_errors
    def synthetic_cmd(
        out: Annotated[Path, typer.Option(help="Run folder (run.json, report.html, PNGs, curves.npz).")],
        model: Annotated[str, typer.Option("--model", "-m", help="Embedded name, HF id, folder or .gguf.")] = "smollm2-135m-instruct",
        site: Annotated[str, typer.Option(help="Site to perturb.")] = "resid_pre.1",
        sae: Annotated[Path | None, typer.Option(help="SAE folder for the site; default: train one into OUT/saes (reused).")] = None,
        n: Annotated[int, typer.Option(help="Base activations (10-token windows).")] = 1000,
        steps: Annotated[int, typer.Option(help="Points per curve.")] = 100,
        mode: Annotated[str, typer.Option(help="relative: A + t(T - A), t in [0, 1]; absolute: steps of --step-size, cut at the target.")] = "relative",
        step_size: Annotated[float, typer.Option(help="Absolute step length in the site's units (also the plateau experiment's).")] = 0.5,
        stats_prompts: Annotated[int, typer.Option(help="Windows for the latent statistics and the Gaussian.")] = 4096,
        corpus: Annotated[str, typer.Option(help="builtin, a .txt/.jsonl/.parquet file, hf:NAME")] = "builtin",
        blowup_threshold: Annotated[float, typer.Option(help="A rise counts as a blow-up above this fraction of the curve's max.")] = 0.02,
        plateau_n: Annotated[int, typer.Option(help="Bases of the plateau experiment (0: skip).")] = 200,
        plateau_threshold: Annotated[float, typer.Option(help="Plateau ends where L2 >= this x the unperturbed last-layer norm.")] = 0.1,
        seed: Annotated[int, typer.Option(help="Seed of windows, Gaussian samples and latent choices.")] = 0,
        batch_rows: Annotated[int, typer.Option(help="Single-token rows per forward pass.")] = 512,
        sae_tokens: Annotated[int, typer.Option(help="Training tokens when no --sae is given.")] = 200_000,
        sae_width: Annotated[int, typer.Option(help="Latents of the trained SAE.")] = 4608,
        sae_k: Annotated[int, typer.Option(help="Active latents per token of the trained SAE.")] = 32,
        device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
        json: Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")] = False,
    ) -> None:
        """Perturb real activations towards real, random and SAE-built targets; compare blow-ups."""
        from saelab.studies.synthetic import SyntheticConfig

        try:
            cfg = SyntheticConfig(model=model, site=site, n=n, steps=steps, mode=mode,
                                  step_size=step_size, stats_prompts=stats_prompts, corpus=corpus,
                                  blowup_threshold=blowup_threshold, plateau_n=plateau_n,
                                  plateau_threshold=plateau_threshold, seed=seed,
                                  batch_rows=batch_rows, sae_tokens=sae_tokens,
                                  sae_width=sae_width, sae_k=sae_k)
        except ValueError as err:
            raise SaelabError(str(err)) from None
        from saelab.studies.stage_lines import study_progress

        with study_progress(json=json) as stage:
            result = run_study(cfg, out, sae=sae, device=device, stage=stage)
        if json:
            return emit_json(result["results"] | {"out": str(out)})
        blow = result["results"]["blowup"]
        table = Table(title=f"Blow-up steps at {result['site']} ({cfg.n} bases, {cfg.steps} "
                            f"steps, {cfg.mode}); KS against real")
        table.add_column("target", no_wrap=True)
        for column in ("L2 mean", "median", "KS", "KL mean", "median", "KS"):
            table.add_column(column, justify="right")
        for kind, l2 in blow["l2"].items():
            kl = blow["kl"][kind]
            table.add_row(kind, f"{l2['mean']:.1f}", f"{l2['median']:g}", _ks(l2),
                          f"{kl['mean']:.1f}", f"{kl['median']:g}", _ks(kl))
        console.print(table)
        if result["results"]["plateau"]:
            lengths = result["results"]["plateau"]["lengths"]
            console.print("plateau length (mean steps): " + ", ".join(
                f"{k} {v['mean']:.1f}" for k, v in lengths.items()), highlight=False)
        console.print(f"report: {out / 'report.html'}")


def _ks(entry: dict) -> str:
    return "–" if entry["ks"] is None else f"{entry['ks']:.3f}"
