"""Downstream metrics: what splicing an SAE in costs the model's next-token predictions.

For each batch, `forward_batch` runs the model

    clean        unchanged, capturing the site's activation x and the logits
    sae          x replaced by the SAE's reconstruction x̂ (no error term)
    zero         x replaced by 0                        (the "nothing" baseline)
    mean         x replaced by μ, its mean over the evaluation tokens (optional)

Replacements happen only at positions whose input token is not special: BOS and
separators carry activations unlike any text token (attention sinks, often 100x
the norm), SAEs are trained without them, and replacing them would measure the
sink, not the SAE. This follows SAEBench's `exclude_special_tokens_from_reconstruction`.

The site's activation in the patched passes equals the clean one (nothing upstream
changed), so x̂ is computed once from the clean capture and written in as is.

Definitions (positions t whose input *and* target token are not special; CE_t the
next-token cross-entropy in nats, KL_t = KL(p_clean,t ‖ p_variant,t)):

    CE_v             mean_t CE_t under variant v
    ΔCE              CE_sae − CE_clean
    loss recovered   (CE_zero − CE_sae) / (CE_zero − CE_clean)      (1 = perfect, 0 = as bad as zero)
    KL score         (KL_zero − KL_sae) / KL_zero
    with mean ablation the same two against CE_mean / KL_mean.

Logits are compared in float32; evaluate a model loaded in float32 (bf16 rounding
alone moves the CE by ~1e-3 nats, the size of a good SAE's ΔCE).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.evals.bootstrap import safe_div
from saelab.models.hooks import capture, patch

DEFINITIONS = {
    "prediction_positions": "positions t whose input token and target token (t+1) are both "
                            "not special; BOS is never a target or an input counted",
    "replaced_positions": "the SAE / zero / mean replacement is applied only at positions whose "
                          "input token is not special; special positions keep their clean value",
    "ce_clean": "mean next-token cross-entropy (nats) of the unmodified model",
    "ce_sae": "mean cross-entropy with the SAE reconstruction spliced in, without the error term",
    "ce_zero": "mean cross-entropy with the site's activation replaced by zeros",
    "delta_ce": "ce_sae - ce_clean",
    "loss_recovered": "(ce_zero - ce_sae) / (ce_zero - ce_clean)",
    "kl_sae": "mean over positions of KL(p_clean || p_sae), nats",
    "kl_zero": "mean over positions of KL(p_clean || p_zero), nats",
    "kl_score": "(kl_zero - kl_sae) / kl_zero",
    "ce_mean": "mean cross-entropy with the site's activation replaced by its mean over the "
               "evaluated tokens",
    "loss_recovered_mean": "(ce_mean - ce_sae) / (ce_mean - ce_clean)",
    "kl_score_mean": "(kl_mean - kl_sae) / kl_mean",
}


@dataclass
class BatchResult:
    """One batch's site activations, reconstruction and per-context loss sums."""

    x: Tensor  # (B, P, d) clean activation at the site
    x_hat: Tensor  # (B, P, d) the SAE's reconstruction, in x's dtype
    feats: Tensor  # (B, P, F)
    columns: dict[str, Tensor]  # per-context (B,) sums: n_pred, ce_*, kl_*; empty without downstream


def prediction_mask(special: Tensor) -> Tensor:
    """(B, P-1) True where position t predicts t+1 and neither token is special."""
    return ~special[:, :-1] & ~special[:, 1:]


def next_token_logp(logits: Tensor) -> Tensor:
    """(B, P-1, V) float32 log-probabilities of the next token at positions 0..P-2."""
    return logits[:, :-1].float().log_softmax(-1)


def next_token_ce(logp: Tensor, ids: Tensor) -> Tensor:
    """(B, P-1) cross-entropy of ids[:, t+1] under logp[:, t] (from `next_token_logp`)."""
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def reconstruct(sae, x: Tensor) -> tuple[Tensor, Tensor]:
    """(x̂ in x's dtype, feats) from the SAE in inference mode."""
    out = sae(x)
    return out.x_hat.to(x.dtype), out.feats


