"""Reconstruction metrics, accumulated batch by batch: L0, MSE, FVU, cosine, shrinkage, densities.

    acc = ReconAccumulator(d_sae)
    for x, x_hat, feats, mask in batches:        # (B, P, d), (B, P, d), (B, P, F), (B, P) bool
        stats.add(acc.update(x, x_hat, feats, mask))   # per-context sums, see bootstrap.py
    recon_metrics(stats.sums())                  # {"fvu": ..., "l0": ..., ...}
    acc.features()                               # dead / dense fractions, density histogram

Only positions whose `mask` is True count (evaluate() passes "input token is not
special": BOS and separators carry activations unlike any text token, often
100x larger, and SAEs are trained without them).

Definitions (N evaluated tokens, x the activation, x̂ its reconstruction, f the features):

    L0          (1/N) Σ_t #{i : f_t,i ≠ 0}
    MSE         (1/N) Σ_t ‖x_t − x̂_t‖²                  (summed over dimensions)
    MSE/dim     MSE / d_in
    FVU         Σ_t ‖x_t − x̂_t‖² / Σ_t ‖x_t − μ‖²        μ = mean of x over ALL N tokens
    EV          1 − FVU
    cosine      (1/N) Σ_t cos(x_t, x̂_t)
    L2 ratio    (1/N) Σ_t ‖x̂_t‖ / ‖x_t‖
    RRB         γ = Σ_t ‖x̂_t‖² / Σ_t x̂_t·x_t   (relative reconstruction bias)

FVU uses one μ for the whole evaluation set: a per-batch mean (or averaging
per-batch FVUs) makes FVU depend on the batch size - peers got explained variance
and MSE wrong this way several times (SAELens PR #443, issue #659, PRs #665/#710/#711).
The error is not centred either: a constant offset in x̂ is unexplained variance
(SAEBench's newer formula subtracts the error's mean, which forgives such offsets). γ is argmin_γ Σ_t ‖x̂_t/γ − x_t‖² (Gated SAE paper, eq. 10;
SAEBench's `relative_reconstruction_bias`): with u = 1/γ the least-squares
solution is u = Σ x̂·x / Σ‖x̂‖². γ < 1 means the SAE shrinks its outputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from saelab.evals.bootstrap import safe_div

DENSE_THRESHOLD = 0.1  # a feature firing on more than this fraction of tokens is "dense"
_EPS = 1e-12
_COS_BINS = 100

DEFINITIONS = {
    "l0": "mean over evaluated tokens of the number of non-zero features",
    "mse": "mean over evaluated tokens of ||x - x_hat||^2 (summed over the d_in dimensions)",
    "mse_per_dim": "mse / d_in",
    "fvu": "sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mu||^2, mu = mean of x over the whole "
           "evaluation set (not per batch); the error is not centred",
    "explained_variance": "1 - fvu",
    "cosine": "mean over evaluated tokens of cos(x_t, x_hat_t)",
    "l2_ratio": "mean over evaluated tokens of ||x_hat_t|| / ||x_t|| (shrinkage below 1)",
    "relative_reconstruction_bias": "gamma = argmin_g sum_t ||x_hat_t/g - x_t||^2 = "
           "sum_t ||x_hat_t||^2 / sum_t x_hat_t.x_t (Gated SAE eq. 10, SAEBench); below 1 = shrinkage",
    "norm_in": "mean over evaluated tokens of ||x_t||",
    "norm_out": "mean over evaluated tokens of ||x_hat_t||",
    "dead_fraction": "fraction of features that never fired (f != 0) on any evaluated token",
    "dense_fraction": f"fraction of features firing on more than {DENSE_THRESHOLD:.0%} of "
                      "evaluated tokens",
    "log10_density": "histogram of log10(fraction of evaluated tokens a feature fires on), "
                     "over features that fired at least once",
    "evaluated_tokens": "positions whose input token is not special (BOS, separators, chat "
                        "markers are excluded)",
}


class ReconAccumulator:
    """Per-context reconstruction sums (returned by `update`) and global feature statistics."""

    def __init__(self, d_sae: int):
        self.d_sae = d_sae
        self.fires = torch.zeros(d_sae, dtype=torch.int64)  # tokens each feature fired on
        self.n_tokens = 0
        self.l0_counts = np.zeros(d_sae + 1, dtype=np.int64)  # tokens with L0 == i
        self.cos_counts = np.zeros(_COS_BINS, dtype=np.int64)  # on [-1, 1]

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, feats: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Sums over each context's masked tokens: (B,) columns and the (B, d) column "sx".

        x, x_hat: (B, P, d); feats: (B, P, F); mask: (B, P) bool.
        """
        if x.shape != x_hat.shape or feats.shape[:-1] != x.shape[:-1] or mask.shape != x.shape[:-1]:
            raise ValueError(f"ReconAccumulator.update: shapes x {tuple(x.shape)}, x_hat "
                             f"{tuple(x_hat.shape)}, feats {tuple(feats.shape)}, mask "
                             f"{tuple(mask.shape)} do not line up as (B, P, d), (B, P, F), (B, P)")
        mask = mask.to(x.device, torch.bool)
        m = mask.double()  # (B, P)
        x64, h64 = x.double(), x_hat.double()
        xx = x64.pow(2).sum(-1)  # (B, P)
        hh = h64.pow(2).sum(-1)
        dot = (x64 * h64).sum(-1)
        sse = (x64 - h64).pow(2).sum(-1)
        x_norm, h_norm = xx.sqrt(), hh.sqrt()
        cos = dot / (x_norm * h_norm).clamp_min(_EPS)
        active = feats != 0  # (B, P, F)
        l0 = active.sum(-1)  # (B, P)

        self.fires += (active & mask[..., None]).sum((0, 1)).cpu()
        self.n_tokens += int(mask.sum())
        self.l0_counts += np.bincount(l0[mask].cpu().numpy(), minlength=self.d_sae + 1)
        cos_bin = ((cos[mask].clamp(-1, 1) + 1) / 2 * _COS_BINS).long().clamp_max(_COS_BINS - 1)
        self.cos_counts += np.bincount(cos_bin.cpu().numpy(), minlength=_COS_BINS)

        def total(v: Tensor) -> Tensor:
            return (v * m).sum(1)  # (B,)

        return {"n": m.sum(1), "sse": total(sse), "sxx": total(xx), "shh": total(hh),
                "sdot": total(dot), "scos": total(cos),
                "sratio": total(h_norm / x_norm.clamp_min(_EPS)),
                "snorm_in": total(x_norm), "snorm_out": total(h_norm),
                "sl0": total(l0.double()),
                "sx": (x64 * m[..., None]).sum(1)}  # (B, d)

    def features(self) -> FeatureSummary:
        return FeatureSummary.from_counts(self.fires.numpy(), self.n_tokens, self.l0_counts,
                                          self.cos_counts)


