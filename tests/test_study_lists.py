"""The list study end to end: on a tiny chat-templated model in seconds, and on the embedded model."""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_lists_data import char_chat
from tiny_lm import tiny_lm
from typer.testing import CliRunner

from saelab.studies import lists as L
from saelab.studies import lists_ablation as A
from saelab.studies.lists_data import StudyInputError, distinct_items, metric_tokens
from saelab.studies.lists_maps import feature_density
from saelab.studies.lists_results import verdict
from saelab.studies.records import RecordLog
from saelab.studies.stage_lines import line_stage
from saelab.studies.timings import StageClock

TOPICS = ("Fruits", "Colors", "Rivers")


def tiny_chat_lm():
    lm = tiny_lm("llama", seed=3)
    return dataclasses.replace(lm, tokenizer=char_chat())


def tiny_config(**overrides) -> L.ListsConfig:
    base = dict(topics=TOPICS, samples=2, max_new_tokens=24, long_max_new_tokens=32,
                regen_max_new_tokens=16, sae_tokens=2048,
                sae_width=64, sae_k=4, sites=("resid_post.0", "attn_z.1"), dashboard_tokens=512,
                batch_size=5, bootstrap=50, embed_diversity=False, metric="end_of_turn",
                only_ended=False)  # a random model rarely ends a list itself
    return L.ListsConfig(**{**base, **overrides})


def no_stage(name, total):
    return lambda done: None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.manual_seed(0)
    lm = tiny_chat_lm()
    out = tmp_path_factory.mktemp("lists")
    return lm, out, L.run_lists(tiny_config(), out, no_stage, lm=lm)


def test_every_stage_writes_its_files(tiny_run):
    lm, out, results = tiny_run
    for name in ("config.json", "dataset.jsonl", "ablation.jsonl", "results.json", "run.json", "report.html",
                 "attribution/end_of_turn.safetensors", "attribution/whitespace.safetensors"):
        assert (out / name).is_file(), name
    dataset = RecordLog(out / "dataset.jsonl", key="index").values()
    assert len(dataset) == len(TOPICS) * 3 * 2
    assert {r["template"] for r in dataset} == {"short", "long", "plain"}
    for r in dataset:
        assert r["n_items"] == len(r["items"])
        if r["last_position"] is not None:
            assert len(r["prompt_ids"]) - 1 <= r["last_position"] < len(r["prompt_ids"]) + len(r["generated"])
    assert set(results["saes"]) == {"resid_post.0", "attn_z.1"}
    for site, entry in results["saes"].items():
        assert (out / entry["maps"]["clustered"]).read_bytes()[:4] == b"\x89PNG"
        assert (out / "features" / site / "dashboard.html").is_file()
        assert entry["ablation"]["n_examples"] == sum(r["template"] == "short" and r["last_position"] is not None
                                                      for r in dataset)
        assert 0 <= entry["error_share"]["mean"] <= 1
    html = (out / "report.html").read_text()
    assert "resid_post.0" in html and "<script>" not in html.split("</style>")[-1].lower()
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["samples"] == 2 and set(run["seconds"]) >= {"dataset", "attribution", "ablation"}


def test_the_long_template_gets_its_own_token_limit(tiny_run):
    _, out, results = tiny_run
    dataset = RecordLog(out / "dataset.jsonl", key="index").values()
    for r in dataset:
        limit = 32 if r["template"] == "long" else 24
        assert len(r["generated"]) <= limit
        if r["ending"] == "length" or (r["last_position"] is None and len(r["generated"]) == limit):
            assert len(r["generated"]) == limit
    assert any(len(r["generated"]) == 32 for r in dataset if r["template"] == "long")
    caps = results["dataset"]["caps"]
    assert sum(c["cap_hits"] for c in caps.values()) > 0  # a random model rarely ends a list
    assert caps["long"]["token_limit"] == 32 and caps["short"]["token_limit"] == 24
    for t in ("short", "long", "plain"):
        rows = [r for r in dataset if r["template"] == t]
        assert caps[t] == {"lists": len(rows), "cap_hits": sum(r["ending"] == "length" for r in rows),
                           "token_limit": 32 if t == "long" else 24}
        want = np.mean([distinct_items(r["items"]) for r in rows])
        assert results["dataset"]["distinct"][t]["mean"] == pytest.approx(want)
    contrast = results["dataset"]["contrast"]
    by = {(r["template"], r["topic"], r["sample"]): r for r in dataset}
    pairs = [(by[("long", t, s)], by[("short", t, s)]) for t in TOPICS for s in range(2)]
    censored = sum("length" in (a["ending"], b["ending"]) for a, b in pairs)
    assert contrast["censored_pairs"] == censored
    assert contrast["uncensored"]["n"] == len(pairs) - censored


