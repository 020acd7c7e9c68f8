"""The list study's numbers and maps, computed from its saved stages (see lists.py).

Effects are per example: ablated minus the unablated regeneration from the
same prefix with the same seed, so sampling noise common to both cancels. The
original's verdict ("an SAE whose ablation adds fewer than 1 item on average is
not effective") is computed here from the top-N condition on *distinct* items,
with the random-N control and the bootstrap interval beside it: an ablated list
that loops ("Andes" x 30) until the token limit adds items but no new ones, so
n_items alone overstates the effect. Lists cut off by the token limit ("cap
hits") are counted beside every count, since their item count is censored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from saelab.studies.embeddings import SentenceEmbedder
from saelab.studies.lists_config import ablation_examples, attributed
from saelab.studies.lists_data import ENDINGS, distinct_items, entropy
from saelab.studies.lists_maps import (
    clustered_heatmap,
    feature_density,
    feature_matrix,
    top_features,
)
from saelab.studies.stats import mean_stat

EFFECT_RULE = ("mean Δdistinct items of the top-N ablation >= 1 (the original's rule of >= 1 "
               "more item, counting a repeated item once)")


def summarize(cfg: Any, out: Path, sm: Any, dataset: list[dict], saes: dict[str, tuple[Any, Path]],
              attrs: dict[str, Any], metric_name: str, reason: str, ablation: Any,
              dashboards: dict[str, dict]) -> dict:
    """The `results` dict of the report (schema in lists_report.py)."""
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
        density = feature_density(attr, site, cfg.skip_first)
        dense = int((density > cfg.max_density).sum()) if cfg.max_density is not None else 0
        entry = {
            "site": site, "path": str(folder),
            "dashboard": dashboards.get(site, {}).get("dashboard"),
            "lists_dashboard": dashboards.get(site, {}).get("lists_dashboard"),
            "error_share": mean_stat(_error_share(attr, site), **boot),
            "density": {"max_density": cfg.max_density, "excluded": dense,
                        "positions": "attributed lists' tokens at positions >= skip_first"},
            "top_features": _top_features(attr, site, cfg, dashboards.get(site), density),
            "maps": _maps(attr, site, rows, out, cfg, density),
            "ablation": {"n_examples": len(examples), "top_n": cfg.ablate,
                         "every_step": cfg.ablate_every_step,
                         "token_limit": cfg.regen_max_new_tokens,
                         "cap_hits": _cap_hits(ablation, site, examples),
                         **{cond: {k: (mean_stat(v, **boot) if v is not None else None)
                                   for k, v in deltas[cond].items()} for cond in ("top", "random")}},
            "per_topic": _per_topic(deltas, examples, boot),
        }
        entry["verdict"] = verdict(entry["ablation"])
        results["saes"][site] = entry
        results["examples"] += _examples(ablation, site, examples, deltas, tok)
    return results


def verdict(ab: dict) -> dict:
    """The original's rule on distinct items, with the interval and the random control."""
    top, rand = ab["top"]["distinct_items"], ab["random"]["distinct_items"]
    mean = top["mean"] if top["mean"] is not None else float("nan")
    items = ab["top"]["n_items"]["mean"]
    return {"effective": bool(mean >= 1), "rule": EFFECT_RULE, "mean_delta_distinct": mean,
            "mean_delta_items": items,
            "ci_excludes_zero": bool(top["ci95"] and (top["ci95"][0] > 0 or top["ci95"][1] < 0)),
            "beats_random": bool(rand["mean"] is not None and mean > rand["mean"])}


def _cap_hits(ablation: Any, site: str, examples: list[dict]) -> dict[str, int]:
    """Regenerations cut off by the token limit, per condition (control: the unablated one)."""
    keys = {"control": "-", "top": site, "random": site}
    return {cond: sum(ablation.get((name, cond, r["index"]))["ending"] == "length" for r in examples)
            for cond, name in keys.items()}


