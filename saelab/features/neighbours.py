"""Nearest features by decoder cosine, in the same SAE or in another one.

    idx, cos = neighbours(sae.W_dec, k=10)              # [F, k] each, self excluded
    idx, cos = neighbours(sae.W_dec, other.W_dec)       # nearest rows of another SAE

Rows are normalized once, then compared chunk by chunk (a [chunk, F_other]
block at a time), so a 16k x 16k comparison never holds the full matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def neighbours(W_dec: Tensor, other: Tensor | None = None, *, k: int = 10,
               chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """(indices, cosines) [F, k] of the k most similar rows; `other` defaults to W_dec itself.

    Against itself a feature is never its own neighbour. A zero row has cosine 0 to all.
    """
    a = _unit(W_dec)
    b = a if other is None else _unit(other)
    if other is not None and b.shape[1] != a.shape[1]:
        raise ValueError(f"decoders of width {a.shape[1]} and {b.shape[1]} cannot be compared; "
                         "neighbours across SAEs need SAEs on the same site width")
    k = min(k, b.shape[0] - (other is None))
    idx, vals = [], []
    for lo in range(0, a.shape[0], chunk):
        sims = a[lo:lo + chunk] @ b.T  # (c, F_b)
        if other is None:
            rows = torch.arange(sims.shape[0])
            sims[rows, rows + lo] = -torch.inf
        top = sims.topk(k, dim=1)
        idx.append(top.indices)
        vals.append(top.values)
    return torch.cat(idx), torch.cat(vals)


def _unit(W: Tensor) -> Tensor:
    W = W.detach().float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
