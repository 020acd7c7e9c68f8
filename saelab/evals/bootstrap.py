"""Confidence intervals by resampling contexts, from per-context sufficient statistics.

Tokens of one context share a document and a prefix, so their errors and losses
are correlated. Resampling single tokens would treat them as independent draws
and make the intervals too narrow (by roughly the square root of the design
effect, often 2-5x on text); we resample whole contexts instead (a cluster
bootstrap), which stays valid whatever the correlation inside a context.

Every metric here is a function of sums over tokens (token counts, Σ squared
error, Σ‖x‖², Σx, Σ cross-entropies ...). Each context contributes one row of
such sums, and a bootstrap replicate is the weighted sum of rows with the
multinomial counts of a resample::

    S*[r] = Σ_c w[r, c] · s[c]          w[r] ~ Multinomial(C, 1/C each)

so ratio metrics (FVU, loss recovered, KL score) are recomputed from the
replicate's sums exactly, never averaged over contexts, and a replicate costs
one small matrix product instead of a pass over the tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

Sums = dict[str, np.ndarray]  # name -> () or (d,) for a total; (R,) or (R, d) for R replicates
MetricFn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]

_CHUNK_BYTES = 64 << 20  # bound on the (replicates, contexts) weight matrix held at once


class ContextStats:
    """Per-context sufficient statistics, appended batch by batch.

    Each column is float64 with one row per context: shape (C,) for scalars
    and (C, d) for vectors such as Σx. Float64 because FVU subtracts
    ‖Σx‖²/n from Σ‖x‖², which cancels badly in float32 when the mean is large
    (SmolLM2's residual stream has components near 1e3).
    """

    def __init__(self) -> None:
        self._parts: dict[str, list[np.ndarray]] = {}
        self._cache: dict[str, np.ndarray] | None = None

    def add(self, columns: Mapping[str, object]) -> None:
        """Append one batch: each value has a leading dimension of its contexts (tensor or array)."""
        sizes = set()
        for name, value in columns.items():
            arr = _to_numpy(value)
            sizes.add(arr.shape[0])
            self._parts.setdefault(name, []).append(arr)
        if len(sizes) > 1:
            raise ValueError(f"ContextStats.add: columns have different context counts {sizes}")
        self._cache = None

    @property
    def columns(self) -> dict[str, np.ndarray]:
        if self._cache is None:
            self._cache = {k: np.concatenate(v) for k, v in self._parts.items()}
        return self._cache

    @property
    def n_contexts(self) -> int:
        cols = self.columns
        return next(iter(cols.values())).shape[0] if cols else 0

    def sums(self) -> Sums:
        """Totals over every context: the point estimate's sufficient statistics."""
        return {k: v.sum(axis=0) for k, v in self.columns.items()}


def _to_numpy(value: object) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; no torch import needed here
        value = value.detach().to("cpu").double().numpy()
    return np.asarray(value, dtype=np.float64)


def bootstrap_ci(stats: ContextStats, metric_fn: MetricFn, *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, tuple[float, float] | None]:
    """Percentile intervals of every metric `metric_fn` computes, resampling contexts.

    `metric_fn` maps sums (leading replicate dimension R) to {name: (R,) values}.
    Replicates where a metric is undefined (NaN, e.g. a zero denominator) are
    left out of its percentiles; a metric undefined in every replicate gets None,
    as does everything when there are fewer than 2 contexts or n_boot is 0.
    """
    if not 0 < level < 1:
        raise ValueError(f"bootstrap level={level}: expected a probability between 0 and 1")
    cols = stats.columns
    n_ctx = stats.n_contexts
    if n_boot <= 0 or n_ctx < 2:
        return {name: None for name in metric_fn(stats.sums())}
    rng = np.random.default_rng(seed)
    per_chunk = max(1, min(n_boot, _CHUNK_BYTES // (8 * n_ctx)))
    draws: dict[str, list[np.ndarray]] = {}
    done = 0
    while done < n_boot:
        r = min(per_chunk, n_boot - done)
        weights = rng.multinomial(n_ctx, np.full(n_ctx, 1.0 / n_ctx), size=r).astype(np.float64)
        sums = {k: weights @ v for k, v in cols.items()}  # (r,) or (r, d)
        for name, values in metric_fn(sums).items():
            draws.setdefault(name, []).append(np.broadcast_to(values, (r,)))
        done += r
    alpha = (1 - level) / 2
    out: dict[str, tuple[float, float] | None] = {}
    for name, parts in draws.items():
        values = np.concatenate(parts)
        values = values[np.isfinite(values)]
        if values.size == 0:
            out[name] = None
            continue
        lo, hi = np.quantile(values, [alpha, 1 - alpha])
        out[name] = (float(lo), float(hi))
    return out


def safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with NaN where den is 0 (an undefined metric, not an error)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)
