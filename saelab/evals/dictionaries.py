"""Compare two dictionaries by their decoder directions: MCS, per-feature max cosine, matching.

    cmp = compare(sae_a, sae_b, hungarian=True)
    cmp.mcs                 # mean over A's features of the max cosine with any B feature
    cmp.max_cos             # (F_a,) per A feature; cmp.best (F_a,) the B feature attaining it
    cmp.matching.b_of_a     # one-to-one assignment maximizing the total cosine

Definitions (rows of W_dec scaled to unit norm; C[i, j] = cos(A_i, B_j)):

    max cos of A_i       max_j C[i, j]
    MCS(A → B)           mean_i max_j C[i, j]          (not symmetric; B → A is reported too)
    matching             the permutation (or, for unequal widths, injection) π maximizing
                         Σ_i C[i, π(i)] (scipy.optimize.linear_sum_assignment); its mean
                         cosine is at most MCS, equal when every feature's best partner is unique

A feature that recurs across dictionaries (trained with other seeds or widths)
is likely a property of the model rather than of one training run. Decoder
rows of zero norm (never-trained features) get cosine 0 with everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from saelab.errors import SaelabError, ShapeMismatchError

MAX_HUNGARIAN = 16_384  # the assignment is cubic and holds an F_a x F_b float64 matrix
_CHUNK_ROWS = 2048  # rows of A per cosine block: bounds memory at 2048 x F_b
THRESHOLDS = (0.5, 0.7, 0.9)

DEFINITIONS = {
    "max_cos": "for each feature of A, the max cosine of its unit decoder row with B's rows",
    "mcs": "MCS(A->B) = mean over A's features of max_cos",
    "mcs_reverse": "MCS(B->A), the same with the roles swapped",
    "frac_above": "fraction of A's features whose max_cos exceeds each threshold",
    "matching": "one-to-one assignment maximizing the summed cosine (Hungarian / "
                "scipy.optimize.linear_sum_assignment); mean_cos is the mean over matched pairs",
}


@dataclass
class Matching:
    """One-to-one matching of A's features to B's (min(F_a, F_b) pairs)."""

    a: np.ndarray  # (M,) indices into A
    b: np.ndarray  # (M,) indices into B, b[i] matched to a[i]
    cos: np.ndarray  # (M,) their cosines
    n_a: int  # features in A

    @property
    def mean_cos(self) -> float:
        return float(self.cos.mean()) if self.cos.size else float("nan")

    @property
    def b_of_a(self) -> np.ndarray:
        """(F_a,) the B feature matched to each A feature, -1 where unmatched."""
        out = np.full(self.n_a, -1, dtype=np.int64)
        out[self.a] = self.b
        return out


@dataclass
class Comparison:
    """The result of `compare`."""

    max_cos: np.ndarray  # (F_a,)
    best: np.ndarray  # (F_a,) argmax over B
    max_cos_reverse: np.ndarray  # (F_b,) each B feature's max cosine with A
    matching: Matching | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def mcs(self) -> float:
        return float(self.max_cos.mean())

    @property
    def mcs_reverse(self) -> float:
        return float(self.max_cos_reverse.mean())

    def frac_above(self, threshold: float) -> float:
        return float((self.max_cos > threshold).mean())

    def to_json(self, per_feature: bool = False) -> dict:
        out = {"mcs": self.mcs, "mcs_reverse": self.mcs_reverse,
               "n_features_a": len(self.max_cos), "n_features_b": len(self.max_cos_reverse),
               "frac_above": {str(t): self.frac_above(t) for t in THRESHOLDS},
               "matching": None if self.matching is None else {
                   "mean_cos": self.matching.mean_cos, "n_pairs": len(self.matching.a),
                   "frac_above": {str(t): float((self.matching.cos > t).mean())
                                  for t in THRESHOLDS}},
               "max_cos_histogram": _histogram(self.max_cos),
               "notes": self.notes, "definitions": DEFINITIONS}
        if per_feature:
            out["max_cos"] = self.max_cos.round(6).tolist()
            out["best"] = self.best.tolist()
            if self.matching is not None:
                out["matching"]["b_of_a"] = self.matching.b_of_a.tolist()
        return out


def _histogram(values: np.ndarray, bins: int = 40) -> dict:
    counts, edges = np.histogram(values, bins=bins, range=(-1.0, 1.0))
    return {"edges": edges.round(6).tolist(), "counts": counts.tolist()}


def unit_rows(w: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm in float32; zero rows stay zero."""
    w = w.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def decoder_of(sae_or_w) -> Tensor:
    """W_dec (F, d_in) of an SAE, or the matrix itself."""
    return sae_or_w.W_dec if hasattr(sae_or_w, "W_dec") else torch.as_tensor(sae_or_w)


@torch.no_grad()
def compare(a, b, *, hungarian: bool = False) -> Comparison:
    """Compare dictionaries `a` and `b` (SAEs or (F, d_in) decoder matrices); see the module doc."""
    wa, wb = unit_rows(decoder_of(a)), unit_rows(decoder_of(b))
    if wa.shape[1] != wb.shape[1]:
        raise ShapeMismatchError(f"dictionary A has d_in={wa.shape[1]} and B has d_in="
                                 f"{wb.shape[1]}; compare SAEs trained on sites of the same width.")
    notes = _site_notes(a, b)
    max_cos = torch.empty(wa.shape[0])
    best = torch.empty(wa.shape[0], dtype=torch.int64)
    max_rev = torch.full((wb.shape[0],), -1.0)
    for start in range(0, wa.shape[0], _CHUNK_ROWS):
        block = wa[start:start + _CHUNK_ROWS] @ wb.T  # (chunk, F_b)
        values, idx = block.max(dim=1)
        max_cos[start:start + len(values)], best[start:start + len(values)] = values, idx
        max_rev = torch.maximum(max_rev, block.max(dim=0).values)
    matching = _hungarian(wa, wb) if hungarian else None
    return Comparison(max_cos.numpy(), best.numpy(), max_rev.numpy(), matching, notes)


def _hungarian(wa: Tensor, wb: Tensor) -> Matching:
    from scipy.optimize import linear_sum_assignment

    if max(wa.shape[0], wb.shape[0]) > MAX_HUNGARIAN:
        raise SaelabError(f"one-to-one matching of {wa.shape[0]} x {wb.shape[0]} features is too "
                          f"large (limit {MAX_HUNGARIAN} per side: cubic time, a dense float64 "
                          "matrix); compare without --hungarian, or slice the dictionaries.")
    cos = (wa.double() @ wb.double().T).numpy()  # (F_a, F_b)
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return Matching(rows.astype(np.int64), cols.astype(np.int64), cos[rows, cols], wa.shape[0])


def _site_notes(a, b) -> list[str]:
    """Warnings worth showing: dictionaries of different sites or models are rarely comparable."""
    cfg_a, cfg_b = getattr(a, "cfg", None), getattr(b, "cfg", None)
    if cfg_a is None or cfg_b is None:
        return []
    notes = []
    for what, va, vb in (("site", cfg_a.site, cfg_b.site),
                         ("model", cfg_a.model_name, cfg_b.model_name)):
        if va and vb and va != vb:
            notes.append(f"A and B were trained at different {what}s ({va} vs {vb}).")
    return notes
