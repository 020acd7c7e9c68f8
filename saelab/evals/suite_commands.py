"""`saelab eval --suite`: the CLI side of saelab/evals/suite.py (called by evals/commands.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saelab.errors import SaelabError

DEFAULT_MODEL = "smollm2-135m-instruct"


def run_suite_paths(saes: list[Path], *, suite: str = "all", model: str | None = None,
                    out: Path | None = None, device: str = "cpu", on_stage: Any = None,
                    **settings: Any) -> dict:
    """Load the SAEs and their model, run the suite into `out` (required); the suite.json dict."""
    from saelab.evals.suite import SuiteConfig, run_suite, sae_entries, suite_metrics
    from saelab.models.load import load_model

    if out is None:
        raise SaelabError("--suite writes one page for all the SAEs: give --out DIR.")
    try:
        config = SuiteConfig(**settings)
    except ValueError as err:
        raise SaelabError(str(err)) from None
    suite_metrics(suite)  # an unknown name fails before anything loads
    entries = sae_entries(saes)
    models = {e.sae.cfg.model_name for e in entries} - {None}
    if model is None and len(models) > 1:
        raise SaelabError(f"the SAEs were trained on different models ({', '.join(sorted(models))});"
                          " a suite compares SAEs of one model: pass --model or fewer SAEs.")
    lm = load_model(model or next(iter(models), None) or DEFAULT_MODEL, dtype="float32",
                    device=device)
    entries = [type(e)(e.name, e.sae.to(device), e.path) for e in entries]
    return run_suite(lm, entries, out, config, suite=suite, on_stage=on_stage)


def suite_cli(saes: list[Path], *, json: bool = False, **kw: Any) -> None:
    from rich.table import Table

    from saelab.console import console, emit_json
    from saelab.report.suite import cell, metric_names

    status = console.status("loading")
    status.start()
    try:
        result = run_suite_paths(saes, on_stage=lambda s: status.update(s), **kw)
    finally:
        status.stop()
    if json:
        return emit_json(result)
    # one row per metric, one column per SAE: metrics outnumber SAEs and fit a terminal so
    table = Table("metric", *[f"{r['sae']}\n({r['architecture']})" for r in result["saes"]],
                  title="suite: value [95% interval]")
    for n in metric_names(result):
        table.add_row(n, *[str(cell(r["metrics"].get(n))) for r in result["saes"]])
    console.print(table)
    for note in result["notes"]:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"wrote {kw['out']}/report.html, suite.json, suite.parquet")
