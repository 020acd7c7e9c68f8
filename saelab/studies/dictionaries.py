"""The dictionary study (seed 003): dictionaries of several sizes on a small model, compared
and read several ways.

    result = run_dictionaries(lm, DictionariesConfig(tokens=200_000), "runs/dictionaries")

Stages, each saved under `out` so an interrupted study resumes where it stopped:

    train        every grid dictionary (widths x sparsities x seeds), plus one dictionary at
                 the next residual site and one at the next MLP output, from ONE stream pass
                 (saelab.train.trainer with a live Stream; checkpointed, resumable)
    evaluate     L0, FVU, loss recovered, ΔCE of every grid point on held-out text
    compare      MCS of every pair; per-feature max cosines; recurring features
    features     feature indexes (dashboards, browser) of the seed-0 dictionaries at the
                 middle sparsity and of the connection dictionaries: top and uniform
                 examples, logit lens with abnormal token rows left out, ablated text
    activations  the three sites' features on the same tokens: outlier dimensions,
                 positions, the sparse linear connections
    ablation     ablated text of the top and the uniform examples of the features shown
    report       report.html, PNGs, run.json (last: its presence means the study finished)

Connection sites: for a residual site X.L the next residual site is X.(L+1) and the
MLP output is that of the first MLP after the site (mlp_out.L for resid_pre/resid_mid,
mlp_out.(L+1) for resid_post), so both later sites are computed from the earlier one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.data.store import atomic_write_text
from saelab.errors import SaelabError, SiteError
from saelab.studies.dictionaries_config import (
    SCHEMA,
    DictionariesConfig,
    Point,
    check_memory,
    featured_sparsity,
    featured_width,
    grid_specs,
)
from saelab.studies.timings import StageClock

Stage = Callable[[str, int], Callable[[int], None]]
RESID_KINDS = ("resid_pre", "resid_mid", "resid_post")
BUFFER_TOKENS = 16_384  # rows per site in the shuffling buffer: ~650 contexts of 25 tokens
FIRST_POSITIONS = 5  # "first sentence": the first five text positions of a 25-token context
OUTLIER_DIMS = 3  # the dimensions of largest mean squared activation at the site


def _no_stage(name: str, total: int) -> Callable[[int], None]:
    return lambda done: None


def connection_sites(arch: Any, site: str) -> tuple[str, ...]:
    """(next residual site, next MLP output) after `site`; () when the model has no next layer."""
    from saelab.models.sites import Site

    s = Site.parse(site)
    if s.kind not in RESID_KINDS:
        return ()
    mlp_layer = s.layer + 1 if s.kind == "resid_post" else s.layer
    if s.layer + 1 >= arch.n_layers:
        return ()
    return (f"{s.kind}.{s.layer + 1}", f"mlp_out.{mlp_layer}")


def featured_point(points: list[Point], cfg: DictionariesConfig) -> Point:
    """The dictionary whose features are shown: the upper-middle width (4x of 1..8x, the
    original's), the middle sparsity, the first seed."""
    mult, sparsity = featured_width(cfg.widths), featured_sparsity(cfg.sparsities)
    return next(p for p in points if p.role == "grid" and p.width_mult == mult
                and p.sparsity == sparsity and p.seed == cfg.seed)


def _check_study(out: Path, cfg: DictionariesConfig, resume: bool) -> None:
    path = out / "study.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    if not resume:
        raise SaelabError(f"{out} already holds a dictionary study. Resume it with --resume, "
                          "or choose another --out.")
    new = json.loads(json.dumps(asdict(cfg)))
    diff = [f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
    if diff:
        raise SaelabError("cannot resume with other settings:\n  " + "\n  ".join(diff)
                          + "\nResume with the original settings, or give another --out.")


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=_np_default) + "\n")


