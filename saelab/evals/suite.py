"""One page for many SAEs: every metric, with intervals, for each SAE, and plots against L0.

    result = run_suite(lm, {"a": (sae_a, path_a), "b": (sae_b, path_b)}, "runs/suite")

A suite is a list of metric functions (`METRICS`); `--suite all` runs them all.
Each function takes the shared `SuiteContext` and one `SAEEntry` and returns
``{metric name: {"value": float | None, "ci95": [lo, hi] | None}}``. Adding a
metric is one line::

    METRICS["probing"] = probing_metrics

A metric function may keep what every SAE shares (the model's activations of a
dataset, the sentence embedder) in `ctx.cache`, so it is computed once per suite.

Writes into `out`: suite.json (everything), suite.parquet (one row per SAE and
metric: value, ci_low, ci_high, L0, architecture, width, site), report.html (the
table and one plot per metric against L0), and each metric's own artifacts under
out/NAME/ (eval.json...) and out/features/ (feature indexes, `saelab serve` them).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from saelab.checks import ABSURD, MAX_SEED, integer
from saelab.errors import BadValueError, SaelabError

SCHEMA = "saelab.suite/1"


@dataclass(frozen=True)
class SuiteConfig:
    """What every SAE of a suite is measured on."""

    tokens: int = 4096
    """Held-out token positions for reconstruction and downstream metrics."""
    corpus: Any = "builtin"
    """Corpus spec (`load_corpus`) or a Corpus, for every metric that reads text."""
    context: int = 128
    """Tokens per context."""
    batch_size: int = 8
    """Contexts per forward pass."""
    bootstrap: int = 1000
    """Bootstrap replicates of every interval."""
    seed: int = 0
    """Seed of the bootstraps and samples."""
    feature_tokens: int = 20_000
    """Tokens collected for the feature examples that interpretation explains and scores."""
    explain_features: int = 100
    """Features explained and scored per SAE (alive, lowest ids first)."""
    negatives: int = 50
    """Random texts per feature in the embedding scorer."""
    probing: dict = field(default_factory=dict)
    """ProbeConfig fields for the probing metric (datasets, n_texts, seeds...); {}: defaults."""
    absorption: dict = field(default_factory=dict)
    """AbsorptionConfig fields for the absorption metric (n_words...); {}: defaults."""

    def __post_init__(self) -> None:
        for name in ("tokens", "context", "batch_size", "feature_tokens", "explain_features",
                     "negatives"):
            integer(name, getattr(self, name), low=2 if name == "context" else 1, high=ABSURD)
        integer("bootstrap", self.bootstrap, low=0, high=10**6)
        integer("seed", self.seed, low=0, high=MAX_SEED)

    def to_json(self) -> dict:
        out = asdict(self)
        out["corpus"] = getattr(self.corpus, "name", str(self.corpus))
        return out


@dataclass
class SAEEntry:
    name: str
    sae: Any
    path: Path | None = None


@dataclass
class SuiteContext:
    lm: Any
    config: SuiteConfig
    out: Path
    entries: list[SAEEntry] = field(default_factory=list)
    """Every SAE of the suite (a metric may compute for all of them at once)."""
    cache: dict = field(default_factory=dict)
    """Shared across SAEs and metrics: computed once per suite."""
    notes: list[str] = field(default_factory=list)


MetricFn = Callable[[SuiteContext, SAEEntry], dict[str, dict]]


def reconstruction_metrics(ctx: SuiteContext, entry: SAEEntry) -> dict[str, dict]:
    """L0, FVU, cosine, ΔCE, loss recovered, KL (saelab/evals/run.py), per-context bootstrap."""
    from saelab.evals.run import EvalConfig, evaluate

    c = ctx.config
    result = evaluate(ctx.lm, entry.sae, EvalConfig(
        tokens=c.tokens, corpus=c.corpus, context=c.context, batch_size=c.batch_size,
        bootstrap=c.bootstrap, seed=c.seed), out=ctx.out / entry.name / "eval",
        sae_path=None if entry.path is None else str(entry.path))
    keys = ("l0", "fvu", "explained_variance", "cosine", "delta_ce", "loss_recovered", "kl_score")
    out = {k: result["metrics"][k] for k in keys if k in result["metrics"]}
    out["dead_fraction"] = {"value": result["features"]["dead_fraction"], "ci95": None}
    ctx.notes += [f"{entry.name}: {n}" for n in result["notes"]]
    return out


def interpretation_metrics(ctx: SuiteContext, entry: SAEEntry) -> dict[str, dict]:
    """Embedding AUROC of token explanations (saelab/features/explain.py): mean over
    features with a bootstrap interval over features, and the mismatched control."""
    from saelab.evals.autointerp import sentence_embedder
    from saelab.features.build import IndexConfig, build_index
    from saelab.features.explain import ExplainConfig, explain_index

    c = ctx.config
    if "embedder" not in ctx.cache:
        ctx.cache["embedder"] = sentence_embedder()
    if "feature_indexes" not in ctx.cache:  # one collection pass feeds every SAE's index
        ctx.cache["feature_indexes"] = build_index(
            ctx.lm, {e.name: (e.sae, e.path) for e in ctx.entries}, ctx.out / "features",
            IndexConfig(tokens=c.feature_tokens, corpus=c.corpus, context=c.context,
                        batch_size=c.batch_size, ablate=0, cards=32))
    summary = explain_index(ctx.cache["feature_indexes"][entry.name], ExplainConfig(
        features=c.explain_features, negatives=c.negatives, bootstrap=c.bootstrap, seed=c.seed),
        embedder=ctx.cache["embedder"])
    a, ctl = summary["auroc"], summary["control_auroc"]
    return {"embedding_auroc": {"value": a["mean"], "ci95": a["ci95"]},
            "embedding_auroc_control": {"value": ctl["mean"], "ci95": ctl["ci95"]}}


def probing_metrics(ctx: SuiteContext, entry: SAEEntry) -> dict[str, dict]:
    """Sparse-probing accuracy (saelab/evals/probing.py), mean over the default datasets, for
    k = 1, 2, 5 and all latents; every SAE of the suite probed from one model pass per site."""
    from saelab.evals.probing import probe_saes

    if "probing" not in ctx.cache:
        ctx.cache["probing"] = probe_saes(ctx.lm, {e.name: e.sae for e in ctx.entries},
                                          **{"seed": ctx.config.seed, **ctx.config.probing})
    row = next(r for r in ctx.cache["probing"]["saes"] if r["label"] == entry.name)
    return {f"probing_{k}": _value_ci(v) for k, v in row["mean"].items()
            if k in ("k1", "k2", "k5", "all")}


def _value_ci(metric: dict) -> dict:
    return {"value": metric["value"], "ci95": metric["ci95"]}


def absorption_metrics(ctx: SuiteContext, entry: SAEEntry) -> dict[str, dict]:
    """First-letter absorption (saelab/evals/absorption.py), from one model pass per site;
    None, with a note, where the model does not know first letters well enough."""
    from saelab.evals.absorption import AbsorptionConfig, absorption, word_activations

    site = entry.sae.cfg.site
    cfg = AbsorptionConfig(**{"seed": ctx.config.seed, **ctx.config.absorption})
    key = f"absorption:{site}"
    if key not in ctx.cache:
        ctx.cache[key] = word_activations(ctx.lm, site, cfg)
    result = absorption(ctx.lm, entry.sae, cfg, word_acts=ctx.cache[key])
    if result["metrics"] is None:
        ctx.notes += [f"{entry.name}: absorption: {n}" for n in result["notes"]]
        return {"absorption_fraction": {"value": None, "ci95": None},
                "full_absorption_rate": {"value": None, "ci95": None}}
    m = result["metrics"]
    return {"absorption_fraction": _value_ci(m["mean_absorption_fraction"]),
            "full_absorption_rate": _value_ci(m["mean_full_absorption_rate"])}


# The suite: name -> metric function. `all` runs every entry, in this order.
METRICS: dict[str, MetricFn] = {
    "reconstruction": reconstruction_metrics,
    "interpretation": interpretation_metrics,
    "probing": probing_metrics,
    "absorption": absorption_metrics,
}
# Lower is better for these; every other metric: higher is better (the page says which).
LOWER_IS_BETTER = {"fvu", "delta_ce", "kl_score", "dead_fraction"}


def suite_metrics(suite: str) -> list[str]:
    """The metric functions of `suite`: all, or comma-separated names of METRICS."""
    names = list(METRICS) if suite == "all" else [s.strip() for s in suite.split(",") if s.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise BadValueError(f"--suite {suite!r}: expected 'all' or names among "
                            f"{', '.join(METRICS)}, comma separated")
    if "reconstruction" not in names:  # it gives L0, the x axis of every plot
        names.insert(0, "reconstruction")
    return names


def sae_entries(paths: Sequence[str | os.PathLike]) -> list[SAEEntry]:
    """Load SAE folders (float32, eval mode); names are the folder names, made unique."""
    from saelab.sae import load_sae

    if not paths:
        raise SaelabError("no SAE given; pass one or more SAE folders, e.g. "
                          "`saelab eval --suite all runs/a/SAE runs/b/SAE --out DIR`.")
    entries, used = [], set()
    for path in _expand_scopes(paths):
        if not path.exists():
            raise SaelabError(f"{path} does not exist; give SAE folders (any format saelab reads).")
        name = path.name if path.is_dir() else path.parent.name
        base, i = name, 2
        while name in used:
            name, i = f"{base}-{i}", i + 1
        used.add(name)
        entries.append(SAEEntry(name, load_sae(path, dtype="float32").eval(), path))
    return entries


def _expand_scopes(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Paths, with a scope folder (`saelab scope --out`) standing for every SAE it indexes
    (its native folders, in index order); a missing or corrupt one is refused by name."""
    from saelab.scope.layout import is_scope, read_scope

    out = []
    for p in map(Path, paths):
        if not is_scope(p):
            out.append(p)
            continue
        scope = read_scope(p)
        bad = [f"{e.id} ({e.status})" for e in scope.entries if e.status != "ok"]
        if bad:
            raise SaelabError(f"scope {p} has SAEs that cannot be read: {', '.join(bad)}; "
                              f"rebuild them (`saelab scope --resume`) or pass the others.")
        out += [p / e.native for e in scope.entries]
    return out


