"""Which SAE features drive a metric: act x gradient for every (position, feature), in one backward.

    attr = attribute(lm, [sae_a, sae_b], prompts, LogitDiff(" ", "\\n"), chat=True)
    attr.top(20, example=0)                # [Pair(example, site, position, token, feature, act, value)]
    attr.save("attr.safetensors")          # the full sparse tensor, nonzero activations only
    aggregate(attr, k=20)                  # per feature: how often among the examples' top pairs

At each SAE's site the activation is written ``x = f @ W_dec + b_dec + err``,
with the error ``err`` held at its clean value. A feature's attribution is
``f * d metric / d f = f * (g . W_dec[i])``, where ``g`` is the gradient of the
metric at the site's output in the *real* model, and the error node's is
``err . g``; per token, features + error + ``b_dec . g`` = ``x . g``. So each
SAE's numbers are the first-order effect of zero-ablating a feature at that
site while everything else stays the real model - what `verify` measures with
`FeatureEdit(mode="zero")`, and the same whether one SAE is attributed or five
at once.

That is why this module does not run the SAEs inside the graph
(`splice(detach_error=True)`): with several SAEs spliced and their errors
detached, the gradient reaching an upstream site flows through the downstream
SAEs' reconstructions instead of the model, so an upstream feature's
attribution would depend on which other SAEs are spliced. Instead each site
gets a zero leaf added to its output (so the forward pass is bit-for-bit the
clean one), one backward pass gives ``g`` at every site, and the features are
encoded afterwards without a graph; only active features are touched.

Integrated gradients (``method="ig"``): the features are scaled by alpha (the
site becomes ``x - (1 - alpha) f @ W_dec``) at the midpoints of ``ig_steps``
intervals, and the mean gradient times the activation is the attribution. Per
site (the default), the attributions of a site sum to the effect of zeroing all
its features, up to the midpoint rule's error; ``ig_joint`` scales every site
at once (``ig_steps`` passes instead of ``ig_steps`` per site), and then all
sites together sum to the effect of zeroing every site's features at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from saelab.attribution.metrics import Metric, MetricBatch, as_metric
from saelab.attribution.result import Attribution, SiteAttribution
from saelab.data.tokens import chat_prompt, pad_id, position_ids, tokenize
from saelab.interventions.splice import SAEs, bind_saes, unwrap
from saelab.models.hooks import patch

# Below this density the feature gradients are gathered per active feature
# (nnz * d) rather than taken from a dense (tokens, d) @ (d, d_sae) product.
GATHER_MAX_DENSITY = 0.05
_CHUNK = 8192  # active features per gather, bounding the (chunk, d) temporary


def prepare_prompts(prompts: Any, tokenizer: Any, chat: bool, extra: Sequence[int] = ()) -> list[list[int]]:
    """Token lists from texts (chat-formatted when `chat`) or token-id lists, `extra` appended."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("attribute: no prompts given")
    if isinstance(prompts[0], str):
        if tokenizer is None:
            raise ValueError("attribute: text prompts need a tokenizer (pass an LM, or tokenizer=)")
        texts = [chat_prompt(tokenizer, p) for p in prompts] if chat else prompts
        # BOS first, as every packed context the SAEs were trained on opens: without it the
        # first word is the attention sink and features fire hundreds of times there.
        ids, mask, _ = tokenize(tokenizer, texts, pad_side="right")
        lists = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    else:
        if chat:
            raise ValueError("attribute: chat=True formats text prompts; token ids are used as given")
        lists = [[int(t) for t in p] for p in prompts]
    return [row + list(extra) for row in lists]


