"""Reading the synthetic-activation study's curves: blow-up steps, plateaus, KS tests, the report.

    blowup_step(l2_curve, 0.02)        # index of the steepest rise, or the last step
    summary = summarize({"real": steps_r, "random": steps_g})   # mean, median, KS vs real
    html = render(result, figures)                               # report.html text

Figures are PNG bytes (saelab.report.plots helpers, matplotlib's Agg canvas);
the run folder gets each as a file and report.html embeds them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from saelab.report.plots import new_figure, to_png

DEFINITIONS = {
    "bases": "real activations at the site, at the last position of windows of the corpus "
             "(BOS first when the tokenizer has one); each perturbed towards one target per kind.",
    "real": "target: the activation at the same site and position of another window.",
    "random": "target: a sample of a Gaussian with the mean and full covariance of the "
              "statistics windows' activations.",
    "synthetic-baseline": "target: the SAE decoding of the base's latent activations, each moved "
                          "to a random unused latent among the n_close closest in firing frequency.",
    "synthetic-structured": "target: as synthetic-baseline, but the new top latent is the one (of "
                            "the n_top closest in frequency) whose decoder cosine to the old top "
                            "latent is closest to the measured mean cosine, and every other "
                            "activation goes to the unused latent whose cosine to the new top best "
                            "matches the old latent's cosine to the old top.",
    "curve": "relative: A + t·(T − A) for `steps` values of t in [0, 1]; absolute: A + "
             "step_size·n·(T − A)/‖T − A‖ for n = 0..steps, cut at the target.",
    "read-out": "L2 distance of the last-layer residual (output of the last block) at the last "
                "position from the unperturbed one; KL(clean ‖ perturbed) of the next-token "
                "distribution, in nats.",
    "blow-up step": "s_i = d_i − d_{i−1} (s_0 = s_1); argmax s_i, or the last step when no s_i "
                    "exceeds blowup_threshold × max d.",
    "KS": "two-sample Kolmogorov–Smirnov statistic (scipy.stats.ks_2samp) of a kind's blow-up "
          "steps against the real targets'; 0 = same distribution, 1 = disjoint.",
}
QUESTION = ("Is the model as sensitive to perturbations towards SAE-built (synthetic) activations "
            "as towards real ones? Each base activation is moved step by step towards a target, "
            "and the step where the model's output changes fastest (the blow-up) is compared "
            "across target kinds. The closer a kind's blow-up distribution is to the real one "
            "(small KS), the more realistic its activations look to the model.")


COLORS = {"real": "#e07b00", "random": "#3b6ea5", "synthetic-baseline": "#7b4fa0",
          "synthetic-structured": "#2e8b57"}  # the seed write-up's colours


# ------------------------------------------------------------------ reading one curve


def blowup_step(d: np.ndarray, rel_threshold: float) -> int:
    """Index of the steepest rise of curve d (its NaN tail ignored), or its last step when no
    rise s_i = d_i − d_{i−1} (s_0 = s_1) exceeds rel_threshold × max |d|."""
    d = np.asarray(d, dtype=float)
    n = int(np.isfinite(d).sum())
    d = d[:n]
    if n < 2:
        return max(n - 1, 0)
    s = np.diff(d)
    s = np.concatenate([s[:1], s])
    if not (s > rel_threshold * np.abs(d).max()).any():
        return n - 1
    return int(np.argmax(s))


def plateau_length(d: np.ndarray, threshold: float) -> int:
    """First step where d ≥ threshold; the curve's length when it never gets there."""
    d = np.asarray(d, dtype=float)
    n = int(np.isfinite(d).sum())
    hits = np.nonzero(d[:n] >= threshold)[0]
    return int(hits[0]) if len(hits) else n


def blowups(curves, rel_threshold: float) -> dict[str, np.ndarray]:
    """{"l2", "kl"}: (B, K) blow-up step of every curve of a `Curves`."""
    return {m: np.apply_along_axis(blowup_step, -1, getattr(curves, m), rel_threshold)
            for m in ("l2", "kl")}


# ------------------------------------------------------------------ numbers


