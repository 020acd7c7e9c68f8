"""The graph JSON that circuit-tracer writes and Neuronpedia's graph viewer reads (schema version 1).

    doc = neuronpedia_json(graph, pruned, slug="rivers", scan="smollm2-135m-instruct")

``metadata``, ``qParams``, ``nodes``, ``links``; node ids and fields spelled as
circuit-tracer's `create_graph_files` spells them:

| node | node_id | feature | layer | jsNodeId |
|---|---|---|---|---|
| feature | ``{layer}_{index}_{pos}`` | Cantor pair of (layer, index) | ``"{layer}"`` | ``{layer}_{index}-0`` |
| error | ``0_{layer}_{pos}`` | -1 | ``"{layer}"`` | ``{layer}_{pos}-0`` |
| token | ``E_{token id}_{pos}`` | pos | ``"E"`` | ``E_{token id}-{pos}`` |
| target | ``{n_layers+1}_{vocab idx}_{pos}`` | vocab idx | ``"{n_layers+1}"`` | ``L_{vocab idx}-{pos}`` |

circuit-tracer's error ids can equal a layer-0 feature's (``0_2_5`` is feature 2 of layer
0 at position 5 and the error node of layer 2 there); in a graph where that happens the
error nodes take the id Neuronpedia's own converter gives them, ``{layer}_error_mlp_{pos}``
(``metadata.info.error_node_ids`` says which), so every link names one node.

``influence`` is the node's cumulative influence rank (the viewer prunes by it),
``activation`` a feature's activation. Only nodes joined by a kept link are
written, besides every token and target.
"""

from __future__ import annotations

from typing import Any

import torch

from saelab.graphs.influence import Pruned
from saelab.graphs.record import Graph

SCHEMA_VERSION = 1


def cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node(node_id: str, feature: int, layer: str, pos: int, kind: str, js: str, **extra: Any) -> dict:
    base = {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": pos,
            "feature_type": kind, "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
            "reverse_ctx_idx": 0, "jsNodeId": js, "clerp": "", "influence": None,
            "activation": None}
    base.update(extra)
    return base


def node_dicts(graph: Graph, pruned: Pruned) -> dict[int, dict]:
    """node index -> circuit-tracer node, for every node the pruning kept."""
    lay, T, L = graph.layout, graph.n_pos, graph.n_layers
    f = graph.features
    out: dict[int, dict] = {}
    kept = pruned.node_mask.nonzero()[:, 0].tolist()
    feature_ids = {f"{int(f.layer[n])}_{int(f.index[n])}_{int(f.pos[n])}"
                   for n in kept if n < lay.n_features}
    errors = [divmod(n - lay.n_features, T) for n in kept
              if lay.n_features <= n < lay.n_features + lay.n_errors]
    neuronpedia_errors = any(f"0_{layer}_{pos}" in feature_ids for layer, pos in errors)
    for node in kept:
        infl = float(pruned.cumulative[node])
        if node < lay.n_features:
            layer, index, pos = int(f.layer[node]), int(f.index[node]), int(f.pos[node])
            out[node] = _node(f"{layer}_{index}_{pos}", cantor(layer, index), str(layer), pos,
                              "cross layer transcoder", f"{layer}_{index}-0", influence=infl,
                              activation=float(f.act[node]))
            continue
        k = node - lay.n_features
        if k < lay.n_errors:
            layer, pos = divmod(k, T)
            node_id = f"{layer}_error_mlp_{pos}" if neuronpedia_errors else f"0_{layer}_{pos}"
            out[node] = _node(node_id, -1, str(layer), pos, "mlp reconstruction error",
                              f"{layer}_{pos}-0", influence=infl)
            continue
        k -= lay.n_errors
        if k < lay.n_tokens:
            tok = graph.tokens[k]
            out[node] = _node(f"E_{tok}_{k}", k, "E", k, "embedding", f"E_{tok}-{k}", influence=infl)
            continue
        k -= lay.n_tokens
        t = graph.targets[k]
        layer = str(L + 1)
        out[node] = _node(f"{layer}_{t['vocab_idx']}_{t['pos']}", t["vocab_idx"], layer, t["pos"],
                          "logit", f"L_{t['vocab_idx']}-{t['pos']}", token_prob=t["weight"],
                          is_target_logit=k == 0,
                          clerp=(f'Metric {t["label"]}' if t.get("kind") == "metric"
                                 else f'Output "{t["label"]}" (p={t["weight"]:.3f})'))
    return out


def neuronpedia_json(graph: Graph, pruned: Pruned, *, slug: str, scan: str,
                     node_threshold: float = 0.8, edge_threshold: float = 0.98,
                     transcoder_list: list[str] | None = None) -> dict[str, Any]:
    """The pruned graph as a schema-version-1 document."""
    nodes = node_dicts(graph, pruned)
    rows = graph.layout.row_nodes()
    dst, src = pruned.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[dst, src].tolist()
    links = []
    for d, s, w in zip(rows[dst].tolist(), src.tolist(), weights, strict=True):
        if d in nodes and s in nodes:
            links.append({"source": nodes[s]["node_id"], "target": nodes[d]["node_id"], "weight": w})
    joined = {x for link in links for x in (link["source"], link["target"])}
    neuronpedia_errors = any("_error_mlp_" in n["node_id"] for n in nodes.values())
    used = [n for n in nodes.values()
            if n["node_id"] in joined or n["feature_type"] in ("embedding", "logit")]
    settings = graph.settings
    return {
        "metadata": {
            "slug": slug, "scan": scan, "transcoder_list": transcoder_list or [],
            "prompt_tokens": graph.token_texts, "prompt": graph.prompt,
            "node_threshold": node_threshold, "schema_version": SCHEMA_VERSION,
            "info": {"generator": {"name": "saelab", "url": "saelab graph"},
                     "error_node_ids": ("neuronpedia {layer}_error_mlp_{pos}" if neuronpedia_errors
                                        else "circuit-tracer 0_{layer}_{pos}")},
            "generation_settings": {"max_n_logits": settings.get("max_logits"),
                                    "desired_logit_prob": settings.get("desired_prob"),
                                    "max_feature_nodes": settings.get("max_features")},
            "pruning_settings": {"node_threshold": node_threshold, "edge_threshold": edge_threshold},
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                    "sg_pos": ""},
        "nodes": used,
        "links": links,
    }


def edges_kept(pruned: Pruned) -> int:
    return int(torch.count_nonzero(pruned.edge_mask))
