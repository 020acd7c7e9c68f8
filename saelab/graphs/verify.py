"""Check a graph by intervening: what it predicts against what the models do.

    report = verify_graph(model, tokenizer, ids, transcoders, graph, pruned, targets, top=10)

For the `top` features of the graph by influence (those the pruning keeps come first) each is ablated
(activation to 0) and steered (activation times `steer`), one at a time:

- predicted: the change of the target through the graph's paths. A change ``da``
  of a feature moves each feature it feeds by ``A[t, s] * da / a_s`` (edges are
  at the source's activation; an active feature's activation follows its
  pre-activation), wave after wave, and the target by the same rule;
- replacement model: frozen attention and norms, error nodes held, every other
  feature recomputed by its transcoder after the edit;
- real model: the unmodified model (attention not frozen, real MLPs), the
  feature's decoder row times ``da`` added to its MLP's output at its position.

The target is the targets' weighted value ``sum_k w_k * value_k`` (each a
direction at the lm_head's input). Reported per model: Spearman rank
correlation and least-squares slope of measured on predicted. The share the
pruned graph explains: keep only its features (the rest zeroed), against
keeping none, ``(T_pruned - T_none) / (T_clean - T_none)``, in both models
(in the real model the features' decoded outputs at their clean activations
are what is removed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from saelab.graphs.features import (
    Writes,
    active_features,
    decoded_by_layer,
    error_nodes,
    replacement_mlp,
)
from saelab.graphs.frozen import _lm_head, record_clean, run_frozen
from saelab.graphs.influence import Pruned
from saelab.graphs.record import Graph
from saelab.graphs.targets import Target
from saelab.models.hooks import patch
from saelab.models.sites import describe


def _weighted(targets: list[Target], final: Tensor) -> float:
    return float(sum(t.weight * float((t.direction.to(final.dtype) * final[0]).sum())
                     for t in targets))


def predicted_effect(graph: Graph, node: int, delta: float) -> float:
    """Change of the weighted target when feature `node`'s activation changes by `delta`."""
    nf = graph.layout.n_features
    A = graph.adjacency.double()
    act = graph.features.act.double()
    w = torch.tensor([t["weight"] for t in graph.targets], dtype=torch.float64)
    wave = torch.zeros(nf, dtype=torch.float64)
    wave[node] = delta
    total = 0.0
    for _ in range(10_000):
        per_unit = wave / act  # activation change per unit of each source's activation
        total += float(w @ (A[nf:, :nf] @ per_unit))
        wave = A[:nf, :nf] @ per_unit
        if not wave.any():
            return total
    raise RuntimeError("the graph has a cycle")


def _real_target(model: nn.Module, ids: Tensor, targets: list[Target],
                 adds: Mapping[int, Tensor]) -> float:
    """The weighted target in the real model with `adds[layer]` (T, d) added to mlp_out."""
    grabbed: dict[str, Tensor] = {}
    handle = _lm_head(model).register_forward_pre_hook(
        lambda _m, args: grabbed.__setitem__("x", args[0].detach()))
    fns = {f"mlp_out.{layer}": (lambda x, _c, a=a: x + a.to(x.dtype)[None]) for layer, a in adds.items()}
    try:
        with torch.no_grad(), patch(model, fns):
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return _weighted(targets, grabbed["x"])


def _fit(pred: list[float], meas: list[float]) -> dict[str, float | None]:
    from scipy.stats import spearmanr

    p, m = np.asarray(pred), np.asarray(meas)
    if len(p) < 3 or np.ptp(p) == 0:
        return {"spearman": None, "slope": None}
    rho = spearmanr(p, m).statistic
    slope = float(np.polyfit(p, m, 1)[0])
    return {"spearman": None if math.isnan(rho) else float(rho), "slope": slope}