def left_pad(rows: Sequence[Sequence[int]], pad: int, device: Any = "cpu") -> tuple[Tensor, Tensor]:
    """(ids, lengths): rows right-aligned in a (B, T) batch, as HF models take them."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
    return ids.to(device), torch.tensor([len(r) for r in rows], device=device)


def forward_logits(model: Any, ids: Tensor, lengths: Tensor) -> Tensor:
    """(B, T, V) logits of a left-padded batch (attention mask and positions skip the padding)."""
    cols = torch.arange(ids.shape[1], device=ids.device)
    mask = (cols[None, :] >= (ids.shape[1] - lengths)[:, None]).long()  # (B, T)
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                 use_cache=False).logits


def _gradient_pass(model: Any, arch: Any, batch: MetricBatch, metric: Metric, sites: list[str],
                   shifts: dict[str, Tensor] | None = None) -> tuple[Tensor, dict, dict]:
    """One forward + backward: (metric (B,), {site: x (B, T, d)}, {site: d metric / d site}).

    `shifts[site]` is subtracted from the site's activation (integrated gradients)."""
    leaves: dict[str, Tensor] = {}
    acts: dict[str, Tensor] = {}

    def hook(site: str) -> Callable:
        def fn(x: Tensor, ctx: Any) -> Tensor:
            acts[site] = x.detach()
            if shifts is not None and site in shifts:
                x = x - shifts[site].to(x.dtype)
            leaves[site] = torch.zeros_like(x, requires_grad=True)
            return x + leaves[site]  # the same value; its gradient is the site's
        return fn

    with torch.enable_grad(), patch(model, {s: hook(s) for s in sites}, arch=arch):
        logits = forward_logits(model, batch.ids, batch.lengths)
        values = metric(logits, batch)  # (B,)
        if not bool(torch.isfinite(values).all()):
            raise FloatingPointError(f"attribute: the metric is {values.tolist()} on this batch; "
                                     "left padding in fp64 gives nan logits in some HF models, "
                                     "so use fp32 or batch_size=1")
        # Examples never interact (causal mask, per-row padding), so one backward of the
        # sum gives every example its own gradient.
        grads = torch.autograd.grad(values.sum(), [leaves[s] for s in sites], allow_unused=True)
    grad = {s: torch.zeros_like(leaves[s]) if g is None else g for s, g in zip(sites, grads, strict=True)}
    return values.detach(), acts, grad


