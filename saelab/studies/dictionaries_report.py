"""The dictionary study's summary (numbers and the original's claims) and its report.html.

Plain numbers in, JSON and HTML out: nothing here needs the model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from saelab.report.html import (
    Markup,
    esc,
    figures,
    fmt,
    image,
    page,
    paragraph,
    section,
    table,
    write_page,
)
from saelab.studies.dictionaries_eval import pareto_front
from saelab.studies.dictionaries_mcs import chance_mcs, histogram

TOP_RECURRING = 20  # the "highest-MCS features" searched for the first-sentence feature
OUTLIER_FACTOR = 10  # decoder share on the outlier dims, x the uniform share, that counts as aligned
FIRST_FACTOR = 2  # activation share on the first positions, x the uniform share, that counts as early
DEPENDS = 0.1  # a deletion that moves the activation by 10% of its value counts as a dependence
# Seed MCS this far above chance at some width means the seeds found shared features; below
# it at every width, recurrence (claims 1 and 2) cannot be read: the dictionaries have not
# converged to anything two seeds agree on (train on more tokens).
ABOVE_CHANCE = 0.1


def _p(points) -> list[dict]:
    return [p if isinstance(p, dict) else p._asdict() for p in points]


def summarize(cfg, points, feat, evals: dict, mcs, acts: dict, ablation: dict,
              d_model: int) -> dict:
    """Every number the report shows, and the claims' verdicts (JSON-ready); d_model is the
    site's width (the dictionaries' rows live there)."""
    grid = [p for p in _p(points) if p["role"] == "grid"]
    metrics = evals["metrics"]
    rows = [{**p, **{k: metrics[p["label"]].get(k) for k in ("l0", "fvu", "loss_recovered", "delta_ce")}}
            for p in grid]
    front = pareto_front([r["l0"] for r in rows], [r["fvu"] for r in rows])
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    index = {p["label"]: mcs.names.index(p["label"]) for p in grid}
    thr = cfg.recur_threshold
    widths, sparsities = sorted(cfg.widths), sorted(cfg.sparsities)

    def at(w, s, seed):
        return next(p for p in grid if p["width_mult"] == w and p["sparsity"] == s and p["seed"] == seed)

    by_width = []
    for s in sparsities:
        for w in widths:
            seeds = [at(w, s, cfg.seed + k) for k in range(cfg.seeds)]
            pairs = [(index[a["label"]], index[b["label"]]) for a in seeds for b in seeds if a is not b]
            entry = {"sparsity": s, "width_mult": w}
            if pairs:
                F = len(mcs.max_cos[pairs[0]])
                entry["chance_mcs"] = chance_mcs(F, F, d_model)
                entry["seed_mcs"] = float(np.mean([mcs.mcs[i, j] for i, j in pairs]))
                entry["seed_recurring"] = float(np.mean(
                    [(mcs.max_cos[(i, j)] >= thr).sum() for i, j in pairs]))
                entry["seed_recurring_share"] = float(np.mean(
                    [mcs.recurring(i, j, thr) for i, j in pairs]))
            i0 = index[seeds[0]["label"]]
            larger = [w2 for w2 in widths if w2 > w]
            entry["in_larger"] = {str(w2): mcs.recurring(i0, index[at(w2, s, cfg.seed)["label"]], thr)
                                  for w2 in larger}
            if larger:
                entry["mcs_to_next"] = float(mcs.mcs[i0, index[at(larger[0], s, cfg.seed)["label"]]])
            by_width.append(entry)
    hists = {}
    for w in widths:
        if cfg.seeds > 1:
            a, b = at(w, feat.sparsity, cfg.seed), at(w, feat.sparsity, cfg.seed + 1)
            hists[str(w)] = histogram(mcs.max_cos[(index[a["label"]], index[b["label"]])])
    claims = _claims(cfg, feat, by_width, acts, ablation)
    return {"grid": rows, "pareto": [rows[i]["label"] for i in front], "by_width": by_width,
            "max_cos_histograms": hists, "mcs_names": mcs.names, "mcs": mcs.mcs.tolist(),
            "recur_threshold": thr, "claims": claims,
            "definitions": {**evals.get("definitions", {}),
                            "seed_mcs": "MCS between the dictionaries of one width and sparsity "
                                        "trained from different seeds (mean over ordered pairs)",
                            "chance_mcs": "MCS between two dictionaries of random unit rows of "
                                          "the same sizes: what unrelated dictionaries reach",
                            "seed_recurring": f"features of a dictionary whose max cosine with the "
                                              f"other seed's dictionary is >= {thr}",
                            "in_larger": f"share of a dictionary's features whose max cosine in a "
                                         f"larger dictionary (same sparsity, first seed) is >= {thr}"}}


def _unconverged(by_width: list[dict], s: float) -> str | None:
    """Why recurrence cannot be read at sparsity s (seed MCS near chance at every width), or None."""
    rows = [e for e in by_width if e["sparsity"] == s and "seed_mcs" in e]
    if not rows or any(e["seed_mcs"] >= e["chance_mcs"] + ABOVE_CHANCE for e in rows):
        return None
    per = "; ".join(f"{e['width_mult']}x: {e['seed_mcs']:.3f} vs {e['chance_mcs']:.3f}" for e in rows)
    return (f"Dictionaries trained from different seeds are no closer than random "
            f"ones (seed MCS vs chance, {per}; less than {ABOVE_CHANCE} above chance at every "
            f"width), so which features recur is noise here; train on more --tokens. ")


def _claims(cfg, feat, by_width: list[dict], acts: dict, ablation: dict) -> list[dict]:
    claims = []
    # 1. larger dictionaries learn more features
    s = feat.sparsity
    noise = _unconverged(by_width, s)
    if cfg.seeds > 1 and len(cfg.widths) > 1:
        counts = {e["width_mult"]: e["seed_recurring"] for e in by_width if e["sparsity"] == s}
        ws = sorted(counts)
        rising = all(counts[a] < counts[b] for a, b in zip(ws, ws[1:]))
        per = "; ".join(f"{w}x: {counts[w]:.0f}" for w in ws)
        others = [e for e in by_width if e["sparsity"] != s]
        all_rising = rising and all(
            all(x["seed_recurring"] < y["seed_recurring"] for x, y in zip(
                [e for e in others if e["sparsity"] == s2], [e for e in others if e["sparsity"] == s2][1:]))
            for s2 in {e["sparsity"] for e in others})
        claims.append({"claim": "larger dictionaries learn progressively more features (by MCS)",
                       "holds": None if noise else rising,
                       "evidence": (noise or "") + f"features found again by another seed (max cos >= "
                                   f"{cfg.recur_threshold}) at {cfg.arch} {_sp(cfg)} {s:g}: {per}"
                                   f"; rising at every sparsity: {'yes' if all_rising else 'no'}"})
    else:
        claims.append({"claim": "larger dictionaries learn progressively more features (by MCS)",
                       "holds": None, "evidence": "needs --seeds 2 or more and two widths or more"})
    # 2. the highest-MCS features include a "first sentence" feature on the outlier dims
    rec = acts["recurring"]
    rows = rec["features"][:TOP_RECURRING]
    u_out, u_first = rec["uniform_outlier_share"], rec["uniform_first_share"]
    hits = [r for r in rows if r["outlier_dim_share"] >= OUTLIER_FACTOR * u_out
            and r["first_positions_share"] >= FIRST_FACTOR * u_first]
    best = max(rows, key=lambda r: r["outlier_dim_share"]) if rows else None
    ev = (f"outlier dims {acts['outlier_dims']} (mean squared activation "
          f"{', '.join(fmt(v, 3) for v in acts['outlier_dim_mean_sq'])} vs median dim "
          f"{fmt(acts['median_dim_mean_sq'], 3)}). ")
    if best is not None:
        rank = rows.index(best) + 1
        ev += (f"Among the {len(rows)} most recurring features of {rec['dictionary']}, the most "
               f"aligned is #{best['feature']} (recurrence rank {rank}, mean max cos "
               f"{best['recurrence']:.3f}): {best['outlier_dim_share']:.1%} of its decoder's squared "
               f"norm on those dims (uniform {u_out:.2%}), {best['first_positions_share']:.1%} of its "
               f"activation on the first {5} text positions (uniform {u_first:.1%}). ")
    ev += (f"Counted as a first-sentence feature: >= {OUTLIER_FACTOR}x the uniform outlier share and "
           f">= {FIRST_FACTOR}x the uniform early share; found: "
           + (", ".join(f"#{r['feature']}" for r in hits) if hits else "none") + ".")
    claims.append({"claim": "the highest-MCS features include a 'beginning of the first sentence' "
                            "feature aligned with the high-norm outlier dimensions",
                   "holds": None if noise else bool(hits), "evidence": (noise or "") + ev})
    # 3. features beyond the embedding depend on earlier tokens
    per_feature = []
    for label, feats in ablation.items():
        for f, rows_ in feats.items():
            rel = [r["max_rel_change"] for r in rows_ if r["max_rel_change"] is not None]
            if rel:
                per_feature.append((label, f, float(np.median(rel))))
    dep = [x for x in per_feature if x[2] >= DEPENDS]
    claims.append({"claim": "features beyond the embedding depend on earlier tokens (ablated text)",
                   "holds": bool(per_feature) and len(dep) * 2 >= len(per_feature),
                   "evidence": f"{len(dep)} of {len(per_feature)} features shown change by >= "
                               f"{DEPENDS:.0%} of their activation when one earlier token is deleted "
                               f"(median over their top and uniform examples of the largest change); "
                               f"median of that change over the features: "
                               f"{np.median([x[2] for x in per_feature]) if per_feature else float('nan'):.1%}."})
    return claims


def _log(ax, which: str, base: float = 10, ticks=None) -> None:
    """A log axis labelled with plain numbers (at `ticks` when given), no minor labels."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=base)
    fmt_ = ScalarFormatter()
    fmt_.set_scientific(False)
    axis.set_major_formatter(fmt_)
    axis.set_minor_formatter(NullFormatter())
    if ticks is not None:
        axis.set_major_locator(FixedLocator(sorted(ticks)))


