"""L0, FVU, loss recovered and ΔCE of every dictionary of a grid, sharing the clean forwards.

    rows = evaluate_grid(lm, saes, "resid_post.2", batches)   # {label: metrics}

`saelab eval` runs the clean and zero-ablated forwards once per SAE; a grid of
24 dictionaries at one site would run them 24 times. Here each batch runs the
clean forward (site activations and next-token log-probabilities) and the
zero-ablated forward once, then one spliced forward per dictionary. The
definitions are saelab.evals': reconstruction over non-special tokens with
attention sinks left out (norm > 10x the batch median, as training), and
downstream CE over positions where neither token is special
(`saelab.evals.downstream.downstream_metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelab.data.outliers import norm_outliers
from saelab.evals import downstream as ds
from saelab.models.hooks import capture, patch

DEFINITIONS = {
    "l0": "mean active features per token (non-special tokens, attention sinks left out)",
    "fvu": "Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over those tokens",
    "delta_ce": "CE with the dictionary's reconstruction spliced in − clean CE (nats/token)",
    "loss_recovered": "(CE_zero-ablation − CE_with-dictionary) / (CE_zero-ablation − CE_clean)",
}


@torch.inference_mode()
def evaluate_grid(lm: Any, saes: Mapping[str, Any], site: str,
                  batches: Iterable[tuple[Tensor, Tensor]], *, outlier_factor: float = 10.0,
                  on_batch: Callable[[int], None] | None = None) -> dict[str, dict[str, float]]:
    """{label: {l0, fvu, delta_ce, loss_recovered, ce_clean, ce_sae, ce_zero, kl_sae, ...}}.

    saes: {label: SAE (eval mode, on lm's device)} all at `site`; batches: (ids [B, P],
    special [B, P]) from `saelab.data.tokens.pack`.
    """
    model = lm.model
    sums = {name: {"sse": 0.0, "l0": 0.0, "n": 0} for name in saes}
    x_sum = x_sq = None
    n_tok = 0
    cols: dict[str, dict[str, float]] = {name: {} for name in saes}
    shared: dict[str, float] = {}
    done = 0
    for ids, special in batches:
        ids, special = ids.to(lm.device), special.to(lm.device)
        with capture(model, site, arch=lm.arch, stop_early=False) as cap:
            cap.run(input_ids=ids)
        x = cap[site].float()
        keep = ~special
        keep = keep & ~norm_outliers(x, keep, outlier_factor)
        xs = x[keep].double()
        x_sum = xs.sum(0) if x_sum is None else x_sum + xs.sum(0)
        x_sq = xs.pow(2).sum() if x_sq is None else x_sq + xs.pow(2).sum()
        n_tok += len(xs)
        pred = ds.prediction_mask(special).double()
        clean = ds.next_token_logp(cap.output.logits)
        cap.output = None
        _add(shared, {"n_pred": pred.sum(), "ce_clean": (ds.next_token_ce(clean, ids) * pred).sum()})
        spliced = {"zero": torch.zeros_like(x)}
        for name, sae in saes.items():
            out = sae(x)
            err = (out.x_hat - x)[keep].double().pow(2).sum()
            sums[name]["sse"] += float(err)
            sums[name]["l0"] += float((out.feats[keep] > 0).sum())
            sums[name]["n"] += int(keep.sum())
            spliced[name] = out.x_hat
        for name, value in spliced.items():
            replacement = torch.where(special[..., None], x, value).to(cap[site].dtype)
            with patch(model, {site: lambda _a, _ctx, r=replacement: r}, arch=lm.arch):
                logp = ds.next_token_logp(model(input_ids=ids, use_cache=False).logits)
            ce = (ds.next_token_ce(logp, ids).double() * pred).sum()
            kl = (torch.nn.functional.kl_div(logp, clean, log_target=True, reduction="none")
                  .sum(-1).double() * pred).sum()
            if name == "zero":
                _add(shared, {"ce_zero": ce, "kl_zero": kl})
            else:
                _add(cols[name], {"ce_sae": ce, "kl_sae": kl})
        done += len(ids)
        if on_batch:
            on_batch(done)
    if n_tok == 0:
        raise ValueError("evaluate_grid: no evaluation tokens")
    total_var = float(x_sq - x_sum.pow(2).sum() / n_tok)
    out: dict[str, dict[str, float]] = {}
    for name in saes:
        s = {k: np.asarray(v) for k, v in (shared | cols[name]).items()}
        metrics = {k: float(v) for k, v in ds.downstream_metrics(s).items()}
        out[name] = {"l0": sums[name]["l0"] / max(sums[name]["n"], 1),
                     "fvu": sums[name]["sse"] / max(total_var, 1e-12),
                     **metrics, "tokens": n_tok, "prediction_positions": int(shared["n_pred"])}
    return out


def _add(into: dict[str, float], values: Mapping[str, Tensor]) -> None:
    for k, v in values.items():
        into[k] = into.get(k, 0.0) + float(v)


def pareto_front(l0: Iterable[float], fvu: Iterable[float]) -> list[int]:
    """Indices of the points no other point beats on both L0 and FVU (lower is better for
    both), sorted by L0."""
    pts = list(zip(l0, fvu, strict=True))
    front = [i for i, (a, b) in enumerate(pts)
             if not any((c <= a and d <= b) and (c < a or d < b) for c, d in pts)]
    return sorted(front, key=lambda i: pts[i][0])
