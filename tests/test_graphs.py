"""Attribution graphs on tiny random models of two families with random transcoders.

The frozen model is affine in its sources, so an edge is checked by removing its
source outright (a finite difference of size one) and measuring the target.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model

from saelab.graphs.build import build_graph
from saelab.graphs.features import active_features, error_nodes, graph_mlp, replacement_mlp
from saelab.graphs.frozen import GraphError, record_clean, run_frozen
from saelab.graphs.graph_json import cantor, neuronpedia_json
from saelab.graphs.influence import Layout, prune, scores
from saelab.graphs.record import Graph
from saelab.graphs.targets import logit_targets, target_values
from saelab.models.sites import describe
from saelab.sae.testing import random_transcoder

FAMILIES = ["llama", "gpt2", "gemma2"]


def _setup(family: str, arch: str = "relu", T: int = 6, seed: int = 0):
    model = tiny_model(family).double()
    n = describe(model).n_layers
    tcs = {layer: random_transcoder(arch, d_in=32, d_sae=40, skip=True, layer=layer,
                                    seed=seed + layer, dtype="float64") for layer in range(n)}
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 60, (1, T), generator=g)
    return model, tcs, ids


def _row_values(model, tcs, ids, graph, acts=None, error_scale=None, embed=None):
    """Every row's value (features' pre-activations, targets) in the frozen model."""
    arch = describe(model)
    state = record_clean(model, arch, ids)
    feats = active_features(tcs, state)
    errors = error_nodes(tcs, feats, state)
    targets = logit_targets(model, None, state.logits, ids.shape[1])
    with torch.no_grad():
        tape = run_frozen(model, arch, state, graph_mlp(tcs, feats, errors, acts, error_scale),
                          embed=embed)
    f = graph.features
    pre = [tape.reads[int(layer)][0, int(pos)] @ tcs[int(layer)].W_enc.detach()[:, int(i)]
           + tcs[int(layer)].b_enc.detach()[int(i)]
           for layer, pos, i in zip(f.layer, f.pos, f.index, strict=True)]
    return torch.cat([torch.stack(pre), target_values(targets, tape.final)]), state, feats


@pytest.mark.parametrize("family", FAMILIES)
def test_replacement_reproduces_logits(family):
    model, tcs, ids = _setup(family)
    arch = describe(model)
    state = record_clean(model, arch, ids)
    with torch.no_grad():
        real = model(input_ids=ids).logits
    feats = active_features(tcs, state)
    errors = error_nodes(tcs, feats, state)
    assert len(feats) > 20 and int(feats.pos.min()) == 1  # BOS position left out
    with torch.no_grad():
        held = run_frozen(model, arch, state, graph_mlp(tcs, feats, errors)).logits
        recomputed = run_frozen(model, arch, state, replacement_mlp(tcs, errors)).logits
    torch.testing.assert_close(held, real, rtol=0, atol=1e-10)
    torch.testing.assert_close(recomputed, real, rtol=0, atol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_edges_are_finite_differences_and_sum_to_preactivation(family):
    model, tcs, ids = _setup(family)
    graph = build_graph(model, None, ids, tcs, max_features=10_000, batch=7)
    lay = graph.layout
    assert graph.stats["selected_features"] == graph.stats["active_features"]  # no cap
    clean, state, feats = _row_values(model, tcs, ids, graph)
    torch.testing.assert_close(clean, graph.row_value, rtol=1e-9, atol=1e-9)
    T, d = ids.shape[1], state.embed.shape[-1]
    L = graph.n_layers
    g = torch.Generator().manual_seed(1)
    # Sources: some features, some error nodes, some tokens. Removing one is exact.
    sources = torch.randperm(lay.n_features, generator=g)[:6].tolist()
    sources += [lay.n_features + e for e in torch.randperm(lay.n_errors, generator=g)[:4].tolist()]
    sources += [lay.n_features + lay.n_errors + 2, lay.n_features + lay.n_errors + T - 1]
    for src in sources:
        acts, error_scale, embed = None, None, None
        if src < lay.n_features:
            acts = feats.act.clone()
            acts[src] = 0
        elif src < lay.n_features + lay.n_errors:
            layer, pos = divmod(src - lay.n_features, T)
            error_scale = {i: torch.ones(T, 1, dtype=torch.float64) for i in range(L)}
            error_scale[layer][pos] = 0
        else:
            pos = src - lay.n_features - lay.n_errors
            embed = state.embed.clone()
            embed[0, pos] = 0
        moved, _, _ = _row_values(model, tcs, ids, graph, acts, error_scale, embed)
        measured = clean - moved
        torch.testing.assert_close(graph.adjacency[:, src], measured, rtol=1e-4, atol=1e-4)
    # Incoming edges + bias = pre-activation; the bias is the value with every source removed.
    zero = {i: torch.zeros(T, 1, dtype=torch.float64) for i in range(L)}
    bias, _, _ = _row_values(model, tcs, ids, graph, torch.zeros_like(feats.act), zero,
                             torch.zeros(1, T, d, dtype=torch.float64))
    torch.testing.assert_close(graph.adjacency.sum(1) + bias, graph.row_value, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(graph.row_sum_all + bias, graph.row_value, rtol=1e-4, atol=1e-4)
    # Causality: no edge from a later position or from the same or a later layer.
    f = graph.features
    later = (f.pos[None, :] > f.pos[:, None]) | (f.layer[None, :] >= f.layer[:, None])
    assert torch.all(graph.adjacency[:lay.n_features, :lay.n_features][later] == 0)


def test_feature_cap_keeps_the_most_influential_and_truncated_rows_stay_close():
    model, tcs, ids = _setup("llama", T=8)
    full = build_graph(model, None, ids, tcs, max_features=10_000)
    capped = build_graph(model, None, ids, tcs, max_features=30, batch=8)
    assert capped.stats["selected_features"] == 30 < full.stats["active_features"]
    # The capped graph's edges among its features equal the full graph's.
    key = {(int(a), int(b), int(c)): n for n, (a, b, c) in
           enumerate(zip(full.features.layer, full.features.pos, full.features.index, strict=True))}

    def in_full(g):
        cols = torch.tensor([key[(int(a), int(b), int(c))] for a, b, c in zip(
            g.features.layer, g.features.pos, g.features.index, strict=True)])
        return cols, torch.cat([cols, torch.arange(full.layout.n_features, full.adjacency.shape[0])])

    cols, rows = in_full(capped)
    torch.testing.assert_close(capped.adjacency[:, :30], full.adjacency[rows][:, cols])
    # The capped features are the most influential ones by the full graph's rows, mostly.
    infl = full.prune(0.8, 0.98).influence[:full.layout.n_features]
    top = set(torch.argsort(infl, descending=True)[:30].tolist())
    assert len(top & set(cols.tolist())) >= 20
    # A tiny row budget truncates the rows as they come; the row sums stay exact.
    tiny = build_graph(model, None, ids, tcs, max_features=30, batch=8, row_budget=40 * 16 * 8)
    assert not tiny.stats["rows_exact"] and tiny.stats["row_mass_dropped"] > 0
    cols, rows = in_full(tiny)
    torch.testing.assert_close(tiny.row_sum_all, full.row_sum_all[rows])
    kept = tiny.adjacency[:, :30] != 0
    torch.testing.assert_close(tiny.adjacency[:, :30][kept], full.adjacency[rows][:, cols][kept])


def _hand_graph():
    # Nodes: f0, f1, e0, tok0, target. Rows: f0, f1, target. Columns: f0, f1, e0, tok0.
    R = torch.tensor([[0.0, 0.0, 1.0, 3.0],
                      [0.0, 0.0, 0.0, -1.0],
                      [3.0, 1.0, 0.0, 0.0]])
    return R, Layout(2, 1, 1, 1), torch.tensor([1.0])


def test_prune_hand_built_graph():
    R, lay, w = _hand_graph()
    # Influences: f0 .75, f1 .25, e0 .1875, tok .8125 (total 2; cumulative .41 .78 .91 1).
    p = prune(R, lay, w, node_threshold=0.8, edge_threshold=0.98)
    torch.testing.assert_close(p.influence, torch.tensor([0.75, 0.25, 0.1875, 0.8125, 0.0]))
    assert p.node_mask.tolist() == [True, True, False, True, True]
    assert p.edge_mask.tolist() == [[False, False, False, True], [False, False, False, True],
                                    [True, True, False, False]]
    p = prune(R, lay, w, node_threshold=0.8, edge_threshold=0.7)  # edge scores .75 .75 .25 .25
    assert p.node_mask.tolist() == [True, False, False, True, True]  # f1 lost its edges
    assert p.edge_mask.tolist() == [[False, False, False, True], [False] * 4,
                                    [True, False, False, False]]
    p = prune(R, lay, w, node_threshold=0.7, edge_threshold=0.98)
    assert p.node_mask.tolist() == [True, False, False, True, True]
    replacement, completeness = scores(R, lay, w)
    assert replacement == pytest.approx(0.8125)
    assert completeness == pytest.approx(2.8125 / 3)
    with pytest.raises(ValueError):
        prune(R, lay, w, node_threshold=1.5)


SCHEMA_REQUIRED = {
    "top": ["metadata", "qParams", "nodes", "links"],
    "metadata": ["slug", "scan", "prompt_tokens", "prompt"],
    "node": ["node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"],
    "link": ["source", "target", "weight"],
}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_json_schema_fields_links_and_record_roundtrip(family, tmp_path):
    model, tcs, ids = _setup(family, arch="topk", T=7)
    graph = build_graph(model, None, ids, tcs, max_features=60)
    pruned = graph.prune(0.8, 0.98)
    doc = json.loads(json.dumps(neuronpedia_json(graph, pruned, slug="t", scan="tiny")))
    for key in SCHEMA_REQUIRED["top"]:
        assert key in doc
    assert all(k in doc["metadata"] for k in SCHEMA_REQUIRED["metadata"])
    assert doc["metadata"]["schema_version"] == 1
    ids_ = [n["node_id"] for n in doc["nodes"]]
    assert len(ids_) == len(set(ids_))
    for node in doc["nodes"]:
        assert all(k in node for k in SCHEMA_REQUIRED["node"])
        assert isinstance(node["ctx_idx"], int) and isinstance(node["layer"], str)
        if node["feature_type"] == "cross layer transcoder":
            layer, index, pos = map(int, node["node_id"].split("_"))
            assert node["feature"] == cantor(layer, index) and node["ctx_idx"] == pos
    assert doc["links"] and all(k in link for link in doc["links"] for k in SCHEMA_REQUIRED["link"])
    assert {x for link in doc["links"] for x in (link["source"], link["target"])} <= set(ids_)
    kinds = {n["feature_type"] for n in doc["nodes"]}
    assert {"embedding", "logit", "cross layer transcoder"} <= kinds
    assert sum(n["is_target_logit"] for n in doc["nodes"]) == 1
    graph.save(tmp_path / "g")
    back = Graph.load(tmp_path / "g")
    torch.testing.assert_close(back.adjacency, graph.adjacency)
    assert back.targets == graph.targets and back.tokens == graph.tokens
    assert not list((tmp_path / "g").glob("*.pt")) and not list((tmp_path / "g").glob("*.pkl"))


def test_bad_input():
    model, tcs, ids = _setup("llama")
    with pytest.raises(GraphError, match="empty"):
        build_graph(model, None, ids[:, :1], tcs)
    with pytest.raises(GraphError, match="layer"):
        build_graph(model, None, ids, {0: tcs[0], 1: tcs[1]})
    other = {layer: random_transcoder("relu", d_in=24, d_sae=40, layer=layer, dtype="float64")
             for layer in range(3)}
    with pytest.raises(GraphError, match="d_model"):
        build_graph(model, None, ids, other)
    with pytest.raises(GraphError, match="context"):
        build_graph(model, None, torch.zeros(1, 200, dtype=torch.long), tcs)


def test_verify_on_tiny_model():
    from saelab.graphs.verify import verify_graph

    model, tcs, ids = _setup("llama", arch="topk", T=5)
    graph = build_graph(model, None, ids, tcs, max_features=10_000)
    pruned = graph.prune(0.8, 0.98)
    v = verify_graph(model, ids, tcs, graph, pruned, graph.live["targets"], top=10_000)
    assert v["top"] == graph.layout.n_features and len(v["checks"]) == 2 * v["top"]
    assert v["target_clean"]["replacement"] == pytest.approx(v["target_clean"]["real"], abs=1e-9)
    # A last-layer feature feeds no other feature: the replacement model moves exactly as
    # the graph predicts (random transcoders make earlier ones switch others on and off).
    last = [r for r in v["checks"] if r["node"].startswith(f"feature {graph.n_layers - 1}:")]
    assert last
    for r in last:
        assert r["replacement"] == pytest.approx(r["predicted"], rel=1e-6, abs=1e-9)
    assert v["replacement_fit"]["spearman"] is not None and v["real_fit"]["slope"] is not None