def _sp(cfg) -> str:
    return "L1" if cfg.arch == "relu" else "k"


# ------------------------------------------------------------------ figures


def make_figures(cfg, results: dict) -> dict[str, bytes]:
    from saelab.report.plots import new_figure, to_png

    figs: dict[str, bytes] = {}
    bw = results["by_width"]
    sps = sorted({e["sparsity"] for e in bw})
    name = _sp(cfg)

    fig = new_figure((6.5, 3.4))
    ax = fig.add_subplot()
    for s in sps:
        es = [e for e in bw if e["sparsity"] == s]
        if "seed_mcs" in es[0]:
            ax.plot([e["width_mult"] for e in es], [e["seed_mcs"] for e in es], "o-",
                    label=f"{name} {s:g}: across seeds")
        nx = [e for e in es if "mcs_to_next" in e]
        if nx:
            ax.plot([e["width_mult"] for e in nx], [e["mcs_to_next"] for e in nx], "s--",
                    label=f"{name} {s:g}: to the next width")
    _log(ax, "x", 2, [e["width_mult"] for e in bw])
    ax.set(title="MCS against width", xlabel="width (x d_model)", ylabel="MCS")
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    figs["mcs_vs_width"] = to_png(fig)

    fig = new_figure((6.5, 3.4))
    ax = fig.add_subplot()
    for s in sps:
        es = [e for e in bw if e["sparsity"] == s and "seed_recurring" in e]
        if es:
            ax.plot([e["width_mult"] for e in es], [e["seed_recurring"] for e in es], "o-",
                    label=f"{name} {s:g}")
    _log(ax, "x", 2, [e["width_mult"] for e in bw])
    ax.set(title=f"Features found again by another seed (max cos >= {results['recur_threshold']:g})",
           xlabel="width (x d_model)", ylabel="recurring features")
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    figs["recurring_vs_width"] = to_png(fig)

    if results["max_cos_histograms"]:
        fig = new_figure((6.5, 3.4))
        ax = fig.add_subplot()
        for w, h in results["max_cos_histograms"].items():
            ax.stairs(h["counts"], h["edges"], label=f"{w}x")
        ax.axvline(results["recur_threshold"], color="k", linestyle=":", linewidth=1)
        ax.set_yscale("symlog", linthresh=1)
        ax.set(title="Per-feature max cosine with the other seed's dictionary",
               xlabel="max cosine", ylabel="features")
        ax.legend(fontsize=7, frameon=False, title="width")
        figs["max_cos_hist"] = to_png(fig)

    rows = results["grid"]
    keys = (("l0", "L0"), ("fvu", "FVU"), ("loss_recovered", "loss recovered"), ("delta_ce", "ΔCE (nats)"))
    widths = sorted({r["width_mult"] for r in rows})
    for axis, series, sfmt in (("sparsity", "width_mult", "{:g}x"), ("width_mult", "sparsity", name + " {:g}")):
        fig = new_figure((8, 5.2))
        for k, (key, title) in enumerate(keys):
            ax = fig.add_subplot(2, 2, k + 1)
            for v in sorted({r[series] for r in rows}):
                xs = sorted({r[axis] for r in rows if r[series] == v})
                ys = [np.mean([r[key] for r in rows if r[series] == v and r[axis] == x]) for x in xs]
                ax.plot(xs, ys, "o-", label=sfmt.format(v), markersize=4)
            _log(ax, "x", 2 if axis == "width_mult" else 10, [r[axis] for r in rows])
            ax.set(title=title, xlabel=name if axis == "sparsity" else "width (x d_model)")
            ax.grid(alpha=0.3)
            if k == 0:
                ax.legend(fontsize=6, frameon=False)
        figs[f"metrics_vs_{'sparsity' if axis == 'sparsity' else 'width'}"] = to_png(fig)

    fig = new_figure((8, 3.4))
    for k, (key, title) in enumerate((("fvu", "FVU"), ("loss_recovered", "loss recovered"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for w in widths:
            pts = [r for r in rows if r["width_mult"] == w]
            ax.scatter([r["l0"] for r in pts], [r[key] for r in pts], s=14, label=f"{w}x")
        front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["l0"])
        ax.plot([r["l0"] for r in front], [r[key] for r in front], "k--", linewidth=1,
                label="Pareto front (L0, FVU)")
        ax.set(title=f"{title} against L0", xlabel="L0", ylabel=title)
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=6, frameon=False)
    figs["pareto"] = to_png(fig)

    m = np.asarray(results["mcs"])
    fig = new_figure((6.5, 5.5))
    ax = fig.add_subplot()
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    short = [n.split("-", 2)[-1] for n in results["mcs_names"]]
    ax.set_xticks(range(len(short)), short, rotation=90, fontsize=5)
    ax.set_yticks(range(len(short)), short, fontsize=5)
    ax.set(title="MCS(row -> column) of every pair")
    fig.colorbar(im, ax=ax, shrink=0.7)
    figs["mcs_pairs"] = to_png(fig)
    return figs


# ------------------------------------------------------------------ HTML


def feature_card(index_folder: Path | None, f: int, abl: list[dict] | None) -> Markup:
    """A feature's dashboard card (top and uniform examples, logit lens, neighbours) from its
    index, with the ablated text of its top and uniform examples (`abl`: the study's rows, in
    whole contexts; without them the index's)."""
    from saelab.features.index import FeatureIndex
    from saelab.report.dashboard import card

    if index_folder is None:
        return Markup("")
    index = FeatureIndex.open(index_folder)
    # The card's ablated text: the study's rows (whole contexts) when it has them, else the index's.
    rows = [r | {"start": 0} for r in abl] if abl else index.ablations(f)
    html = card(index.feature(f), index.examples(f), rows, set(),
                index.meta["collection"]["config"]["n_bins"], lens_link=False)
    return Markup(f'<div class="fc"><p class="muted">{esc(index.meta["name"])}</p>{html}</div>')


def render(result: dict, figs: Mapping[str, bytes], indexes: Mapping[str, Path], evals: dict,
           acts: dict, ablation: dict) -> str:
    from saelab.report.dashboard import DASH_CSS

    cfg, res = result["config"], result["results"]
    sp = "L1" if cfg["arch"] == "relu" else "k"
    body = [paragraph(f"{cfg['arch']} dictionaries at {result['site']} of {result['model']['model']}: "
                      f"widths {', '.join(f'{w}x' for w in cfg['widths'])} of d_model, {sp} "
                      f"{', '.join(f'{v:g}' for v in (cfg['l1'] if sp == 'L1' else cfg['k']))}, "
                      f"{cfg['seeds']} seed(s), {cfg['context']}-token contexts, {cfg['tokens']:,} "
                      f"training tokens, all trained from one stream pass.")]
    claims = [[c["claim"], Markup("<b>holds</b>") if c["holds"] else
               (Markup("inconclusive") if c["holds"] is None else Markup("<b>does not hold</b>")),
               c["evidence"]] for c in res["claims"]]
    body.append(section("The original's claims, on this model", table(claims, ["claim", "here", "numbers"])))

    grid = [[r["label"].split("-", 2)[-1], r["width_mult"], r["sparsity"], r["seed"], r["l0"], r["fvu"],
             r["loss_recovered"], r["delta_ce"], "yes" if r["pareto"] else ""] for r in res["grid"]]
    held = evals.get("held_out", {})
    body.append(section(
        "L0, FVU, loss recovered and ΔCE of every grid point",
        paragraph(f"{evals['metrics'][res['grid'][0]['label']]['tokens']:,} held-out tokens "
                  f"({held.get('note', '')}). Loss recovered = (CE zero-ablation − CE with the "
                  "dictionary) / (CE zero-ablation − CE clean)."),
        table(grid, ["dictionary", "width (x)", sp, "seed", "L0", "FVU", "loss recovered", "ΔCE",
                     "Pareto (L0, FVU)"]),
        figures(*(image(figs[k], k) for k in ("metrics_vs_sparsity", "metrics_vs_width", "pareto")
                  if k in figs))))

    bw = [[e["sparsity"], f"{e['width_mult']}x", e.get("seed_mcs"), e.get("seed_recurring"),
           e.get("seed_recurring_share"), e.get("mcs_to_next"),
           ", ".join(f"{k}x: {v:.1%}" for k, v in e["in_larger"].items())] for e in res["by_width"]]
    body.append(section(
        "MCS and recurring features",
        paragraph("MCS(A → B): mean over A's unit decoder rows of the max cosine with B's rows. A "
                  f"feature recurs when its max cosine is >= {res['recur_threshold']:g}."),
        table(bw, [sp, "width", "MCS across seeds", "recurring across seeds", "share",
                   "MCS to next width", "share recurring in larger (first seed)"]),
        figures(*(image(figs[k], k) for k in ("mcs_vs_width", "recurring_vs_width", "max_cos_hist",
                                              "mcs_pairs") if k in figs))))

    rec = acts["recurring"]
    rows = [[r["feature"], r["recurrence"], r["outlier_dim_share"], r["first_positions_share"],
             r["firing_rate"], r["mean_position"]] for r in rec["features"]]
    filt = acts.get("lens_filter", {})
    reasons = filt.get("reasons", {})
    lens_text = (f"Logit lens: a feature's decoder row through the final norm's scale and the "
                 f"unembedding. Left out of the unembedding: rows whose norm is more than "
                 f"{filt.get('z_max', 5):g} standard deviations above (abnormally high norm: on "
                 "this tokenizer word pieces that are always merged further, so the text never uses "
                 "them) or below (never trained) the vocabulary's mean, and padding rows with no "
                 f"token. {filt.get('n_excluded', 0)} rows left out: "
                 + "; ".join(f"{k} ({v['count']}): " + ", ".join(repr(t) for t in v["examples"])
                             for k, v in reasons.items()))
    feat_label = result["featured"]["label"]
    cards = [feature_card(indexes.get(feat_label), r["feature"], ablation.get(feat_label, {}).get(str(r["feature"])))
             for r in rec["features"][:cfg["featured"]]]
    body.append(section(
        f"The most recurring features of {feat_label}",
        paragraph(f"Recurrence: a feature's mean max cosine over {len(rec['compared_with'])} other "
                  f"dictionaries of the same {sp}. Outlier dims {acts['outlier_dims']} (largest mean "
                  f"squared activation; they hold {acts['outlier_dims_share_of_sq_norm']:.1%} of it). "
                  f"Uniform shares: outlier dims {rec['uniform_outlier_share']:.2%}, first positions "
                  f"{rec['uniform_first_share']:.1%}."),
        table(rows, ["feature", "recurrence", "decoder share on outlier dims",
                     "activation on first 5 positions", "firing rate", "mean position"]),
        paragraph(lens_text), *cards))

    conn = acts["connections"]
    parts = [paragraph(f"An L1 (Lasso, alpha {conn['alpha']:g}) linear map from every feature of "
                       f"{conn['earlier']} to each of the most frequent features of the later "
                       "dictionary, on the same tokens (fitted on the first half, R² on the second). "
                       "Coefficients are standardised: the later feature's change in its standard "
                       "deviations per standard deviation of the earlier feature. The guess is "
                       "W_dec(earlier) · W_enc(later) times the earlier feature's standard deviation; "
                       "its rank is the earlier feature's place in the guess for that later feature.")]
    for site, pair in conn["pairs"].items():
        r2 = [v for v in pair["r2"] if v is not None and v == v]
        w = pair["weights"]
        parts.append(Markup(f"<h3>{esc(result['site'])} → {esc(site)}</h3>"))
        parts.append(paragraph(
            f"{len(pair['targets'])} later features fitted; held-out R² median "
            f"{np.median(r2) if r2 else float('nan'):.3f}, max {max(r2) if r2 else float('nan'):.3f}; "
            f"non-zero connections per feature (median) {np.median(pair['nonzero']) if pair['nonzero'] else 0:.0f}; "
            f"fits stopped at the iteration limit: {pair.get('not_converged', 0)}. "
            f"Weight-based guess: the strongest fitted connection is in the guess's top "
            f"{w['top']} for {fmt(w['strongest_in_guess_top'], 3)} of the features; Spearman "
            f"{fmt(w['spearman_mean'], 3)}."))
        parts.append(table([[s["earlier"], s["later"], s["coef"], s["r2"], s["guess"], s["guess_rank"]]
                            for s in pair["strongest"]],
                           ["earlier feature", "later feature", "coef", "R² (later)", "guess", "guess rank"]))
        for s in pair["strongest"][:3]:
            parts.append(Markup(f"<h4>{s['earlier']} → {s['later']} (coef {fmt(s['coef'], 3)})</h4>"))
            parts.append(Markup('<div class="pair">')
                         + feature_card(indexes.get(conn["earlier"]), s["earlier"],
                                        ablation.get(conn["earlier"], {}).get(str(s["earlier"])))
                         + feature_card(indexes.get(pair["later"]), s["later"],
                                        ablation.get(pair["later"], {}).get(str(s["later"])))
                         + Markup("</div>"))
    if conn["pairs"]:
        body.append(section("Sparse linear connections between consecutive sites", *parts))

    links = "".join(f'<li><a href="{esc(os.path.relpath(p, result["out"]))}/dashboard.html">'
                    f"{esc(n)}</a></li>" for n, p in indexes.items())
    sec = result["seconds"]
    body.append(section("Feature indexes", Markup(f"<ul>{links}</ul>"), paragraph(
        f"Browse them all: saelab serve {result['out']}/features")))
    body.append(section("Stage times (seconds)", table([[k, v] for k, v in sec.items()], ["stage", "s"])))
    html = page("Dictionaries on a small model", Markup("".join(body)),
                subtitle="saelab study dictionaries (after Logan Riggs' dictionaries on Pythia-70M)")
    style = (DASH_CSS + ".pair{display:grid;grid-template-columns:1fr 1fr;gap:1em}"
             ".fc{border-top:1px solid #ddd;margin-top:1em}")
    return html.replace("</style>", style + "</style>", 1)


def write_report(out: Path, result: dict, indexes: Mapping[str, Path], evals: dict, mcs, acts: dict,
                 ablation: dict) -> None:
    """PNGs and report.html under `out` (run.json is the caller's, written last)."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(**result["config"])
    figs = make_figures(cfg, result["results"])
    for name, png in figs.items():
        tmp = out / f".{name}.png.tmp"
        tmp.write_bytes(png)
        os.replace(tmp, out / f"{name}.png")
    write_page(out / "report.html", render(result | {"out": str(out)}, figs, indexes, evals, acts, ablation))
