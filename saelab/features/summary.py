"""From a collection's state to per-feature tables: stats, histogram, top and bin examples.

    table = summarize(collection, "l12")
    table.density[7], table.max_act[7], table.hist[7]         # per feature
    table.examples["feature"], table.examples["token_ids"]    # one row per example

Definitions (all over non-special tokens; M = the feature's max activation):

- density = firings / tokens; mean_act = mean activation over the firings.
- hist[f, h]: firings with activation in [h·M/H, (h+1)·M/H), the last bin closed at M.
- bin_counts[f, b]: the same over the n_bins example bins.
- top examples: the top_k contexts by their max activation, ties by context index.
- bin examples: in every bin, the per_bin firings with the smallest key, where
  key = splitmix64(splitmix64(token ^ seed) ^ feature) >> 33 and token = context · P
  + position: a uniform sample without replacement, reproducible and the same
  whatever split of the corpus produced the events.
- window: `left` tokens before the example token and `right` after, shifted to
  stay inside the context; acts are the feature's activation on each window token.

Everything is computed from the event log in a canonical order (feature,
context, position), so the result does not depend on batch order or on how the
corpus was split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from saelab.features.collect import CollectConfig, Collection

KIND_TOP, KIND_BIN = 0, 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_keys(token: Tensor, feat: Tensor, seed: int) -> Tensor:
    """31-bit pseudo-random key of each (global token, feature), int64."""
    t = token.numpy().astype(np.uint64) ^ np.uint64(seed)
    z = splitmix64(splitmix64(t) ^ feat.numpy().astype(np.uint64))
    return torch.from_numpy((z >> np.uint64(33)).astype(np.int64))


@dataclass
class FeatureTable:
    """Per-feature arrays [F] and example arrays [X] (numpy; see the module docstring)."""

    config: CollectConfig
    n_tokens: int
    count: np.ndarray  # [F] int64 firings
    density: np.ndarray  # [F] float64
    mean_act: np.ndarray  # [F] float64, NaN for a feature that never fired
    max_act: np.ndarray  # [F] float32, 0 for a feature that never fired
    hist: np.ndarray  # [F, hist_bins] int64
    bin_counts: np.ndarray  # [F, n_bins] int64
    examples: dict[str, np.ndarray]
    """feature, kind (0 top / 1 bin), bin (-1 for top), rank, act, context, position,
    start [X]; token_ids, acts [X, W] (window tokens and the feature's activations)."""

    @property
    def d_sae(self) -> int:
        return len(self.count)


def _bin_of(act: Tensor, top: Tensor, n: int) -> Tensor:
    return torch.floor(act / top * n).clamp(max=n - 1).long()


def _rank_in_groups(group: Tensor) -> Tensor:
    """Rank of each entry of a sorted `group` array within its run of equal values."""
    if len(group) == 0:
        return group
    _, counts = torch.unique_consecutive(group, return_counts=True)
    return torch.arange(len(group)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)


def summarize(coll: Collection, name: str) -> FeatureTable:
    """Turn SAE `name`'s state in `coll` into tables."""
    cfg, state = coll.config, coll.states[name]
    F = state.d_sae
    P = coll.contexts.n_pos
    n_ctx = int(coll.contexts.ctx.max()) + 1 if len(coll.contexts.ctx) else 1
    ctx, pos, feat, act = state.events()
    feat, pos = feat.long(), pos.long()
    key = (feat * n_ctx + ctx) * P + pos  # unique per event: the canonical order
    order = torch.argsort(key)
    key, ctx, pos, feat, act = key[order], ctx[order], pos[order], feat[order], act[order]

    count = torch.bincount(feat, minlength=F)
    max_act = torch.zeros(F).scatter_reduce_(0, feat, act, "amax")
    sums = torch.zeros(F, dtype=torch.float64).index_add_(0, feat, act.double())
    top = max_act[feat]
    hist = torch.bincount(feat * cfg.hist_bins + _bin_of(act, top, cfg.hist_bins),
                          minlength=F * cfg.hist_bins).view(F, cfg.hist_bins)
    ebin = _bin_of(act, top, cfg.n_bins)
    group = feat * cfg.n_bins + ebin
    bin_counts = torch.bincount(group, minlength=F * cfg.n_bins).view(F, cfg.n_bins)

    # Uniform examples: per (feature, bin) the per_bin smallest keys; the stable sort
    # breaks equal keys by the canonical order.
    rkey = sample_keys(ctx * P + pos, feat, cfg.seed)
    by_key = torch.argsort((group << 31) | rkey, stable=True)
    chosen = by_key[(_rank_in_groups(group[by_key]) < cfg.per_bin).nonzero().squeeze(1)]
    bin_rank = _rank_in_groups(group[chosen])

    valid = state.top_val > 0  # (F, k)
    top_feat = torch.arange(F)[:, None].expand_as(valid)[valid]
    top_rank = torch.arange(cfg.top_k)[None, :].expand_as(valid)[valid]
    ex_feat = torch.cat([top_feat, feat[chosen]])
    ex = {
        "feature": ex_feat,
        "kind": torch.cat([torch.full_like(top_feat, KIND_TOP), torch.full_like(chosen, KIND_BIN)]),
        "bin": torch.cat([torch.full_like(top_feat, -1), ebin[chosen]]),
        "rank": torch.cat([top_rank, bin_rank]),
        "act": torch.cat([state.top_val[valid], act[chosen]]),
        "context": torch.cat([state.top_ctx[valid], ctx[chosen]]),
        "position": torch.cat([state.top_pos[valid], pos[chosen]]),
    }
    ex["start"], ex["token_ids"], ex["acts"] = _windows(coll, cfg, ex, key, act, n_ctx, P)
    by_row = np.lexsort((ex["rank"].numpy(), ex["bin"].numpy(), ex["kind"].numpy(),
                         ex["feature"].numpy()))
    examples = {k: v.numpy()[by_row] for k, v in ex.items()}
    for k, dt in (("feature", np.int32), ("kind", np.int8), ("bin", np.int16), ("rank", np.int32),
                  ("position", np.int32), ("start", np.int32)):
        examples[k] = examples[k].astype(dt)
    n_tok = max(state.n_tokens, 1)
    count_np = count.numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_act = np.where(count_np > 0, sums.numpy() / count_np, np.nan)
    return FeatureTable(cfg, state.n_tokens, count_np, count_np / n_tok, mean_act,
                        max_act.numpy(), hist.numpy(), bin_counts.numpy(), examples)


def _windows(coll: Collection, cfg: CollectConfig, ex: dict[str, Tensor], key: Tensor,
             act: Tensor, n_ctx: int, P: int) -> tuple[Tensor, Tensor, Tensor]:
    """Window start [X], token ids [X, W] and the feature's activations [X, W]."""
    W = min(cfg.window, P)
    pos, ctx, feat = ex["position"].long(), ex["context"].long(), ex["feature"].long()
    start = (pos - cfg.left).clamp(min=0).clamp(max=P - W)  # (X,)
    tpos = start[:, None] + torch.arange(W)  # (X, W)
    rows = coll.contexts.rows(ctx)
    ids = coll.contexts.ids[rows[:, None], tpos]
    if len(key) == 0:
        return start, ids, torch.zeros(ids.shape)
    q = (feat * n_ctx + ctx)[:, None] * P + tpos  # the event keys of the window's tokens
    at = torch.searchsorted(key, q).clamp(max=len(key) - 1)
    acts = torch.where(key[at] == q, act[at], torch.zeros(()))
    return start, ids, acts
