"""`saelab eval SAE --probing / --absorption`: load, run, write JSON, print a table.

    result = run_probing("runs/x/resid_post.12-topk-4608", datasets=["glue_sst2"])
    result = run_absorption("runs/x/resid_post.12-topk-4608")

Each writes its JSON (probing.json, absorption.json) into `out` (default SAE/eval), next
to eval.json; the model's activations are cached under $SAELAB_CACHE/probing so that a
further SAE at the same site costs only its encoding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from saelab.errors import SaelabError


def _load(sae: str | os.PathLike, model: str | None, device: str):
    from saelab.evals.commands import DEFAULT_MODEL
    from saelab.models.load import load_model
    from saelab.sae import load_sae

    sae_obj = load_sae(sae, dtype="float32").to(device)
    if not sae_obj.cfg.site:
        raise SaelabError(f"the SAE at {sae} records no site; probing needs the site it reads "
                          "(cfg.json metadata.site, e.g. resid_post.12).")
    lm = load_model(model or sae_obj.cfg.model_name or DEFAULT_MODEL, dtype="float32",
                    device=device)
    return lm, sae_obj


def cache_dir() -> Path:
    from saelab.models.load import cache_root

    return cache_root() / "probing"


def _write(result: dict, out: Path, name: str) -> Path:
    from saelab.atomic import disk_full
    from saelab.data.store import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    with disk_full(out, "the previous results there, if any, are unchanged"):
        atomic_write_text(out / name, json.dumps(result, indent=1) + "\n")
    return out / name


def run_probing(sae: str | os.PathLike, *, model: str | None = None,
                datasets: Sequence[str] | None = None, out: str | os.PathLike | None = None,
                device: str = "cpu", on_progress: Callable[[str, int, int], None] | None = None,
                **settings: Any) -> dict:
    """Sparse probing of one SAE folder; writes OUT/probing.json (OUT default SAE/eval)."""
    from saelab.evals.commands import sae_folder
    from saelab.evals.probe_data import load_probe_dataset
    from saelab.evals.probing import ProbeConfig, probe_saes

    cfg = ProbeConfig(**settings, **({"datasets": tuple(datasets)} if datasets else {}))
    for name in cfg.datasets:  # bad names fail before the model loads
        load_probe_dataset(name, n=cfg.n_texts, seed=cfg.seed)
    lm, sae_obj = _load(sae, model, device)
    result = probe_saes(lm, {str(sae): sae_obj}, config=cfg, cache_dir=cache_dir(),
                        on_progress=on_progress)
    path = _write(result, Path(out) if out is not None else sae_folder(sae) / "eval",
                  "probing.json")
    result["out"] = str(path)
    return result


def run_absorption(sae: str | os.PathLike, *, model: str | None = None,
                   out: str | os.PathLike | None = None, device: str = "cpu",
                   on_progress: Callable[[int, int], None] | None = None,
                   **settings: Any) -> dict:
    """First-letter absorption of one SAE folder; writes OUT/absorption.json."""
    from saelab.evals.absorption import AbsorptionConfig, absorption
    from saelab.evals.commands import sae_folder

    cfg = AbsorptionConfig(**settings)
    lm, sae_obj = _load(sae, model, device)
    result = absorption(lm, sae_obj, cfg, cache_dir=cache_dir(), on_progress=on_progress)
    result["sae_path"] = str(sae)
    path = _write(result, Path(out) if out is not None else sae_folder(sae) / "eval",
                  "absorption.json")
    result["out"] = str(path)
    return result


def _fmt(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "–"
    ci = m.get("ci95")
    return f"{m['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _short(m: dict) -> str:
    """value ± the larger half of its interval: the table stays narrow."""
    ci = m.get("ci95")
    half = max(m["value"] - ci[0], ci[1] - m["value"]) if ci else None
    return f"{m['value']:.2f}" + (f"±{half:.2f}" if half is not None else "")


def table_width(table) -> int:
    """Columns the table needs to show every cell whole."""
    from rich.console import Console

    return Console(width=10_000).measure(table).maximum


def print_probing(result: dict, console) -> None:
    from rich.table import Table

    sae = result["saes"][0]
    model = result["sites"][sae["site"]]["model"]
    keys = list(sae["mean"])
    table = Table("dataset", "chance", *[f"SAE {k}" for k in keys], f"model {keys[-2]}",
                  "model all", title=f"sparse probing: {sae['architecture']} SAE at {sae['site']}"
                  " (test accuracy ± 95% interval)")
    rows = [(name, sae["datasets"][name], model["datasets"][name],
             f"{result['datasets'][name]['chance']:.2f}") for name in sae["datasets"]]
    rows.append(("mean", sae["mean"], model["mean"], ""))
    for name, s, m, chance in rows:
        table.add_row(name, chance, *[_short(s[k]) for k in keys], _short(m[keys[-2]]),
                      _short(m["all"]))
    for column in table.columns:
        column.no_wrap = True
    # Never cut a dataset name or a number to fit 80 columns (piped output is 80 wide).
    width = console.width
    console.width = max(width, table_width(table))
    try:
        console.print(table)
    finally:
        console.width = width
    site = result["sites"][sae["site"]]
    console.print(f"model activations {site['activations_s']:.1f} s"
                  + (f" ({len(site['activations_from_cache'])} sets from the cache)"
                     if site["activations_from_cache"] else "")
                  + f"; SAE encoding and probes {sae['probe_s']:.1f} s", highlight=False)


def print_absorption(result: dict, console) -> None:
    letters = result["letters"]
    f1 = " ".join(f"{k}:{v['probe_f1']:.2f}" if v["probe_f1"] is not None else f"{k}:–"
                  for k, v in letters.items())
    console.print(f"first-letter probe F1 at {result['site']} (passes above "
                  f"{result['settings']['min_probe_f1']}): {f1}", highlight=False)
    console.print(f"letters passing: {len(result['passing_letters'])} of 26", highlight=False)
    if result["metrics"] is None:
        for note in result["notes"]:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
        return
    m = result["metrics"]
    console.print(f"mean absorption fraction: {_fmt(m['mean_absorption_fraction'])}",
                  highlight=False)
    console.print(f"mean full-absorption rate: {_fmt(m['mean_full_absorption_rate'])}",
                  highlight=False)
    console.print(f"main latents per letter: {m['mean_num_main_latents']:.2f} over "
                  f"{m['n_letters']} letters", highlight=False)


def run_extra_evals(sae: Path, *, model: str | None, out: Path | None, device: str, json: bool,
                    probing: bool, absorption: bool, datasets: str | None, seed: int,
                    bootstrap: int) -> None:
    """The `saelab eval --probing / --absorption` command body (progress, tables, JSON)."""
    from saelab.console import console, emit_json, progress

    names = [d.strip() for d in datasets.split(",") if d.strip()] if datasets else None
    if datasets is not None and not names:
        raise SaelabError("--datasets is empty; give comma-separated names, e.g. "
                          "--datasets glue_sst2,spam_is")
    results: dict[str, Any] = {}
    with progress() as bar:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, info="")
            bar.update(tasks[stage], completed=done, total=total, info=f"{done:,}/{total:,}")

        if probing:
            results["probing"] = run_probing(sae, model=model, datasets=names, out=out,
                                             device=device, on_progress=update, seed=seed,
                                             bootstrap=bootstrap)
        if absorption:
            results["absorption"] = run_absorption(
                sae, model=model, out=out, device=device, seed=seed, bootstrap=bootstrap,
                on_progress=lambda d, t: update("model: first-letter prompts", d, t))
    if json:
        return emit_json(results if len(results) > 1 else next(iter(results.values())))
    if "probing" in results:
        print_probing(results["probing"], console)
        console.print(f"wrote {results['probing']['out']}")
    if "absorption" in results:
        print_absorption(results["absorption"], console)
        console.print(f"wrote {results['absorption']['out']}")
