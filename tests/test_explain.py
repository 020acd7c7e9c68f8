"""Explanations without an API, the embedding scorer, and the LM explainer's plumbing."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny_lm import tiny_lm
from tiny_models import tiny_sae

from saelab.data.corpus import Corpus, load_corpus
from saelab.errors import SaelabError
from saelab.evals.autointerp import auroc, auroc_summary, embedding_aurocs, sentence_embedder
from saelab.features.build import IndexConfig, build_index
from saelab.features.collect import CollectConfig
from saelab.features.explain import ExplainConfig, explain_index, feature_records
from saelab.features.explainer_lm import LMExplainer, parse_explanation
from saelab.features.index import FeatureIndex

FRUIT = ["She peeled a ripe banana for breakfast.", "The apple orchard smelled sweet in autumn.",
         "He squeezed fresh oranges into a glass.", "Strawberries and cherries filled the bowl.",
         "A slice of juicy watermelon on a hot day.", "The grapes on the vine were purple."]
OTHER = ["The compiler reported a syntax error on line 12.", "Heavy rain is expected tomorrow.",
         "The striker scored in the final minute.", "Interest rates rose by a quarter point.",
         "The train to Berlin leaves at noon.", "She tuned the guitar before the concert.",
         "The database query timed out.", "Snow covered the mountain pass overnight.",
         "The senator gave a long speech.", "He replaced the bicycle's flat tyre."]


@pytest.fixture(scope="module")
def embedder():
    return sentence_embedder()


def test_auroc_counts_ties_half():
    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0]), np.array([2.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    assert auroc(np.array([2.0, 0.5]), np.array([1.0, 3.0])) == 0.25  # 1 pair of 4
    assert np.isnan(auroc(np.array([]), np.array([1.0])))
    s = auroc_summary(np.array([0.2, 0.9, np.nan, 0.7]), bootstrap=200)
    assert s["n"] == 3 and s["ci95"][0] <= s["mean"] <= s["ci95"][1] and sum(s["hist"]) == 3


def test_embedding_scorer_ranks_the_true_explanation_above_distractors(embedder):
    explanations = ["fruit", "computer programming", "weather", "sports", "money and finance"]
    scores = embedding_aurocs(embedder, explanations, [FRUIT] * 5, [OTHER] * 5)
    assert scores[0] > 0.9
    assert scores[0] > scores[1:].max()


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    lm = tiny_lm("llama")
    sae = tiny_sae(lm.model, "resid_post.1", "topk", d_sae=24)
    docs = load_corpus("builtin:stdlib")
    corpus = Corpus.from_texts("head", [d for _, d in zip(range(30), docs)])
    out = tmp_path_factory.mktemp("run")
    build_index(lm, {"tiny": (sae, None)}, out, IndexConfig(
        tokens=1500, corpus=corpus, context=24, batch_size=8, ablate=0, cards=5,
        collect=CollectConfig(top_k=6, n_bins=3, per_bin=3, left=4, right=2)))
    return lm, out / "tiny"


def test_explain_index_writes_labels_scores_and_a_control(index, embedder):
    _, folder = index
    summary = explain_index(folder, ExplainConfig(source="tokens+lens", negatives=20),
                            embedder=embedder)
    assert summary["features_scored"] > 0 and summary["source"] == "tokens+lens"
    assert 0 <= summary["auroc"]["mean"] <= 1 and summary["control_auroc"]["n"] > 0
    expl = pq.read_table(folder / "explanations.parquet").to_pylist()
    labels = FeatureIndex.open(folder).features["label"].to_pylist()
    for row in expl:
        assert labels[row["feature"]] == row["explanation"] and "; predicts " in row["explanation"]
        assert row["n_neg"] == 20 or row["n_pos"] < 2
    assert json.loads((folder / "explanations.json").read_text())["auroc"] == summary["auroc"]
    assert "; predicts " in (folder / "dashboard.html").read_text()  # the static page shows them
    # the explaining examples (top half) are never among the held-out positives
    for rec in feature_records(folder, ExplainConfig())[0]:
        shown = {left + tok + right for left, tok, right in rec.top}
        assert not shown & set(rec.held_out) and len(set(rec.held_out)) == len(rec.held_out)


def test_lm_explainer_plumbing(index, embedder, tmp_path):
    lm, folder = index
    explainer = LMExplainer(lm, max_new_tokens=8, name="tiny")
    rec = feature_records(folder, ExplainConfig())[0][0]
    prompt = explainer.prompt(rec)
    assert "<<" in prompt and rec.top[0][1] in prompt and prompt.endswith("Answer:")
    summary = explain_index(folder, ExplainConfig(features=3, negatives=10), explainer=explainer,
                            embedder=embedder)
    assert summary["source"] == "lm:tiny" and summary["features_explained"] == 3
    rows = pq.read_table(folder / "explanations.parquet").to_pylist()
    assert all(r["source"] == "lm:tiny" and r["explanation"] for r in rows)


def test_parse_explanation():
    assert parse_explanation('\n  "The feature detects: fruit names".\nmore') == "fruit names"
    assert parse_explanation("Answer: closing brackets") == "closing brackets"
    assert parse_explanation("   \n\n") == ""


def test_bad_inputs(tmp_path, index):
    with pytest.raises(SaelabError, match="not a feature index"):
        explain_index(tmp_path)
    with pytest.raises(ValueError, match="source"):
        ExplainConfig(source="gpt")


def test_explain_command_with_a_local_explainer_folder(index, tmp_path):
    from typer.testing import CliRunner

    from saelab.cli import app

    lm, folder = index
    model_dir = tmp_path / "explainer"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    res = CliRunner().invoke(app, ["explain", str(folder.parent), "--explainer", str(model_dir),
                                   "--features", "2", "--negatives", "8", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out[str(folder)]["source"] == f"lm:{model_dir}"
    assert out[str(folder)]["features_explained"] == 2
    res = CliRunner().invoke(app, ["explain", str(folder), "--scorer", "gpt4"])
    assert res.exit_code == 2 and "embedding" in res.output
    res = CliRunner().invoke(app, ["explain", str(tmp_path)])
    assert res.exit_code == 2 and "no feature index" in res.output