def _np_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if not math.isfinite(float(o)) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def run_dictionaries(lm: Any, cfg: DictionariesConfig, out: str | Path, *, resume: bool = False,
                     stage: Stage = _no_stage, memory_budget: int | None = None,
                     device: str = "cpu") -> dict:
    """Run (or resume) the study into `out`; returns the run.json dict. Raises SaelabError
    for a site the model lacks, a grid past the memory budget, or an `out` holding another
    study (see the module docstring for the stages)."""
    from saelab.interventions.splice import one_site
    from saelab.models.sites import site_width
    from saelab.train.trainer import default_memory_budget, resolve_device

    out = Path(out)
    started = time.perf_counter()
    site = one_site(lm.arch, cfg.site, "--site")
    d_model = site_width(lm.arch, site)
    others = connection_sites(lm.arch, site) if cfg.connect else ()
    if cfg.connect and not others:
        raise SiteError(f"--site {site}: the connections need a residual site with a next "
                        f"layer (resid_pre/resid_mid/resid_post below layer "
                        f"{lm.arch.n_layers - 1}); pick one, or pass --no-connect.")
    specs, points = grid_specs(cfg, site, d_model, others)
    widths = {s: site_width(lm.arch, s) for s in (site, *others)}
    budget = memory_budget or default_memory_budget(resolve_device(device))
    need = check_memory(specs, widths, cfg.batch_size, BUFFER_TOKENS, budget)
    _check_study(out, cfg, resume)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "study.json", asdict(cfg))
    clock = StageClock(out / "timings.json")

    with clock.stage("train", out / "train"):
        sae_dirs = _train(lm, cfg, specs, out / "train", stage, budget, device)
    saes = _load(sae_dirs, device)
    grid = [p for p in points if p.role == "grid"]
    feat = featured_point(points, cfg)

    with clock.stage("evaluate", out / "eval.json"):
        evals = _evaluate(lm, cfg, saes, grid, site, out / "eval.json", stage)
    with clock.stage("compare", out / "mcs.npz"):
        mcs = _compare(saes, grid, out / "mcs.npz", stage)
    shown = [p for p in grid if p.seed == cfg.seed and p.sparsity == feat.sparsity]
    shown += [p for p in points if p.role == "connect"]
    with clock.stage("features", out / "features"):
        indexes = _features(lm, cfg, saes, sae_dirs, shown, out / "features", stage)
    with clock.stage("activations", out / "connections.json"):
        acts = _activations(lm, cfg, saes, points, feat, mcs, site, others,
                            out / "connections.json", stage)
    with clock.stage("ablation", out / "ablation.json"):
        ablation = _ablation(lm, cfg, saes, indexes, feat, acts, out / "ablation.json", stage)

    from saelab.studies.dictionaries_report import summarize, write_report

    with clock.stage("report"):
        results = summarize(cfg, points, feat, evals, mcs, acts, ablation, d_model)
        result = {
            "schema": SCHEMA, "config": asdict(cfg), "site": site, "connection_sites": list(others),
            "model": lm.provenance(), "memory_needed_bytes": need, "memory_budget_bytes": budget,
            "dictionaries": [p._asdict() | {"folder": str(sae_dirs[p.label])} for p in points],
            "featured": feat._asdict(), "feature_indexes": {k: str(v) for k, v in indexes.items()},
            "results": results, "seconds": dict(clock.seconds), "versions": _versions(),
        }
        write_report(out, result, indexes, evals, mcs, acts, ablation)
    result["seconds"] = clock.seconds | {"this run": time.perf_counter() - started}
    _write_json(out / "run.json", result)
    return result


def _versions() -> dict:
    import sklearn

    from saelab.studies.synthetic_report import versions

    return versions() | {"scikit-learn": sklearn.__version__}


# ------------------------------------------------------------------ stages


