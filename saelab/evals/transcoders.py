"""Transcoder evaluation: FVU of mlp_out, L0, dead fraction, ΔCE with transcoders replacing MLPs.

    result = evaluate_transcoders(lm, tset, EvalConfig(tokens=2048), out="runs/tc_eval")
    result["layers"]["3"]["metrics"]["fvu"]        # {"value": ..., "ci95": [...]}
    result["all_layers"]["metrics"]["delta_ce"]     # every transcoder at once

Per batch of contexts:

    clean    one forward capturing mlp_in.L and mlp_out.L of every layer, and the logits
    layer L  the MLP of layer L replaced by its transcoder (decode + skip), alone: its
             prediction from the clean mlp_in.L is exact, since nothing upstream changed
    all      every MLP of the set replaced at once, in one forward (later transcoders
             read what earlier ones changed: `interventions.splice.replace_mlps`)

Replacement happens only at positions whose input token is not special (as SAE
evaluation does), and reconstruction metrics leave special tokens and attention-sink
outliers out. Definitions are SAE evaluation's with x = mlp_out.L (the target) and
x̂ = the transcoder's prediction; CE_t and KL_t as in evals/downstream.py. 95%
intervals resample contexts (bootstrap.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from saelab.data.corpus import Corpus, load_corpus
from saelab.data.outliers import norm_outliers
from saelab.data.tokens import pack
from saelab.errors import SaelabError, ShapeMismatchError
from saelab.evals import reconstruction as rc
from saelab.evals.bootstrap import ContextStats, bootstrap_ci, safe_div
from saelab.evals.downstream import next_token_ce, next_token_logp, prediction_mask
from saelab.interventions.splice import replace_mlps
from saelab.models.hooks import capture
from saelab.models.limits import check_positions, lm_max_positions

SCHEMA = "saelab.eval-transcoders/1"
DEFINITIONS = {
    **{k: v.replace("x_hat", "prediction").replace("d_in", "d_out") for k, v in
       rc.DEFINITIONS.items()},
    "fvu": "sum_t ||y_t - y_hat_t||^2 / sum_t ||y_t - mu||^2 with y = mlp_out.L (the real MLP "
           "output), y_hat the transcoder's prediction (decode + skip) from the real mlp_in.L, "
           "mu the mean of y over the evaluation set",
    "ce_clean": "mean next-token cross-entropy (nats) of the unmodified model",
    "ce_replaced": "mean cross-entropy with the MLP(s) replaced by the transcoder(s), no error term",
    "delta_ce": "ce_replaced - ce_clean",
    "kl": "mean over positions of KL(p_clean || p_replaced), nats",
    "all_layers": "every MLP of the set replaced at once, in one forward",
}


@torch.inference_mode()
def _batch(lm, tcs: Mapping[int, Any], ids, special, downstream: bool, all_at_once: bool):
    model = lm.model
    ids, special = ids.to(lm.device), special.to(lm.device)
    reads = {L: tc.site or f"mlp_in.{L}" for L, tc in tcs.items()}  # mlp_in.L as a rule
    sites = list(dict.fromkeys(s for L in tcs for s in (reads[L], f"mlp_out.{L}")))
    with capture(model, sites, arch=lm.arch, stop_early=not downstream) as cap:
        cap.run(input_ids=ids)
    preds = {}
    for L, tc in tcs.items():
        out = tc(cap[reads[L]])
        preds[L] = (cap[f"mlp_out.{L}"], out.output.to(cap[f"mlp_out.{L}"].dtype), out.feats)
    columns: dict[str, torch.Tensor] = {}
    if not downstream:
        return preds, columns
    keep = ~special  # (B, P) positions replaced
    pred = prediction_mask(special).double()
    clean_logp = next_token_logp(cap.output.logits)
    cap.output = None
    columns["n_pred"] = pred.sum(1)
    columns["ce_clean"] = (next_token_ce(clean_logp, ids) * pred).sum(1)

    def score(name: str, layers: Mapping[int, Any]) -> None:
        with replace_mlps(lm, layers, where=keep):
            logits = model(input_ids=ids, use_cache=False).logits
        logp = next_token_logp(logits)
        del logits
        kl = F.kl_div(logp, clean_logp, log_target=True, reduction="none").sum(-1)
        columns[f"ce_{name}"] = (next_token_ce(logp, ids).double() * pred).sum(1)
        columns[f"kl_{name}"] = (kl.double() * pred).sum(1)

    for L, tc in tcs.items():
        score(str(L), {L: tc})
    if all_at_once and len(tcs) > 1:
        score("all", tcs)
    return preds, {k: v.cpu() for k, v in columns.items()}


def _metric_fn(layers: list[str]) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    def fn(s: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for L in layers:
            sub = {k.split("/", 1)[1]: v for k, v in s.items() if k.startswith(f"{L}/")}
            out |= {f"{L}/{k}": v for k, v in rc.recon_metrics(sub).items()}
        if "n_pred" in s:
            n = s["n_pred"]
            ce_clean = safe_div(s["ce_clean"], n)
            out["ce_clean"] = ce_clean
            for name in [*layers, "all"]:
                if f"ce_{name}" in s:
                    ce = safe_div(s[f"ce_{name}"], n)
                    out[f"{name}/ce_replaced"] = ce
                    out[f"{name}/delta_ce"] = ce - ce_clean
                    out[f"{name}/kl"] = safe_div(s[f"kl_{name}"], n)
        return out
    return fn


def evaluate_transcoders(lm, transcoders: Mapping[int, Any], config=None, *,
                         out: str | Path | None = None, all_at_once: bool = True,
                         on_progress: Callable[[int, int], None] | None = None,
                         notes: list[str] | None = None) -> dict:
    """Evaluate transcoders ({layer: Transcoder}, e.g. a TranscoderSet) on `lm`.

    config: an EvalConfig (tokens, corpus, context, batch_size, bootstrap, seed,
    downstream, outlier_factor, skip_contexts; other fields are ignored). Returns the
    result dict (and writes `out`/eval.json): per layer the reconstruction metrics of
    mlp_out.L, dead fraction and ΔCE with that MLP replaced; `all_layers` the ΔCE with
    every MLP replaced at once. Raises ShapeMismatchError for transcoders of another width.
    """
    from saelab.evals.run import EvalConfig, _json_safe, held_out_skip

    cfg = config or EvalConfig()
    started = time.perf_counter()
    tcs = {int(L): tc.eval() for L, tc in sorted(transcoders.items())}
    if not tcs:
        raise SaelabError("no transcoders to evaluate")
    d_model = lm.arch.d_model
    for L, tc in tcs.items():
        if not 0 <= L < lm.arch.n_layers:
            raise SaelabError(f"a transcoder for layer {L}, but {lm.name} has layers "
                              f"0..{lm.arch.n_layers - 1}; it belongs to another model.")
        if (tc.d_in, tc.d_out) != (d_model, d_model):
            raise ShapeMismatchError(
                f"the transcoder of layer {L} maps {tc.d_in} -> {tc.d_out}, but {lm.name}'s "
                f"d_model is {d_model}; it was trained on another model "
                f"({tc.cfg.model_name or 'unnamed'}).")
    check_positions("context", cfg.context, lm_max_positions(lm), getattr(lm, "name", "the model"))
    corpus = cfg.corpus if isinstance(cfg.corpus, Corpus) else load_corpus(cfg.corpus)
    notes = list(notes or [])
    first = next(iter(tcs.values()))
    if cfg.skip_contexts is not None:
        skip, held = cfg.skip_contexts, {"held_out": "given", "note": "skip_contexts given"}
    else:
        skip, held = held_out_skip(first.cfg, corpus, lm.tokenizer, cfg.context)
    if held["held_out"] in ("no", "unknown"):
        notes.append(held["note"])
    names = {tc.cfg.model_name for tc in tcs.values()} - {None}
    if names and lm.name not in names:
        notes.append(f"the transcoders were trained on {', '.join(sorted(names))}, evaluated on "
                     f"{lm.name}.")
    n_ctx = math.ceil(cfg.tokens / cfg.context)
    stats = ContextStats()
    accs = {L: rc.ReconAccumulator(tc.cfg.d_sae) for L, tc in tcs.items()}
    for ids, special in pack(corpus, lm.tokenizer, cfg.context, batch_size=cfg.batch_size,
                             n_tokens=(skip + n_ctx) * cfg.context, skip=skip):
        preds, columns = _batch(lm, tcs, ids, special, cfg.downstream, all_at_once)
        keep = ~special.to(lm.device)
        row: dict[str, Any] = dict(columns)
        for L, (y, y_hat, feats) in preds.items():
            sinks = norm_outliers(y, keep, cfg.outlier_factor) & keep
            for k, v in accs[L].update(y, y_hat, feats, keep & ~sinks).items():
                row[f"{L}/{k}"] = v
        stats.add(row)
        if on_progress:
            on_progress(stats.n_contexts * cfg.context, n_ctx * cfg.context)
    if stats.n_contexts == 0:
        raise SaelabError(f"corpus {corpus.name!r} holds no evaluation text after skipping "
                          f"{skip} contexts; pass a smaller --skip-contexts or a larger corpus.")
    if stats.n_contexts < 20:
        notes.append(f"only {stats.n_contexts} contexts: the bootstrap intervals are rough.")
    layer_keys = [str(L) for L in tcs]
    fn = _metric_fn(layer_keys)
    point = fn(stats.sums())
    ci = bootstrap_ci(stats, fn, n_boot=cfg.bootstrap, seed=cfg.seed)

    def metric(key: str) -> dict:
        return {"value": _finite(point[key]), "ci95": list(ci[key]) if ci.get(key) else None}

    layers = {}
    for L, tc in tcs.items():
        feats = accs[L].features()
        m = {k.split("/", 1)[1]: metric(k) for k in point if k.startswith(f"{L}/")}
        layers[str(L)] = {
            "transcoder": {"architecture": tc.cfg.architecture, "d_in": tc.d_in,
                           "d_out": tc.d_out, "d_sae": tc.d_sae, "k": tc.cfg.k,
                           "skip": tc.cfg.skip, "site": f"mlp_in.{L}", "site_out": f"mlp_out.{L}",
                           "model_name": tc.cfg.model_name},
            "metrics": m, "dead_fraction": feats.dead_fraction,
            "dense_fraction": feats.dense_fraction, "n_dead": feats.n_dead}
    result = {
        "schema": SCHEMA, "kind": "transcoders", "model": lm.provenance(),
        "layers": layers,
        "all_layers": ({"layers": [int(L) for L in layer_keys],
                        "metrics": {k.split("/", 1)[1]: metric(k) for k in point
                                    if k.startswith("all/")}} if "all/delta_ce" in point else None),
        "ce_clean": metric("ce_clean") if "ce_clean" in point else None,
        "data": {"corpus": corpus.name, "corpus_hash": corpus.sha256, "context": cfg.context,
                 "skip_contexts": skip, "n_contexts": stats.n_contexts,
                 "tokens_evaluated": int(sum(a.n_tokens for a in accs.values()) / len(accs)),
                 "held_out": held["held_out"]},
        "settings": cfg.to_json() | {"all_at_once": all_at_once},
        "bootstrap": {"unit": "context", "n": cfg.bootstrap if stats.n_contexts > 1 else 0,
                      "seed": cfg.seed, "level": 0.95, "method": "percentile"},
        "definitions": DEFINITIONS, "notes": notes,
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    result = _json_safe(result)
    if out is not None:
        import json

        from saelab.data.store import atomic_write_text

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "eval.json", json.dumps(result, indent=1) + "\n")
        result["out"] = str(out)
    return result


def _finite(v: Any) -> float | None:
    v = float(np.asarray(v))
    return v if math.isfinite(v) else None
