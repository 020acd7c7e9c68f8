"""`saelab eval --suite`: many SAEs, every metric with intervals, one page; bad input."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from tiny_lm import tiny_lm
from tiny_models import tiny_sae
from typer.testing import CliRunner

from saelab.data.corpus import Corpus, load_corpus
from saelab.errors import SaelabError
from saelab.evals import suite as suite_mod
from saelab.evals.suite import SuiteConfig, run_suite, suite_metrics
from saelab.report.suite import metric_names
from saelab.sae import save_sae


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


@pytest.fixture(scope="module")
def corpus():
    docs = load_corpus("builtin:stdlib")
    return Corpus.from_texts("head", [d for _, d in zip(range(40), docs)])


def small(corpus) -> SuiteConfig:
    return SuiteConfig(tokens=256, corpus=corpus, context=32, batch_size=4, bootstrap=100,
                       feature_tokens=1024, explain_features=8, negatives=10,
                       probing=dict(datasets=("spam_is", "click_bait"), n_texts=40, seeds=2,
                                    bootstrap=50, max_tokens=24),
                       absorption=dict(n_words=52, icl_examples=3, bootstrap=10))


def test_suite_end_to_end(lm, corpus, tmp_path):
    saes = {"topk": (tiny_sae(lm.model, "resid_post.1", "topk", d_sae=24), None),
            "batchtopk": (tiny_sae(lm.model, "resid_post.1", "batchtopk", d_sae=32, seed=1), None)}
    saes["batchtopk"][0].threshold.fill_(0.05)
    stages = []
    result = run_suite(lm, saes, tmp_path, small(corpus), on_stage=stages.append)
    assert stages[:2] == ["topk: reconstruction", "topk: interpretation"]
    assert [r["sae"] for r in result["saes"]] == ["topk", "batchtopk"]
    for r in result["saes"]:
        m = r["metrics"]
        assert {"l0", "fvu", "delta_ce", "loss_recovered", "embedding_auroc",
                "embedding_auroc_control"} <= set(m)
        lo, hi = m["fvu"]["ci95"]
        assert lo <= m["fvu"]["value"] <= hi
        assert 0 <= m["embedding_auroc"]["value"] <= 1
        assert 0 <= m["probing_k1"]["value"] <= 1 and 0 <= m["probing_all"]["value"] <= 1
        # a random tiny model does not know first letters: no number, and a note says why
        assert m["absorption_fraction"]["value"] is None
    assert any("absorption" in n for n in result["notes"])
    table = pq.read_table(tmp_path / "suite.parquet").to_pylist()
    assert {(t["sae"], t["metric"]) for t in table} >= {("topk", "l0"), ("batchtopk", "embedding_auroc")}
    assert json.loads((tmp_path / "suite.json").read_text())["schema"] == "saelab.suite/1"
    page = (tmp_path / "report.html").read_text()
    measured = [n for n in metric_names(result)
                if any(r["metrics"][n]["value"] is not None for r in result["saes"])]
    assert page.count("<img") == len(measured) - 1  # each measured metric against L0
    assert (tmp_path / "features" / "topk" / "explanations.parquet").is_file()
    assert (tmp_path / "topk" / "eval" / "eval.json").is_file()


def test_adding_a_metric_is_one_line(lm, corpus, tmp_path, monkeypatch):
    def planted(ctx, entry):
        ctx.cache["calls"] = ctx.cache.get("calls", 0) + 1
        return {"planted": {"value": entry.sae.cfg.d_sae / 100, "ci95": None}}

    monkeypatch.setitem(suite_mod.METRICS, "planted", planted)
    saes = {"a": (tiny_sae(lm.model, "resid_post.1", "topk", d_sae=24), None)}
    result = run_suite(lm, saes, tmp_path, small(corpus), suite="planted")
    assert result["suite"] == ["reconstruction", "planted"]  # L0 always comes along
    assert result["saes"][0]["metrics"]["planted"]["value"] == 0.24


def test_bad_input(lm, corpus, tmp_path):
    with pytest.raises(SaelabError, match="no SAE given"):
        run_suite(lm, {}, tmp_path, small(corpus))
    with pytest.raises(SaelabError, match="expected 'all'"):
        suite_metrics("probng")
    far = tiny_sae(lm.model, "resid_post.1", "topk", d_sae=24)
    far.cfg = far.cfg.with_metadata(site="resid_post.40")
    with pytest.raises(SaelabError, match="SAE far .*resid_post.40"):
        run_suite(lm, {"far": (far, None)}, tmp_path, small(corpus))
    assert not (tmp_path / "report.html").exists()  # refused before any work


def test_cli_refusals(lm, tmp_path):
    from saelab.cli import app

    for i in range(2):
        save_sae(tiny_sae(lm.model, "resid_post.1", "topk", d_sae=24), tmp_path / f"s{i}")
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(tmp_path / "s0"), str(tmp_path / "s1")])
    assert res.exit_code == 2 and "--suite all" in res.output
    res = runner.invoke(app, ["eval", "--suite", "all", str(tmp_path / "s0")])
    assert res.exit_code == 2 and "--out" in res.output
    res = runner.invoke(app, ["eval", "--suite", "al", str(tmp_path / "s0"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "expected 'all'" in res.output
    res = runner.invoke(app, ["eval", "--suite", "all", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_a_scope_folder_stands_for_every_sae_it_indexes(tmp_path):
    import shutil

    from tiny_scope import make_tiny_scope

    from saelab.evals.suite import sae_entries
    from saelab.scope import read_scope

    scope_dir = make_tiny_scope(tmp_path, features=False)
    scope = read_scope(scope_dir)
    entries = sae_entries([scope_dir])
    assert [e.path for e in entries] == [scope_dir / e.native for e in scope.entries]
    assert [e.sae.cfg.site for e in entries] == [e.site for e in scope.entries]
    shutil.rmtree(scope_dir / scope.entries[1].native)  # one SAE gone: named, not skipped
    with pytest.raises(SaelabError, match=f"{scope.entries[1].id} \\(missing\\)"):
        sae_entries([scope_dir])