def _train(lm, cfg: DictionariesConfig, specs, folder: Path, stage: Stage, budget: int,
           device: str) -> dict[str, Path]:
    from saelab.train.config import TrainConfig
    from saelab.train.trainer import Stream, train

    tcfg = TrainConfig(saes=tuple(specs), tokens=cfg.tokens, batch_size=cfg.batch_size,
                       lr=cfg.lr, seed=cfg.seed, buffer_tokens=BUFFER_TOKENS,
                       checkpoint_every=max(cfg.tokens // 4, cfg.batch_size),  # a grid checkpoint is large
                       chunk_contexts=64, log_every=20)
    done = all((folder / s.label / "cfg.json").is_file() for s in specs)
    if not done:
        update = stage("train dictionaries (one stream pass)", tcfg.steps * tcfg.batch_size)
        result = train(tcfg, Stream(lm, cfg.corpus, context=cfg.context), folder,
                       resume=(folder / "run.json").is_file(), device=device,
                       memory_budget=budget, on_progress=lambda d, t, s: update(d))
        if len(result.groups) > 1:  # cannot happen after check_memory; say so if it does
            raise SaelabError(f"the grid was split into {len(result.groups)} passes")
    return {s.label: folder / s.label for s in specs}


def _load(dirs: dict[str, Path], device: str) -> dict[str, Any]:
    from saelab.sae import load_sae

    return {label: load_sae(d, dtype="float32").to(device).eval() for label, d in dirs.items()}


def _evaluate(lm, cfg, saes, grid: list[Point], site: str, path: Path, stage: Stage) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    from saelab.data.corpus import load_corpus
    from saelab.data.tokens import pack
    from saelab.evals.run import held_out_skip
    from saelab.studies.dictionaries_eval import DEFINITIONS, evaluate_grid

    corpus = load_corpus(cfg.corpus)
    first = saes[grid[0].label]
    skip, held = held_out_skip(first.cfg, corpus, lm.tokenizer, cfg.context)
    n_ctx = math.ceil(cfg.eval_tokens / cfg.context)
    update = stage("evaluate every dictionary", n_ctx)
    batches = pack(corpus, lm.tokenizer, cfg.context, batch_size=32,
                   n_tokens=(skip + n_ctx) * cfg.context, skip=skip)
    rows = evaluate_grid(lm, {p.label: saes[p.label] for p in grid}, site, batches, on_batch=update)
    result = {"metrics": rows, "held_out": held, "skip_contexts": skip, "definitions": DEFINITIONS}
    _write_json(path, result)
    return result


def _compare(saes, grid: list[Point], path: Path, stage: Stage):
    from saelab.studies.dictionaries_mcs import PairwiseMCS, pairwise_mcs

    names = [p.label for p in grid]
    if path.is_file():
        data = np.load(path, allow_pickle=False)
        if list(data["names"]) == names:
            max_cos = {(int(i), int(j)): data[f"max_cos_{i}_{j}"]
                       for i in range(len(names)) for j in range(len(names)) if i != j}
            return PairwiseMCS(names, data["mcs"], max_cos)
    n = len(names)
    update = stage("MCS of every pair", n * (n - 1) // 2)
    res = pairwise_mcs({p.label: saes[p.label] for p in grid}, on_pair=update)
    arrays = {f"max_cos_{i}_{j}": v.astype(np.float32) for (i, j), v in res.max_cos.items()}
    tmp = path.with_name(".mcs.npz.tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, names=np.array(names), mcs=res.mcs, **arrays)
    tmp.replace(path)
    return res


def _features(lm, cfg, saes, dirs, shown: list[Point], folder: Path, stage: Stage) -> dict[str, Path]:
    from saelab.features.build import IndexConfig, build_index
    from saelab.features.index import is_index

    names = {p.label: folder / p.label for p in shown}
    if (folder / "run.json").is_file() and all(is_index(f) for f in names.values()):
        return names
    update = stage("feature indexes (collect)", cfg.feature_tokens)

    def on_stage(name: str, done: int, total: int) -> None:
        if name == "collect":
            update(done)

    icfg = IndexConfig(tokens=cfg.feature_tokens, corpus=cfg.corpus, context=cfg.context,
                       batch_size=64, ablate=cfg.index_ablate, max_back=cfg.max_back,
                       cards=max(cfg.index_ablate, 16))
    return build_index(lm, {p.label: (saes[p.label], dirs[p.label]) for p in shown}, folder,
                       icfg, on_stage=on_stage)


@torch.inference_mode()
def _site_features(lm, cfg, saes: dict, labels: dict[str, str], n_tokens: int, stage: Stage):
    """({label: (N, F) features}, site activations (N, d) of the first label's site,
    positions (N,)) over the non-special tokens of the first `n_tokens` of the corpus."""
    from saelab.data.corpus import load_corpus
    from saelab.data.tokens import pack
    from saelab.models.hooks import capture

    sites = list(dict.fromkeys(labels.values()))
    feats: dict[str, list] = {lb: [] for lb in labels}
    xs, pos = [], []
    n_ctx = math.ceil(n_tokens / cfg.context)
    update = stage("features on shared tokens", n_ctx)
    done = 0
    for ids, special in pack(load_corpus(cfg.corpus), lm.tokenizer, cfg.context, batch_size=64,
                             n_tokens=n_tokens):
        with capture(lm.model, sites, arch=lm.arch) as cap:
            cap.run(input_ids=ids.to(lm.device))
        keep = ~special.to(lm.device)
        for lb, s in labels.items():
            feats[lb].append(saes[lb].encode(cap[s][keep].float()).cpu())
        xs.append(cap[sites[0]][keep].float().cpu())
        pos.append(torch.arange(ids.shape[1]).expand_as(ids)[keep.cpu()])
        done += len(ids)
        update(done)
    return ({lb: torch.cat(v).numpy() for lb, v in feats.items()}, torch.cat(xs).numpy(),
            torch.cat(pos).numpy())


def _activations(lm, cfg, saes, points: list[Point], feat: Point, mcs, site: str,
                 others: tuple[str, ...], path: Path, stage: Stage) -> dict:
    """Outlier dimensions, the recurring features' positions and decoder alignment, and the
    connections; saved as JSON."""
    if path.is_file():
        return json.loads(path.read_text())
    from saelab.data.outliers import norm_outliers
    from saelab.studies.dictionaries_connect import (
        compare_with_weights,
        fit_connections,
        weight_guess,
    )

    later = [p for p in points if p.role == "connect"]
    labels = {feat.label: site} | {p.label: p.site for p in later}
    acts, x, pos = _site_features(lm, cfg, saes, labels, cfg.connect_tokens, stage)
    # Outlier dimensions: largest mean squared activation over ordinary tokens (the
    # attention sinks, >10x the median norm, are left out as in training).
    sinks = norm_outliers(torch.from_numpy(x)).numpy()
    ms = (x[~sinks] ** 2).mean(0)
    dims = np.argsort(-ms)[:OUTLIER_DIMS]
    result: dict[str, Any] = {
        "tokens": int(len(x)), "sinks_left_out": int(sinks.sum()),
        "outlier_dims": dims.tolist(), "outlier_dim_mean_sq": ms[dims].tolist(),
        "median_dim_mean_sq": float(np.median(ms)),
        "outlier_dims_share_of_sq_norm": float(ms[dims].sum() / ms.sum()),
    }
    from saelab.features.logit_lens import abnormal_tokens, unembedding

    W_U = unembedding(lm)[0]
    token_filter = abnormal_tokens(W_U)
    if len(lm.tokenizer) < len(W_U):  # padded vocabularies: rows with no token
        token_filter.reasons["padding"] = list(range(len(lm.tokenizer), len(W_U)))
        token_filter.excluded[len(lm.tokenizer):] = True
    result["lens_filter"] = token_filter.report(lm.tokenizer, show=200)
    # The featured dictionary's most recurring features: decoder alignment and positions.
    grid = [p for p in points if p.role == "grid"]
    i = mcs.names.index(feat.label)
    same = [mcs.names.index(p.label) for p in grid if p.sparsity == feat.sparsity and p.label != feat.label]
    score = mcs.recurrence_score(i, same) if same else np.zeros(saes[feat.label].cfg.d_sae)
    f_acts = acts[feat.label]
    alive = (f_acts > 0).any(0)
    order = [int(f) for f in np.argsort(-score) if alive[f]][:20]
    W = saes[feat.label].W_dec.detach().float().numpy()
    share = (W[:, dims] ** 2).sum(1) / np.maximum((W ** 2).sum(1), 1e-12)
    text_pos = pos - pos.min()  # 0 = the first text position (after BOS)
    rows = []
    for f in order:
        a = f_acts[:, f]
        mass = a.sum()
        early = a[text_pos < FIRST_POSITIONS].sum() / mass if mass > 0 else 0.0
        rows.append({"feature": f, "recurrence": float(score[f]), "outlier_dim_share": float(share[f]),
                     "first_positions_share": float(early),
                     "firing_rate": float((a > 0).mean()),
                     "mean_position": float((a * text_pos).sum() / mass) if mass > 0 else None})
    n_pos = cfg.context - int(pos.min())
    result["recurring"] = {"dictionary": feat.label, "compared_with": [mcs.names[j] for j in same],
                           "uniform_outlier_share": OUTLIER_DIMS / x.shape[1],
                           "uniform_first_share": FIRST_POSITIONS / n_pos, "features": rows}
    # Connections
    conns = {}
    for p in later:
        late = acts[p.label]
        freq = (late > 0).mean(0)
        targets = [int(t) for t in np.argsort(-freq) if 0 < freq[t] < 0.5][:cfg.connect_features]
        update = stage(f"connections {site} -> {p.site}", 1)
        fit = fit_connections(acts[feat.label], late, targets, alpha=cfg.connect_alpha)
        update(1)
        guess = weight_guess(saes[feat.label].W_dec.detach().numpy(),
                             saes[p.label].W_enc.detach().numpy())
        strongest = []
        for e, t, c, r2 in fit.strongest(20):
            strongest.append({"earlier": e, "later": t, "coef": c, "r2": r2,
                              "guess": float(guess[e, t] * fit.scale[e]),
                              "guess_rank": int((np.abs(guess[:, t]) * fit.scale
                                                 > abs(guess[e, t]) * fit.scale[e]).sum()) + 1})
        conns[p.site] = {"later": p.label, "targets": targets, "r2": fit.r2.tolist(),
                         "nonzero": (fit.coef != 0).sum(1).tolist(),
                         "not_converged": fit.not_converged,
                         "strongest": strongest, "weights": compare_with_weights(fit, guess)}
    result["connections"] = {"earlier": feat.label, "alpha": cfg.connect_alpha, "pairs": conns}
    _write_json(path, result)
    return result


def _ablation(lm, cfg, saes, indexes: dict[str, Path], feat: Point, acts: dict, path: Path,
              stage: Stage) -> dict:
    """Ablated text of the top example and one example per uniform bin, for the featured
    dictionary's most recurring features and the strongest connections' features."""
    if path.is_file():
        return json.loads(path.read_text())
    from saelab.data.corpus import load_corpus
    from saelab.data.tokens import pack
    from saelab.features.ablated_text import ablate_examples, as_arrays, chosen
    from saelab.features.index import FeatureIndex

    wanted: dict[str, list[int]] = {feat.label: [r["feature"] for r in acts["recurring"]["features"]
                                                 [:cfg.featured]]}
    for pair in acts["connections"]["pairs"].values():
        for s in pair["strongest"][:3]:
            wanted.setdefault(feat.label, []).append(s["earlier"])
            wanted.setdefault(pair["later"], []).append(s["later"])
    ids_all, special_all = [], []
    for ids, special in pack(load_corpus(cfg.corpus), lm.tokenizer, cfg.context, batch_size=256,
                             n_tokens=cfg.feature_tokens):
        ids_all.append(ids)
        special_all.append(special)
    ids_all, special_all = torch.cat(ids_all), torch.cat(special_all)
    total = sum(len(dict.fromkeys(v)) for v in wanted.values())
    update = stage("ablated text (top and uniform examples)", total)
    done, result = 0, {}
    for label, feats in wanted.items():
        index = FeatureIndex.open(indexes[label])
        for f in dict.fromkeys(feats):
            # the same examples as `saelab features` ablates: the top one, the first of each bin
            examples = index.examples(f)
            ex = as_arrays(examples)
            pick = np.flatnonzero(chosen(ex["kind"], ex["bin"], ex["rank"], per_bin=1)).tolist()
            pick.sort(key=lambda i: (examples[i]["kind"] != "top", -examples[i]["bin"]))
            picked = [examples[i] for i in pick]
            ctx_rows = torch.tensor([e["context"] for e in picked], dtype=torch.long)
            res = ablate_examples(lm, saes[label], {k: v[pick] for k, v in ex.items()},
                                  ids_all[ctx_rows], special_all[ctx_rows], max_back=cfg.max_back)
            rows = []
            for e, r in zip(picked, res, strict=True):
                ctx = ids_all[e["context"]][: r.position + 1].tolist()
                deltas = [None] * len(ctx)
                for p_, d in zip(r.deleted, r.deltas, strict=True):
                    deltas[p_] = d
                rel = max((abs(d) for d in r.deltas), default=0.0) / r.base if r.base > 0 else None
                rows.append({"kind": e["kind"], "bin": e.get("bin"), "position": r.position,
                             "base": r.base, "token_ids": ctx, "tokens": lm.tokenizer.batch_decode([[t] for t in ctx]),
                             "deltas": deltas, "max_rel_change": rel})
            result.setdefault(label, {})[str(f)] = rows
            done += 1
            update(done)
    _write_json(path, result)
    return result