def test_distinct_items_and_cap_hits_beside_n_items(tiny_run):
    """Per SAE: Δdistinct and the cap hits of each condition, recomputed from ablation.jsonl."""
    _, out, results = tiny_run
    log = RecordLog(out / "ablation.jsonl", key=("sae", "condition", "index"))
    for site, entry in results["saes"].items():
        ab = entry["ablation"]
        controls = {r["index"]: r for r in log.values() if r["condition"] == "control"}
        tops = [r for r in log.values() if r["sae"] == site and r["condition"] == "top"]
        assert ab["cap_hits"] == {
            "control": sum(r["ending"] == "length" for r in controls.values()),
            "top": sum(r["ending"] == "length" for r in tops),
            "random": sum(r["ending"] == "length" for r in log.values()
                          if r["sae"] == site and r["condition"] == "random")}
        deltas = [distinct_items(r["items"]) - distinct_items(controls[r["index"]]["items"]) for r in tops]
        assert ab["top"]["distinct_items"]["mean"] == pytest.approx(np.mean(deltas))
        assert entry["verdict"]["mean_delta_distinct"] == pytest.approx(np.mean(deltas))
        assert ab["token_limit"] == 16


def test_the_verdict_counts_distinct_items():
    """The demo's "Andes" loop: +4.96 items but +0.5 distinct is not an effect."""
    stat = lambda mean, ci: {"mean": mean, "ci95": ci, "var": 1.0, "n": 25}  # noqa: E731
    ab = {"top": {"n_items": stat(4.96, [3.0, 7.0]), "distinct_items": stat(0.5, [-0.2, 1.3])},
          "random": {"n_items": stat(1.0, None), "distinct_items": stat(0.1, None)}}
    v = verdict(ab)
    assert v["effective"] is False and v["ci_excludes_zero"] is False and v["beats_random"] is True
    assert v["mean_delta_items"] == 4.96 and v["mean_delta_distinct"] == 0.5
    ab["top"]["distinct_items"] = stat(2.28, [1.1, 3.4])
    assert verdict(ab)["effective"] is True and verdict(ab)["ci_excludes_zero"] is True


def test_density_is_reported_beside_attribution(tiny_run):
    lm, out, results = tiny_run
    from saelab.attribution import Attribution

    attr = Attribution.load(out / "attribution" / "end_of_turn.safetensors")
    for site, entry in results["saes"].items():
        density = feature_density(attr, site, 1)
        assert entry["top_features"] and entry["density"]["max_density"] is None
        for f in entry["top_features"]:
            assert f["density"] == pytest.approx(density[f["feature"]])
            assert 0 < f["density"] <= 1
            assert f["corpus_density"] is not None and 0 <= f["corpus_density"] <= 1


def test_dashboards_are_built_on_the_study_lists_too(tiny_run):
    _, out, results = tiny_run
    meta = json.loads((out / "features_lists" / "run.json").read_text())
    assert meta["collection"]["corpus"] == "list study texts"
    assert json.loads((out / "features" / "run.json").read_text())["collection"]["corpus"] == "builtin"
    for site, entry in results["saes"].items():
        assert (out / "features_lists" / site / "dashboard.html").is_file()
        assert entry["lists_dashboard"] == f"features_lists/{site}/dashboard.html"
        f = entry["top_features"][0]
        assert f["lists_dashboard"] == f"features_lists/{site}/dashboard.html#f{f['feature']}"


