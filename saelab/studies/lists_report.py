"""The list study's HTML report, rendered from its `results` dict alone (no torch, no model).

    write_report(json.loads((out / "results.json").read_text()), out)   # -> out/report.html

The dict is the one `lists_results.summarize` builds (plus "seconds"); every key
below the top level is optional, and None/NaN numbers show as a dash. The page
opens with what was found (the verdicts and key numbers with their intervals);
the timings and settings come last. The maps
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
MEASURES = (("distinct_items", "Δdistinct items"), ("n_items", "Δn_items"),
            ("diversity", "Δdiversity"), ("embed_diversity", "Δembedding diversity"))
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


def _summary(results: Mapping) -> Markup:
    """What was found, in sentences: the verdict per SAE with its numbers and intervals,
    the template contrast with its censoring, and the density of the top features."""
    lines: list[str] = []
    cfg = results.get("config") or {}
    for name, s in (results.get("saes") or {}).items():
        ab = s.get("ablation") or {}
        top, rand = ab.get("top") or {}, ab.get("random") or {}
        caps = ab.get("cap_hits") or {}
        v = s.get("verdict") or {}
        verdict = "effective" if v.get("effective") else "not effective"
        cap_text = (f"; regenerations cut at the {fmt(ab.get('token_limit'))}-token limit: "
                    f"{fmt(caps.get('control'))} control, {fmt(caps.get('top'))} top-N, "
                    f"{fmt(caps.get('random'))} random-N of {fmt(ab.get('n_examples'))}"
                    if caps else "")
        sure = " (its 95% interval excludes 0)" if v.get("ci_excludes_zero") else ""
        lines.append(f"{name}: {verdict}{sure}. Zeroing the top-{fmt(ab.get('top_n'))} attributed pairs "
                     f"changed the distinct items by {_mean_ci(top.get('distinct_items'))} "
                     f"(random-N: {_mean_ci(rand.get('distinct_items'))}) and the item count by "
                     f"{_mean_ci(top.get('n_items'))}{cap_text}.")
        feats = s.get("top_features") or []
        if feats and feats[0].get("density") is not None:
            f = feats[0]
            lines.append(f"{name}: its most attributed feature, f{f.get('feature')}, fires on "
                         f"{_pct(f.get('density'))} of the lists' tokens"
                         + (f" and on {_pct(f.get('corpus_density'))} of the corpus tokens"
                            if f.get("corpus_density") is not None else "") + ".")
    if cfg.get("max_density") is not None:
        lines.append(f"Features firing on more than {_pct(cfg['max_density'])} of the lists' tokens "
                     "were left out of the top pairs, the random control and the feature tables.")
    elif results.get("saes"):
        lines.append("Dense features were kept (the original's method); --max-density leaves "
                     "them out of the top pairs.")
    d = results.get("dataset") or {}
    contrast = d.get("contrast")
    if contrast:
        text = (f"Asking for a long rather than a short list changed the item count by "
                f"{_mean_ci(contrast)} ({_mean_ci(contrast.get('distinct'))} distinct)")
        if contrast.get("censored_pairs"):
            text += (f"; {fmt(contrast['censored_pairs'])} of {fmt(contrast.get('n'))} pairs hold a "
                     "list cut off by the token limit, so those counts are lower bounds; over the "
                     f"pairs where both lists ended: {_mean_ci(contrast.get('uncensored'))} distinct")
        lines.append(text + ".")
    if (results.get("graph") or {}).get("verdict"):
        text = results["graph"]["verdict"]["text"]
        lines.append(text[:1].upper() + text[1:] + ".")
    if not lines:
        return Markup()
    rule = next((s.get("verdict", {}).get("rule") for s in (results.get("saes") or {}).values()
                 if s.get("verdict")), None)
    return section("Summary", Markup("<ul>" + "".join(f"<li>{esc(t)}</li>" for t in lines) + "</ul>"),
                   notes([f"Verdict rule: {rule}. Intervals are 95% bootstrap intervals of the "
                          "mean; Δ is ablated minus an unablated regeneration with the same seed."]
                         if rule else []))


def _pct(value: Any) -> str:
    return "–" if value is None or not math.isfinite(_num(value)) else f"{100 * float(value):.1f}%"


def _run(results: Mapping) -> Markup:
    seconds = results.get("seconds") or {}
    rows: list[list[object]] = [[stage, _num(s)] for stage, s in seconds.items()]
    if rows:
        rows.append([Markup("<b>total</b>"), sum(_num(s) for s in seconds.values())])
    return section("Run",
                   paragraph("Seconds per stage, as computed: a rerun that finds a stage's output "
                             "saved keeps the time of the run that computed it.") if rows else Markup(),
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
    distinct = d.get("distinct") or {}
    caps = d.get("caps") or {}
    parts.append(table([[t, s.get("n"), _num(s.get("mean")), _num(s.get("var")), _ci(s),
                         _mean_ci(distinct.get(t)),
                         _caps(caps.get(t))]
                        for t, s in templates.items()],
                       header=["template", "lists", "mean items", "variance", "95% CI",
                               "distinct items [95% CI]", "cut off by the token limit"]))
    contrast = d.get("contrast")
    if contrast:
        text = (f"Template contrast {contrast.get('name', '')}: {_mean_ci(contrast)} items, "
                f"{_mean_ci(contrast.get('distinct'))} distinct items (paired by topic and sample).")
        if contrast.get("censored_pairs"):
            text += (f" {fmt(contrast['censored_pairs'])} pairs are censored (a list cut off by the "
                     f"token limit); over the others: {_mean_ci(contrast.get('uncensored'))} distinct.")
        parts.append(paragraph(text))
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


def _caps(cap: Mapping | None) -> str:
    if not cap:
        return "–"
    return f"{fmt(cap.get('cap_hits'))} of {fmt(cap.get('lists'))} (limit {fmt(cap.get('token_limit'))})"


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
    return notes([f"Verdict: {verdict} (rule: {v.get('rule', '–')}). Mean Δdistinct items "
                  f"{fmt(_num(v.get('mean_delta_distinct')))} (Δn_items "
                  f"{fmt(_num(v.get('mean_delta_items')))}); 95% CI excludes 0: "
                  f"{fmt(v.get('ci_excludes_zero'))}; beats random-N: {fmt(v.get('beats_random'))}."])


def _sae(name: str, s: Mapping, out: Path) -> Markup:
    ab = s.get("ablation") or {}
    maps = s.get("maps") or {}
    dens = s.get("density") or {}
    caps = ab.get("cap_hits") or {}
    head = [["site", s.get("site", "–")], ["SAE", s.get("path", "–")],
            ["features on the corpus", _link("dashboard", s.get("dashboard")) if s.get("dashboard") else "–"],
            ["features on the study's lists",
             _link("dashboard", s.get("lists_dashboard")) if s.get("lists_dashboard") else "–"],
            ["error-node share of |attribution|", _mean_ci(s.get("error_share"))],
            ["dense features left out", "none (all kept)" if dens.get("max_density") is None else
             f"{fmt(dens.get('excluded'))} firing on > {_pct(dens.get('max_density'))} of the lists' tokens"]]
    feats = table([[_link(f"f{f.get('feature')}", f.get("dashboard")),
                    _link("lists", f.get("lists_dashboard")) if f.get("lists_dashboard") else "–",
                    f.get("examples"), _num(f.get("attribution")), _pct(f.get("density")),
                    _pct(f.get("corpus_density"))] for f in s.get("top_features") or []],
                  header=["feature (corpus dashboard)", "on the lists", "lists with it in their top pairs",
                          "summed attribution", "density on the lists", "density on the corpus"])
    cap_rows = ([["control (no ablation)", caps.get("control")], ["top-N ablated", caps.get("top")],
                 ["random-N ablated", caps.get("random")]] if caps else [])
    return section(
        f"SAE {name}", table(head),
        paragraph("Top features by attribution towards ending the list, with their firing "
                  "fraction (density): a feature active on most tokens ranks high by being "
                  "everywhere, not by marking the end:"), feats,
        paragraph("Gene-expression map: features × lists, clustered (average linkage):"),
        figures(_png(out, maps.get("clustered"), f"clustered map of {name}")),
        paragraph(f"Ablation of the top-{fmt(ab.get('top_n'))} attributed (position, feature) pairs "
                  f"vs {fmt(ab.get('top_n'))} random active features, on "
                  f"{fmt(ab.get('n_examples'))} lists"
                  + (", at every generated step" if ab.get("every_step") else ", prefix only")
                  + "; effects are ablated minus an unablated regeneration with the same seed. "
                  "Distinct items count a repeated item once (a list that loops on one item "
                  "until the token limit adds items but no new ones):"),
        _ablation_table(ab),
        *([paragraph(f"Regenerations cut off by the {fmt(ab.get('token_limit'))}-token limit "
                     "(their item counts are lower bounds):"),
           table(cap_rows, header=["condition", "cut off"])] if cap_rows else []),
        _verdict(s.get("verdict")))


def _graph(g: Mapping | None) -> Markup:
    """Graph-chosen against attribution-chosen transcoder features (with --graph)."""
    if not g:
        return Markup()
    arms = g.get("arms") or {}
    diff = g.get("difference") or {}
    rows = [[arm, label, _num((arms.get(arm) or {}).get(key, {}).get("mean")),
             _ci((arms.get(arm) or {}).get(key)), (arms.get(arm) or {}).get(key, {}).get("n")]
            for arm in ("graph", "attribution", "random")
            for key, label in (("distinct_items", "Δdistinct items"), ("n_items", "Δn_items"))]
    rows += [["graph − attribution (paired)", label, _num((diff.get(key) or {}).get("mean")),
              _ci(diff.get(key)), (diff.get(key) or {}).get("n")]
             for key, label in (("distinct_items", "Δdistinct items"), ("n_items", "Δn_items"))]
    caps = g.get("cap_hits") or {}
    scores = g.get("scores") or {}
    s = g.get("settings") or {}
    lists = table([[e.get("index"), e.get("topic"), _link("graph", e.get("graph")),
                    _num(e.get("metric")), e.get("active_features"), e.get("pruned_features"),
                    e.get("overlap"), e.get("Δgraph"), e.get("Δattribution"), e.get("Δrandom"),
                    _num(e.get("graph_attribution_sum")), _num(e.get("attribution_sum"))]
                   for e in g.get("lists") or []],
                  header=["list", "topic", "graph folder", "metric", "active features",
                          "features in the pruned graph", "shared by both sets", "Δdistinct graph",
                          "Δdistinct attribution", "Δdistinct random",
                          "attribution of the graph's set", "attribution of the attribution's set"])
    return section(
        "Graph-chosen vs attribution-chosen features",
        paragraph((g.get("verdict") or {}).get("text", "")),
        paragraph(f"For {fmt(g.get('n_examples'))} of the ablated lists, an attribution graph of the "
                  f"study's metric at the last item's last token over the transcoder set "
                  f"{s.get('transcoders', '–')} ({fmt(s.get('max_features'))} feature nodes with rows, "
                  f"pruned at {fmt(s.get('node_threshold'))} / {fmt(s.get('edge_threshold'))}). Three "
                  f"sets of {fmt(g.get('top_n'))} transcoder features per list, from the same active "
                  "features: the graph's most influential on the target (pruned graph first), the "
                  "largest act × gradient of the metric in the real model, and random active ones; "
                  "each zeroed (its act × decoder row taken off the real MLP output)"
                  + (" on the prefix and at every generated token" if g.get("every_step") else
                     " on the prefix") + ", then the list regenerated with the seed of an unablated "
                  "control. Δ is ablated − control; the paired row is, per list, graph − attribution."),
        table(rows, header=["features zeroed", "measure", "mean", "95% CI", "lists"]),
        table([["control", caps.get("control")], ["graph", caps.get("graph")],
               ["attribution", caps.get("attribution")], ["random", caps.get("random")]],
              header=[f"regenerations cut at {fmt(g.get('token_limit'))} tokens", "lists"]),
        table([["features both sets share (mean per list)", _mean_ci(g.get("overlap"))],
               ["replacement score", _mean_ci(scores.get("replacement_score"))],
               ["completeness score", _mean_ci(scores.get("completeness_score"))],
               ["graph building time (s, all lists)", fmt(_num(g.get("graph_seconds")))]]),
        lists,
        notes([f"Verdict rule: {(g.get('verdict') or {}).get('rule', '–')}. Graph influence is "
               "unsigned, so the graph's set may hold features that delay the end; the last two "
               "columns give each set's summed attribution. saelab serve on the run folder "
               "shows the graphs."]))


def _per_topic(saes: Mapping) -> Markup:
    rows = []
    for name, s in saes.items():
        for topic, conds in (s.get("per_topic") or {}).items():
            n = ((conds.get("top") or {}).get("n_items") or {}).get("n")
            row: list[object] = [name, topic, n]
            for cond, _ in CONDITIONS:
                for key in ("distinct_items", "n_items"):
                    stat = (conds.get(cond) or {}).get(key) or {}
                    row += [_num(stat.get("mean")), _num(stat.get("var"))]
            rows.append(row)
    header = ["SAE", "topic", "lists"] + [f"{c} {m} {v}" for _, c in CONDITIONS
                                 for m in ("Δdistinct", "Δn_items") for v in ("mean", "var")]
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
    body = [_summary(results), _dataset(results.get("dataset") or {}),
            _metric(results.get("metric") or {})]
    body += [_sae(name, s, out) for name, s in saes.items()]
    body.append(_graph(results.get("graph")))
    body += [_examples(results.get("examples") or []), _per_topic(saes),
             section("Feature browser", Markup(
                 f"<p>Run <code>saelab serve {esc(results.get('out', out))}</code> to open the "
                 "feature browser for this run.</p>")),
             _run(results)]
    subtitle = (f"model {results.get('model', '?')} · preset {results.get('preset', '–')} · "
                f"{len(saes)} SAE(s)")
    return page("When does a list end?", Markup("".join(body)), subtitle=subtitle)


def write_report(results: Mapping, out: Path) -> Path:
    """Write out/report.html (atomically) and return its path."""
    return write_page(Path(out) / "report.html", render_report(results, out))
