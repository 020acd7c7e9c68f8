"""DIR/report.html: a scope's metrics against depth, its L0–ΔCE trade-offs and its costs.

As in the Gemma Scope technical report: each metric against layer, one panel per
metric and one line per site kind (and width, target L0); ΔCE against the measured
L0, one line per layer, for each site kind; the wall time of each stage beside the
machine's measured matmul rates. Reads only the index (no torch), like report/.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from saelab.report import html as h
from saelab.report.plots import new_figure, to_png
from saelab.scope.layout import METRICS, Scope

REPORT = "report.html"
_LABELS = {"l0": "L0 (mean active latents)", "fvu": "FVU", "delta_ce": "ΔCE (nats)",
           "loss_recovered": "loss recovered", "kl": "KL(clean ‖ spliced), nats",
           "dead_frac": "dead fraction", "dense_frac": "dense fraction",
           "delta_ce_all": "ΔCE, every MLP replaced (nats)"}


def _series(scope: Scope) -> dict[tuple[str, int, float], list]:
    """(site kind, width, target) -> entries by layer."""
    out: dict[tuple[str, int, float], list] = defaultdict(list)
    for e in scope.entries:
        out[(e.site_kind, e.width, e.target_l0)].append(e)
    return {k: sorted(v, key=lambda e: e.layer) for k, v in out.items()}


def metric_vs_depth(scope: Scope, metric: str) -> bytes:
    fig = new_figure()
    ax = fig.add_subplot()
    series = _series(scope)
    for (kind, width, target), entries in series.items():
        layers = [e.layer for e in entries]
        values = np.array([e.metrics.get(metric, np.nan) for e in entries], dtype=float)
        label = kind if len(series) <= 3 else f"{kind} w{width} L0→{target:g}"
        line = ax.plot(layers, values, "o-", markersize=3, linewidth=1, label=label)[0]
        lo = [e.metrics.get(f"{metric}_lo") for e in entries]
        hi = [e.metrics.get(f"{metric}_hi") for e in entries]
        if all(v is not None for v in lo + hi):
            ax.fill_between(layers, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(title=f"{_LABELS[metric]} by layer", xlabel="layer", ylabel=_LABELS[metric])
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=7)
    return to_png(fig)


def tradeoff(scope: Scope, kind: str) -> bytes:
    """ΔCE against measured L0 for one site kind: one line per layer (and width)."""
    fig = new_figure()
    ax = fig.add_subplot()
    by_layer: dict[tuple[int, int], list] = defaultdict(list)
    for e in scope.entries:
        if e.site_kind == kind:
            by_layer[(e.layer, e.width)].append(e)
    n = max(scope.n_layers - 1, 1)
    cmap = __import__("matplotlib").colormaps["viridis"]
    for (layer, _width), entries in sorted(by_layer.items()):
        entries.sort(key=lambda e: e.average_l0)
        ax.plot([e.average_l0 for e in entries], [e.metrics.get("delta_ce", np.nan) for e in entries],
                "o-", markersize=3, linewidth=1, color=cmap(layer / n))
    sm = __import__("matplotlib").cm.ScalarMappable(cmap=cmap)
    sm.set_clim(0, n)
    fig.colorbar(sm, ax=ax, label="layer")
    ax.set(title=f"{kind}: ΔCE against L0, one line per layer", xlabel="measured L0",
           ylabel="ΔCE (nats)")
    ax.grid(alpha=0.3)
    return to_png(fig)


def stage_costs(scope: Scope) -> bytes:
    fig = new_figure()
    ax = fig.add_subplot()
    names = list(scope.stages)
    secs = [scope.stages[n] for n in names]
    ax.barh(names, secs, color="#3b6ea5")
    for i, s in enumerate(secs):
        ax.annotate(f"{s:,.0f} s", (s, i), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set(title="wall time per stage", xlabel="seconds")
    return to_png(fig)


def render_report(scope: Scope) -> str:
    ok = [e for e in scope.entries if e.status == "ok"]
    bad = [e for e in scope.entries if e.status != "ok"]
    view = Scope(**{**scope.__dict__, "entries": ok})
    parts = []
    rates = (scope.machine or {}).get("matmul_gflops", {})
    total = sum(scope.stages.values())
    cost_rows = [[n, f"{s:,.1f}", f"{s / total:.0%}" if total else ""]
                 for n, s in scope.stages.items()]
    parts.append(h.section(
        "Cost", h.figures(h.image(stage_costs(scope), "wall time per stage")),
        h.table(cost_rows + [["total", f"{total:,.1f}", ""]], ["stage", "seconds", "share"]),
        h.paragraph("Measured matmul rate of this machine ([4096, 576] × [576, 2304]): "
                    + ", ".join(f"{k} {v:,.1f} GFLOP/s" for k, v in rates.items())
                    + f"; device {scope.machine.get('device', '?')}, "
                    f"{scope.machine.get('threads', '?')} threads.")))
    # the metrics the scope has (a transcoder scope: no loss_recovered; ΔCE of all at once)
    shown = [m for m in (*METRICS, "delta_ce_all") if any(m in e.metrics for e in scope.entries)]
    if ok:
        parts.append(h.section("Metrics against depth", h.figures(
            *(h.image(metric_vs_depth(view, m), m) for m in shown if m != "delta_ce_all"))))
        kinds = list(dict.fromkeys(e.site_kind for e in ok))
        parts.append(h.section("L0–ΔCE trade-off per layer", h.figures(
            *(h.image(tradeoff(view, k), f"{k} trade-off") for k in kinds))))
    rows = [[e.id, e.site, e.arch, e.width, f"{e.target_l0:g}",
             *(h.fmt(e.metrics.get(m)) for m in shown), e.status] for e in scope.entries]
    what = "Transcoders" if scope.kind == "transcoder" else "SAEs"
    parts.append(h.section(what, h.table(rows, ["id", "site", "arch", "width", "target L0",
                                                *shown, "status"])))
    if bad:
        parts.append(h.notes([f"{e.id}: {e.status}" for e in bad]))
    parts.append(h.section("Settings", h.key_values({k: str(v) for k, v in scope.settings.items()})))
    return h.page(f"Scope of {scope.model}", h.Markup("".join(parts)),
                  subtitle=f"{len(scope.entries)} {what.lower()}, {scope.n_layers} layers, "
                           f"d_model {scope.d_model}")


def write_report(folder: str | Path, scope: Scope) -> Path:
    return h.write_page(Path(folder) / REPORT, render_report(scope))
