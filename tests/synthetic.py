"""Synthetic activations with a known sparse dictionary, stored as a real cache."""

from __future__ import annotations

import torch

from saelab.data.store import ShardWriter


def sparse_data(n: int, d: int = 32, n_true: int = 64, active: int = 3, seed: int = 0):
    """x = codes · D with `active` features per token; returns (x, D) with unit rows in D."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_true, d, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_true, generator=gen).argsort(dim=1)[:, :active]
    vals = torch.rand(n, active, generator=gen) * 2 + 0.5
    codes = torch.zeros(n, n_true).scatter_(1, idx, vals)
    return codes @ dictionary, dictionary


def write_synthetic_cache(folder, n_tokens: int = 40_960, site: str = "resid_post.0",
                          scale: float = 1.0, **kw):
    x, dictionary = sparse_data(n_tokens, **kw)
    x = x * scale
    context = 32
    n_ctx = n_tokens // context
    writer = ShardWriter(folder, {"model": "synthetic", "model_hash": "none",
                                  "sites": {site: x.shape[1]}, "context": context,
                                  "corpus": "synthetic", "corpus_hash": "none"},
                         tokens_target=n_tokens)
    per_shard = 64
    for start in range(0, n_ctx, per_shard):
        rows = x[start * context:(start + per_shard) * context]
        m = rows.shape[0] // context
        writer.append(torch.zeros(m, context, dtype=torch.long),
                      torch.zeros(m, context, dtype=torch.bool),
                      {site: rows.reshape(m, context, -1)})
    return dictionary
