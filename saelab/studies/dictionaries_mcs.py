"""MCS between every pair of a grid's dictionaries, and which features recur.

    res = pairwise_mcs({"a": W_dec_a, "b": W_dec_b, ...})
    res.mcs[i, j]            # MCS(i -> j): mean over i's unit decoder rows of the max cosine with j's
    res.max_cos[(i, j)]      # (F_i,) each feature's max cosine with dictionary j

Definitions are saelab.evals.dictionaries' (`compare`), run once per unordered
pair (both directions come out of one cosine matrix). A feature of dictionary
A *recurs* in dictionary B when its max cosine there is at least the
threshold (0.9 in the original's write-up). `chance_mcs` is what two unrelated
dictionaries of the same sizes reach: random unit rows in d dimensions still
find a nearest neighbour at cosine ~0.15 for d=576 and a thousand rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from saelab.evals.dictionaries import compare


@dataclass
class PairwiseMCS:
    names: list[str]
    mcs: np.ndarray  # (N, N) MCS(row -> column); 1 on the diagonal
    max_cos: dict[tuple[int, int], np.ndarray]  # (i, j) -> (F_i,)

    def recurring(self, i: int, j: int, threshold: float) -> float:
        """Share of dictionary i's features whose max cosine in j is >= threshold."""
        return float((self.max_cos[(i, j)] >= threshold).mean())

    def recurrence_score(self, i: int, others: list[int]) -> np.ndarray:
        """(F_i,) each feature's mean max cosine over the dictionaries `others`."""
        return np.mean([self.max_cos[(i, j)] for j in others], axis=0)


def pairwise_mcs(decoders: Mapping[str, object], on_pair=None) -> PairwiseMCS:
    """Compare every pair of `decoders` ({name: SAE or (F, d) W_dec}); on_pair(done) after each."""
    names = list(decoders)
    n = len(names)
    mcs = np.eye(n)
    max_cos: dict[tuple[int, int], np.ndarray] = {}
    done = 0
    for i in range(n):
        for j in range(i + 1, n):
            cmp = compare(decoders[names[i]], decoders[names[j]])
            mcs[i, j], mcs[j, i] = cmp.mcs, cmp.mcs_reverse
            max_cos[(i, j)], max_cos[(j, i)] = cmp.max_cos, cmp.max_cos_reverse
            done += 1
            if on_pair:
                on_pair(done)
    return PairwiseMCS(names, mcs, max_cos)


def histogram(values: np.ndarray, bins: int = 40) -> dict:
    counts, edges = np.histogram(values, bins=bins, range=(-1.0, 1.0))
    return {"edges": edges.round(6).tolist(), "counts": counts.tolist()}


def chance_mcs(n_a: int, n_b: int, d: int, seed: int = 0) -> float:
    """MCS(A -> B) of two dictionaries of n_a and n_b random unit rows in d dimensions
    (isotropic Gaussian rows, seeded): the floor a learned pair must clear to share anything."""
    g = torch.Generator().manual_seed(seed)
    return float(compare(torch.randn(n_a, d, generator=g), torch.randn(n_b, d, generator=g)).mcs)