def check_sites(lm: Any, entries: Sequence[SAEEntry]) -> None:
    """Every SAE must name a site the model has, of the SAE's width (SaelabError naming it)."""
    from saelab.interventions.splice import bind_saes

    for e in entries:
        if e.sae.cfg.site is None:
            raise SaelabError(f"SAE {e.name} records no site (cfg.json metadata 'site' or "
                              "hook_name); evaluate it alone with `saelab eval --site`.")
        try:
            bind_saes(lm.arch, e.sae)
        except SaelabError as err:
            raise type(err)(f"SAE {e.name} ({e.path}): {err}") from None


def run_suite(lm: Any, entries: Sequence[SAEEntry] | Mapping[str, tuple[Any, Any]],
              out: str | os.PathLike, config: SuiteConfig = SuiteConfig(), *, suite: str = "all",
              on_stage: Callable[[str], None] | None = None) -> dict:
    """Run the suite's metrics on every SAE; write suite.json/.parquet and report.html.

    entries: SAEEntry list, or {name: (SAE, folder or None)}. Raises SaelabError for an
    empty list, an unknown suite, or an SAE at a site the model lacks (before any work).
    """
    if isinstance(entries, Mapping):
        entries = [SAEEntry(n, s, None if p is None else Path(p)) for n, (s, p) in entries.items()]
    if not entries:
        raise SaelabError("no SAE given; pass one or more SAE folders.")
    names = suite_metrics(suite)
    check_sites(lm, entries)
    started = time.perf_counter()
    ctx = SuiteContext(lm, config, Path(out), list(entries))
    ctx.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for e in entries:
        metrics: dict[str, dict] = {}
        seconds = {}
        for name in names:
            if on_stage:
                on_stage(f"{e.name}: {name}")
            t0 = time.perf_counter()
            metrics |= METRICS[name](ctx, e)
            seconds[name] = round(time.perf_counter() - t0, 2)
        meta = e.sae.cfg.metadata
        rows.append({"sae": e.name, "path": None if e.path is None else str(e.path),
                     "architecture": meta.get("trained_architecture", e.sae.cfg.architecture),
                     "d_sae": e.sae.cfg.d_sae, "k": e.sae.cfg.k or meta.get("batchtopk_k"),
                     "site": e.sae.cfg.site, "metrics": metrics, "seconds": seconds})
    result = {"schema": SCHEMA, "suite": names, "config": config.to_json(),
              "model": ctx.lm.provenance(), "saes": rows, "notes": ctx.notes,
              "lower_is_better": sorted(LOWER_IS_BETTER),
              "wall_time_s": round(time.perf_counter() - started, 2)}
    write_suite(result, ctx.out)
    return result


def long_rows(result: dict) -> list[dict]:
    """One row per SAE and metric (the parquet table)."""
    out = []
    for r in result["saes"]:
        l0 = (r["metrics"].get("l0") or {}).get("value")
        for metric, m in r["metrics"].items():
            ci = m.get("ci95") or [None, None]
            out.append({"sae": r["sae"], "architecture": r["architecture"], "d_sae": r["d_sae"],
                        "site": r["site"], "l0": l0, "metric": metric, "value": m.get("value"),
                        "ci_low": ci[0], "ci_high": ci[1]})
    return out


def write_suite(result: dict, out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from saelab.atomic import atomic_write_text
    from saelab.report.html import write_page
    from saelab.report.suite import render_suite

    rows = long_rows(result)
    cols = ("sae", "architecture", "d_sae", "site", "l0", "metric", "value", "ci_low", "ci_high")
    table = pa.table({c: [r[c] for r in rows] for c in cols})
    tmp = out / ".suite.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out / "suite.parquet")
    atomic_write_text(out / "suite.json", json.dumps(_finite(result), indent=1) + "\n")
    write_page(out / "report.html", render_suite(result))


def _finite(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    return obj
