"""Sparse linear connections between the features of two dictionaries at consecutive sites.

    fit = fit_connections(early_acts, late_acts, targets=[3, 17], alpha=0.01)
    fit.coef[i]          # (F_early,) the L1 map onto later feature targets[i], standardised:
                         # later-feature standard deviations per earlier-feature one
    fit.r2[i]            # R² on the held-out half of the tokens

Both feature sets are read on the same tokens. For each later feature an L1
(Lasso, scikit-learn) linear regression from all earlier features is fitted on
the first half of the tokens and scored on the second half. Both sides are
scaled to unit standard deviation on the training half (the earlier features
are not centred, so a sparse matrix stays sparse; the intercept absorbs the
means), so coefficients compare across features and sites and one penalty
`alpha` suits them all: a coefficient is the later feature's change, in its
standard deviations, per standard deviation of the earlier one.

The weight-based guess is `W_dec(earlier) · W_enc(later)`: how much a unit of
the earlier feature, written into the residual stream, adds to the later
feature's pre-activation if nothing between the sites changed it. It is exact
only for a residual-to-residual pair with nothing in between; the data fit
sees the layers in between.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class ConnectionFit:
    """The fitted maps for some later features."""

    targets: np.ndarray  # (T,) later feature ids
    coef: np.ndarray  # (T, F_early) standardised (see the module docstring)
    intercept: np.ndarray  # (T,)
    r2: np.ndarray  # (T,) held-out R² (NaN when the held-out target is constant)
    scale: np.ndarray  # (F_early,) the standard deviations the features were divided by
    not_converged: int = 0  # fits that stopped at max_iter (coordinate descent's gap above tol)

    def strongest(self, n: int = 20) -> list[tuple[int, int, float, float]]:
        """The `n` largest |coef| over all targets: (earlier, later, coef, that target's R²)."""
        flat = np.abs(self.coef).ravel()
        order = np.argsort(-flat)[:n]
        out = []
        for o in order:
            t, e = divmod(int(o), self.coef.shape[1])
            if flat[o] == 0:
                break
            out.append((e, int(self.targets[t]), float(self.coef[t, e]), float(self.r2[t])))
        return out


def fit_connections(early: np.ndarray, late: np.ndarray, targets: Sequence[int], *,
                    alpha: float = 0.01, max_iter: int = 2000) -> ConnectionFit:
    """Fit an L1 map from `early` (N, F_early) to each late[:, t] (N,) for t in `targets`;
    the first half of the rows trains, the second half scores (see the module docstring)."""
    import warnings

    from scipy import sparse
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso

    early = np.asarray(early, dtype=np.float64)
    late = np.asarray(late, dtype=np.float64)
    if early.shape[0] != late.shape[0] or early.shape[0] < 4:
        raise ValueError(f"fit_connections: {early.shape[0]} and {late.shape[0]} rows; need the "
                         "same tokens for both, at least 4")
    half = early.shape[0] // 2
    scale = early[:half].std(0)
    scale[scale == 0] = 1.0  # a feature silent on the training half gets coefficient 0
    x = sparse.csc_matrix(early / scale)
    x_train, x_test = x[:half], x[half:]
    coefs, intercepts, r2 = [], [], []
    not_converged = 0
    for t in targets:
        sd = late[:half, t].std()
        y = late[:, t] / (sd if sd > 0 else 1.0)
        model = Lasso(alpha=alpha, max_iter=max_iter, tol=1e-4, selection="cyclic")
        with warnings.catch_warnings(record=True) as caught:  # counted, not printed per fit
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(x_train, y[:half])
        not_converged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
        pred = model.predict(x_test)
        resid = ((y[half:] - pred) ** 2).sum()
        total = ((y[half:] - y[half:].mean()) ** 2).sum()
        r2.append(1 - resid / total if total > 0 else float("nan"))
        coefs.append(model.coef_.copy())
        intercepts.append(float(model.intercept_))
    return ConnectionFit(np.asarray(targets, dtype=np.int64), np.asarray(coefs).reshape(len(targets), -1),
                         np.asarray(intercepts), np.asarray(r2, dtype=np.float64), scale,
                         not_converged)


def weight_guess(W_dec_early: np.ndarray, W_enc_late: np.ndarray) -> np.ndarray:
    """(F_early, F_late) W_dec(earlier) · W_enc(later)."""
    return np.asarray(W_dec_early, dtype=np.float64) @ np.asarray(W_enc_late, dtype=np.float64)


def compare_with_weights(fit: ConnectionFit, guess: np.ndarray, top: int = 5) -> dict:
    """How well the weight-based guess agrees with the fitted connections.

    Per target with a non-zero fit: the Spearman correlation between the fitted
    coefficients (per standard deviation) and the guess scaled the same way, over the
    earlier features either one ranks in its `top`; and whether the fit's strongest
    earlier feature is among the guess's `top`."""
    from scipy.stats import spearmanr

    rho, hits, n = [], 0, 0
    for i, t in enumerate(fit.targets):
        c = fit.coef[i]
        if not np.any(c):
            continue
        g = guess[:, t] * fit.scale
        chosen = np.union1d(np.argsort(-np.abs(c))[:top], np.argsort(-np.abs(g))[:top])
        if len(chosen) >= 3 and np.ptp(c[chosen]) > 0 and np.ptp(g[chosen]) > 0:
            rho.append(float(spearmanr(c[chosen], g[chosen]).statistic))
        hits += int(np.argmax(np.abs(c)) in np.argsort(-np.abs(g))[:top])
        n += 1
    return {"targets_fitted": n, "top": top,
            "strongest_in_guess_top": hits / n if n else None,
            "spearman_mean": float(np.mean(rho)) if rho else None,
            "definition": f"for each later feature with a non-zero fit: whether its strongest "
                          f"fitted earlier feature is among the {top} largest |W_dec·W_enc| "
                          "(scaled by the earlier feature's std), and the Spearman correlation "
                          "of fit and guess over the union of both tops"}
