"""Loss terms, as pure functions of tensors.

Inputs are scaled to unit mean squared norm (E‖x‖² = 1) before training, so
`mse` starts near 1 and coefficients transfer between sites and models.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """Mean over tokens of the squared L2 error (summed over dimensions)."""
    return (x_hat - x).pow(2).sum(-1).mean()


def fvu(x_hat: Tensor, x: Tensor) -> Tensor:
    """Fraction of variance unexplained over this batch: Σ‖x−x̂‖² / Σ‖x−mean(x)‖²."""
    return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def fvu_from_mse(mse: Tensor, x: Tensor) -> Tensor:
    """`fvu(x_hat, x)` from `mse(x_hat, x)` (x [N, d]): Σ‖x−x̂‖² = N·mse, and
    Σ‖x−μ‖² = Σ‖x‖² − N‖μ‖², two passes over x (a dot product and a mean) where the
    residual and the centred copy took five (`torch.var` is slower still on a CPU).
    The subtraction loses ~1e-7 · Σ‖x‖²/Σ‖x−μ‖² relative: nothing for a logged statistic."""
    flat, mu = x.reshape(-1), x.mean(0)
    total = torch.dot(flat, flat) - x.shape[0] * torch.dot(mu, mu)
    return mse * x.shape[0] / total.clamp_min(1e-12)


def l1_weighted(feats: Tensor, W_dec: Tensor) -> Tensor:
    """Σ_f |f|·‖W_dec[f]‖ per token, averaged: L1 that a decoder rescale cannot dodge."""
    return (feats.abs() * W_dec.norm(dim=1)).sum(-1).mean()


def auxk(residual: Tensor, aux_recon: Tensor) -> Tensor:
    """AuxK (Gao et al. 2024): dead latents reconstruct the residual error, normalized
    by the residual's variance so the term is scale free."""
    denom = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    return (aux_recon - residual).pow(2).sum(-1).mean() / denom


def lr_factor(step: int, steps: int, warmup: int, decay_start: float) -> float:
    """Linear warm-up over `warmup` steps, constant, then linear decay to 0 from
    `decay_start` (a fraction of training)."""
    if step < warmup:
        return (step + 1) / warmup
    start = int(decay_start * steps)
    if step >= start and steps > start:
        return max(0.0, (steps - step) / (steps - start))
    return 1.0


def warmup_factor(step: int, steps: int, fraction: float) -> float:
    """Sparsity-coefficient warm-up: 0 → 1 over the first `fraction` of training."""
    n = int(fraction * steps)
    return 1.0 if n == 0 else min(1.0, (step + 1) / n)


def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimizing Σ‖x_i − m‖, robust to outliers."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - m).norm(dim=1).clamp_min(eps)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() < eps * m.norm().clamp_min(1):
            return new
        m = new
    return m
