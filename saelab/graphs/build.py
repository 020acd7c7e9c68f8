"""Build an attribution graph: clean pass, nodes, rows chosen by influence, assembly.

    graph = build_graph(model, tokenizer, ids, transcoders)               # top next tokens
    graph = build_graph(..., metric=parse_metric('logit_diff:" ":"\\n"'))  # or a metric

Features are capped at `max_features`, chosen as circuit-tracer does: the
targets' rows first, then, repeatedly, the not yet visited features of largest
influence on the targets through the rows so far (`RowStore.feature_influence`),
`batch` at a time. The graph keeps the visited features' columns only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from saelab.attribution.metrics import Metric
from saelab.graphs.edges import PASS_BYTES, EdgeEngine
from saelab.graphs.features import ActiveFeatures, active_features, error_nodes
from saelab.graphs.frozen import CleanState, GraphError, record_clean
from saelab.graphs.record import Graph
from saelab.graphs.rows import ROW_BUDGET, RowStore
from saelab.graphs.targets import Target, logit_targets, metric_target, target_values
from saelab.models.sites import describe

UPDATE_EVERY = 4  # batches of rows between two re-rankings of the features by influence


def check_inputs(model: nn.Module, ids: Tensor, transcoders: Mapping[int, Any]) -> None:
    """Refuse (GraphError) an empty prompt, one past the context, or transcoders of another model."""
    arch = describe(model)
    T = ids.shape[1]
    if T < 2:
        raise GraphError("the prompt is empty (only BOS or nothing); give a prompt of at least "
                         "one token (--prompt TEXT).")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None)
    if limit is not None and T > limit:
        raise GraphError(f"the prompt is {T:,} tokens, past the model's context of {limit:,}; "
                         "shorten it.")
    check = getattr(transcoders, "check_model", None)
    if check is not None:
        check(n_layers=arch.n_layers, d_model=arch.d_model)
        return
    missing = sorted(set(range(arch.n_layers)) - set(transcoders))
    if missing:
        raise GraphError(f"no transcoder for layer(s) {missing}; the model has {arch.n_layers} "
                         "layers and the replacement model needs one transcoder per MLP.")
    for layer, tc in transcoders.items():
        if tc.W_enc.shape[0] != arch.d_model or tc.W_dec.shape[1] != arch.d_model:
            raise GraphError(f"the transcoder of layer {layer} maps {tc.W_enc.shape[0]} -> "
                             f"{tc.W_dec.shape[1]} but the model's d_model is {arch.d_model}; "
                             "it was trained on another model.")


def build_graph(model: nn.Module, tokenizer: Any, ids: Tensor, transcoders: Mapping[int, Any], *,
                metric: Metric | None = None, metric_spec: str = "", max_features: int = 7500,
                max_logits: int = 10, desired_prob: float = 0.95, batch: int = 256,
                row_budget: int = ROW_BUDGET, pass_bytes: int = PASS_BYTES,
                progress: Any = None) -> Graph:
    """The unpruned graph of `ids` (1, T) through `transcoders` (layer -> transcoder).

    metric: a target metric (default: the top next tokens up to `desired_prob`, at most
    `max_logits`). max_features: features with rows (chosen by influence). progress: an
    optional callable(done, total). Raises GraphError for bad input.
    """
    check_inputs(model, ids, transcoders)
    t0 = time.perf_counter()
    arch = describe(model)
    state = record_clean(model, arch, ids)
    feats = active_features(transcoders, state)
    errors = error_nodes(transcoders, feats, state)
    T = ids.shape[1]
    vocab = state.logits.shape[-1]
    if metric is None:
        targets = logit_targets(model, tokenizer, state.logits, T, max_logits=max_logits,
                                desired_prob=desired_prob)
    else:
        targets = [metric_target(model, tokenizer, ids, metric, metric_spec or repr(metric), vocab)]
    engine = EdgeEngine(model, arch, state, transcoders, feats, errors, max_batch=batch,
                        pass_bytes=pass_bytes)
    N, n_t = len(feats), len(targets)
    cap = min(max_features, N)
    store = RowStore(cap + n_t, N, engine.n_dense, row_budget, engine.row_dtype)
    store.add(*engine.target_rows(targets))
    row_feature = [-1] * n_t  # feature index of each stored row; -1 for targets
    visited = torch.zeros(N, dtype=torch.bool)
    weights = torch.tensor([t.weight for t in targets])
    while len(row_feature) - n_t < cap:
        if cap == N:
            pending = torch.arange(N)
        else:
            first = torch.zeros(store.n)
            first[:n_t] = weights
            infl = store.feature_influence(first, torch.tensor(row_feature))
            infl[visited] = -1.0
            room = min(UPDATE_EVERY * engine.batch, cap - (len(row_feature) - n_t))
            pending = torch.argsort(infl, descending=True)[:room]
        for start in range(0, len(pending), engine.batch):
            chunk = pending[start:start + engine.batch]
            store.add(*engine.feature_rows(chunk))
            row_feature += chunk.tolist()
            visited[chunk] = True
            if progress is not None:
                progress(len(row_feature) - n_t, cap)

    stats = {"active_features": N, "backward_passes": engine.passes, "rows_per_pass": engine.batch,
             "rows_exact": store.exact, "row_mass_dropped": store.dropped}
    del engine  # its tape (the frozen forward's autograd graph) is not needed any more
    graph = assemble(store, row_feature, visited, feats, targets, state, transcoders, tokenizer,
                     ids, arch.n_layers, is_metric=metric is not None)
    del store
    replacement, completeness = graph.scores()
    graph.stats = {**stats, "selected_features": len(graph.features), "targets": n_t,
                   "replacement_score": replacement, "completeness_score": completeness,
                   "seconds": time.perf_counter() - t0}
    graph.settings = {"max_features": max_features, "max_logits": max_logits,
                      "desired_prob": desired_prob, "metric": metric_spec or None,
                      "dtype": str(state.embed.dtype).removeprefix("torch.")}
    return graph


def assemble(store: RowStore, row_feature: list[int], visited: Tensor, feats: ActiveFeatures,
             targets: list[Target], state: CleanState, transcoders: Mapping[int, Any],
             tokenizer: Any, ids: Tensor, n_layers: int, *, is_metric: bool = False) -> Graph:
    """The unpruned graph from the stored rows (no stats, no scores yet).

    row_feature: the feature index of each stored row, -1 for the targets' rows (first);
    visited: (N,) bool, the features with rows. Nodes: the visited features in (layer, pos,
    index) order, then the targets. Peak memory: the adjacency (rows x (visited + L*T + T))
    and one copy of the store's dense part (`RowStore.feature_columns` works by row chunks).
    """
    n_t = len(targets)
    selected = visited.nonzero()[:, 0]
    row_of = {f: r for r, f in enumerate(row_feature)}
    order = torch.tensor([row_of[int(f)] for f in selected] + list(range(n_t)), dtype=torch.long)
    adjacency = torch.zeros(len(order), len(selected) + store.dense.shape[1], dtype=store.dense.dtype)
    store.feature_columns(order, selected, out=adjacency[:, :len(selected)])
    for a in range(0, len(order), 256):  # row chunks: no second copy of the dense part
        adjacency[a:a + 256, len(selected):] = store.dense[order[a:a + 256]]
    sel = feats.subset(selected)
    value = torch.empty(len(order), dtype=torch.float64)
    for r, f in enumerate(selected.tolist()):
        layer, pos, i = int(feats.layer[f]), int(feats.pos[f]), int(feats.index[f])
        tc = transcoders[layer]
        value[r] = float(state.mlp_in[layer][0, pos].double() @ tc.W_enc[:, i].detach().double()
                         + tc.b_enc[i].detach().double())
    tv = target_values(targets, state.final)
    value[len(selected):] = tv.double()
    texts = [tokenizer.decode([t]) if tokenizer is not None else str(t) for t in ids[0].tolist()]
    graph = Graph(prompt="", tokens=ids[0].tolist(), token_texts=texts, n_layers=n_layers,
                  features=sel,
                  targets=[{"label": t.label, "kind": "metric" if is_metric else "token",
                            "vocab_idx": t.vocab_idx, "weight": t.weight,
                            "pos": t.pos, "value": float(v)} for t, v in zip(targets, tv, strict=True)],
                  adjacency=adjacency, row_value=value, row_sum_all=store.sum[order].clone())
    graph.live["targets"] = targets
    return graph
