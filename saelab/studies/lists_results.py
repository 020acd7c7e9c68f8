"""The list study's numbers and maps, computed from its saved stages (see lists.py).

Effects are per example: ablated minus the unablated regeneration from the
same prefix with the same seed, so sampling noise common to both cancels. The
original's verdict ("an SAE whose ablation adds fewer than 1 item on average is
not effective") is computed here from the top-N condition, with the random-N
control and the bootstrap interval beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from saelab.studies.embeddings import SentenceEmbedder
from saelab.studies.lists_data import ENDINGS, entropy
from saelab.studies.stats import mean_stat

EFFECT_RULE = "mean Δn_items of the top-N ablation >= 1 item (the original's rule)"


def summarize(cfg: Any, out: Path, sm: Any, dataset: list[dict], saes: dict[str, tuple[Any, Path]],
              attrs: dict[str, Any], metric_name: str, reason: str, ablation: Any,
              dashboards: dict[str, dict]) -> dict:
    """The `results` dict of the report (schema in lists_report.py)."""
    from saelab.studies.lists import attributed
    from saelab.studies.lists_ablation import ablation_examples

    boot = {"n_boot": cfg.bootstrap, "seed": cfg.seed}
    embedder = SentenceEmbedder.find() if cfg.embed_diversity else None
    rows = attributed(cfg, dataset)
    results = {
        "model": sm.lm.name, "preset": cfg.preset, "out": str(out),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
        "dataset": _dataset(cfg, dataset, boot),
        "metric": _metric(sm, attrs, metric_name, reason, boot),
        "saes": {},
        "examples": [],
    }
    examples = ablation_examples(cfg, dataset)
    attr = attrs[metric_name]
    tok = sm.lm.tokenizer
    for site, (_, folder) in saes.items():
        deltas = _deltas(ablation, site, examples, embedder)
        entry = {
            "site": site, "path": str(folder),
            "dashboard": dashboards.get(site, {}).get("dashboard"),
            "error_share": mean_stat(_error_share(attr, site), **boot),
            "top_features": _top_features(attr, site, cfg, dashboards.get(site)),
            "maps": _maps(attr, site, rows, out, cfg),
            "ablation": {"n_examples": len(examples), "top_n": cfg.ablate,
                         "every_step": cfg.ablate_every_step,
                         **{cond: {k: (mean_stat(v, **boot) if v is not None else None)
                                   for k, v in deltas[cond].items()} for cond in ("top", "random")}},
            "per_topic": _per_topic(deltas, examples, boot),
        }
        top = entry["ablation"]["top"]["n_items"]
        rand = entry["ablation"]["random"]["n_items"]
        mean = top["mean"] if top["mean"] is not None else float("nan")
        entry["verdict"] = {
            "effective": bool(mean >= 1), "rule": EFFECT_RULE, "mean_delta_items": mean,
            "ci_excludes_zero": bool(top["ci95"] and (top["ci95"][0] > 0 or top["ci95"][1] < 0)),
            "beats_random": bool(rand["mean"] is not None and mean > rand["mean"])}
        results["saes"][site] = entry
        results["examples"] += _examples(ablation, site, examples, deltas, tok)
    return results


def _dataset(cfg: Any, dataset: list[dict], boot: dict) -> dict:
    templates = {}
    for t in cfg.templates:
        templates[t] = mean_stat([r["n_items"] for r in dataset if r["template"] == t], **boot)
    contrast = None
    if "long" in templates and "short" in templates:
        # per topic and sample, long minus short: the pairing removes the topic's own effect
        by_key = {(r["template"], r["topic"], r["sample"]): r["n_items"] for r in dataset}
        diffs = [by_key[("long", t, s)] - by_key[("short", t, s)]
                 for t in cfg.topics for s in range(cfg.samples)]
        contrast = {"name": "long - short", **mean_stat(diffs, **boot)}
    endings = {t: {e: sum(r["ending"] == e for r in dataset if r["template"] == t) for e in ENDINGS}
               for t in cfg.templates}
    return {"n": len(dataset), "samples": cfg.samples, "templates": templates, "contrast": contrast,
            "endings": endings}


def _metric(sm: Any, attrs: dict[str, Any], name: str, reason: str, boot: dict) -> dict:
    tok = sm.lm.tokenizer
    tokens = sm.tokens
    return {"name": name, "reason": reason,
            "tokens": {"whitespace": None if tokens.whitespace is None else repr(tok.decode([tokens.whitespace])),
                       "line_break": repr(tok.decode([tokens.line_break])),
                       "end_of_turn": repr(tok.decode([tokens.end_of_turn]))},
            "values": {k: mean_stat(a.metric.tolist(), **boot) for k, a in attrs.items()}}


def _error_share(attr: Any, site: str) -> list[float]:
    """Per example |error attribution| / (|features| + |error|), summed over positions."""
    totals = attr.totals()[site]
    feats, err = totals["features"].abs().numpy(), totals["error"].abs().numpy()
    den = feats + err
    return [float(e / d) for e, d in zip(err, den, strict=True) if d > 0]


def _top_features(attr: Any, site: str, cfg: Any, dash: dict | None) -> list[dict]:
    from saelab.studies.lists_maps import top_features

    link = dash["dashboard"] if dash else None
    shown = set(dash["features"]) if dash else set()
    return [{"feature": f, "examples": n, "attribution": total,
             "dashboard": f"{link}#f{f}" if link and f in shown else None}
            for f, n, total in top_features(attr, site, cfg.top_pairs, skip_first=cfg.skip_first, limit=20)]


def _maps(attr: Any, site: str, rows: list[dict], out: Path, cfg: Any) -> dict:
    from saelab.studies.lists_maps import (
        clustered_heatmap,
        feature_matrix,
        top_features,
        topic_heatmap,
    )

    feats = [f for f, _, _ in top_features(attr, site, cfg.top_pairs, skip_first=cfg.skip_first, limit=60)]
    if not feats:
        return {}
    matrix = feature_matrix(attr, site, feats, skip_first=cfg.skip_first)
    labels = [f"f{f}" for f in feats]
    folder = out / "maps"
    folder.mkdir(exist_ok=True)
    stem = site.replace("/", "_")
    clustered = folder / f"{stem}_clustered.png"
    clustered.write_bytes(clustered_heatmap(
        matrix, labels, [f"{r['topic']} #{r['sample']}" for r in rows], [r["template"] for r in rows],
        title=f"{site}: max activation of the top features per list (min-max per feature)"))
    topics = folder / f"{stem}_topics.png"
    topics.write_bytes(topic_heatmap(matrix, labels, [r["topic"] for r in rows],
                                     title=f"{site}: share of a topic's lists where the feature is active"))
    return {"clustered": f"maps/{clustered.name}", "topics": f"maps/{topics.name}"}


def _deltas(ablation: Any, site: str, examples: list[dict], embedder: Any) -> dict[str, dict]:
    """Per condition, per example (in `examples` order): ablated minus control."""
    out = {}
    for cond in ("top", "random"):
        d = {"n_items": [], "diversity": [], "embed_diversity": [] if embedder else None}
        for r in examples:
            base = ablation.get(("-", "control", r["index"]))
            new = ablation.get((site, cond, r["index"]))
            d["n_items"].append(new["n_items"] - base["n_items"])
            d["diversity"].append(entropy(new["items"]) - entropy(base["items"]))
            if embedder:
                a, b = embedder.diversity(new["items"]), embedder.diversity(base["items"])
                d["embed_diversity"].append(None if a is None or b is None else a - b)
        out[cond] = d
    return out


def _per_topic(deltas: dict, examples: list[dict], boot: dict) -> dict:
    topics: dict[str, list[int]] = {}
    for i, r in enumerate(examples):
        topics.setdefault(r["topic"], []).append(i)
    return {topic: {cond: {k: mean_stat([deltas[cond][k][i] for i in idx], **boot)
                           for k in ("n_items", "diversity")} for cond in ("top", "random")}
            for topic, idx in topics.items()}


def _examples(ablation: Any, site: str, examples: list[dict], deltas: dict, tok: Any,
              shown: int = 4) -> list[dict]:
    """The lists whose top-N ablation changed the item count most, before and after."""
    order = np.argsort([-abs(d) for d in deltas["top"]["n_items"]], kind="stable")[:shown]
    out = []
    for i in order.tolist():
        r = examples[i]
        out.append({"sae": site, "example": r["index"], "topic": r["topic"], "template": r["template"],
                    "control": ablation.get(("-", "control", r["index"]))["items"],
                    "top": ablation.get((site, "top", r["index"]))["items"],
                    "random": ablation.get((site, "random", r["index"]))["items"]})
    return out
