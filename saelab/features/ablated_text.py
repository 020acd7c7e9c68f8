"""Ablated text of a feature's examples: which examples get it, and the rows the index stores.

    pick = chosen(ex["kind"], ex["bin"], ex["rank"], per_bin=1)   # top 0 + first of each bin
    results = ablate_examples(lm, sae, sub, ids, special, max_back=16)
    rows = window_rows(sub, results)          # ablation.parquet columns

One code path for `saelab features` (the first `--ablate` alive features) and the
dictionaries study (its featured features): the top example (rank 0) and the first
`per_bin` drawn examples of every uniform bin are ablated with
`token_ablation.ablate_many` in their whole context, and each deletion's change is
placed on the example's window (NaN for window tokens not deleted).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from saelab.features.summary import KIND_BIN, KIND_TOP
from saelab.features.token_ablation import AblationItem, AblationResult, ablate_many

EXAMPLE_KEYS = ("feature", "kind", "bin", "rank", "act", "context", "position", "start", "token_ids")


def chosen(kind: np.ndarray, bin_: np.ndarray, rank: np.ndarray, *, per_bin: int) -> np.ndarray:
    """[X] bool: the top example of rank 0 and the bin examples of rank < per_bin."""
    kind, rank = np.asarray(kind), np.asarray(rank)
    return ((kind == KIND_TOP) & (rank == 0)) | ((kind == KIND_BIN) & (rank < per_bin))


def as_arrays(examples: list[dict]) -> dict[str, np.ndarray]:
    """FeatureIndex.examples rows (kind as "top"/"bin") -> the example arrays used here."""
    out = {k: np.array([e[k] for e in examples]) for k in EXAMPLE_KEYS if k != "kind"}
    out["kind"] = np.array([KIND_TOP if e["kind"] == "top" else KIND_BIN for e in examples], dtype=np.int8)
    if examples:
        out["token_ids"] = np.array([e["token_ids"] for e in examples], dtype=np.int32)
    return out


def _list(row: Sequence | torch.Tensor) -> list:
    return row.tolist() if isinstance(row, torch.Tensor) else list(row)


def ablate_examples(lm, sae, ex: dict[str, np.ndarray], ids: Sequence | torch.Tensor,
                    special: Sequence | torch.Tensor, *,
                    max_back: int, progress: Callable[[int, int], None] | None = None,
                    step: int = 16) -> list[AblationResult]:
    """Token ablation of every example of `ex` ([X] arrays) in its whole context.

    ids, special: the contexts of the examples, row i example i's ([X, P] tensors, or lists
    of rows of any lengths).
    progress(done, total) is called every `step` examples.
    """
    items = [AblationItem(_list(ids[i]), int(ex["position"][i]), int(ex["feature"][i]),
                          _list(special[i])) for i in range(len(ex["feature"]))]
    results: list[AblationResult] = []
    for lo in range(0, len(items), step):
        results += ablate_many(lm, sae, items[lo:lo + step], max_back=max_back)
        if progress is not None:
            progress(min(lo + step, len(items)), len(items))
    return results


def window_rows(ex: dict[str, np.ndarray], results: list[AblationResult]) -> dict[str, np.ndarray]:
    """The ablation.parquet rows of ablated examples: each deletion's change at its window slot.

    Returns feature, kind, bin, rank, context, position, start, base [A]; token_ids,
    deltas [A, W] (NaN: a window token not deleted).
    """
    start = ex["start"]
    W = ex["token_ids"].shape[1]
    deltas = np.full((len(results), W), np.nan, dtype=np.float32)
    for i, res in enumerate(results):
        for pos, delta in zip(res.deleted, res.deltas, strict=True):
            if start[i] <= pos < start[i] + W:
                deltas[i, pos - start[i]] = delta
    rows = {k: ex[k] for k in ("feature", "kind", "bin", "rank", "context", "position", "start",
                               "token_ids")}
    return rows | {"base": np.array([r.base for r in results], dtype=np.float32), "deltas": deltas}
