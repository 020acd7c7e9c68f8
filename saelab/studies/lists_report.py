"""The list study's HTML report, rendered from its `results` dict alone (no torch, no model).

    write_report(json.loads((out / "results.json").read_text()), out)   # -> out/report.html

The dict is the one `lists_results.summarize` builds (plus "seconds"); every key
below the top level is optional, and None/NaN numbers show as a dash. The maps
are PNG files under `out` and are inlined as data URIs, so the page is one
self-contained file; feature dashboards stay separate pages behind relative links.
Model output (list items) and user input (topics, paths, settings) is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
    write_page,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MEASURES = (("n_items", "Δn_items"), ("diversity", "Δdiversity"),
            ("embed_diversity", "Δembedding diversity"))
CONDITIONS = (("top", "top-N"), ("random", "random-N"))


def _ci(stat: Mapping | None) -> str:
    ci = (stat or {}).get("ci95")
    return "–" if not ci else f"[{fmt(_num(ci[0]))}, {fmt(_num(ci[1]))}]"


def _num(value: Any) -> float:
    """A table cell for a number that may be None (shown as a dash via NaN)."""
    return float("nan") if value is None else float(value)


def _mean_ci(stat: Mapping | None) -> str:
    return f"{fmt(_num((stat or {}).get('mean')))} {_ci(stat)}"


def _link(text: str, href: str | None) -> Markup:
    """A relative link, or plain text; anything with a scheme or absolute path is refused
    so a tampered results.json cannot point the page elsewhere."""
    if not href or ":" in href.split("#")[0] or href.startswith(("/", "\\")):
        return esc(text)
    return Markup(f'<a href="{esc(href)}">{esc(text)}</a>')


def _png(out: Path, rel: str | None, alt: str) -> Markup:
    """The PNG at out/rel inlined, or a note saying why not (only files inside `out`)."""
    if not rel:
        return Markup()
    path = (out / rel).resolve()
    if not path.is_relative_to(out.resolve()):
        return notes([f"map {rel} is outside the run folder; not shown"])
    if not path.is_file():
        return notes([f"map {rel} not found"])
    data = path.read_bytes()
    if not data.startswith(PNG_MAGIC):
        return notes([f"map {rel} is not a PNG"])
    return image(data, alt)


# ---------------------------------------------------------------- sections


def _run(results: Mapping) -> Markup:
    seconds = results.get("seconds") or {}
    rows: list[list[object]] = [[stage, _num(s)] for stage, s in seconds.items()]
    if rows:
        rows.append([Markup("<b>total</b>"), sum(_num(s) for s in seconds.values())])
    return section("Run",
                   table(rows, header=["stage", "seconds"]) if rows else Markup(),
                   key_values({k: _setting(v) for k, v in (results.get("config") or {}).items()}))


def _setting(value: Any) -> Any:
    """Lists (topics, sites) as comma-separated text rather than a Python repr."""
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return value


def _dataset(d: Mapping) -> Markup:
    templates = {t: s or {} for t, s in (d.get("templates") or {}).items()}
    parts = [paragraph(f"{fmt(d.get('n'))} lists sampled, {fmt(d.get('samples'))} per topic and "
                       "template. Items per list by template:")]
    parts.append(table([[t, s.get("n"), _num(s.get("mean")), _num(s.get("var")), _ci(s)]
                        for t, s in templates.items()],
                       header=["template", "lists", "mean items", "variance", "95% CI"]))
    contrast = d.get("contrast")
    if contrast:
        parts.append(paragraph(f"Template contrast {contrast.get('name', '')}: "
                               f"{_mean_ci(contrast)} items (paired by topic and sample)."))
    endings = d.get("endings") or {}
    kinds = list(dict.fromkeys(k for counts in endings.values() for k in counts))
    if endings:
        parts.append(paragraph("How the lists ended:"))
        parts.append(table([[t, *(counts.get(k, 0) for k in kinds)] for t, counts in endings.items()],
                           header=["template", *kinds]))
    means = [_num(s.get("mean")) for s in templates.values()]
    if any(math.isfinite(v) for v in means):
        intervals = [tuple(s["ci95"]) if s.get("ci95") else None for s in templates.values()]
        parts.append(figures(image(plots.point_chart(
            list(templates), means, intervals=intervals, title="Items per list by template",
            ylabel="items (mean, 95% CI)"), "items per list by template")))
    return section("Dataset", *parts)


def _metric(m: Mapping) -> Markup:
    name = m.get("name", "?")
    tokens = m.get("tokens") or {}
    values = {k: v or {} for k, v in (m.get("values") or {}).items()}
    return section(
        "Metric",
        paragraph(f"Attributed and ablated metric: {name} − line_break (logits at the last token "
                  f"of the last item). Why: {m.get('reason', '–')}"),
        table([[role, "–" if tok is None else tok] for role, tok in tokens.items()],
              header=["token", "text (repr)"]),
        table([[k + (" (used)" if k == name else ""), _num(v.get("mean")), _ci(v), v.get("n")]
               for k, v in values.items()], header=["metric", "mean", "95% CI", "lists"]))


def _ablation_table(ab: Mapping) -> Markup:
    rows = []
    for cond, cond_label in CONDITIONS:
        stats = ab.get(cond) or {}
        for key, label in MEASURES:
            s = stats.get(key)
            if s:
                rows.append([cond_label, label, _num(s.get("mean")), _num(s.get("var")), _ci(s),
                             s.get("n")])
    return table(rows, header=["ablation", "measure (ablated − control)", "mean", "variance",
                               "95% CI", "lists"])


def _verdict(v: Mapping | None) -> Markup:
    if not v:
        return Markup()
    verdict = "effective" if v.get("effective") else "not effective"
    return notes([f"Verdict: {verdict} (rule: {v.get('rule', '–')}). Mean Δn_items "
                  f"{fmt(_num(v.get('mean_delta_items')))}; 95% CI excludes 0: "
                  f"{fmt(v.get('ci_excludes_zero'))}; beats random-N: {fmt(v.get('beats_random'))}."])


def _sae(name: str, s: Mapping, out: Path) -> Markup:
    ab = s.get("ablation") or {}
    maps = s.get("maps") or {}
    head = [["site", s.get("site", "–")], ["SAE", s.get("path", "–")],
            ["features", _link("dashboard", s.get("dashboard")) if s.get("dashboard") else "–"],
            ["error-node share of |attribution|", _mean_ci(s.get("error_share"))]]
    feats = table([[_link(f"f{f.get('feature')}", f.get("dashboard")), f.get("examples"),
                    _num(f.get("attribution"))] for f in s.get("top_features") or []],
                  header=["feature", "lists with it in their top pairs", "summed attribution"])
    images = [_png(out, maps.get("clustered"), f"clustered map of {name}"),
              _png(out, maps.get("topics"), f"topic map of {name}")]
    return section(
        f"SAE {name}", table(head),
        paragraph("Top features by attribution towards ending the list:"), feats,
        paragraph("Gene-expression maps: features × lists, clustered (average linkage), and "
                  "features × topics:"), figures(*images),
        paragraph(f"Ablation of the top-{fmt(ab.get('top_n'))} attributed (position, feature) pairs "
                  f"vs {fmt(ab.get('top_n'))} random active features, on "
                  f"{fmt(ab.get('n_examples'))} lists"
                  + (", at every generated step" if ab.get("every_step") else ", prefix only")
                  + "; effects are ablated minus an unablated regeneration with the same seed:"),
        _ablation_table(ab), _verdict(s.get("verdict")))


def _per_topic(saes: Mapping) -> Markup:
    rows = []
    for name, s in saes.items():
        for topic, conds in (s.get("per_topic") or {}).items():
            n = ((conds.get("top") or {}).get("n_items") or {}).get("n")
            row: list[object] = [name, topic, n]
            for cond, _ in CONDITIONS:
                for key in ("n_items", "diversity"):
                    stat = (conds.get(cond) or {}).get(key) or {}
                    row += [_num(stat.get("mean")), _num(stat.get("var"))]
            rows.append(row)
    header = ["SAE", "topic", "lists"] + [f"{c} {m} {v}" for _, c in CONDITIONS
                                 for m in ("Δn_items", "Δdiversity") for v in ("mean", "var")]
    return section("Per-topic effects",
                   paragraph("Mean and variance (ddof 1) over a topic's lists of ablated − control."),
                   table(rows, header=header))


def _items(items: Sequence[str] | None) -> Markup:
    if not items:
        return Markup("<i>(no items)</i>")
    return Markup("<br>".join(esc(i) for i in items))


def _examples(examples: Sequence[Mapping]) -> Markup:
    parts = []
    for e in examples:
        parts.append(paragraph(f"{e.get('sae', '?')} · {e.get('topic', '?')} · "
                               f"{e.get('template', '?')} · list #{fmt(e.get('example'))}"))
        parts.append(table([[_items(e.get("control")), _items(e.get("top")), _items(e.get("random"))]],
                           header=["control (no ablation)", "top-N ablated", "random-N ablated"]))
    return section("Example lists", *(parts or [paragraph("No examples recorded.")]))


def render_report(results: Mapping, out: Path) -> str:
    """The HTML page of one list-study run; `out` is the run folder the map paths are relative to."""
    out = Path(out)
    saes = results.get("saes") or {}
    body = [_run(results), _dataset(results.get("dataset") or {}),
            _metric(results.get("metric") or {})]
    body += [_sae(name, s, out) for name, s in saes.items()]
    body += [_per_topic(saes), _examples(results.get("examples") or []),
             section("Feature browser", Markup(
                 f"<p>Run <code>saelab serve {esc(results.get('out', out))}</code> to open the "
                 "feature browser for this run.</p>"))]
    subtitle = (f"model {results.get('model', '?')} · preset {results.get('preset', '–')} · "
                f"{len(saes)} SAE(s)")
    return page("When does a list end?", Markup("".join(body)), subtitle=subtitle)


def write_report(results: Mapping, out: Path) -> Path:
    """Write out/report.html (atomically) and return its path."""
    return write_page(Path(out) / "report.html", render_report(results, out))