def summarize(values: Mapping[str, np.ndarray], ref: str = "real") -> dict[str, dict]:
    """Per kind: n, mean, its 95% bootstrap interval ("ci95"), median, std, the two-sample KS
    statistic and p-value against `ref`, and "diff_vs_ref": the mean of the paired differences
    to `ref` (every base has one target of each kind, so steps pair by base) with its interval
    (`stats.mean_stat`: mean, var, ci95, n), None for `ref` itself or unequal lengths."""
    from scipy.stats import ks_2samp

    from saelab.studies.stats import mean_stat

    out = {}
    for kind, v in values.items():
        v = np.asarray(v, dtype=float)
        entry = {"n": len(v), "mean": float(v.mean()), "ci95": mean_stat(v.tolist())["ci95"],
                 "median": float(np.median(v)),
                 "std": float(v.std(ddof=1)) if len(v) > 1 else None, "ks": None, "ks_p": None,
                 "diff_vs_ref": None}
        if kind != ref and ref in values:
            other = np.asarray(values[ref], dtype=float)
            ks = ks_2samp(v, other)
            entry["ks"], entry["ks_p"] = float(ks.statistic), float(ks.pvalue)
            if len(other) == len(v):
                entry["diff_vs_ref"] = mean_stat((v - other).tolist())
        out[kind] = entry
    return out


def distribution(v: np.ndarray) -> dict:
    """Mean, median and quartiles of a sample, NaNs left out."""
    v = np.asarray(v, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"n": 0, "mean": None, "median": None, "q25": None, "q75": None}
    q25, q50, q75 = np.percentile(v, [25, 50, 75])
    return {"n": len(v), "mean": float(v.mean()), "median": float(q50), "q25": float(q25),
            "q75": float(q75)}


def results_json(m, plateau: Mapping[str, np.ndarray] | None,
                 censored: Mapping[str, np.ndarray] | None, mismatch: Mapping[str, float]) -> dict:
    """The "results" of run.json: summaries per kind, real-activation statistics, every
    curve's blow-up step and plateau length (m: a `Measured`)."""
    by_kind = {metric: {k: m.steps[metric][:, i] for i, k in enumerate(m.kinds)}
               for metric in ("l2", "kl")}
    stats = m.stats
    return {
        "blowup": {metric: summarize(v) for metric, v in by_kind.items()},
        "plateau": None if plateau is None else {
            "lengths": summarize(plateau),
            "censored": {k: float(np.mean(v)) for k, v in censored.items()}},
        "real_stats": {"l0": distribution(stats.l0), "top_share": distribution(stats.top_share),
                       "cos_to_top": distribution(stats.cos_to_top), "mean_cos": stats.mean_cos,
                       "fvu": stats.fvu, "alive_fraction": float((stats.freq > 0).double().mean())},
        "profile_mismatch": dict(mismatch),
        "per_curve": {f"blowup_{metric}": {k: v.tolist() for k, v in steps.items()}
                      for metric, steps in by_kind.items()}
                     | {"plateau": None if plateau is None else
                        {k: v.tolist() for k, v in plateau.items()}},
    }


# ------------------------------------------------------------------ figures


def step_histogram(values: Mapping[str, np.ndarray], n_steps: int, *, title: str,
                   xlabel: str = "blow-up step") -> bytes:
    """Overlaid outlined histograms, one per kind, over steps 0..n_steps-1."""
    fig = new_figure()
    ax = fig.add_subplot()
    edges = np.linspace(-0.5, n_steps - 0.5, min(n_steps, 25) + 1)
    for kind, v in values.items():
        ax.hist(v, bins=edges, histtype="step", linewidth=1.6, label=kind,
                color=COLORS.get(kind))
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    ax.legend(frameon=False, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return to_png(fig)


def cdf(values: Mapping[str, np.ndarray], *, title: str, xlabel: str = "blow-up step") -> bytes:
    """Empirical CDFs, one per kind."""
    fig = new_figure()
    ax = fig.add_subplot()
    for kind, v in values.items():
        v = np.sort(np.asarray(v, dtype=float))
        ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=kind,
                color=COLORS.get(kind), linewidth=1.6)
    ax.set(title=title, xlabel=xlabel, ylabel="fraction of curves", ylim=(0, 1.02))
    ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    return to_png(fig)


