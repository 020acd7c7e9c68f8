"""`saelab study dictionaries`: dictionaries of several sizes on a small model, compared and read.

    saelab study dictionaries --tokens 150000 --out runs/dictionaries
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(study_app: typer.Typer) -> None:
    """Add `dictionaries` to the `saelab study` app."""
    from saelab.console import console, emit_json, user_errors

    @study_app.command("dictionaries")
    @user_errors
    def dictionaries_cmd(
        out: Annotated[Path, typer.Option(help="Study folder (run.json, report.html, PNGs, train/, features/).")],
        tokens: Annotated[int, typer.Option(help="Training tokens; every dictionary sees every one.")] = 150_000,
        model: Annotated[str, typer.Option("--model", "-m", help="Embedded name, HF id, folder or .gguf.")] = "smollm2-135m-instruct",
        site: Annotated[str, typer.Option(help="Site of the grid: an early residual site.")] = "resid_post.2",
        widths: Annotated[str, typer.Option(help="Widths as multiples of the site's width.")] = "1,2,4,8",
        arch: Annotated[str, typer.Option(help="relu (L1, as the original) or topk.")] = "relu",
        l1: Annotated[str, typer.Option(help="L1 coefficients (relu).")] = "0.1,0.3",
        k: Annotated[str, typer.Option(help="Active latents per token (topk).")] = "16,32",
        seeds: Annotated[int, typer.Option(help="Initialisation seeds per width and sparsity.")] = 2,
        context: Annotated[int, typer.Option(help="Tokens per context.")] = 25,
        batch_size: Annotated[int, typer.Option(help="Tokens per optimizer step.")] = 1024,
        lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
        corpus: Annotated[str, typer.Option(help="builtin, a .txt/.jsonl/.parquet file, hf:NAME")] = "builtin",
        connect: Annotated[bool, typer.Option("--connect/--no-connect", help="Train the next sites' dictionaries and fit connections.")] = True,
        eval_tokens: Annotated[int, typer.Option(help="Held-out tokens for L0, FVU, loss recovered, ΔCE.")] = 2_000,
        feature_tokens: Annotated[int, typer.Option(help="Tokens collected for the dashboards.")] = 20_000,
        connect_tokens: Annotated[int, typer.Option(help="Tokens the connections are fitted on.")] = 8_000,
        connect_features: Annotated[int, typer.Option(help="Later features whose connections are fitted.")] = 48,
        connect_alpha: Annotated[float, typer.Option(help="Lasso penalty of the connection fit.")] = 0.01,
        recur_threshold: Annotated[float, typer.Option(help="Max cosine at which a feature recurs.")] = 0.9,
        featured: Annotated[int, typer.Option(help="Most recurring features shown with dashboards.")] = 6,
        index_ablate: Annotated[int, typer.Option(help="Features per feature index with ablated text of their top example.")] = 64,
        seed: Annotated[int, typer.Option(help="Base seed (data order, first initialisation).")] = 0,
        memory_budget: Annotated[str | None, typer.Option(help="Memory the one-pass grid may use, e.g. 4GB (default: 80% of what is free).")] = None,
        device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
        resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted study in OUT.")] = False,
        json: Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")] = False,
    ) -> None:
        """Train a grid of dictionaries (widths x L1 x seeds) from one stream; compare them by MCS;
        read their features (uniform examples, logit lens, ablated text); connect consecutive sites."""
        from rich.table import Table

        from saelab.studies.dictionaries_config import DictionariesConfig, parse_list

        cfg = DictionariesConfig(
            model=model, site=site, widths=parse_list("--widths", widths, int), arch=arch,
            l1=parse_list("--l1", l1, float), k=parse_list("--k", k, int), seeds=seeds,
            context=context, tokens=tokens, batch_size=batch_size, lr=lr, corpus=corpus,
            connect=connect, eval_tokens=eval_tokens, feature_tokens=feature_tokens,
            connect_tokens=connect_tokens, connect_features=connect_features,
            connect_alpha=connect_alpha, recur_threshold=recur_threshold, featured=featured,
            index_ablate=index_ablate, seed=seed)
        from saelab.models.load import load_model
        from saelab.studies.dictionaries import run_dictionaries
        from saelab.studies.stage_lines import study_progress
        from saelab.train.trainer import parse_bytes

        budget = parse_bytes(memory_budget) if memory_budget else None
        lm = load_model(cfg.model, dtype="float32", device=device)
        with study_progress(json=json) as stage:
            result = run_dictionaries(lm, cfg, out, resume=resume, stage=stage,
                                      memory_budget=budget, device=device)
        res = result["results"]
        if json:
            return emit_json({"out": str(out), "claims": res["claims"], "grid": res["grid"],
                              "by_width": res["by_width"], "seconds": result["seconds"]})
        sp = "L1" if cfg.arch == "relu" else "k"
        grid = Table(title=f"{len(res['grid'])} dictionaries at {result['site']} (held-out)")
        for col in ("dictionary", "L0", "FVU", "loss rec.", "ΔCE"):
            grid.add_column(col, justify="right" if col != "dictionary" else "left", no_wrap=True)
        for r in res["grid"]:
            grid.add_row(f"{r['width_mult']}x {sp} {r['sparsity']:g} s{r['seed']}",
                         f"{r['l0']:.1f}", f"{r['fvu']:.3f}", f"{r['loss_recovered']:.3f}",
                         f"{r['delta_ce']:.3f}")
        console.print(grid)
        for c in res["claims"]:
            verdict = {True: "holds", False: "does not hold", None: "inconclusive"}[c["holds"]]
            console.print(f"- {c['claim']}: {verdict}. {c['evidence']}", highlight=False)
        console.print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()),
                      highlight=False)
        console.print(f"report: {out / 'report.html'}")