def _feature_grads(sae: Any, g: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """(nnz,) d metric / d f at the active entries (flat token `rows`, feature `cols`)."""
    W = sae.W_dec.detach()  # (F, d)
    g = g.to(W.dtype)  # (N, d)
    if rows.numel() > GATHER_MAX_DENSITY * g.shape[0] * W.shape[0]:
        return (g @ W.T)[rows, cols]  # dense (N, F) product
    out = torch.empty(rows.numel(), dtype=W.dtype, device=W.device)
    for s in range(0, rows.numel(), _CHUNK):
        r, c = rows[s:s + _CHUNK], cols[s:s + _CHUNK]
        out[s:s + _CHUNK] = (g[r] * W[c]).sum(-1)
    return out


@torch.no_grad()
def _site_attribution(sae: Any, x: Tensor, g_feats: Tensor, g_site: Tensor, lengths: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(index (nnz, 3) with batch rows, act, value, error attribution (B, T)) of one batch."""
    B, T, d = x.shape
    feats = sae.encode(x)  # (B, T, F)
    x_hat = sae.decode(feats)
    error = (x.to(x_hat.dtype) - x_hat) * g_site.to(x_hat.dtype)
    pad = T - lengths  # (B,)
    real = torch.arange(T, device=x.device)[None, :] >= pad[:, None]  # (B, T)
    # where, not a product: padded positions may hold inf or nan (HF masks in fp64)
    flat = torch.where(real.reshape(-1, 1), feats.reshape(B * T, -1), 0)
    rows, cols = flat.nonzero(as_tuple=True)  # row-major: sorted by example, position
    act = flat[rows, cols]
    value = act * _feature_grads(sae, g_feats.reshape(B * T, d), rows, cols)
    b, t = rows // T, rows % T
    index = torch.stack([b, t - pad[b], cols], dim=1)
    err = torch.where(real, error.sum(-1), 0)  # (B, T) columns
    # Re-index the error by position within the example, so column pad+p -> p.
    by_pos = torch.zeros_like(err)
    src = torch.arange(T, device=x.device)[None, :] - pad[:, None]
    by_pos.scatter_add_(1, src.clamp(min=0), err)
    return index, act, value, by_pos


def _shift(sae: Any, x: Tensor, scale: float) -> Tensor:
    """``scale * f @ W_dec``: the features' part of the reconstruction, scaled."""
    with torch.no_grad():
        feats = sae.encode(x)
        return scale * (sae.decode(feats) - sae.b_dec)


def attribute(lm: Any, saes: SAEs, prompts: Any, metric: Metric | str | Callable, *,
              method: str = "grad", ig_steps: int = 8, ig_joint: bool = False, chat: bool = False,
              batch_size: int = 8, tokenizer: Any = None, allow_multi: bool = False) -> Attribution:
    """Attribute `metric` to the features of every SAE in `saes` for each prompt.

    prompts: a text, texts (chat-formatted with `chat`) or token-id lists. metric: a
    Metric, a spec such as ``'logit_diff:" ":"\\n"@-1'`` or a callable on logits
    (see `metrics`). saes as in `splice`: an SAE, a list (sites from cfg.site) or
    ``{site: sae}``. method: "grad" (act x gradient, one backward pass) or "ig"
    (integrated gradients, `ig_steps` midpoints per site, or in all at once with `ig_joint`).
    """
    if method not in ("grad", "ig"):
        raise ValueError(f"attribute: method={method!r}; expected 'grad' or 'ig'")
    if (method == "ig" and ig_steps < 1) or batch_size < 1:
        raise ValueError(f"attribute: need ig_steps >= 1 (got {ig_steps}), batch_size >= 1 ({batch_size})")
    model, arch = unwrap(lm)
    if model.training:
        warnings.warn("attribute: the model is in training mode, so dropout makes attributions "
                      "random; call model.eval() first", stacklevel=2)
    tokenizer = tokenizer or getattr(lm, "tokenizer", None)
    bound = bind_saes(arch, saes)
    if not bound:
        raise ValueError("attribute: no SAEs given")
    metric = as_metric(metric, allow_multi=allow_multi)
    metric.check(tokenizer)
    tokens = prepare_prompts(prompts, tokenizer, chat, metric.continuation(tokenizer))
    device = next(model.parameters()).device
    pad = pad_id(tokenizer) if tokenizer is not None else 0
    sites = list(bound)
    parts: dict[str, list] = {s: [] for s in sites}
    metric_values = []
    for start in range(0, len(tokens), batch_size):
        ids, lengths = left_pad(tokens[start:start + batch_size], pad, device)
        batch = MetricBatch(ids, lengths, tokenizer)
        values, acts, grads = _gradient_pass(model, arch, batch, metric, sites)
        feat_grads = grads
        if method == "ig":
            feat_grads = _ig_grads(model, arch, batch, metric, bound, acts, ig_steps, ig_joint)
        metric_values.append(values)
        for s in sites:
            index, act, value, err = _site_attribution(bound[s], acts[s], feat_grads[s], grads[s], lengths)
            index[:, 0] += start
            parts[s].append((index, act, value, err))
    width = max(len(t) for t in tokens)
    result = {}
    for s in sites:
        index, act, value, err = zip(*parts[s], strict=True)
        error = torch.cat([torch.nn.functional.pad(e, (0, width - e.shape[1])) for e in err])
        result[s] = SiteAttribution(s, bound[s].cfg.d_sae, torch.cat(index).cpu(), torch.cat(act).cpu(),
                                    torch.cat(value).cpu(), error.cpu())
    settings = {"metric": repr(metric), "method": method, "chat": chat,
                **({"ig_steps": ig_steps, "ig_joint": ig_joint} if method == "ig" else {})}
    return Attribution(result, tokens, torch.cat(metric_values).cpu(), method, settings)


def _ig_grads(model: Any, arch: Any, batch: MetricBatch, metric: Metric, saes: dict[str, Any],
              acts: dict[str, Tensor], steps: int, joint: bool) -> dict[str, Tensor]:
    """Mean over alpha midpoints of d metric / d site with the features scaled by alpha."""
    sites = list(saes)
    groups = [sites] if joint else [[s] for s in sites]
    contrib = {s: _shift(saes[s], acts[s], 1.0) for s in sites}  # (B, T, d) f @ W_dec
    mean = {s: torch.zeros_like(acts[s]) for s in sites}
    for group in groups:
        for j in range(steps):
            alpha = (j + 0.5) / steps
            shifts = {s: (1 - alpha) * contrib[s] for s in group}
            _, _, grads = _gradient_pass(model, arch, batch, metric, group, shifts)
            for s in group:
                mean[s] += grads[s] / steps
    return mean
