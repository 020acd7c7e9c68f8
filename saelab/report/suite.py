"""The suite page: one table of every metric for every SAE, and each metric against L0.

Reads the suite.json dict only (no torch), like the other report pages.
"""

from __future__ import annotations

from collections.abc import Mapping

from saelab.report.html import (
    Markup,
    esc,
    figures,
    fmt,
    image,
    notes,
    page,
    paragraph,
    section,
    table,
)
from saelab.report.plots import COLOR, new_figure, to_png

MARKERS = "osD^vP*X"


def cell(m: Mapping | None) -> Markup:
    if not m or m.get("value") is None:
        return Markup("–")
    ci = m.get("ci95")
    text = fmt(m["value"]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")
    return Markup(esc(text))


def metric_names(result: Mapping) -> list[str]:
    names: list[str] = []
    for r in result["saes"]:
        names += [m for m in r["metrics"] if m not in names]
    return names


def metric_plot(result: Mapping, metric: str) -> bytes | None:
    """PNG of `metric` against L0, one point per SAE with its 95% interval, shaped by architecture."""
    points = []  # (row, L0, metric entry); rows are numbered #1.. as in the table
    for i, r in enumerate(result["saes"]):
        m, l0 = r["metrics"].get(metric), (r["metrics"].get("l0") or {}).get("value")
        if m and m.get("value") is not None and l0 is not None:
            points.append(({**r, "n": i + 1}, l0, m))
    if not points:
        return None
    fig = new_figure((4.2, 3.0))
    ax = fig.add_subplot()
    archs = sorted({r["architecture"] for r, _, _ in points})
    for i, arch in enumerate(archs):
        sel = [(r, x, m) for r, x, m in points if r["architecture"] == arch]
        xs = [x for _, x, _ in sel]
        ys = [m["value"] for _, _, m in sel]
        err = [[max(0.0, m["value"] - m["ci95"][0]) if m.get("ci95") else 0 for _, _, m in sel],
               [max(0.0, m["ci95"][1] - m["value"]) if m.get("ci95") else 0 for _, _, m in sel]]
        ax.errorbar(xs, ys, yerr=err, fmt=MARKERS[i % len(MARKERS)], capsize=3, label=arch,
                    color=None if len(archs) > 1 else COLOR)
        for (r, x, m) in sel:
            ax.annotate(f"#{r['n']}", (x, m["value"]), fontsize=7, alpha=0.8,
                        xytext=(3, 3), textcoords="offset points")
    better = "lower" if metric in result.get("lower_is_better", ()) else "higher"
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} ({better} is better)", fontsize=9)
    ax.legend(fontsize=7)
    return to_png(fig)


def render_suite(result: Mapping) -> str:
    names = metric_names(result)
    header = ["#", "SAE", "architecture", "width", "k", "site", *names]
    rows = [[i + 1, r["sae"], r["architecture"], r["d_sae"], r["k"] if r["k"] is not None else "–",
             r["site"], *[cell(r["metrics"].get(n)) for n in names]]
            for i, r in enumerate(result["saes"])]
    plots = [image(png, f"{n} against L0") for n in names if n != "l0"
             if (png := metric_plot(result, n)) is not None]
    cfg = result["config"]
    body = Markup(
        section("Every metric, 95% intervals", table(rows, header),
                paragraph("Intervals: reconstruction and downstream metrics resample contexts "
                          "(percentile bootstrap); the embedding AUROC resamples features. "
                          f"Lower is better for {', '.join(result.get('lower_is_better', []))}; "
                          "higher for the rest. embedding_auroc_control scores each feature with "
                          "another feature's explanation (about 0.5 expected).", "def"))
        + section("Each metric against L0", figures(*plots))
        + section("Settings", table([[k, str(v)] for k, v in cfg.items()], ["setting", "value"]))
        + (section("Notes", notes(result["notes"])) if result.get("notes") else Markup("")))
    model = result.get("model", {}).get("model", "")
    return page(f"SAE suite: {len(result['saes'])} SAEs", body,
                subtitle=f"model {model}; suite {', '.join(result['suite'])}")