def sample_curves(curves: np.ndarray, kinds: Sequence[str], steps: np.ndarray, n: int, *,
                  title: str, ylabel: str) -> bytes:
    """The first n curves of each kind (thin, with their blow-up step dotted) and the mean (dashed).

    curves (B, K, S); steps (B, K) blow-up steps.
    """
    fig = new_figure((6.0, 3.6))
    ax = fig.add_subplot()
    x = np.arange(curves.shape[-1])
    for i, kind in enumerate(kinds):
        color = COLORS.get(kind)
        for b in range(min(n, curves.shape[0])):
            ax.plot(x, curves[b, i], color=color, linewidth=0.8, alpha=0.6)
            s = int(steps[b, i])
            ax.plot([s], [curves[b, i, s]], "o", color=color, markersize=3)
        with np.errstate(invalid="ignore"):
            ax.plot(x, np.nanmean(curves[:, i], axis=0), "--", color=color, linewidth=1.8,
                    label=f"{kind} (mean)")
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.legend(frameon=False, fontsize=7)
    ax.grid(alpha=0.3)
    return to_png(fig)


def value_histogram(values: Mapping[str, np.ndarray], *, title: str, xlabel: str,
                    bins: int = 40, density: bool = True) -> bytes:
    """Overlaid histograms of continuous values (cosines, shares, L0), one per series."""
    fig = new_figure()
    ax = fig.add_subplot()
    finite = [np.asarray(v, dtype=float)[np.isfinite(v)] for v in values.values()]
    lo = min((v.min() for v in finite if len(v)), default=0.0)
    hi = max((v.max() for v in finite if len(v)), default=1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    drawn = 0
    for (name, _), v in zip(values.items(), finite, strict=True):
        if len(v):
            ax.hist(v, bins=edges, histtype="step", linewidth=1.6, density=density, label=name,
                    color=COLORS.get(name))
            drawn += 1
    ax.set(title=title, xlabel=xlabel, ylabel="density" if density else "count")
    if drawn > 1:
        ax.legend(frameon=False, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return to_png(fig)


def make_figures(m, kinds: Sequence[str], plateau: Mapping[str, np.ndarray] | None,
                 profiles: Mapping[str, np.ndarray], n_curves: int) -> dict[str, bytes]:
    """Every figure of the report, by name: from a `Measured`, the plateau lengths and the
    cosine-to-top profiles {series: cosines}."""
    n_steps = m.curves.l2.shape[-1]
    figs = {}
    for metric, label in (("l2", "last-layer residual L2"), ("kl", "KL(clean ‖ perturbed)")):
        steps = {k: m.steps[metric][:, i] for i, k in enumerate(kinds)}
        figs[f"blowup_{metric}_hist"] = step_histogram(steps, n_steps, title=f"Blow-up steps, {label}")
        figs[f"blowup_{metric}_cdf"] = cdf(steps, title=f"CDF of blow-up steps, {label}")
        figs[f"curves_{metric}"] = sample_curves(getattr(m.curves, metric), kinds, m.steps[metric],
                                                 n_curves, title=f"Sample curves, {label}",
                                                 ylabel=label)
    if plateau:
        figs["plateau_cdf"] = cdf(plateau, title="Plateau lengths (towards Gaussian samples)",
                                  xlabel="plateau length (steps)")
    figs["real_l0"] = value_histogram({"real": m.stats.l0}, title="L0 of real activations",
                                      xlabel="active latents", density=False)
    figs["real_top_share"] = value_histogram({"real": m.stats.top_share},
                                             title="Top latent's share of the activation sum",
                                             xlabel="share", density=False)
    last = {k: v for k, v in profiles.items() if k != "real"} | {"real": profiles["real"]}
    figs["cos_to_top"] = value_histogram(last, title="Cosine of active latents to the top one "
                                         "(bases and their synthetic targets)", xlabel="decoder cosine")
    return figs


# ------------------------------------------------------------------ the page


def _interval(ci: Sequence[float] | None) -> str:
    return "–" if not ci else f"[{ci[0]:.3g}, {ci[1]:.3g}]"


def _stat_rows(summary: Mapping[str, dict]) -> list[list[object]]:
    rows = []
    for kind, s in summary.items():
        diff = s.get("diff_vs_ref") or {}
        rows.append([kind, s["mean"], _interval(s.get("ci95")), s["median"], s["ks"], s["ks_p"],
                     diff.get("mean"), _interval(diff.get("ci95"))])
    return rows


def render(result: dict, figures: Mapping[str, bytes]) -> str:
    """report.html for a run.json dict and its figures (every text from data is escaped)."""
    from saelab.report.html import Markup, image, key_values, page, paragraph, section, table
    from saelab.report.html import figures as figs

    res, cfg, res_stats = result["results"], result["config"], result["results"]["real_stats"]
    img = {name: image(png, name) for name, png in figures.items()}
    header = ["target", "mean", "95% CI", "median", "KS vs real", "p", "paired Δ vs real",
              "95% CI"]
    body = [
        paragraph(result["question"]),
        section("Setup", key_values({
            "model": result["model"]["model"], "site": result["site"], "SAE": result["sae"]["path"],
            "SAE architecture": result["sae"]["architecture"], "d_sae": result["sae"]["d_sae"],
            "corpus": result["corpus"]["name"], "bases": cfg["n"], "steps": cfg["steps"],
            "mode": cfg["mode"], "blow-up threshold": cfg["blowup_threshold"],
            "seed": cfg["seed"]})),
        section("Blow-up steps: last-layer residual L2", table(_stat_rows(res["blowup"]["l2"]), header),
                figs(img["blowup_l2_hist"], img["blowup_l2_cdf"])),
        section("Blow-up steps: KL(clean ‖ perturbed)", table(_stat_rows(res["blowup"]["kl"]), header),
                figs(img["blowup_kl_hist"], img["blowup_kl_cdf"])),
        section("Sample curves", figs(img["curves_l2"], img["curves_kl"])),
    ]
    if res.get("plateau"):
        p = res["plateau"]
        body.append(section(
            "Plateaus: from each kind towards fresh Gaussian samples",
            paragraph(f"Absolute steps of {cfg['step_size']:g}; a plateau ends at the first step "
                      f"where L2 ≥ {cfg['plateau_threshold']:g} × the unperturbed last-layer "
                      "residual norm. Curves that never get there count their full length "
                      "(censored fraction below).", "def"),
            table([[k, s["mean"], s["median"], s["ks"], s["ks_p"], p["censored"][k]]
                   for k, s in p["lengths"].items()],
                  ["start", "mean", "median", "KS vs real", "p", "censored"]),
            figs(img["plateau_cdf"])))
    body.append(section(
        "Real-activation statistics (statistics windows)",
        table([["L0 (active latents)", *_q(res_stats["l0"])],
               ["top latent's share of the activation sum", *_q(res_stats["top_share"])],
               ["cosine of active latents to the top latent", *_q(res_stats["cos_to_top"])]],
              ["", "mean", "median", "25%", "75%"]),
        key_values({"mean cosine used by synthetic-structured": res_stats["mean_cos"],
                    "SAE FVU on these activations": res_stats["fvu"],
                    "latents that fired": res_stats["alive_fraction"]}),
        table([[k, v] for k, v in res["profile_mismatch"].items()],
              ["synthetic kind", "mean |cos-to-top profile − base's|"]),
        figs(img["real_l0"], img["real_top_share"], img["cos_to_top"])))
    body.append(section("Definitions", table(list(result["definitions"].items()),
                                             ["term", "definition"])))
    body.append(section("Time", key_values({k: round(v, 1) for k, v in result["seconds"].items()})))
    return page("Are SAE-built activations realistic?", Markup("".join(body)),
                subtitle=f"{result['model']['model']} · {result['site']} · {cfg['n']} bases")


def _q(d: dict) -> list[object]:
    return [d["mean"], d["median"], d["q25"], d["q75"]]


# ------------------------------------------------------------------ the run folder


def write_run(out: Path, result: dict, figures: Mapping[str, bytes], curves,
              kinds: Sequence[str]) -> None:
    """PNGs, curves.npz, report.html, then run.json last: its presence means the run finished."""

    from saelab.data.store import atomic_write_text
    from saelab.report.html import write_page

    out.mkdir(parents=True, exist_ok=True)
    for name, png in figures.items():
        tmp = out / f".{name}.png.tmp"
        tmp.write_bytes(png)
        os.replace(tmp, out / f"{name}.png")
    tmp = out / ".curves.npz.tmp"
    with open(tmp, "wb") as fh:  # a file object, so numpy does not append .npz to the name
        np.savez_compressed(fh, l2=curves.l2.astype(np.float32), kl=curves.kl.astype(np.float32),
                            kinds=np.array(kinds))
    os.replace(tmp, out / "curves.npz")
    write_page(out / "report.html", render(result, figures))
    atomic_write_text(out / "run.json", json.dumps(_json_safe(result), indent=1) + "\n")


def _json_safe(obj: Any) -> Any:
    """NaN/inf become null (JSON has no NaN); numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def versions() -> dict:
    import scipy
    import torch
    import transformers

    import saelab

    return {"saelab": saelab.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__}