@torch.inference_mode()
def site_mean(lm, site: str, batches) -> Tensor:
    """(d,) mean activation at `site` over the non-special tokens of `batches` (float64).

    Each forward stops right after the site, so this pre-pass costs a fraction of one.
    """
    total, n = None, 0
    for ids, special in batches:
        with capture(lm.model, site, arch=lm.arch, stop_early=True) as cap:
            cap.run(input_ids=ids.to(lm.device))
        x = cap[site].double()
        keep = ~special.to(x.device)
        part = x[keep].sum(0)
        total = part if total is None else total + part
        n += int(keep.sum())
    if total is None or n == 0:
        raise ValueError("site_mean: no non-special tokens in the batches")
    return (total / n).cpu()


@torch.inference_mode()
def forward_batch(lm, sae, site: str, ids: Tensor, special: Tensor, *, downstream: bool = True,
                  mean: Tensor | None = None, keep_error: bool = False) -> BatchResult:
    """Clean, SAE, zero (and mean) forwards of one batch; see the module docstring.

    keep_error splices x̂ + (x − x̂) instead of x̂: the model's output must not change
    (a check of the splicing, ΔCE ≈ 0 up to float rounding).
    """
    model = lm.model
    ids, special = ids.to(lm.device), special.to(lm.device)
    with capture(model, site, arch=lm.arch, stop_early=not downstream) as cap:
        cap.run(input_ids=ids)
    x = cap[site]
    x_hat, feats = reconstruct(sae, x)
    if not downstream:
        return BatchResult(x, x_hat, feats, {})
    keep = ~special[..., None]  # (B, P, 1) positions to replace
    spliced = x_hat + (x - x_hat) if keep_error else x_hat
    variants = {"sae": spliced, "zero": torch.zeros_like(x)}
    if mean is not None:
        variants["mean"] = mean.to(x.device, x.dtype).expand_as(x)

    pred = prediction_mask(special).double()  # (B, P-1)
    clean_logp = next_token_logp(cap.output.logits)  # (B, P-1, V)
    cap.output = None  # free the clean logits
    columns = {"n_pred": pred.sum(1), "ce_clean": (next_token_ce(clean_logp, ids) * pred).sum(1)}
    for name, value in variants.items():
        replacement = torch.where(keep, value, x)
        with patch(model, {site: lambda _a, _ctx, r=replacement: r}, arch=lm.arch):
            logits = model(input_ids=ids, use_cache=False).logits
        logp = next_token_logp(logits)  # (B, P-1, V)
        del logits
        ce = next_token_ce(logp, ids)  # (B, P-1)
        kl = F.kl_div(logp, clean_logp, log_target=True, reduction="none").sum(-1)  # (B, P-1)
        columns[f"ce_{name}"] = (ce.double() * pred).sum(1)
        columns[f"kl_{name}"] = (kl.double() * pred).sum(1)
    return BatchResult(x, x_hat, feats, {k: v.cpu() for k, v in columns.items()})


def downstream_metrics(s: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Metrics from summed statistics; works on totals and on bootstrap replicates alike."""
    if "n_pred" not in s:
        return {}
    n = s["n_pred"]
    ce = {k: safe_div(s[f"ce_{k}"], n) for k in ("clean", "sae", "zero", "mean") if f"ce_{k}" in s}
    kl = {k: safe_div(s[f"kl_{k}"], n) for k in ("sae", "zero", "mean") if f"kl_{k}" in s}
    out = {
        "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"],
        "delta_ce": ce["sae"] - ce["clean"],
        "loss_recovered": safe_div(ce["zero"] - ce["sae"], ce["zero"] - ce["clean"]),
        "kl_sae": kl["sae"], "kl_zero": kl["zero"],
        "kl_score": safe_div(kl["zero"] - kl["sae"], kl["zero"]),
    }
    if "mean" in ce:
        out |= {"ce_mean": ce["mean"], "kl_mean": kl["mean"],
                "loss_recovered_mean": safe_div(ce["mean"] - ce["sae"], ce["mean"] - ce["clean"]),
                "kl_score_mean": safe_div(kl["mean"] - kl["sae"], kl["mean"])}
    return out
