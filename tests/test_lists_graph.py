"""`saelab study lists --graph`: graph-chosen against attribution-chosen transcoder features,
on a tiny chat-templated model with a random transcoder set, and the transcoder ablation itself."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from test_lists_data import char_chat
from test_study_lists import no_stage, tiny_config
from tiny_lm import tiny_lm
from typer.testing import CliRunner

from saelab.graphs.record import Graph
from saelab.interventions.edits import SteerEdit
from saelab.interventions.generate import generate
from saelab.interventions.transcoder_edits import TranscoderEdit, edit_transcoders
from saelab.models.hooks import capture
from saelab.sae.testing import random_transcoder
from saelab.sae.transcoder import save_transcoders
from saelab.studies import lists as L
from saelab.studies import lists_graph as G
from saelab.studies.lists_data import StudyInputError, distinct_items
from saelab.studies.records import RecordLog


def tiny_chat_lm():
    """The list study's tiny chat model with room for a whole chat prompt and list (a graph
    refuses a prompt past the context)."""
    lm = tiny_lm("llama", seed=3, max_position_embeddings=512)
    return dataclasses.replace(lm, tokenizer=char_chat())


def random_set(n_layers: int = 3, d: int = 32, seed: int = 0) -> dict:
    return {layer: random_transcoder("topk", d_in=d, d_sae=48, k=4, skip=True, layer=layer,
                                     seed=seed + layer) for layer in range(n_layers)}


def graph_cfg(folder, **kw) -> G.GraphStudyConfig:
    return G.GraphStudyConfig(str(folder), **{"examples": 3, "max_features": 40, **kw})


def small_config(**kw):
    return tiny_config(sites=("resid_post.0",), dashboard_tokens=0, both_metrics=False, ablate=3, **kw)


@pytest.fixture(scope="module")
def graph_run(tmp_path_factory):
    torch.manual_seed(0)
    lm = tiny_chat_lm()
    root = tmp_path_factory.mktemp("lists_graph")
    tc = save_transcoders(random_set(), root / "tc")
    out = root / "run"
    return lm, out, tc, L.run_lists(small_config(), out, no_stage, lm=lm, graph=graph_cfg(tc))


def test_the_graph_stage_runs_end_to_end(graph_run):
    lm, out, tc, results = graph_run
    g = results["graph"]
    choices = RecordLog(out / "graphs" / "choices.jsonl", key="index").values()
    assert len(choices) == g["n_examples"] == 3
    log = RecordLog(out / "graphs" / "ablation.jsonl", key=("condition", "index"))
    assert len(log) == 4 * len(choices)
    for c in choices:
        folder = out / c["folder"]
        assert (folder / "neuronpedia.json").is_file() and (folder / "record.json").is_file()
        # the graph's target is the study's metric (logit(end) - logit("\n") at the last item)
        assert c["graph_target"] == pytest.approx(c["metric"], abs=1e-4)
        assert json.loads((folder / "record.json").read_text())["targets"][0]["label"].startswith("logit_diff:")
        for arm in G.ARMS:
            assert 1 <= len(c[arm]) <= 3
            assert all(p["pos"] >= 1 for p in c[arm])
        keys = {arm: {(p["layer"], p["pos"], p["feature"]) for p in c[arm]} for arm in G.ARMS}
        assert not keys["random"] & (keys["graph"] | keys["attribution"])
        assert c["overlap"] == len(keys["graph"] & keys["attribution"])
        # the attribution arm is the largest positive act x grad, in order
        values = [p["attribution"] for p in c["attribution"]]
        assert values == sorted(values, reverse=True) and min(values) > 0
        # every ablated regeneration carries the set it zeroed
        for arm in G.ARMS:
            assert log.get((arm, c["index"]))["pairs"] == c[arm]
    # the zeroing reaches the regenerations (same seed and prefix as the control); on this
    # random model a change at the last position rarely flips a sampled token, one earlier does
    assert any(log.get((arm, c["index"]))["new_tokens"] != log.get(("control", c["index"]))["new_tokens"]
               for c in choices for arm in G.ARMS)
    run = json.loads((out / "run.json").read_text())
    assert run["graph"]["examples"] == 3 and "graphs" in run["seconds"]
    html = (out / "report.html").read_text()
    assert "Graph-chosen vs attribution-chosen features" in html
    assert "graph-chosen features change list length" in html


def test_the_graph_set_is_the_pruned_graphs_most_influential(graph_run):
    _, out, _, _ = graph_run
    for c in RecordLog(out / "graphs" / "choices.jsonl", key="index").values():
        graph = Graph.load(out / c["folder"])
        pruned = graph.prune(0.8, 0.98)
        want = G.graph_top(graph, pruned, 3, skip_first=1)
        assert [{k: p[k] for k in want[0]} for p in c["graph"]] == want
        infl = [p["influence"] for p in want]
        inside = [p for p in want if p["in_pruned"]]
        assert want[:len(inside)] == inside  # pruned-graph nodes first, then by influence
        assert infl[:len(inside)] == sorted(infl[:len(inside)], reverse=True)


def test_stats_have_the_right_shape_and_values(graph_run):
    _, out, _, results = graph_run
    g = results["graph"]
    log = RecordLog(out / "graphs" / "ablation.jsonl", key=("condition", "index"))
    idx = [e["index"] for e in g["lists"]]
    for arm in G.ARMS:
        for measure in ("distinct_items", "n_items"):
            assert set(g["arms"][arm][measure]) == {"mean", "var", "ci95", "n"}
            assert g["arms"][arm][measure]["n"] == 3
        deltas = [distinct_items(log.get((arm, i))["items"]) - distinct_items(log.get(("control", i))["items"])
                  for i in idx]
        assert g["arms"][arm]["distinct_items"]["mean"] == pytest.approx(np.mean(deltas))
    paired = [distinct_items(log.get(("graph", i))["items"]) - distinct_items(log.get(("attribution", i))["items"])
              for i in idx]
    diff = g["difference"]["distinct_items"]
    assert diff["mean"] == pytest.approx(np.mean(paired))
    lo, hi = diff["ci95"]
    assert lo <= diff["mean"] <= hi
    v = g["verdict"]
    assert v["more"] == (lo > 0)
    assert v["text"].startswith("graph-chosen features change list length " + ("more" if lo > 0 else "not more"))
    assert f"{diff['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]" in v["text"]
    assert set(g["cap_hits"]) == {"control", *G.ARMS}


def test_resume_skips_the_finished_graph_stage(graph_run, tmp_path, monkeypatch):
    import shutil

    lm, out, tc, results = graph_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    stamps = {p: p.stat().st_mtime_ns for p in (copy / "graphs").rglob("*") if p.is_file()}

    def boom(*args, **kwargs):
        raise AssertionError("a finished graph stage was computed again")

    monkeypatch.setattr(G, "choose_features", boom)
    monkeypatch.setattr(G, "_regenerate", boom)
    again = L.run_lists(small_config(), copy, no_stage, lm=lm, graph=graph_cfg(tc))
    assert again["graph"]["difference"] == results["graph"]["difference"]
    assert {p: p.stat().st_mtime_ns for p in (copy / "graphs").rglob("*") if p.is_file()} == stamps
    with pytest.raises(StudyInputError, match="graph stage with other settings"):
        L.run_lists(small_config(), copy, no_stage, lm=lm, graph=graph_cfg(tc, examples=2))
    # --graph off leaves the study as it was: no graph section
    plain = L.run_lists(small_config(), copy, no_stage, lm=lm)
    assert "graph" not in plain and "graph" not in json.loads((copy / "run.json").read_text())


# ---------------------------------------------------------------- the ablation itself


def _clean_and_edited(lm, tcs, ids, edits):
    sites = [f"mlp_in.{layer}" for layer in tcs] + [f"mlp_out.{layer}" for layer in tcs]
    with torch.no_grad(), capture(lm.model, ",".join(sites)) as clean:
        clean.run(input_ids=ids)
        clean = {k: clean[k].clone() for k in sites}
    with torch.no_grad(), edit_transcoders(lm, tcs, edits), capture(lm.model, ",".join(sites)) as new:
        new.run(input_ids=ids)
        new = {k: new[k].clone() for k in sites}
    return clean, new


def test_zeroing_transcoder_features_removes_exactly_their_contributions():
    lm = tiny_lm("llama", seed=1)
    lm.model.double()
    tcs = {layer: tc.double() for layer, tc in random_set().items()}
    ids = torch.randint(4, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture(lm.model, "mlp_in.1") as acts:
        acts.run(input_ids=ids)
        x = acts["mlp_in.1"][0].clone()
    f = tcs[1].encode(x)  # (T, F)
    feats = f[5].nonzero()[:, 0][:2].tolist()
    assert len(feats) == 2
    edits = [TranscoderEdit(1, feats, "zero", positions=[5]), TranscoderEdit(1, [feats[0]], positions=[7])]
    clean, new = _clean_and_edited(lm, tcs, ids, edits)
    torch.testing.assert_close(new["mlp_out.0"], clean["mlp_out.0"], rtol=0, atol=0)
    # layer 1's input is unchanged, so the features removed are exactly the clean ones
    torch.testing.assert_close(new["mlp_in.1"], clean["mlp_in.1"], rtol=0, atol=0)
    W = tcs[1].W_dec.detach()
    want = clean["mlp_out.1"].clone()
    want[0, 5] -= f[5, feats[0]] * W[feats[0]] + f[5, feats[1]] * W[feats[1]]
    want[0, 7] -= f[7, feats[0]] * W[feats[0]]
    torch.testing.assert_close(new["mlp_out.1"], want, rtol=0, atol=1e-12)
    untouched = [p for p in range(9) if p not in (5, 7)]
    assert torch.equal(new["mlp_out.1"][0, untouched], clean["mlp_out.1"][0, untouched])
    assert not torch.allclose(new["mlp_out.2"][0, 5:], clean["mlp_out.2"][0, 5:])  # downstream moved


def test_generate_with_transcoder_edits_equals_the_same_change_steered():
    """In a left-padded batch, a TranscoderEdit of row 1 at its absolute position p equals
    steering that row's mlp_out by -act x decoder row there: the frame is respected (layer 0,
    so later positions see the change through attention)."""
    lm = tiny_lm("llama", seed=2)
    tcs = random_set()
    long_prompt = torch.randint(4, 100, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    short = long_prompt[:7]
    with torch.no_grad(), capture(lm.model, "mlp_in.0") as acts:
        acts.run(input_ids=torch.tensor([short]))
        f = tcs[0].encode(acts["mlp_in.0"][0])
    p = 4
    feats = f[p].nonzero()[:, 0][:2].tolist()
    delta = -(f[p, feats][:, None] * tcs[0].W_dec.detach()[feats]).sum(0)
    kw = dict(max_new_tokens=6, temperature=0, seeds=[0, 1], eos_token_ids=[2], stop_at_eos=False)
    edited = generate(lm, [long_prompt, short], transcoders=tcs,
                      edits=[TranscoderEdit(0, feats, positions=[p], rows=[1])], **kw)
    steered = generate(lm, [long_prompt, short], edits=[SteerEdit("mlp_out.0", delta, [p], rows=[1])], **kw)
    plain = generate(lm, [long_prompt, short], **kw)
    assert edited.samples[0].tokens == plain.samples[0].tokens  # row 0 untouched
    assert edited.samples[0].logprobs == plain.samples[0].logprobs
    assert edited.samples[1].tokens == steered.samples[1].tokens
    np.testing.assert_allclose(edited.samples[1].logprobs, steered.samples[1].logprobs, atol=1e-5)
    assert not np.allclose(edited.samples[1].logprobs, plain.samples[1].logprobs, atol=1e-6)


def test_transcoder_attribution_is_act_times_gradient():
    """Each feature's attribution equals the metric's finite difference when its decoder
    contribution is scaled, in float64."""
    from saelab.attribution.metrics import LogitDiff

    lm = tiny_lm("llama", seed=4)
    lm.model.double()
    tcs = {layer: tc.double() for layer, tc in random_set(seed=5).items()}
    ids = torch.randint(4, 100, (1, 8), generator=torch.Generator().manual_seed(2))
    metric = LogitDiff([10], [11], -1)
    pool = G.transcoder_attribution(lm, tcs, ids, metric, skip_first=1)
    assert int(pool.pos.min()) >= 1 and pool.layer.numel() == 3 * 7 * 4  # topk: k per token

    def value(edits):
        with torch.no_grad(), edit_transcoders(lm, tcs, edits):
            logits = lm.model(input_ids=ids).logits
        return float(logits[0, -1, 10] - logits[0, -1, 11])

    base = value([])
    assert pool.metric == pytest.approx(base, abs=1e-6)  # LogitDiff reads the logits in float32
    for k in torch.argsort(pool.attribution.abs(), descending=True)[:3].tolist():
        layer, pos, i = int(pool.layer[k]), int(pool.pos[k]), int(pool.index[k])
        # scale the feature by (1 +- eps): the change is +-eps * act * grad. (HF's eager attention
        # takes its softmax in float32, so eps is not tiny.)
        eps = 1e-3
        up, down = (value([TranscoderEdit(layer, [i], "scale", 1 + s, positions=[pos])]) for s in (eps, -eps))
        assert (up - down) / (2 * eps) == pytest.approx(float(pool.attribution[k]), rel=1e-3)


# ---------------------------------------------------------------- bad input


def test_graph_without_transcoders_is_a_clear_error(tmp_path):
    from saelab.cli import app

    with pytest.raises(StudyInputError, match="saelab scope --kind transcoder"):
        G.GraphStudyConfig("")
    result = CliRunner().invoke(app, ["study", "lists", "--out", str(tmp_path / "x"), "--graph"])
    assert result.exit_code == 2, result.output
    assert "--transcoders" in result.output and "saelab train --kind transcoder" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(app, ["study", "lists", "--out", str(tmp_path / "x"),
                                      "--transcoders", str(tmp_path)])
    assert result.exit_code == 2 and "add --graph" in result.output
    assert not (tmp_path / "x").exists()


def test_transcoders_of_another_width_or_nowhere_are_refused_before_any_stage(tmp_path):
    from saelab.sae.transcoder import TranscoderSetError

    lm = tiny_chat_lm()
    other = save_transcoders(random_set(d=16), tmp_path / "tc16")
    with pytest.raises(TranscoderSetError, match="d_model 16 but the model's d_model is 32"):
        L.run_lists(small_config(), tmp_path / "a", no_stage, lm=lm, graph=graph_cfg(other))
    assert not (tmp_path / "a" / "dataset.jsonl").exists()
    short = save_transcoders(random_set(n_layers=2), tmp_path / "tc2")
    with pytest.raises(TranscoderSetError, match="no transcoder for layer"):
        L.run_lists(small_config(), tmp_path / "b", no_stage, lm=lm, graph=graph_cfg(short))
    with pytest.raises(StudyInputError, match="no such folder"):
        L.run_lists(small_config(), tmp_path / "c", no_stage, lm=lm,
                    graph=graph_cfg(tmp_path / "missing"))
    assert os.listdir(tmp_path / "c") == ["config.json"]


def test_the_terminal_summary_gives_the_verdict(graph_run):
    from saelab.studies.lists_commands import graph_lines

    _, _, _, results = graph_run
    lines = graph_lines(results["graph"])
    assert lines[-1] == results["graph"]["verdict"]["text"]
    assert lines[0].startswith("graphs (3 lists, top 3 transcoder features zeroed)")
    assert graph_lines(None) == []


def test_the_command_line_passes_the_graph_options(graph_run, tmp_path, monkeypatch):
    """`saelab study lists --graph ...` builds the GraphStudyConfig and prints the verdict."""
    from saelab.cli import app
    from saelab.studies import lists_commands

    _, out, tc, results = graph_run
    seen = {}

    def fake_run(cfg, folder, *, json=False, graph=None):
        seen.update(cfg=cfg, graph=graph)
        return results

    monkeypatch.setattr(lists_commands, "run_with_progress", fake_run)
    result = CliRunner().invoke(app, ["study", "lists", "--out", str(out), "--graph", "--transcoders",
                                      str(tc), "--graph-examples", "5", "--graph-features", "64",
                                      "--ablate", "3"])
    assert result.exit_code == 0, result.output
    assert seen["graph"] == G.GraphStudyConfig(str(tc), examples=5, max_features=64)
    assert seen["cfg"].ablate == 3
    assert results["graph"]["verdict"]["text"] in " ".join(result.output.split())
