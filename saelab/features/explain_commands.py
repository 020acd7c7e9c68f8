"""`saelab explain`: explain and score the features of feature indexes (features/explain.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from saelab.errors import SaelabError


def run_explain(path: str | Path, *, explainer: str | None = None, device: str = "cpu",
                on_progress: Any = None, **settings: Any) -> dict[str, dict]:
    """Explain every feature index at or below `path`; {index folder: summary}."""
    from saelab.evals.autointerp import sentence_embedder
    from saelab.features.explain import ExplainConfig, explain_index
    from saelab.features.index import find_indexes

    try:
        config = ExplainConfig(**settings)
    except ValueError as err:
        raise SaelabError(str(err)) from None
    root = Path(path)
    if not root.exists():
        raise SaelabError(f"{root} does not exist; give a feature index folder or a run of them "
                          "(from `saelab features`).")
    folders = find_indexes(root)
    if not folders:
        raise SaelabError(f"{root} holds no feature index; build one with `saelab features SAE "
                          "--out DIR` first.")
    embedder = sentence_embedder()  # before a (large) explainer is loaded: fail early
    lm = None
    if explainer is not None:
        from saelab.features.explainer_lm import LMExplainer

        lm = LMExplainer.load(explainer, device=device)
    return {str(f): explain_index(f, config, explainer=lm, embedder=embedder,
                                  on_progress=on_progress) for f in folders}


def register(app: typer.Typer) -> None:
    from rich.table import Table

    from saelab.console import console, emit_json, progress, user_errors

    @app.command("explain")
    @user_errors
    def explain_cmd(
        index: Annotated[Path, typer.Argument(help="A feature index folder, or a run folder holding several (from `saelab features`).")],
        source: Annotated[str, typer.Option(help="Explanation without an LM: tokens (top activating tokens), lens (logit lens), tokens+lens.")] = "tokens",
        explainer: Annotated[str | None, typer.Option(help="A local Hugging Face causal LM (id or folder) that writes the explanations instead (GPU advised).")] = None,
        scorer: Annotated[str, typer.Option(help="How explanations are scored: embedding (MiniLM similarity AUROC).")] = "embedding",
        features: Annotated[int, typer.Option(help="Features to explain (alive, lowest ids first).")] = 200,
        negatives: Annotated[int, typer.Option(help="Random texts per feature for the AUROC.")] = 50,
        seed: Annotated[int, typer.Option(help="Seed of the random texts.")] = 0,
        device: Annotated[str, typer.Option(help="cpu or cuda, for --explainer.")] = "cpu",
        json: Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")] = False,
    ) -> None:
        """Explain features without an API and score the explanations (embedding AUROC).

        Writes explanations.parquet / .json into each index and the explanations as the
        features' labels, which `saelab serve` and dashboard.html show.
        """
        if scorer != "embedding":
            raise SaelabError(f"--scorer {scorer!r}: the scorer available is 'embedding'")
        bar, task = None, None

        def explained(done: int, total: int) -> None:  # only an LM explainer takes long
            nonlocal bar, task
            if bar is None:
                bar = progress()
                bar.start()
                task = bar.add_task("explain", total=total, info="")
            bar.update(task, completed=done, total=total, info=f"{done} features")

        try:
            results = run_explain(index, explainer=explainer, device=device, source=source,
                                  features=features, negatives=negatives, seed=seed,
                                  on_progress=None if json else explained)
        finally:
            if bar is not None:
                bar.stop()
        if json:
            return emit_json(results)
        table = Table("index", "source", "scored", "AUROC mean [95% CI]", "median", "control",
                      title="embedding scorer: explanation vs held-out texts where the feature fires")
        for folder, s in results.items():
            a, c = s["auroc"], s["control_auroc"]
            ci = f" [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]" if a["ci95"] else ""
            table.add_row(folder, s["source"], str(s["features_scored"]),
                          "–" if a["mean"] is None else f"{a['mean']:.3f}{ci}",
                          "–" if a["median"] is None else f"{a['median']:.3f}",
                          "–" if c["mean"] is None else f"{c['mean']:.3f}")
        console.print(table)
        console.print("control: each feature scored with another feature's explanation (~0.5 "
                      "expected). Labels written; browse with `saelab serve`.")
