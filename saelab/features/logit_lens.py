"""Logit lens of SAE features: what each decoder direction promotes and suppresses.

    lens = logit_lens(lm, sae.W_dec, k=10)          # all features, chunked
    lens.top_ids[f], lens.top_values[f]             # most promoted tokens of feature f
    lens.filter                                     # which token rows were left out, and why

The direction d = W_dec[f] goes through the final norm's linear part and the
unembedding: ``logits = W_U (s ⊙ P d)`` with s the norm's scale and P the mean
removal of a LayerNorm (identity for RMSNorm). The norm's division by the
token's RMS is a positive factor per token, so it changes no ranking and is left
out. s and P are measured by probing the norm module, which covers Gemma's
``(1 + w)`` and GPT-2's LayerNorm without a per-family table.

Abnormal token rows are excluded from the rankings, and the filter is reported:
rows whose norm is an outlier (|z| > `z_max` over the vocabulary: very high
norms dominate every lens, very low norms mark tokens training never touched),
and optionally tokens with no occurrence in a reference token count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class TokenFilter:
    """Which vocabulary rows the lens ignores, and why."""

    excluded: Tensor  # [V] bool
    reasons: dict[str, list[int]] = field(default_factory=dict)  # reason -> token ids
    z_max: float = 5.0

    def report(self, tokenizer=None, show: int = 20) -> dict:
        """JSON-ready summary: counts per reason and the first `show` tokens of each."""
        out = {"z_max": self.z_max, "n_excluded": int(self.excluded.sum()), "reasons": {}}
        for reason, ids in self.reasons.items():
            shown = ids[:show]
            # padding rows have no token text: show their ids
            names = ([tokenizer.decode([i]) for i in shown] if tokenizer is not None
                     and reason != "padding" else shown)
            out["reasons"][reason] = {"count": len(ids), "examples": names}
        return out


@dataclass
class LensResult:
    """Top and bottom tokens per feature: ids and logit contributions, [F, k] each."""

    top_ids: Tensor
    top_values: Tensor
    bottom_ids: Tensor
    bottom_values: Tensor
    filter: TokenFilter


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied before the unembedding (Llama/Gemma/Qwen `norm`, GPT-2 `ln_f`, NeoX)."""
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "norm", "ln_f"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    return None


@torch.no_grad()
def norm_linear_part(norm: nn.Module | None, d: int) -> tuple[Tensor, bool]:
    """(scale s [d], centers) of a norm y = s ⊙ P x / σ(x) + b, measured by probing it.

    With x = ±1 alternating (mean 0, RMS 1): (y(x) - y(-x)) / 2 = s ⊙ x, so s = that ⊙ x.
    A LayerNorm maps a constant vector to its bias alone, an RMSNorm does not.
    """
    if norm is None:
        return torch.ones(d), False
    p = next(norm.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    x = torch.ones(d, dtype=dtype)
    x[1::2] = -1
    if d % 2:
        x[-1] = 0  # keep the mean at zero
    y_pos, y_neg = norm(x[None]).float()[0], norm(-x[None]).float()[0]
    scale = (y_pos - y_neg) / 2 * x.float()
    if d % 2:
        scale[-1] = scale[-2]  # unmeasured: borrow a neighbour (only odd widths)
    ones = torch.ones(1, d, dtype=dtype)
    centers = bool(torch.allclose(norm(ones).float(), norm(-ones).float(), atol=1e-4))
    return scale, centers


def unembedding(lm_or_model) -> tuple[Tensor, Tensor, bool]:
    """(W_U [V, d] float32, final norm scale [d], whether the norm centers)."""
    model = getattr(lm_or_model, "model", lm_or_model)
    W_U = model.get_output_embeddings().weight.detach().float()
    scale, centers = norm_linear_part(final_norm(model), W_U.shape[1])
    return W_U, scale, centers


def abnormal_tokens(W_U: Tensor, *, z_max: float = 5.0, token_counts: Tensor | None = None,
                    keep: Tensor | None = None) -> TokenFilter:
    """Rows of W_U with outlying norms (|z| > z_max), and tokens never counted (if counts given).

    `keep` [V] bool marks rows never to exclude (e.g. the tokenizer's real vocabulary
    when W_U is padded, inversely). Padding rows beyond the tokenizer are excluded.
    """
    norms = W_U.norm(dim=1)
    z = (norms - norms.mean()) / norms.std().clamp_min(1e-12)
    reasons = {"high_norm": (z > z_max), "low_norm": (z < -z_max)}
    if token_counts is not None:
        counts = torch.zeros(len(W_U), dtype=torch.long)
        counts[: len(token_counts)] = token_counts[: len(W_U)]
        reasons["unseen"] = counts == 0
    excluded = torch.zeros(len(W_U), dtype=torch.bool)
    for mask in reasons.values():
        excluded |= mask
    if keep is not None:
        excluded &= ~keep
    return TokenFilter(excluded, {r: m.nonzero().squeeze(1).tolist() for r, m in reasons.items()
                                  if m.any()}, z_max)


@torch.no_grad()
def logit_lens(lm_or_model, W_dec: Tensor, *, k: int = 10, token_filter: TokenFilter | None = None,
               z_max: float = 5.0, token_counts: Tensor | None = None,
               chunk: int = 512) -> LensResult:
    """Top/bottom `k` tokens of every decoder row of W_dec [F, d] (see the module docstring)."""
    W_U, scale, centers = unembedding(lm_or_model)
    V = W_U.shape[0]
    tokenizer = getattr(lm_or_model, "tokenizer", None)
    if token_filter is None:
        token_filter = abnormal_tokens(W_U, z_max=z_max, token_counts=token_counts)
    if tokenizer is not None and len(tokenizer) < V:  # padded vocabularies: rows with no token
        pad = torch.zeros(V, dtype=torch.bool)
        pad[len(tokenizer):] = True
        token_filter.excluded |= pad
        token_filter.reasons["padding"] = pad.nonzero().squeeze(1).tolist()
    kept = (~token_filter.excluded).nonzero().squeeze(1)  # (V',) excluded columns are dropped
    U = (W_U[kept] * scale).T.contiguous()  # (d, V'): the norm's scale folded in
    k = min(k, len(kept))
    tops, bottoms = [], []
    for lo in range(0, W_dec.shape[0], chunk):
        d = W_dec[lo:lo + chunk].detach().float()  # (c, d)
        if centers:
            d = d - d.mean(dim=1, keepdim=True)
        logits = d @ U  # (c, V')
        tops.append(logits.topk(k, dim=1))
        bottoms.append(logits.topk(k, dim=1, largest=False))
    return LensResult(kept[torch.cat([t.indices for t in tops])], torch.cat([t.values for t in tops]),
                      kept[torch.cat([b.indices for b in bottoms])],
                      torch.cat([b.values for b in bottoms]), token_filter)