def test_dense_features_are_left_out_of_the_top_pairs():
    from saelab.attribution.result import Attribution, SiteAttribution

    # feature 7 fires everywhere (4 of 4 positions >= 1) with the largest attributions
    index = torch.tensor([[0, 1, 7], [0, 1, 2], [0, 2, 7], [0, 2, 3], [0, 3, 7], [0, 4, 7]])
    value = torch.tensor([9.0, 1.0, 8.0, 2.0, 7.0, 6.0])
    sa = SiteAttribution("s", 8, index, torch.ones(6), value, torch.zeros(1, 5))
    attr = Attribution({"s": sa}, [[1, 2, 3, 4, 5]], torch.zeros(1), "grad")
    cfg = L.ListsConfig(max_density=0.5)
    dense = L.dense_features(cfg, attr, {"s": None})
    assert dense == {"s": {7}}  # density 1.0; f2 and f3 are at 0.25
    assert L.dense_features(L.ListsConfig(), attr, {"s": None}) == {"s": set()}
    assert A.top_pairs(attr, "s", 0, 2, 1) == A.Pairs((1, 2), (7, 7))
    assert A.top_pairs(attr, "s", 0, 2, 1, exclude={7}) == A.Pairs((2, 1), (3, 2))
    rand = A.random_pairs(attr, "s", 0, 5, 1, A.Pairs((), ()), seed=0, features={7})
    assert set(rand.features) == {2, 3}
    with pytest.raises(ValueError, match="max_density"):
        L.ListsConfig(max_density=0)


def test_rerunning_a_finished_run_keeps_its_times(tiny_run, tmp_path):
    """A rerun that only resumes keeps the stage times of the run that computed them."""
    import shutil

    lm, out, results = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    again = L.run_lists(tiny_config(), copy, no_stage, lm=lm)
    assert again["seconds"] == results["seconds"]
    run = json.loads((copy / "run.json").read_text())
    assert run["seconds"] == results["seconds"] and set(run["this_run_seconds"]) == set(results["seconds"])
    assert "<h2>Run</h2>" in (copy / "report.html").read_text()


def test_stage_clock_adds_only_the_work_of_a_rerun(tmp_path):
    ticks = iter([0.0, 10.0, 10.0, 13.0, 13.0, 20.0])
    out = tmp_path / "data.jsonl"
    clock = StageClock(tmp_path / "timings.json")
    import saelab.studies.timings as T

    real = T.time.perf_counter
    T.time.perf_counter = lambda: next(ticks)
    try:
        with clock.stage("load"):
            pass
        with clock.stage("data", out):
            out.write_text("half\n")  # an interrupted run wrote half
        assert clock.seconds == {"load": 10.0, "data": 3.0}
        again = StageClock(tmp_path / "timings.json")
        with again.stage("load"):
            pass  # 7 s of loading the model again: the recorded 10 s stay
        assert again.seconds == {"load": 10.0}
        ticks2 = iter([0.0, 4.0, 4.0, 6.0])
        T.time.perf_counter = lambda: next(ticks2)
        with again.stage("data", out):
            out.write_text("half\nrest\n")  # finishes the stage: 3 + 4 s
        with again.stage("results"):
            pass  # recomputed after new work: this run's 2 s
        assert again.seconds == {"load": 10.0, "data": 7.0, "results": 2.0}
    finally:
        T.time.perf_counter = real
    assert json.loads((tmp_path / "timings.json").read_text()) == {"load": 10.0, "data": 7.0, "results": 2.0}


def test_piped_progress_prints_a_line_per_stage():
    out = io.StringIO()
    now = iter([100.0, 142.0])
    stage = line_stage(out, clock=lambda: next(now), stamp=lambda: "01:02:03")
    update = stage("sample lists", 8)
    for done in range(1, 9):
        update(done)
    assert out.getvalue().splitlines() == [
        "[01:02:03] sample lists: 0/8", "[01:02:03] sample lists: 2/8", "[01:02:03] sample lists: 4/8",
        "[01:02:03] sample lists: 6/8", "[01:02:03] sample lists: 8/8 done in 42 s"]
    empty = io.StringIO()
    line_stage(empty, clock=lambda: 0.0, stamp=lambda: "t")("nothing to do", 0)
    assert empty.getvalue() == "[t] nothing to do: 0/0 done in 0 s\n"


