"""Edges ``A[target, source]`` from batched backward passes through the frozen model.

    engine = EdgeEngine(model, arch, state, transcoders, feats, errors)   # one frozen forward
    feat_cols, dense_cols = engine.feature_rows(torch.tensor([0, 5, 9]))  # rows of 3 features
    feat_cols, dense_cols = engine.target_rows(targets)

A row is the direct effect of every source on one target's pre-activation (a
feature's ``x . W_enc[:, i]``, read at ``mlp_in.L``; a target's ``sum(D * final)``):

- a feature source ``(l, p, i)`` with activation ``a``: ``a * (g_out[p] . W_dec[i])``
  summed over every layer it writes to, where ``g_out`` is the gradient at that
  layer's ``mlp_out``;
- an error node ``(l, p)``: ``err[p] . g_out[p]``; a token ``p``: ``embed[p] . g_embed[p]``.

The frozen model is affine in the sources (attention patterns and norm scales
fixed, activations held), so these gradients are exact direct effects. The
forward runs once with a batch of one; each pass differentiates ``n`` targets
at once (``is_grads_batched``: the attention weights are shared by the batch,
not copied), and `n` is chosen so the gradients of one pass fit `pass_bytes`.

Columns: ``feat_cols (n, N)`` over the active features, ``dense_cols (n, L*T + T)``
over the error nodes (``layer * T + pos``) and then the tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from saelab.graphs.features import ActiveFeatures, Writes, graph_mlp
from saelab.graphs.frozen import CleanState, run_frozen
from saelab.graphs.targets import Target
from saelab.models.sites import Architecture

PASS_BYTES = 512 * 2**20  # gradients of one batched backward pass
_CHUNK_ELEMS = 2**23  # (n, m, d) temporaries when features are gathered


class EdgeEngine:
    """The frozen model's forward, kept for many batched backward passes."""

    def __init__(self, model: nn.Module, arch: Architecture, state: CleanState,
                 transcoders: Mapping[int, Any], feats: ActiveFeatures, errors: Mapping[int, Tensor],
                 *, max_batch: int = 256, pass_bytes: int = PASS_BYTES):
        self.arch, self.state, self.tcs, self.feats, self.errors = arch, state, transcoders, feats, errors
        self.writes = Writes(transcoders)
        T, d = state.embed.shape[1], state.embed.shape[2]
        self.T, self.d, self.L = T, d, arch.n_layers
        self.dtype = state.embed.dtype
        # Rows are float32 (memory) unless the model runs in float64 (exact checks).
        self.row_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        per_row = (self.L + 1) * T * d * state.embed.element_size()
        self.batch = max(1, min(max_batch, pass_bytes // per_row))
        with torch.enable_grad():
            self.embed_leaf = torch.zeros_like(state.embed, requires_grad=True)
            self.out_leaves = {layer: torch.zeros_like(state.embed, requires_grad=True)
                               for layer in range(self.L)}
            fn = graph_mlp(transcoders, feats, errors, leaves=self.out_leaves)
            self.tape = run_frozen(model, arch, state, fn, embed=state.embed + self.embed_leaf)
        self.passes = 0

    @property
    def n_dense(self) -> int:
        return self.L * self.T + self.T

    # ------------------------------------------------------------------ targets' values
    def _feature_values(self, idx: Tensor) -> Tensor:
        """(n,) pre-activations (without b_enc) of features `idx`, in the graph: one gather."""
        f = self.feats
        layers = torch.unique(f.layer[idx])
        slot = torch.full((self.L,), -1, dtype=torch.long)
        slot[layers] = torch.arange(len(layers))
        x = torch.stack([self.tape.reads[int(layer)][0] for layer in layers])  # (l, T, d)
        enc = torch.stack([self.tcs[int(f.layer[k])].W_enc.detach()[:, int(f.index[k])]
                           for k in idx.tolist()]).to(self.dtype)  # (n, d)
        return (x[slot[f.layer[idx]], f.pos[idx]] * enc).sum(-1)

    def _target_values(self, targets: list[Target]) -> Tensor:
        final = self.tape.final[0]
        return torch.stack([(t.direction.to(final.dtype) * final).sum() for t in targets])

    # ------------------------------------------------------------------ rows
    def feature_rows(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Rows of the features `idx` (indices into the active features)."""
        return self._rows(lambda sl: self._feature_values(idx[sl]), len(idx))

    def target_rows(self, targets: list[Target]) -> tuple[Tensor, Tensor]:
        """Rows of the targets."""
        return self._rows(lambda sl: self._target_values(targets[sl]), len(targets))

    def _rows(self, values, n: int) -> tuple[Tensor, Tensor]:
        feat_parts, dense_parts = [], []
        for start in range(0, n, self.batch):
            sl = slice(start, min(n, start + self.batch))
            with torch.enable_grad():
                y = values(sl)
                f, dn = self._backward(y)
            feat_parts.append(f)
            dense_parts.append(dn)
        return torch.cat(feat_parts), torch.cat(dense_parts)

    def _backward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        n = y.numel()
        leaves = [self.embed_leaf, *(self.out_leaves[layer] for layer in range(self.L))]
        eye = torch.eye(n, dtype=y.dtype)
        grads = torch.autograd.grad(y, leaves, grad_outputs=eye, is_grads_batched=True,
                                    retain_graph=True, allow_unused=True)
        self.passes += 1
        T = self.T
        zeros = torch.zeros(n, T, dtype=self.row_dtype)
        g_embed = grads[0]
        g_out = {layer: grads[1 + layer] for layer in range(self.L)}
        dense = [zeros if g_out[layer] is None else
                 (g_out[layer][:, 0] * self.errors[layer][None]).sum(-1).to(self.row_dtype)
                 for layer in range(self.L)]
        dense.append(zeros if g_embed is None else
                     (g_embed[:, 0] * self.state.embed[0][None]).sum(-1).to(self.row_dtype))
        return self._feature_cols(g_out, n), torch.cat(dense, 1)

    def _feature_cols(self, g_out: dict[int, Tensor | None], n: int) -> Tensor:
        """act * (g[pos] . decoder row) for every active feature, as (n, N).

        Per source layer the features are grouped by position and padded to the largest
        group, so one batched matmul over positions does it: (T, n, d) @ (T, d, c)."""
        f = self.feats
        cols = torch.zeros(n, len(f), dtype=self.row_dtype)
        T, d = self.T, self.d
        for src in torch.unique(f.layer).tolist():
            where = (f.layer == src).nonzero()[:, 0]
            pos = f.pos[where]
            order = torch.argsort(pos, stable=True)
            where, pos = where[order], pos[order]
            counts = torch.bincount(pos, minlength=T)
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(len(where)) - starts[pos]
            for out_layer in self.writes.out_layers(src):
                g = g_out.get(out_layer)
                if g is None:
                    continue
                g = g[:, 0].transpose(0, 1)  # (T, n, d)
                rows = self.writes.rows(out_layer, src, f.index[where]).to(g.dtype)
                c = int(counts.max())
                step = max(1, _CHUNK_ELEMS // max(1, T * d))  # slots per matmul
                for s0 in range(0, c, step):
                    part = (slot >= s0) & (slot < s0 + step)
                    w_pad = torch.zeros(T, min(step, c - s0), d, dtype=g.dtype)
                    w_pad[pos[part], slot[part] - s0] = rows[part] * f.act[where[part]].to(g.dtype)[:, None]
                    out = torch.bmm(g, w_pad.transpose(1, 2))  # (T, n, c)
                    cols[:, where[part]] += out[pos[part], :, slot[part] - s0].T.to(self.row_dtype)
        return cols
