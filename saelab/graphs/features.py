"""Active features, error nodes and the MLP replacement made of them.

    feats = active_features(transcoders, state)       # every nonzero (layer, pos, index), BOS left out
    fn = graph_mlp(transcoders, feats, state)         # mlp_out = decode(acts) + skip(x) + error
    fn = replacement_mlp(transcoders, state, edit)    # the same, features recomputed from x

A feature is a source wherever its transcoder's decoder writes. Per-layer
transcoders write to their own layer's ``mlp_out`` only; `Writes` is the one
place that says so, so a cross-layer transcoder (a feature writing to every
later layer) needs a new `Writes`, not new graph code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saelab.graphs.frozen import CleanState

FIRST_POSITION = 1  # position 0 (BOS, the attention sink) has no feature nodes: it is all error


@dataclass
class ActiveFeatures:
    """The nonzero features of a prompt, as parallel (N,) tensors, in (layer, pos, index) order."""

    layer: Tensor  # (N,) long
    pos: Tensor  # (N,) long
    index: Tensor  # (N,) long, the feature's index in its transcoder
    act: Tensor  # (N,) activation

    def __len__(self) -> int:
        return int(self.layer.numel())

    def subset(self, keep: Tensor) -> ActiveFeatures:
        return ActiveFeatures(self.layer[keep], self.pos[keep], self.index[keep], self.act[keep])


class Writes:
    """Where features write: ``rows(out_layer, src_layer, index) -> (n, d)`` decoder rows or None."""

    def __init__(self, transcoders: Mapping[int, Any]):
        self.tcs = transcoders

    def out_layers(self, src_layer: int) -> list[int]:
        return [src_layer]  # per-layer transcoders: their own MLP's output only

    def rows(self, out_layer: int, src_layer: int, index: Tensor) -> Tensor:
        return self.tcs[src_layer].W_dec.detach()[index]


def _encode(tc: Any, x: Tensor) -> Tensor:
    """Feature activations (T, d_sae) of x (T, d), position 0 zeroed (BOS left out)."""
    acts = tc.encode(x)
    acts = acts.clone()
    acts[:FIRST_POSITION] = 0
    return acts


@torch.no_grad()
def active_features(transcoders: Mapping[int, Any], state: CleanState) -> ActiveFeatures:
    """Every nonzero feature activation of the clean pass, BOS position left out."""
    parts = []
    for layer in sorted(transcoders):
        acts = _encode(transcoders[layer], state.mlp_in[layer][0])  # (T, d_sae)
        pos, idx = acts.nonzero(as_tuple=True)
        parts.append((torch.full_like(pos, layer), pos, idx, acts[pos, idx]))
    cat = [torch.cat([p[i] for p in parts]) for i in range(4)]
    return ActiveFeatures(*cat)


def _decode_sparse(writes: Writes, feats: ActiveFeatures, out_layer: int, acts: Tensor,
                   T: int, d: int, dtype: torch.dtype) -> Tensor:
    """Sum of act * decoder row over `feats` writing to `out_layer`, as (T, d)."""
    out = torch.zeros(T, d, dtype=dtype)
    for src in torch.unique(feats.layer).tolist():
        if out_layer not in writes.out_layers(src):
            continue
        m = feats.layer == src
        rows = writes.rows(out_layer, src, feats.index[m]).to(dtype)
        out.index_add_(0, feats.pos[m], acts[m].to(dtype)[:, None] * rows)
    return out


@torch.no_grad()
def decoded_by_layer(writes: Writes, feats: ActiveFeatures, coef: Tensor, T: int, d: int,
                     dtype: torch.dtype) -> dict[int, Tensor]:
    """out layer -> (T, d): sum of coef * decoder row of `feats`, wherever each feature writes."""
    out: dict[int, Tensor] = {}
    for src in torch.unique(feats.layer).tolist():
        m = feats.layer == src
        for layer in writes.out_layers(src):
            rows = writes.rows(layer, src, feats.index[m]).to(dtype)
            add = out.setdefault(layer, torch.zeros(T, d, dtype=dtype))
            add.index_add_(0, feats.pos[m], coef[m].to(dtype)[:, None] * rows)
    return out


@torch.no_grad()
def error_nodes(transcoders: Mapping[int, Any], feats: ActiveFeatures,
                state: CleanState) -> dict[int, Tensor]:
    """layer -> (T, d): the real MLP output minus the transcoders' reconstruction of it."""
    writes = Writes(transcoders)
    errs = {}
    for layer, tc in transcoders.items():
        real = state.mlp_out[layer][0]
        T, d = real.shape
        recon = _decode_sparse(writes, feats, layer, feats.act, T, d, real.dtype)
        errs[layer] = real - recon - tc.b_dec.to(real.dtype) - tc.skip(state.mlp_in[layer][0]).to(real.dtype)
    return errs


def graph_mlp(transcoders: Mapping[int, Any], feats: ActiveFeatures, errors: Mapping[int, Tensor],
              acts: Tensor | None = None, error_scale: Mapping[int, Tensor] | None = None,
              leaves: Mapping[int, Tensor] | None = None) -> Callable[[int, Tensor], Tensor]:
    """The MLP of the graph's linear model: activations held at `acts` (default the clean ones).

    error_scale[layer]: (T, 1) multiplier of the error node (finite differences);
    leaves[layer]: (1, T, d) zero tensors added to the output, where gradients are read.
    """
    writes = Writes(transcoders)
    values = feats.act if acts is None else acts

    def fn(layer: int, x: Tensor) -> Tensor:
        tc = transcoders[layer]
        T, d = x.shape[1], x.shape[2]
        out = _decode_sparse(writes, feats, layer, values, T, d, x.dtype)
        err = errors[layer] if error_scale is None else errors[layer] * error_scale[layer]
        out = out + tc.b_dec.to(x.dtype) + err + tc.skip(x[0]).to(x.dtype)
        out = out[None]
        return out + leaves[layer] if leaves is not None and layer in leaves else out
    return fn


Edit = Callable[[int, Tensor], Tensor]  # (layer, acts (T, d_sae)) -> edited acts


def replacement_mlp(transcoders: Mapping[int, Any], errors: Mapping[int, Tensor],
                    edit: Edit | None = None) -> Callable[[int, Tensor], Tensor]:
    """The replacement model's MLP: features recomputed from x, edited, decoded, plus error."""
    def fn(layer: int, x: Tensor) -> Tensor:
        tc = transcoders[layer]
        acts = _encode(tc, x[0])
        if edit is not None:
            acts = edit(layer, acts)
        out = tc.decode(acts).to(x.dtype) + tc.skip(x[0]).to(x.dtype) + errors[layer]
        return out[None]
    return fn
