"""A static, self-contained HTML dashboard of one feature index.

    write_dashboard("runs/feats/l12", cards=128)      # -> runs/feats/l12/dashboard.html

The page holds a sortable list of every feature (density, max and mean
activation, label) and a card for `cards` features (alive ones, lowest ids
first, plus any asked for): activation histogram, top examples with each token
shaded by the feature's activation, examples from equal-width activation bins,
logit lens, nearest features and the ablated text of the top example and of the
first uniform example of every bin (for the `--ablate` features that have it). Cards
are capped because a card is ~30 kB: 16k of them would make a 500 MB page
(`saelab serve` shows any feature).

Reads the Parquet index with pyarrow (no torch). All model text - tokens,
labels, names - goes through `esc`, so a token ``<script>`` shows as text; the
only script on the page is the fixed sorter below.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow.parquet as pq

from saelab.features.index import EXAMPLES, FeatureIndex, lens_filter
from saelab.report.html import CSS, Markup, esc, fmt, write_page

DASH_CSS = """
.tok{white-space:pre;border-radius:2px;padding:0 1px;font-family:ui-monospace,monospace;font-size:12.5px}
.ex{margin:.15em 0;line-height:1.9}.ex .a{color:#5a6270;font-size:.85em;display:inline-block;width:5em}
.ex .a.ab{width:7.5em}#lens-filter code{white-space:pre}
.focus{outline:1.5px solid #222}.card{border:1px solid #dde;border-radius:6px;padding:.6em 1em;margin:1.2em 0}
.cols{display:flex;flex-wrap:wrap;gap:2em}.muted{color:#5a6270}
table.list td,table.list th{padding:.1em .6em}th.sort{cursor:pointer}
.lens td{font-family:ui-monospace,monospace}
"""

SORTER = """
document.querySelectorAll('th.sort').forEach(function(th){th.addEventListener('click',function(){
var t=th.closest('table'),i=Array.prototype.indexOf.call(th.parentNode.children,th);
var dir=th.dataset.dir==='desc'?1:-1;th.dataset.dir=dir===1?'asc':'desc';
var rows=Array.prototype.slice.call(t.tBodies[0].rows);
rows.sort(function(a,b){var x=a.cells[i].dataset.v,y=b.cells[i].dataset.v;
var nx=parseFloat(x),ny=parseFloat(y);
if(!isNaN(nx)&&!isNaN(ny))return dir*(nx-ny);return dir*String(x).localeCompare(String(y));});
rows.forEach(function(r){t.tBodies[0].appendChild(r);});});});
"""


def shade(value: float, top: float) -> str:
    """Background colour for an activation: orange with alpha value/top (blue for negatives)."""
    if not top or not value or math.isnan(value):
        return "transparent"
    a = min(abs(value) / top, 1.0)
    return f"rgba(255,140,0,{a:.2f})" if value > 0 else f"rgba(60,120,220,{a:.2f})"


def show_token(text: str) -> str:
    """Make whitespace-only and control tokens visible (newline, tab)."""
    return text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")


def token_spans(tokens: Sequence[str], values: Sequence[float], top: float,
                focus: int | None = None, label: str = "act") -> Markup:
    """Tokens shaded by value; inactive ones are bare spans (a card holds ~2k tokens)."""
    parts = []
    for i, (tok, v) in enumerate(zip(tokens, values, strict=True)):
        cls = "tok focus" if i == focus else "tok"
        text = esc(show_token(tok))
        if v is None or (isinstance(v, float) and math.isnan(v)) or v == 0:
            parts.append(f'<span class="{cls}">{text}</span>')
        else:
            parts.append(f'<span class="{cls}" style="background:{shade(v, top)}" '
                         f'title="{esc(label)} {v:.3g}">{text}</span>')
    return Markup("".join(parts))


def svg_histogram(counts: Sequence[int], top: float, width: int = 320, height: int = 90) -> Markup:
    """Bars of a histogram over [0, top], as inline SVG with an axis caption."""
    if not counts or max(counts) == 0:
        return Markup('<p class="muted">never fired</p>')
    n, peak = len(counts), max(counts)
    bw = width / n
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{height - c / peak * height:.1f}" width="{max(bw - 1, 1):.1f}" '
        f'height="{c / peak * height:.1f}" fill="#3b6ea5"><title>{c}</title></rect>'
        for i, c in enumerate(counts))
    return Markup(f'<svg width="{width}" height="{height + 14}" role="img" aria-label="histogram">'
                  f'{bars}<text x="0" y="{height + 12}" font-size="10">0</text>'
                  f'<text x="{width}" y="{height + 12}" font-size="10" text-anchor="end">'
                  f'{esc(fmt(float(top), 3))}</text></svg>')


def _examples(rows: Iterable[dict], top: float) -> Markup:
    out = []
    for r in rows:
        focus = r["position"] - r["start"]
        out.append(f'<div class="ex"><span class="a">{esc(fmt(float(r["act"]), 3))}</span>'
                   f'{token_spans(r["tokens"], r["acts"], top, focus)}</div>')
    return Markup("".join(out))


def _lens(feat: dict) -> Markup:
    rows = []
    for side in ("top", "bottom"):
        cells = "".join(f"<td>{esc(show_token(t))} <span class='muted'>{esc(fmt(float(v), 3))}</span></td>"
                        for t, v in zip(feat[f"lens_{side}_tokens"] or [],
                                        feat[f"lens_{side}_values"] or [], strict=True))
        rows.append(f"<tr><th>{'promoted' if side == 'top' else 'suppressed'}</th>{cells}</tr>")
    return Markup(f'<table class="lens">{"".join(rows)}</table>')


def _neighbours(feat: dict, cards: set[int]) -> Markup:
    def link(i: int) -> str:
        return f'<a href="#f{i}">{i}</a>' if i in cards else str(i)

    parts = []
    for key, title in (("neighbours", "in this SAE"), ("other_neighbours", "in the other SAE")):
        ids, cos = feat.get(key), feat.get(key.replace("neighbours", "neighbour_cos"))
        if ids:
            items = ", ".join(f"{link(i) if key == 'neighbours' else i} ({c:.2f})"
                              for i, c in zip(ids, cos, strict=True))
            parts.append(f"<p><b>{esc(title)}:</b> {items}</p>")
    return Markup("".join(parts))


def _ablation_row(ab: dict) -> Markup:
    deltas = [float("nan") if d is None else d for d in ab["deltas"]]
    scale = max((abs(d) for d in deltas if not math.isnan(d)), default=0.0)
    # Deleting a token that drives the feature lowers it: negative deltas show blue.
    spans = token_spans(ab["tokens"], deltas, scale, ab["position"] - ab["start"], label="change")
    what = "top" if ab.get("kind", "top") == "top" else f"bin {ab['bin']}"
    return Markup(f'<div class="ex"><span class="a ab" title="{esc(what)}: activation with nothing '
                  f'deleted">{esc(what)} {esc(fmt(float(ab["base"]), 3))}</span>{spans}</div>')


def _ablation(rows: Sequence[dict]) -> Markup:
    """Ablated text of the top example, then of the uniform examples from the highest bin down."""
    if not rows:
        return Markup('<p class="muted">not computed for this feature (see `--ablate`).</p>')
    rows = sorted(rows, key=lambda r: (r.get("kind", "top") != "top", -r.get("bin", -1), r.get("rank", 0)))
    return Markup('<p class="muted">each earlier token shaded by the change of the activation at '
                  "the outlined token when it is deleted (blue: lower); the number is the activation "
                  f"with nothing deleted.</p>{''.join(_ablation_row(r) for r in rows)}")


LENS_LINK = ('<p class="muted">abnormal token rows left out: '
             '<a href="#lens-filter">the rule and the list</a></p>')


def card(feat: dict, examples: list[dict], ablation: Sequence[dict], cards: set[int],
         n_bins: int, lens_link: bool = True) -> Markup:
    """A feature's card; `ablation`: its ablated-text rows (FeatureIndex.ablations);
    `lens_link`: link to the page's #lens-filter (the dashboard's summary has it)."""
    f, top = feat["feature"], float(feat["max_act"] or 0.0)
    label = f" — {esc(feat['label'])}" if feat.get("label") else ""
    tops = [e for e in examples if e["kind"] == "top"]
    bins = []
    for b in range(n_bins - 1, -1, -1):
        rows = sorted((e for e in examples if e["kind"] == "bin" and e["bin"] == b),
                      key=lambda e: -e["act"])
        if rows:
            lo, hi = b * top / n_bins, (b + 1) * top / n_bins
            bins.append(f"<h4>bin {b} [{fmt(lo, 3)}, {fmt(hi, 3)}): "
                        f"{fmt(int(feat['bin_counts'][b]))} firings</h4>{_examples(rows, top)}")
    mean = feat["mean_act"]
    return Markup(
        f'<div class="card" id="f{f}"><h2>Feature {f}{label}</h2>'
        f'<p>density {fmt(feat["density"], 3)} · max {fmt(top, 3)} · mean when active '
        f'{fmt(mean, 3) if mean is not None else "–"} · {fmt(int(feat["count"]))} firings</p>'
        f'<div class="cols"><div><h3>Activations</h3>{svg_histogram(feat["hist"], top)}</div>'
        f'<div><h3>Logit lens</h3>{_lens(feat)}{LENS_LINK if lens_link else ""}</div></div>'
        f'<h3>Top examples</h3>{_examples(tops, top)}'
        f'<h3>Examples by activation bin</h3>{"".join(bins) or "<p class=muted>none</p>"}'
        f'<h3>Nearest features</h3>{_neighbours(feat, cards)}'
        f'<h3>Ablated text: top and uniform examples</h3>{_ablation(ablation)}</div>')


def feature_list(index: FeatureIndex, cards: set[int]) -> Markup:
    cols = index.features.select(["feature", "density", "max_act", "mean_act", "count", "label"]).to_pydict()
    head = "".join(f'<th class="sort">{esc(h)}</th>' for h in
                   ("feature", "density", "max act", "mean act", "firings", "label"))
    rows = []
    for f, d, mx, mean, n, label in zip(*cols.values(), strict=True):
        name = f'<a href="#f{f}">{f}</a>' if f in cards else str(f)
        rows.append(f'<tr><td data-v="{f}">{name}</td><td data-v="{d}">{fmt(d, 3)}</td>'
                    f'<td data-v="{mx}">{fmt(float(mx), 3)}</td>'
                    f'<td data-v="{mean if mean is not None else -1}">{fmt(mean, 3)}</td>'
                    f'<td data-v="{n}">{fmt(int(n))}</td><td data-v="{esc(label or "")}">{esc(label or "")}</td></tr>')
    return Markup(f'<table class="list"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def choose_cards(index: FeatureIndex, cards: int, extra: Iterable[int] = ()) -> list[int]:
    counts = index.features.column("count").to_pylist()
    alive = [f for f, c in enumerate(counts) if c > 0][:cards]
    return sorted(set(alive) | {f for f in extra if 0 <= f < len(counts)})


def render_dashboard(folder: str | os.PathLike, *, cards: int = 128, features: Iterable[int] = ()) -> str:
    index = FeatureIndex.open(folder)
    chosen = choose_cards(index, cards, features)
    chosen_set = set(chosen)
    meta = index.meta
    examples = pq.read_table(Path(folder) / EXAMPLES, filters=[("feature", "in", chosen)]).to_pylist() if chosen else []
    by_feature: dict[int, list[dict]] = {}
    for e in examples:
        by_feature.setdefault(e["feature"], []).append(e)
    n_bins = meta["collection"]["config"]["n_bins"]
    body = [_summary(meta, len(chosen)), "<h2>Features</h2>", feature_list(index, chosen_set)]
    body += [card(index.feature(f), by_feature.get(f, []), index.ablations(f), chosen_set, n_bins)
             for f in chosen]
    sae = meta["sae"]
    title = f"Features of {meta['name']}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}{DASH_CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class=\"sub\">{esc(sae['architecture'])} SAE, "
            f"{esc(sae['d_in'])} → {esc(sae['d_sae'])}, at {esc(sae['site'])} of "
            f"{esc(meta['model']['name'])}</p>{''.join(body)}<script>{SORTER}</script></body></html>\n")


def _summary(meta: dict, n_cards: int) -> Markup:
    s = meta["summary"]
    return Markup(
        f"<p>{fmt(meta['tokens'])} tokens of {esc(meta['collection'].get('corpus'))} · "
        f"L0 {fmt(s['l0'], 3)} · {fmt(s['alive'])} alive, {fmt(s['dead'])} dead, "
        f"{fmt(s['dense'])} with density &gt; 0.1 · cards below for {n_cards} features</p>"
        f"{lens_filter_html(lens_filter(meta))}")


def lens_filter_html(filt: dict) -> Markup:
    """The logit lens's token filter: its rule and every token left out (as index.json lists)."""
    parts = []
    for reason, v in filt["reasons"].items():
        shown = ", ".join(f"<code>{esc(show_token(str(t)))}</code>" for t in v["examples"])
        more = f" and {fmt(v['count'] - len(v['examples']))} more" if v["count"] > len(v["examples"]) else ""
        parts.append(f"<li>{esc(reason)} ({fmt(v['count'])}): {shown}{more}</li>")
    return Markup(f'<div id="lens-filter"><h3>Logit lens: {fmt(filt["n_excluded"])} token rows left '
                  f'out</h3><p class="muted">{esc(filt["rule"])}</p><ul>{"".join(parts)}</ul></div>')


def write_dashboard(folder: str | os.PathLike, *, cards: int = 128,
                    features: Iterable[int] = ()) -> Path:
    return write_page(Path(folder) / "dashboard.html",
                      render_dashboard(folder, cards=cards, features=features))