@torch.no_grad()
def verify_graph(model: nn.Module, ids: Tensor, transcoders: Mapping[int, Any], graph: Graph,
                 pruned: Pruned, targets: list[Target], *, top: int = 10,
                 steer: float = 2.0) -> dict[str, Any]:
    """Predicted vs measured effects of the top features, and the pruned graph's share."""
    arch = describe(model)
    state = record_clean(model, arch, ids)
    feats = active_features(transcoders, state)
    errors = error_nodes(transcoders, feats, state)
    nf = graph.layout.n_features
    f = graph.features

    def replacement(edit=None) -> float:
        return _weighted(targets, run_frozen(model, arch, state, replacement_mlp(
            transcoders, errors, edit)).final)

    writes = Writes(transcoders)
    T, d, dtype = state.embed.shape[1], state.embed.shape[2], state.embed.dtype

    def decoded(mask: Tensor, scale: float) -> dict[int, Tensor]:
        """out layer -> (T, d): scale * act * decoder rows of the graph's features in mask."""
        return decoded_by_layer(writes, f.subset(mask), scale * f.act[mask].double(), T, d, dtype)

    clean_rep, clean_real = replacement(), _real_target(model, ids, targets, {})
    kept = pruned.node_mask[:nf].nonzero()[:, 0]
    order = torch.argsort(pruned.influence[:nf], descending=True)[:top]  # kept ones first
    rows = []
    for node in order.tolist():
        layer, pos, index, act = int(f.layer[node]), int(f.pos[node]), int(f.index[node]), float(f.act[node])
        for kind, factor in (("ablate", 0.0), ("steer", steer)):
            def edit(lay, acts, layer=layer, pos=pos, index=index, factor=factor, act=act):
                if lay == layer:
                    acts = acts.clone()
                    acts[pos, index] = factor * act
                return acts
            one = torch.zeros(nf, dtype=torch.bool)
            one[node] = True
            delta = (factor - 1.0) * act
            rows.append({"node": graph.node_label(node), "intervention": kind,
                         "predicted": predicted_effect(graph, node, delta),
                         "replacement": replacement(edit) - clean_rep,
                         "real": _real_target(model, ids, targets, decoded(one, factor - 1.0)) - clean_real})

    # The pruned graph's share: its features only, against none (all the graph's features and
    # every other active feature are zeroed in "none"; the graph's are kept in "pruned").
    keep_mask = {layer: torch.zeros(state.embed.shape[1], transcoders[layer].W_dec.shape[0],
                                    dtype=torch.bool) for layer in transcoders}
    for node in kept.tolist():
        keep_mask[int(f.layer[node])][int(f.pos[node]), int(f.index[node])] = True
    only_kept = replacement(lambda lay, acts: acts * keep_mask[lay].to(acts.dtype))
    none_rep = replacement(lambda lay, acts: torch.zeros_like(acts))
    removal_all = decoded_by_layer(writes, feats, -feats.act.double(), T, d, dtype)
    in_graph = torch.zeros(len(feats), dtype=torch.bool)
    key = {(int(a), int(b), int(c)) for a, b, c in zip(f.layer[kept], f.pos[kept], f.index[kept], strict=True)}
    for k, (a, b, c) in enumerate(zip(feats.layer.tolist(), feats.pos.tolist(), feats.index.tolist(), strict=True)):
        in_graph[k] = (a, b, c) in key
    rest = feats.subset(~in_graph)
    removal_rest = decoded_by_layer(writes, rest, -rest.act.double(), T, d, dtype)
    none_real = _real_target(model, ids, targets, removal_all)
    kept_real = _real_target(model, ids, targets, removal_rest)

    def share(kept_value: float, none: float, clean: float) -> float | None:
        return None if clean == none else (kept_value - none) / (clean - none)

    pred = [r["predicted"] for r in rows]
    return {"top": len(order), "steer": steer, "checks": rows,
            "replacement_fit": _fit(pred, [r["replacement"] for r in rows]),
            "real_fit": _fit(pred, [r["real"] for r in rows]),
            "target_clean": {"replacement": clean_rep, "real": clean_real},
            "pruned_share": {"replacement": share(only_kept, none_rep, clean_rep),
                             "real": share(kept_real, none_real, clean_real)},
            "pruned_features": int(len(kept))}

