"""Attention-sink tokens: activations whose norm is many times the typical one.

Besides position 0 (kept on a special BOS token by packing, see tokens.py),
a few text tokens right after it also become attention sinks: on SmolLM2 at
resid_post.12, 4 in 20,000 tokens have a norm near 21,000 against a median of
144. Four such tokens carry ~9x more variance than all the others together,
so they would dominate SAE training and every variance-based metric (FVU,
MSE) while telling nothing about the features of ordinary text. Training
and reconstruction metrics therefore leave out tokens whose norm exceeds
`factor` times the median norm of their batch, and count them.
"""

from __future__ import annotations

import torch

DEFAULT_FACTOR = 10.0


def norm_outliers(x: torch.Tensor, keep: torch.Tensor | None = None,
                  factor: float = DEFAULT_FACTOR) -> torch.Tensor:
    """Bool mask (x.shape[:-1]) of rows whose L2 norm is > factor x the median norm.

    `keep` restricts which rows the median is taken over (e.g. non-special tokens).
    factor <= 0 disables the filter.
    """
    norms = x.float().norm(dim=-1)
    if factor <= 0 or norms.numel() == 0:
        return torch.zeros_like(norms, dtype=torch.bool)
    ref = norms[keep] if keep is not None else norms
    if ref.numel() == 0:
        return torch.zeros_like(norms, dtype=torch.bool)
    return norms > factor * ref.median()
