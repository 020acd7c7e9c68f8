"""Small statistics the studies report: a mean with its variance and bootstrap interval."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mean_stat(values: Sequence[float], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """{"mean", "var" (ddof 1), "ci95" (percentile bootstrap of the mean), "n"}; NaNs are dropped.

    var is None below 2 values and ci95 is None below 2 values (a resample of
    one value has no spread to show).
    """
    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return {"mean": None, "var": None, "ci95": None, "n": 0}
    out = {"mean": float(x.mean()), "var": float(x.var(ddof=1)) if n > 1 else None, "ci95": None, "n": n}
    if n > 1 and n_boot > 0:
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
        out["ci95"] = [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]
    return out