def recon_metrics(s: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Metrics from summed statistics; works on totals and on bootstrap replicates alike."""
    n = s["n"]
    d_in = s["sx"].shape[-1]
    total_var = s["sxx"] - safe_div(np.sum(s["sx"] ** 2, axis=-1), n)  # Σ‖x − μ‖²
    fvu = safe_div(s["sse"], total_var)
    return {
        "l0": safe_div(s["sl0"], n),
        "mse": safe_div(s["sse"], n),
        "mse_per_dim": safe_div(s["sse"], n * d_in),
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "cosine": safe_div(s["scos"], n),
        "l2_ratio": safe_div(s["sratio"], n),
        "relative_reconstruction_bias": safe_div(s["shh"], s["sdot"]),
        "norm_in": safe_div(s["snorm_in"], n),
        "norm_out": safe_div(s["snorm_out"], n),
    }


@dataclass
class FeatureSummary:
    """How often each feature fired over the evaluated tokens, and per-token distributions."""

    n_tokens: int
    density: np.ndarray  # (F,) fraction of evaluated tokens each feature fired on
    l0_counts: np.ndarray  # (max L0 + 1,) tokens with each L0
    cos_counts: np.ndarray  # (_COS_BINS,) tokens per cosine bin on [-1, 1]

    @classmethod
    def from_counts(cls, fires: np.ndarray, n_tokens: int, l0_counts: np.ndarray,
                    cos_counts: np.ndarray) -> FeatureSummary:
        density = fires / max(n_tokens, 1)
        used = np.flatnonzero(l0_counts)
        l0_counts = l0_counts[: (used[-1] + 1) if used.size else 1]
        return cls(n_tokens, density.astype(np.float64), l0_counts, cos_counts)

    @property
    def n_dead(self) -> int:
        return int((self.density == 0).sum())

    @property
    def n_dense(self) -> int:
        return int((self.density > DENSE_THRESHOLD).sum())

    @property
    def dead_fraction(self) -> float:
        return self.n_dead / len(self.density)

    @property
    def dense_fraction(self) -> float:
        return self.n_dense / len(self.density)

    def log10_density_histogram(self, bin_width: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
        """(edges, counts) of log10 density over features that fired at least once.

        The edges start at the lowest density observable (1 / n_tokens), so an
        empty left tail means "rare but alive" features were not seen, not absent.
        """
        alive = self.density[self.density > 0]
        low = math.floor(math.log10(1 / max(self.n_tokens, 1)) / bin_width) * bin_width
        edges = np.arange(low, bin_width / 2, bin_width)
        if len(edges) < 2:
            edges = np.array([low - bin_width, 0.0])
        counts, _ = np.histogram(np.log10(alive), bins=edges) if alive.size else (
            np.zeros(len(edges) - 1, dtype=np.int64), None)
        return edges, counts

    def to_json(self) -> dict:
        edges, counts = self.log10_density_histogram()
        cos_edges = np.linspace(-1, 1, len(self.cos_counts) + 1)
        return {
            "n_features": len(self.density), "n_tokens": self.n_tokens,
            "dead_fraction": self.dead_fraction, "n_dead": self.n_dead,
            "dense_fraction": self.dense_fraction, "n_dense": self.n_dense,
            "dense_threshold": DENSE_THRESHOLD,
            "log10_density_histogram": {"edges": edges.round(6).tolist(), "counts": counts.tolist()},
            "l0_histogram": {"l0": list(range(len(self.l0_counts))),
                             "counts": self.l0_counts.tolist()},
            "cosine_histogram": {"edges": cos_edges.round(6).tolist(),
                                 "counts": self.cos_counts.tolist()},
        }
