"""The graph stage's numbers (see lists_graph.py): does zeroing the graph-chosen transcoder
features change list length more than zeroing the attribution-chosen ones?

Per list and arm the effect is ablated minus the unablated regeneration (same prefix,
same seed), on distinct items (the study's measure: a looping list adds items but no
new ones) and on all items. The comparison is paired: per list, graph minus
attribution (the control cancels), with a 95% bootstrap interval of its mean.
"More" means a larger signed Δ, the direction in which removing features that push
the list to end should move it (longer lists); the verdict says "more" only when the
interval of the paired difference lies above 0.
"""

from __future__ import annotations

from typing import Any

from saelab.studies.lists_data import distinct_items
from saelab.studies.stats import mean_stat

MEASURES = ("distinct_items", "n_items")
ARMS = ("graph", "attribution", "random")


def _measure(record: dict, key: str) -> int:
    return distinct_items(record["items"]) if key == "distinct_items" else record["n_items"]


def graph_verdict(diff: dict, n: int) -> dict:
    """{"more": bool, "text": the one-line verdict} from the paired difference's stat."""
    mean, ci = diff.get("mean"), diff.get("ci95")
    more = bool(ci is not None and ci[0] > 0)
    if mean is None:
        number = "no list to compare"
    else:
        interval = f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else " (no interval from one list)"
        number = f"difference {mean:+.2f}{interval} distinct items, graph − attribution, over {n} lists"
    return {"more": more, "text": f"graph-chosen features change list length "
                                  f"{'more' if more else 'not more'} than attribution-chosen ones ({number})",
            "rule": "more when the 95% bootstrap interval of the paired difference of Δdistinct "
                    "items (graph − attribution) lies above 0"}


def graph_summary(cfg: Any, gcfg: Any, choices: list[dict], log: Any) -> dict:
    """The `results["graph"]` dict: per-arm effects, the paired difference, the verdict."""
    boot = {"n_boot": cfg.bootstrap, "seed": cfg.seed}
    deltas: dict[str, dict[str, list[int]]] = {arm: {m: [] for m in MEASURES} for arm in ARMS}
    for c in choices:
        base = log.get(("control", c["index"]))
        for arm in ARMS:
            new = log.get((arm, c["index"]))
            for m in MEASURES:
                deltas[arm][m].append(_measure(new, m) - _measure(base, m))
    paired = {m: [g - a for g, a in zip(deltas["graph"][m], deltas["attribution"][m], strict=True)]
              for m in MEASURES}
    difference = {m: mean_stat(v, **boot) for m, v in paired.items()}
    scores = {k: mean_stat([c["stats"][k] for c in choices], **boot)
              for k in ("replacement_score", "completeness_score")}
    return {
        "n_examples": len(choices), "top_n": cfg.ablate, "every_step": cfg.ablate_every_step,
        "token_limit": cfg.regen_max_new_tokens,
        "settings": {"transcoders": gcfg.transcoders, "examples": gcfg.examples,
                     "max_features": gcfg.max_features, "node_threshold": gcfg.node_threshold,
                     "edge_threshold": gcfg.edge_threshold},
        "arms": {arm: {m: mean_stat(deltas[arm][m], **boot) for m in MEASURES} for arm in ARMS},
        "difference": difference,
        "verdict": graph_verdict(difference["distinct_items"], len(choices)),
        "cap_hits": {cond: sum(log.get((cond, c["index"]))["ending"] == "length" for c in choices)
                     for cond in ("control", *ARMS)},
        "overlap": mean_stat([c["overlap"] for c in choices], **boot),
        "scores": scores,
        "graph_seconds": sum(c["stats"]["seconds"] for c in choices),
        "lists": [{"index": c["index"], "topic": c["topic"], "graph": c["folder"],
                   "metric": c["metric"], "active_features": c["active_features"],
                   "pruned_features": c["pruned_features"], "overlap": c["overlap"],
                   **{f"Δ{arm}": deltas[arm]["distinct_items"][i] for arm in ARMS},
                   "graph_attribution_sum": sum(p["attribution"] for p in c["graph"]),
                   "attribution_sum": sum(p["attribution"] for p in c["attribution"])}
                  for i, c in enumerate(choices)],
    }