def test_the_results_table_fits_80_columns():
    from rich.console import Console

    from saelab.studies.lists_commands import summary_table

    def stat(mean, ci=None):
        return {"mean": mean, "ci95": ci}

    entry = {"ablation": {"top": {"distinct_items": stat(-12.28, [-10.12, 13.4]), "n_items": stat(-14.96)},
                          "random": {"distinct_items": stat(-10.5, [-12.3, 13.8])},
                          "cap_hits": {"control": 150, "top": 120, "random": 114}},
             "verdict": {"effective": True}}
    results = {"config": {"ablate": 5}, "saes": {"resid_post.12": entry, "attn_z.16": entry}}
    console = Console(width=80, record=True)
    console.print(summary_table(results))
    lines = console.export_text().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    rows = [line for line in lines if line.startswith(("resid_post.12", "attn_z.16"))]
    assert len(rows) == 2 and all("-12.3 [-10.1, +13.4]" in r and "150/120/114" in r and r.endswith("yes")
                                  for r in rows)


def test_study_lists_help_says_the_default_preset_and_the_full_cost():
    from saelab.cli import app

    result = CliRunner().invoke(app, ["study", "lists", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;]*m", "", result.output))
    assert "[default: quick]" in text and "several hours on a CPU" in text
    bad = CliRunner().invoke(app, ["study", "lists", "--out", "x", "--max-density", "2"])
    assert bad.exit_code == 2 and "max_density" in bad.output


def test_the_list_modules_import_only_downwards():
    """lists_config and the stage modules never import the pipeline (lists.py) or the CLI."""
    folder = Path(L.__file__).parent
    order = ["lists_data", "lists_config", "lists_maps", "lists_ablation", "lists_results",
             "lists_report", "lists_graph", "lists_graph_results", "lists", "lists_commands"]
    for i, name in enumerate(order):
        tree = ast.parse((folder / f"{name}.py").read_text())
        imported = {node.module.rsplit(".", 1)[-1] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module
                    and node.module.startswith("saelab.studies.lists")}
        assert imported <= set(order[:i]), (name, imported - set(order[:i]))


def test_ablation_conditions_share_seeds_and_prefixes(tiny_run):
    _, out, _ = tiny_run
    log = RecordLog(out / "ablation.jsonl", key=("sae", "condition", "index"))
    by_index: dict[int, set[int]] = {}
    for r in log.values():
        by_index.setdefault(r["index"], set()).add(r["seed"])
        if r["condition"] == "top":
            assert len(r["pairs"]["features"]) <= 5 and min(r["pairs"]["positions"], default=1) >= 1
    assert by_index and all(len(seeds) == 1 for seeds in by_index.values())
    assert len({next(iter(s)) for s in by_index.values()}) == len(by_index)  # but differ between examples


def test_ablating_inactive_features_changes_nothing(tiny_run):
    """The same seed and prefix give the same tokens when the edit is a no-op: the controls
    differ from the ablation only by the ablation."""
    lm, out, _ = tiny_run
    cfg = tiny_config()
    dataset = RecordLog(out / "dataset.jsonl", key="index").values()
    examples = A.ablation_examples(cfg, dataset)[:3]
    sae = L.load_study_saes(lm, cfg, out, no_stage)["resid_post.0"][0]
    mt = metric_tokens(lm.tokenizer)
    sm = L.StudyModel(lm, mt.end_of_turn, mt)
    prefixes = [(r["prompt_ids"] + r["generated"])[:r["last_position"]] for r in examples]
    control = A._regenerate(sm, cfg, examples, prefixes, [], None, {}, "-", "control",
                            [A.Pairs((), ())] * len(examples))
    # zero a feature where it is not active: the SAE is spliced but its output is unchanged
    edits = [e for row in range(len(examples)) for e in A.pair_edits(A.Pairs((0,), (0,)), "resid_post.0", row, False)]
    same = A._regenerate(sm, cfg, examples, prefixes, edits, "resid_post.0", {"resid_post.0": (sae, None)},
                         "resid_post.0", "top", [A.Pairs((0,), (0,))] * len(examples))
    assert [r["new_tokens"] for r in same] == [r["new_tokens"] for r in control]


def test_top_and_random_pairs():
    from saelab.attribution.result import Attribution, SiteAttribution

    index = torch.tensor([[0, 0, 1], [0, 1, 2], [0, 1, 3], [0, 2, 4], [0, 3, 5], [1, 1, 7]])
    value = torch.tensor([9.0, 1.0, -2.0, 3.0, 0.5, 4.0])
    sa = SiteAttribution("s", 8, index, torch.ones(6), value, torch.zeros(2, 4))
    attr = Attribution({"s": sa}, [[1, 2, 3, 4], [1, 2]], torch.zeros(2), "grad")
    top = A.top_pairs(attr, "s", 0, 2, skip_first=1)
    assert top == A.Pairs((2, 1), (4, 2))  # position 0 left out, negatives never chosen
    rand = A.random_pairs(attr, "s", 0, 5, skip_first=1, exclude=top, seed=0)
    assert set(zip(rand.positions, rand.features, strict=True)) == {(1, 3), (3, 5)}
    assert A.random_pairs(attr, "s", 0, 1, 1, top, seed=4) == A.random_pairs(attr, "s", 0, 1, 1, top, seed=4)
    edits = A.pair_edits(A.Pairs((2, 1, 2), (4, 2, 6)), "s", 3, every_step=True)
    assert [(e.positions, list(e.features)) for e in edits] == [([1], [2]), ([2], [4, 6]), ("generated", [2, 4, 6])]
    assert all(e.rows == [3] and e.mode == "zero" for e in edits)


def test_resume_after_an_interruption_gives_the_same_results(tiny_run, tmp_path):
    lm, out, results = tiny_run
    # a copy of the finished run, with its last ablation records lost mid-write
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    lines = (copy / "ablation.jsonl").read_bytes().splitlines(keepends=True)
    (copy / "ablation.jsonl").write_bytes(b"".join(lines[:-3]) + lines[-3][:20])
    (copy / "results.json").unlink()
    again = L.run_lists(tiny_config(), copy, no_stage, lm=lm)
    assert again["saes"]["resid_post.0"]["ablation"] == results["saes"]["resid_post.0"]["ablation"]
    assert (copy / "ablation.jsonl").read_bytes() == (out / "ablation.jsonl").read_bytes()


def test_changed_settings_are_refused(tiny_run):
    lm, out, _ = tiny_run
    with pytest.raises(StudyInputError, match="samples: 2 -> 3"):
        L.run_lists(tiny_config(samples=3), out, no_stage, lm=lm)


def test_base_model_is_refused(tmp_path):
    lm = tiny_lm("llama")
    with pytest.raises(StudyInputError, match="no chat template"):
        L.run_lists(tiny_config(), tmp_path, no_stage, lm=lm)


def test_only_lists_the_model_ended_are_attributed():
    rows = [{"last_position": 5, "ending": e, "template": "short"} for e in ("end_of_turn", "length", "text")]
    rows.append({"last_position": None, "ending": "text", "template": "short"})
    assert [r["ending"] for r in L.attributed(L.ListsConfig(), rows)] == ["end_of_turn", "text"]
    assert len(L.attributed(L.ListsConfig(only_ended=False), rows)) == 3


def test_default_sites_keep_relative_depth():
    assert L.default_sites(26) == ("resid_post.0", "resid_post.5", "resid_post.10", "resid_post.15",
                                   "resid_post.20", "attn_z.2", "attn_z.7", "attn_z.14", "attn_z.18",
                                   "attn_z.22")
    assert L.default_sites(30)[:5] == ("resid_post.0", "resid_post.6", "resid_post.12", "resid_post.17",
                                       "resid_post.23")


@pytest.mark.slow
def test_embedded_model_quick_path(tmp_path):
    """A reduced quick preset on SmolLM2 through the command line (what `make demo` runs, smaller)."""
    from saelab.cli import app

    out = tmp_path / "lists"
    result = CliRunner().invoke(app, ["study", "lists", "--preset", "quick", "--out", str(out),
                                      "--samples", "1", "--sae-tokens", "8192", "--sites", "resid_post.12",
                                      "--topics", "Fruits,Colors,Countries,Rivers"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["metric"]["name"] in ("end_of_turn", "whitespace")
    assert results["dataset"]["n"] == 12
    assert "resid_post.12" in result.output and "report:" in result.output
    entry = results["saes"]["resid_post.12"]
    assert entry["ablation"]["top"]["n_items"]["n"] >= 1
    assert (out / "report.html").stat().st_size > 10_000


def test_the_closing_summary_prints_from_a_real_run(tiny_run, capsys):
    from saelab.studies.lists_commands import print_summary

    _, out, results = tiny_run
    print_summary(results, out)
    err = capsys.readouterr().err
    assert f"{results['dataset']['n']} lists; items per list: short" in err
    assert "distinct" in err and "capped" in err and "resid_post.0" in err and "report:" in err