def _dataset(cfg: Any, dataset: list[dict], boot: dict) -> dict:
    templates, distinct, caps = {}, {}, {}
    for t in cfg.templates:
        rows = [r for r in dataset if r["template"] == t]
        templates[t] = mean_stat([r["n_items"] for r in rows], **boot)
        distinct[t] = mean_stat([distinct_items(r["items"]) for r in rows], **boot)
        caps[t] = {"lists": len(rows), "cap_hits": sum(r["ending"] == "length" for r in rows),
                   "token_limit": cfg.token_limit(t)}
    contrast = None
    if "long" in templates and "short" in templates:
        # per topic and sample, long minus short: the pairing removes the topic's own effect
        by_key = {(r["template"], r["topic"], r["sample"]): r for r in dataset}
        pairs = [(by_key[("long", t, s)], by_key[("short", t, s)])
                 for t in cfg.topics for s in range(cfg.samples)]
        ended = [(a, b) for a, b in pairs if "length" not in (a["ending"], b["ending"])]
        contrast = {"name": "long - short", **mean_stat([a["n_items"] - b["n_items"] for a, b in pairs], **boot),
                    "distinct": mean_stat([distinct_items(a["items"]) - distinct_items(b["items"])
                                           for a, b in pairs], **boot),
                    # A capped list's count is a lower bound: a pair with one is censored. The
                    # contrast over the pairs where both lists ended is the uncensored one.
                    "censored_pairs": len(pairs) - len(ended),
                    "uncensored": mean_stat([distinct_items(a["items"]) - distinct_items(b["items"])
                                             for a, b in ended], **boot)}
    endings = {t: {e: sum(r["ending"] == e for r in dataset if r["template"] == t) for e in ENDINGS}
               for t in cfg.templates}
    return {"n": len(dataset), "samples": cfg.samples, "templates": templates,
            "distinct": distinct, "caps": caps, "contrast": contrast, "endings": endings}


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


def _top_features(attr: Any, site: str, cfg: Any, dash: dict | None, density: Any) -> list[dict]:
    """The top features with their firing fraction on the lists (and on the corpus, when its
    dashboard was built) beside their attribution; dense ones left out with max_density."""
    link = dash["dashboard"] if dash else None
    lists_link = dash.get("lists_dashboard") if dash else None
    shown = set(dash["features"]) if dash else set()
    corpus = (dash or {}).get("corpus_density") or {}
    return [{"feature": f, "examples": n, "attribution": total, "density": float(density[f]),
             "corpus_density": corpus.get(f),
             "dashboard": f"{link}#f{f}" if link and f in shown else None,
             "lists_dashboard": f"{lists_link}#f{f}" if lists_link and f in shown else None}
            for f, n, total in top_features(attr, site, cfg.top_pairs, skip_first=cfg.skip_first,
                                            limit=20, exclude=_dense(cfg, density))]


def _dense(cfg: Any, density: Any) -> set[int]:
    if cfg.max_density is None:
        return set()
    return set(np.flatnonzero(density > cfg.max_density).tolist())


def _maps(attr: Any, site: str, rows: list[dict], out: Path, cfg: Any, density: Any) -> dict:
    """The clustered features x lists map. (A features x topics map was dropped: the top
    features are active in nearly every list of every topic, so it was a flat block.)"""
    feats = [f for f, _, _ in top_features(attr, site, cfg.top_pairs, skip_first=cfg.skip_first,
                                            limit=60, exclude=_dense(cfg, density))]
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
    return {"clustered": f"maps/{clustered.name}"}


def _deltas(ablation: Any, site: str, examples: list[dict], embedder: Any) -> dict[str, dict]:
    """Per condition, per example (in `examples` order): ablated minus control."""
    out = {}
    for cond in ("top", "random"):
        d = {"n_items": [], "distinct_items": [], "diversity": [],
             "embed_diversity": [] if embedder else None}
        for r in examples:
            base = ablation.get(("-", "control", r["index"]))
            new = ablation.get((site, cond, r["index"]))
            d["n_items"].append(new["n_items"] - base["n_items"])
            d["distinct_items"].append(distinct_items(new["items"]) - distinct_items(base["items"]))
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
                           for k in ("n_items", "distinct_items")} for cond in ("top", "random")}
            for topic, idx in topics.items()}


def _examples(ablation: Any, site: str, examples: list[dict], deltas: dict, tok: Any,
              shown: int = 4) -> list[dict]:
    """The lists whose top-N ablation changed the item count most, before and after."""
    order = np.argsort([-abs(d) for d in deltas["top"]["distinct_items"]], kind="stable")[:shown]
    out = []
    for i in order.tolist():
        r = examples[i]
        out.append({"sae": site, "example": r["index"], "topic": r["topic"], "template": r["template"],
                    "control": ablation.get(("-", "control", r["index"]))["items"],
                    "top": ablation.get((site, "top", r["index"]))["items"],
                    "random": ablation.get((site, "random", r["index"]))["items"]})
    return out
