"""The list study end to end: on a tiny chat-templated model in seconds, and on the embedded model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_lists_data import char_chat
from tiny_lm import tiny_lm
from typer.testing import CliRunner

from saelab.studies import lists as L
from saelab.studies import lists_ablation as A
from saelab.studies.lists_data import StudyInputError, metric_tokens
from saelab.studies.records import RecordLog

TOPICS = ("Fruits", "Colors", "Rivers")


def tiny_chat_lm():
    lm = tiny_lm("llama", seed=3)
    return dataclasses.replace(lm, tokenizer=char_chat())


def tiny_config(**overrides) -> L.ListsConfig:
    base = dict(topics=TOPICS, samples=2, max_new_tokens=24, regen_max_new_tokens=16, sae_tokens=2048,
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
