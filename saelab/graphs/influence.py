"""Influence, pruning and the graph's scores, as circuit-tracer defines them.

The adjacency is kept as its rows only: ``R (n_f + n_t, n_f + n_e + n_tok)``, rows
the nodes that have inputs (features, then targets), columns the sources
(features, error nodes, tokens). Node order everywhere: features, errors,
tokens, targets. Only feature and target rows are ever nonzero, so the square
matrix circuit-tracer builds (30 GB of zeros for a long prompt) is never needed.

- normalised adjacency: ``|R|``, each row divided by its sum;
- influence of a node: the target-weighted sum over all paths of the products of
  normalised edges (``w @ (A + A^2 + ...)``);
- nodes kept: the most influential until `node_threshold` of the total (tokens
  and targets always); edges kept: by ``normalised edge * (influence of its
  target + its weight)`` until `edge_threshold` of the total; then features and
  errors without an outgoing edge, and features without an incoming one, go,
  until nothing changes;
- replacement score: the tokens' share of the influence of tokens and errors;
  completeness score: the influence-weighted share of each node's inputs that
  does not come from error nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """How many nodes of each kind, in node order."""

    n_features: int
    n_errors: int
    n_tokens: int
    n_targets: int

    @property
    def n_cols(self) -> int:
        return self.n_features + self.n_errors + self.n_tokens

    @property
    def n_nodes(self) -> int:
        return self.n_cols + self.n_targets

    def row_nodes(self) -> Tensor:
        """Node index of each row of R."""
        return torch.cat([torch.arange(self.n_features),
                          torch.arange(self.n_cols, self.n_nodes)])


def normalize(R: Tensor) -> Tensor:
    """|R| with each row divided by its sum, as one new float32 buffer."""
    a = R.abs().float()
    a /= a.sum(1, keepdim=True).clamp(min=1e-10)
    return a


def influence(Rn: Tensor, layout: Layout, weights: Tensor, max_iter: int = 10_000) -> Tensor:
    """(n_nodes,) influence of every node on the targets (weighted by `weights`, (n_t,))."""
    nf = layout.n_features
    prod = torch.zeros(Rn.shape[0], dtype=Rn.dtype)
    prod[nf:] = weights.to(Rn.dtype)
    total = torch.zeros(layout.n_nodes, dtype=Rn.dtype)
    for _ in range(max_iter):
        cur = prod @ Rn  # (n_cols,)
        total[:layout.n_cols] += cur
        prod = torch.zeros_like(prod)
        prod[:nf] = cur[:nf]  # only features pass influence on (they alone have rows)
        if not prod.any():
            return total
    raise RuntimeError("influence did not converge: the graph has a cycle")


def find_threshold(scores: Tensor, threshold: float, chunk: int = 1 << 22) -> float:
    """The smallest score among the top scores that hold `threshold` of the total.

    Zeros never count; the sorted scores are summed in chunks (float64 running total),
    so a 300M-entry score matrix needs one float32 copy, not a float64 cumsum of it."""
    values = scores.detach().flatten()
    values = values[values > 0].float().numpy()
    if values.size == 0:
        return 0.0
    values.sort()
    values = values[::-1]
    total = float(values.sum(dtype=np.float64))
    goal, running = threshold * total, 0.0
    for start in range(0, values.size, chunk):
        part = np.cumsum(values[start:start + chunk], dtype=np.float64) + running
        hit = int(np.searchsorted(part, goal))
        if hit < part.size:
            return float(values[start + hit])
        running = float(part[-1])
    return float(values[-1])


@dataclass
class Pruned:
    node_mask: Tensor  # (n_nodes,) bool
    edge_mask: Tensor  # (n_rows, n_cols) bool
    cumulative: Tensor  # (n_nodes,) each node's cumulative influence rank (circuit-tracer's `influence`)
    influence: Tensor  # (n_nodes,) node influence


def prune(R: Tensor, layout: Layout, weights: Tensor, node_threshold: float = 0.8,
          edge_threshold: float = 0.98) -> Pruned:
    """Nodes and edges kept by cumulative influence (see the module docstring)."""
    for name, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"{name}={t}: expected a fraction in [0, 1]")
    nf, ncol = layout.n_features, layout.n_cols
    rows = layout.row_nodes()
    node_infl = influence(normalize(R), layout, weights)
    node_mask = node_infl >= find_threshold(node_infl, node_threshold)
    node_mask[layout.n_features + layout.n_errors:] = True  # tokens and targets stay

    # One working buffer (a single copy of R): the pruned matrix, normalised in place, then
    # its edge scores.
    work = R.to(torch.float32, copy=True).abs_()
    work *= node_mask[rows][:, None]
    work *= node_mask[:ncol][None, :]
    work /= work.sum(1, keepdim=True).clamp(min=1e-10)
    infl = influence(work, layout, weights)
    row_weight = infl[rows].clone()
    row_weight[nf:] += weights.to(row_weight.dtype)
    work *= row_weight[:, None]
    edge_threshold_value = find_threshold(work, edge_threshold)
    edge_mask = work >= edge_threshold_value
    if edge_threshold_value <= 0:  # no positive score: no edge (zeros never count)
        edge_mask &= work > 0
    del work

    keep_out = nf + layout.n_errors  # features and errors need an outgoing edge
    while True:
        old = node_mask.clone()
        edge_mask &= node_mask[rows][:, None]  # in place: no second (rows, cols) mask
        edge_mask &= node_mask[:ncol][None, :]
        node_mask[:keep_out] &= edge_mask[:, :keep_out].any(0)
        node_mask[:nf] &= edge_mask[:nf].any(1)
        if torch.equal(old, node_mask):
            break

    order = torch.argsort(node_infl, descending=True)
    cum = torch.cumsum(node_infl[order], 0) / node_infl.sum().clamp(min=1e-30)
    cumulative = torch.zeros_like(node_infl)
    cumulative[order] = cum
    return Pruned(node_mask, edge_mask, cumulative, node_infl)


def scores(R: Tensor, layout: Layout, weights: Tensor) -> tuple[float, float]:
    """(replacement score, completeness score) of the unpruned graph."""
    Rn = normalize(R)
    infl = influence(Rn, layout, weights)
    e0, e1 = layout.n_features, layout.n_features + layout.n_errors
    token = infl[e1:layout.n_cols].sum()
    error = infl[e0:e1].sum()
    replacement = float(token / (token + error).clamp(min=1e-30))
    non_error = torch.ones(layout.n_nodes, dtype=Rn.dtype)
    non_error[layout.row_nodes()] = 1 - Rn[:, e0:e1].sum(1)
    out_infl = infl.clone()
    out_infl[layout.n_cols:] += weights.to(out_infl.dtype)
    completeness = float((non_error * out_infl).sum() / out_infl.sum().clamp(min=1e-30))
    return replacement, completeness
