"""Rows of the adjacency as they come, within a memory budget.

A row has a column for every active feature of the prompt (a million on a long
prompt) besides the error and token columns. The feature part is kept dense
when all the rows fit `budget` bytes; otherwise each row keeps its `k` largest
entries by magnitude (``k = budget / (rows * 8)``) and the rest is dropped as it
arrives, so the dense ``[targets x sources]`` matrix never exists. Each row's
exact sum and absolute sum are kept before anything is dropped: normalisation
and the check ``incoming edges + bias = pre-activation`` use them, and
`dropped` says how much of a row's absolute mass the truncation lost.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROW_BUDGET = 1 << 30  # bytes for the feature columns of all rows
_CHUNK_ELEMS = 1 << 22  # stored entries per chunk in the passes over all rows


class RowStore:
    def __init__(self, max_rows: int, n_features: int, n_dense: int, budget: int = ROW_BUDGET,
                 dtype: torch.dtype = torch.float32):
        self.n_features = n_features
        size = torch.finfo(dtype).bits // 8
        self.dense = torch.zeros(max_rows, n_dense, dtype=dtype)
        self.exact = max_rows * max(n_features, 1) * size <= budget
        if self.exact:
            self.feat = torch.zeros(max_rows, n_features, dtype=dtype)
        else:
            self.k = max(1, min(n_features, budget // (max_rows * (4 + size))))
            self.idx = torch.zeros(max_rows, self.k, dtype=torch.int32)
            self.val = torch.zeros(max_rows, self.k, dtype=dtype)
        self.sum = torch.zeros(max_rows, dtype=torch.float64)
        self.abs_sum = torch.zeros(max_rows, dtype=torch.float64)
        self.kept_abs = torch.zeros(max_rows, dtype=torch.float64)
        self.n = 0

    def add(self, feat: Tensor, dense: Tensor) -> None:
        """Append rows: feature part (n, N), dense part (n, n_dense)."""
        a, b = self.n, self.n + feat.shape[0]
        self.dense[a:b] = dense
        self.sum[a:b] = feat.double().sum(1) + dense.double().sum(1)
        self.abs_sum[a:b] = feat.double().abs().sum(1) + dense.double().abs().sum(1)
        if self.exact:
            self.feat[a:b] = feat
            self.kept_abs[a:b] = self.abs_sum[a:b]
        else:
            _, top = feat.abs().topk(self.k, dim=1)
            self.idx[a:b] = top.int()
            self.val[a:b] = feat.gather(1, top)
            self.kept_abs[a:b] = self.val[a:b].double().abs().sum(1) + dense.double().abs().sum(1)
        self.n = b

    @property
    def dropped(self) -> float:
        """The largest share of a row's absolute mass lost to truncation (0 when exact)."""
        if self.n == 0:
            return 0.0
        lost = 1 - self.kept_abs[:self.n] / self.abs_sum[:self.n].clamp(min=1e-30)
        return float(lost.max().clamp(min=0))

    def _chunks(self, n: int):
        """Row slices of about `_CHUNK_ELEMS` stored entries: temporaries stay small."""
        width = self.feat.shape[1] if self.exact else self.k
        step = max(1, _CHUNK_ELEMS // max(1, width))
        for a in range(0, n, step):
            yield slice(a, min(n, a + step))

    def feature_influence(self, first: Tensor, feature_of_row: Tensor) -> Tensor:
        """(N,) influence on the targets of every feature through the stored rows.

        first: (n,) starting weight of each stored row (the targets' weights, 0 elsewhere);
        feature_of_row: (n,) feature index of each row, -1 for target rows. Works by row
        chunks: no temporary the size of the store.
        """
        n = self.n
        norm = self.abs_sum[:n].clamp(min=1e-10).float()
        prod = first.float()
        total = torch.zeros(self.n_features)
        is_feat = feature_of_row >= 0
        for _ in range(10_000):
            w = prod / norm
            cur = torch.zeros(self.n_features)
            for sl in self._chunks(n):
                if not w[sl].any():
                    continue
                if self.exact:
                    cur += w[sl] @ self.feat[sl].abs().float()
                else:
                    cur.index_add_(0, self.idx[sl].flatten(),
                                   (w[sl, None] * self.val[sl].abs().float()).flatten())
            total += cur
            prod = torch.zeros(n)
            prod[is_feat] = cur[feature_of_row[is_feat]]
            if not prod.any():
                return total
        raise RuntimeError("influence did not converge: the graph has a cycle")

    def feature_columns(self, rows: Tensor, selected: Tensor, out: Tensor | None = None) -> Tensor:
        """(len(rows), len(selected)) the feature part restricted to columns `selected`.

        Gathered by row chunks: no temporary the size of the store. out: a zeroed
        (len(rows), len(selected)) tensor (or view) to fill instead of a new one."""
        if out is None:
            out = torch.zeros(len(rows), len(selected), dtype=self.dense.dtype)
        col = torch.full((self.n_features,), -1, dtype=torch.long)
        col[selected] = torch.arange(len(selected))
        for sl in self._chunks(len(rows)):
            if self.exact:
                out[sl] = self.feat[rows[sl]][:, selected]
                continue
            where = col[self.idx[rows[sl]].long()]
            keep = where >= 0
            r = torch.arange(sl.start, sl.stop)[:, None].expand_as(where)
            out[r[keep], where[keep]] = self.val[rows[sl]][keep]
        return out
