"""The report pages of `saelab eval` and `saelab compare`, rendered from their JSON alone.

    html = render_eval(json.loads(Path("run/eval.json").read_text()))
    html = render_compare(json.loads(Path("run/compare.json").read_text()))

Nothing here needs torch or the model: a report can be rebuilt from a run folder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from saelab.report import plots
from saelab.report.html import (
    Markup,
    esc,
    figures,
    fmt,
    image,
    key_values,
    notes,
    page,
    paragraph,
    section,
    table,
)

# (group, metric key) in the order the summary shows them.
GROUPS = {
    "Sparsity": ("l0", "dead_fraction", "dense_fraction"),
    "Reconstruction": ("fvu", "explained_variance", "mse", "mse_per_dim", "cosine"),
    "Shrinkage": ("l2_ratio", "relative_reconstruction_bias", "norm_in", "norm_out"),
    "Downstream": ("ce_clean", "ce_sae", "ce_zero", "ce_mean", "delta_ce", "loss_recovered",
                   "loss_recovered_mean", "kl_sae", "kl_zero", "kl_mean", "kl_score",
                   "kl_score_mean"),
}


def _ci(entry: Mapping) -> Markup:
    ci = entry.get("ci95")
    return esc("–" if not ci else f"[{fmt(ci[0])}, {fmt(ci[1])}]")


def summary_table(result: Mapping) -> Markup:
    metrics, definitions = result.get("metrics", {}), result.get("definitions", {})
    feats = result.get("features", {})
    rows = []
    for group, keys in GROUPS.items():
        for key in keys:
            if key in metrics:
                entry = metrics[key]
            elif key in feats:
                entry = {"value": feats[key], "ci95": None}
            else:
                continue
            rows.append([group, Markup(f"<code>{esc(key)}</code>"), _num(entry.get("value")),
                         _ci(entry), Markup(f'<span class="def">{esc(definitions.get(key, ""))}'
                                            "</span>")])
    return table(rows, header=["group", "metric", "value", "95% CI", "definition"])


def _num(value: object) -> object:
    return float("nan") if value is None else value


def eval_figures(result: Mapping) -> Markup:
    feats = result.get("features", {})
    images = []
    hist = feats.get("log10_density_histogram")
    if hist:
        images.append(image(plots.histogram(
            hist["edges"], hist["counts"], title="Feature density (features that fired)",
            xlabel="log10 fraction of tokens a feature fires on", ylabel="features",
            marker=math.log10(feats.get("dense_threshold", 0.1)), marker_label="dense threshold",
            note=f"dead: {feats.get('n_dead', 0):,} of {feats.get('n_features', 0):,}"),
            "log10 feature density histogram"))
    l0 = feats.get("l0_histogram")
    if l0 and len(l0["l0"]):
        edges = [v - 0.5 for v in l0["l0"]] + [l0["l0"][-1] + 0.5]
        images.append(image(plots.histogram(edges, l0["counts"], title="Active features per token",
                                            xlabel="L0", ylabel="tokens"), "L0 histogram"))
    cos = feats.get("cosine_histogram")
    if cos:
        images.append(image(plots.histogram(cos["edges"], cos["counts"], title="cos(x, x̂) per token",
                                            xlabel="cosine", ylabel="tokens", log_y=True),
                            "cosine histogram"))
    metrics = result.get("metrics", {})
    variants = [(label, key) for label, key in (("clean", "ce_clean"), ("SAE", "ce_sae"),
                                                ("mean abl.", "ce_mean"), ("zero abl.", "ce_zero"))
                if key in metrics]
    if variants:
        values = [_num(metrics[k]["value"]) for _, k in variants]
        intervals = [tuple(metrics[k]["ci95"]) if metrics[k].get("ci95") else None
                     for _, k in variants]
        images.append(image(plots.point_chart([label for label, _ in variants], values,
                                            intervals=intervals, title="Next-token cross-entropy",
                                            ylabel="nats"), "cross-entropy by variant"))
    return figures(*images)


def render_eval(result: Mapping) -> str:
    """The HTML report of one `evaluate` result (the eval.json dict)."""
    sae, data, model = result.get("sae", {}), result.get("data", {}), result.get("model", {})
    title = f"SAE evaluation: {sae.get('architecture', '?')} at {sae.get('site', '?')}"
    subtitle = (f"{fmt(sae.get('d_sae'))} features, d_in {fmt(sae.get('d_in'))} · model "
                f"{model.get('model', '?')} · {fmt(data.get('tokens_evaluated'))} tokens of "
                f"{data.get('corpus', '?')} in {fmt(data.get('n_contexts'))} contexts")
    boot = result.get("bootstrap", {})
    body = [notes(result.get("notes", [])),
            section("Summary", summary_table(result),
                    paragraph(boot.get("method_text", ""), cls="def")),
            section("Figures", eval_figures(result)),
            section("SAE", key_values(sae)),
            section("Model", key_values(model)),
            section("Data", key_values(data)),
            section("Settings", key_values({**result.get("settings", {}),
                                            "wall_time_s": result.get("wall_time_s")})),
            section("Definitions", key_values(result.get("definitions", {})))]
    return page(title, Markup("".join(body)), subtitle=subtitle)


def render_compare(result: Mapping) -> str:
    """The HTML report of one `compare` result (the compare.json dict)."""
    a, b = result.get("a", {}), result.get("b", {})
    rows = [["MCS (A → B)", result.get("mcs")], ["MCS (B → A)", result.get("mcs_reverse")],
            ["features in A", result.get("n_features_a")],
            ["features in B", result.get("n_features_b")]]
    rows += [[f"fraction of A with max cos > {t}", v]
             for t, v in result.get("frac_above", {}).items()]
    match = result.get("matching")
    if match:
        rows += [["one-to-one matching: mean cos", match.get("mean_cos")],
                 ["one-to-one matching: pairs", match.get("n_pairs")]]
        rows += [[f"matched pairs with cos > {t}", v]
                 for t, v in match.get("frac_above", {}).items()]
    body = [notes(result.get("notes", [])), section("Summary", table(rows, ["", "value"]))]
    hist = result.get("max_cos_histogram")
    if hist:
        body.append(section("Figures", figures(image(plots.histogram(
            hist["edges"], hist["counts"], title="Max cosine of each A feature with B",
            xlabel="max cosine", ylabel="features"), "max cosine histogram"))))
    body += [section("A", key_values(a)), section("B", key_values(b)),
             section("Definitions", key_values(result.get("definitions", {})))]
    return page("Dictionary comparison", Markup("".join(body)),
                subtitle=f"A = {a.get('path', '?')} · B = {b.get('path', '?')}")
