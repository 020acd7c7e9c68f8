"""Sparse probing: planted features, the shared model pass, the data files, bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from tiny_lm import tiny_lm

from saelab.errors import BadValueError, SaelabError, SiteError
from saelab.evals import probe_data
from saelab.evals import probing as pr
from saelab.sae.testing import random_sae


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


def planted(n: int = 900, d: int = 40, flip: float = 0.1, seed: int = 0):
    """Labels y and features X where column 7 equals y with probability 1 - flip (the rest
    noise): the best achievable accuracy is 1 - flip."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)
    X = rng.normal(size=(n, d))
    X[:, 7] = np.where(rng.random(n) < flip, 1 - y, y) + 0.01 * rng.normal(size=n)
    return X, y


def test_a_one_feature_probe_finds_the_planted_feature_and_its_accuracy():
    X, y = planted()
    assert list(pr.top_k_mean_diff(X, y, 1)) == [7]
    split_list = pr.splits(y, 1 / 3, 5, 0)
    correct = pr.probe_correct(X, y, (1, 2, 5), split_list)
    assert correct["k1"].shape == (5, 300)
    assert correct["k1"].mean() == pytest.approx(0.9, abs=0.03)
    # more features add only noise: no better than the planted accuracy
    assert correct["all"].mean() <= 0.92
    # without the feature the probe is at chance
    Xn = np.delete(X, 7, axis=1)
    assert pr.probe_correct(Xn, y, (1,), split_list)["k1"].mean() == pytest.approx(0.5, abs=0.06)


def test_splits_are_stratified_disjoint_and_seeded():
    y = np.array([0] * 30 + [1] * 60)
    (tr, te), *_ = pr.splits(y, 1 / 3, 3, 0)
    assert set(tr).isdisjoint(te) and len(tr) + len(te) == 90
    assert (y[te] == 0).sum() == 10 and (y[te] == 1).sum() == 20
    again = pr.splits(y, 1 / 3, 3, 0)
    assert all((a[1] == b[1]).all() for a, b in zip(pr.splits(y, 1 / 3, 3, 0), again))
    assert not (pr.splits(y, 1 / 3, 2, 0)[1][1] == pr.splits(y, 1 / 3, 2, 0)[0][1]).all()


def test_pooling_means_each_texts_tokens():
    acts = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    ta = pr.TextActs("x", acts, torch.tensor([0, 2, 3, 6]), np.array([0, 1, 0]))
    assert pr.pool_model(ta) == pytest.approx(np.array([[1, 2], [4, 5], [8, 9]]))
    sae = random_sae("relu", d_in=2, d_sae=5, seed=3)
    pooled = pr.pool_sae(sae, ta)
    with torch.no_grad():
        expect = sae.encode(acts)[3:6].mean(0).numpy()
    assert pooled[2] == pytest.approx(expect, rel=1e-5)


def test_probe_data_reads_the_package_files():
    names = probe_data.available()
    assert len(names) > 100 and set(pr.DEFAULT_DATASETS) <= set(names)
    ds = probe_data.load_probe_dataset("glue_sst2", n=50, seed=1)
    assert len(ds.texts) == 50 and ds.labels.sum() == 25 and ds.chance == 0.5
    assert all(isinstance(t, str) and t for t in ds.texts)
    same = probe_data.load_probe_dataset("92_glue_sst2", n=50, seed=1)  # the file's own name
    assert same.texts == ds.texts


def test_bad_dataset_names_and_class_counts(monkeypatch):
    with pytest.raises(BadValueError, match="unknown probing dataset 'glue_sst3'.*glue_sst2") as err:
        probe_data.load_probe_dataset("glue_sst3")
    assert "available (" in str(err.value) and "spam_is" in str(err.value)
    with pytest.raises(BadValueError, match="5 classes.*nyc_borough_Manhattan"):
        probe_data.load_probe_dataset("nyc_borough")
    monkeypatch.setattr(probe_data, "read_rows", lambda name: [("a text", "yes")] * 10)
    with pytest.raises(BadValueError, match="single class"):
        probe_data.load_probe_dataset("spam_is")


def test_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sae_probes" else real(name, *a))
    probe_data._files.cache_clear()
    try:
        with pytest.raises(probe_data.ProbeDataMissingError, match="pip install --no-deps sae-probes"):
            probe_data.available()
    finally:
        monkeypatch.undo()
        probe_data._files.cache_clear()


def test_probe_saes_shares_one_model_pass_and_caches_it(lm, tmp_path, monkeypatch):
    meta = {"site": "resid_post.1"}
    saes = {"relu": random_sae("relu", d_in=32, d_sae=64, seed=1, metadata=meta),
            "topk": random_sae("topk", d_in=32, d_sae=64, seed=2, metadata=meta)}
    calls = []
    real = pr.model_activations
    monkeypatch.setattr(pr, "model_activations",
                        lambda *a, **k: calls.append(a[2].name) or real(*a, **k))
    settings = dict(n_texts=40, seeds=2, bootstrap=50, max_tokens=24)
    res = pr.probe_saes(lm, saes, ["spam_is", "click_bait"], cache_dir=tmp_path, **settings)
    assert calls == ["spam_is", "click_bait"]  # once per set, not once per SAE
    json.dumps(res)
    site = res["sites"]["resid_post.1"]
    assert site["activations_from_cache"] == []
    assert [s["label"] for s in res["saes"]] == ["relu", "topk"]
    for row in [*res["saes"], site["model"]]:
        assert set(row["mean"]) == {"k1", "k2", "k5", "all"}
        for m in [*row["mean"].values(), *row["datasets"]["spam_is"].values()]:
            lo, hi = m["ci95"]
            assert 0 <= lo <= m["value"] <= hi <= 1
    assert len(res["saes"][0]["datasets"]["spam_is"]["k1"]["per_seed"]) == 2
    assert res["datasets"]["spam_is"]["chance"] == 0.5
    again = pr.probe_saes(lm, saes["relu"], ["spam_is"], cache_dir=tmp_path, **settings)
    assert again["sites"]["resid_post.1"]["activations_from_cache"] == ["spam_is"]
    assert (again["sites"]["resid_post.1"]["model"]["datasets"]["spam_is"]
            == site["model"]["datasets"]["spam_is"])
    for f in tmp_path.glob("spam_is-*.safetensors"):  # a truncated cache file is recomputed
        f.write_bytes(f.read_bytes()[:100])
    third = pr.probe_saes(lm, saes["relu"], ["spam_is"], cache_dir=tmp_path, **settings)
    assert third["sites"]["resid_post.1"]["activations_from_cache"] == []
    assert third["saes"][0]["datasets"] == again["saes"][0]["datasets"]


def test_an_sae_at_a_site_the_model_lacks(lm):
    sae = random_sae("relu", d_in=32, d_sae=64, metadata={"site": "resid_post.40"})
    with pytest.raises(SiteError, match="resid_post.40"):
        pr.probe_saes(lm, sae, ["spam_is"], n_texts=20)


def test_probe_config_validates():
    with pytest.raises(SaelabError, match="n_texts"):
        pr.ProbeConfig(n_texts=2)
    with pytest.raises(SaelabError, match="at least one dataset"):
        pr.ProbeConfig(datasets=())


def test_eval_probing_and_absorption_commands(lm, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from saelab.evals.commands import register
    from saelab.sae import save_sae

    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    app = typer.Typer()
    register(app)
    model_dir = tmp_path / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    sae = tmp_path / "sae"
    save_sae(random_sae("relu", d_in=32, d_sae=64, seed=1, metadata={"site": "resid_post.1"}), sae)
    runner = CliRunner()
    base = ["eval", str(sae), "--model", str(model_dir), "--bootstrap", "20"]
    res = runner.invoke(app, [*base, "--probing", "--datasets", "spam_is", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout[res.stdout.index("{"):])
    assert list(out["datasets"]) == ["spam_is"] and out["saes"][0]["site"] == "resid_post.1"
    assert json.loads((sae / "eval" / "probing.json").read_text())["schema"] == pr.SCHEMA
    assert list((tmp_path / "cache" / "probing").glob("spam_is-*.safetensors"))
    # the table, piped (80 columns), shows every name and interval whole
    res = runner.invoke(app, [*base, "--probing", "--datasets",
                              "spam_is,world_country_United_States"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    table = res.output[res.output.index("sparse probing"):res.output.index("model activations")]
    assert "world_country_United_States" in table and "…" not in table
    assert re.search(r"0\.\d\d±0\.\d\d", table)
    res = runner.invoke(app, [*base, "--absorption"])
    assert res.exit_code == 0, res.output
    assert "absorption means nothing here" in " ".join(res.output.split())
    assert (sae / "eval" / "absorption.json").is_file()
    res = runner.invoke(app, [*base, "--probing", "--datasets", "spam_iss"])
    assert res.exit_code == 2 and "unknown probing dataset 'spam_iss'" in res.output
    assert "Traceback" not in res.output


def test_an_sae_latent_that_reads_the_planted_direction_reaches_the_planted_accuracy():
    from saelab.sae import SAEConfig, build_sae

    rng = np.random.default_rng(1)
    n, d, flip = 600, 16, 0.1
    y = rng.permutation(np.arange(n) % 2)
    shown = np.where(rng.random(n) < flip, 1 - y, y)  # the concept as the text shows it
    counts = rng.integers(3, 9, size=n)
    text = np.repeat(np.arange(n), counts)
    acts = rng.normal(size=(len(text), d)) * 0.3
    acts[:, 5] += 2.0 * shown[text]  # every token of a text carries the direction
    ta = pr.TextActs("planted", torch.tensor(acts, dtype=torch.float32),
                     torch.tensor(np.concatenate([[0], np.cumsum(counts)])), y)
    sae = build_sae(SAEConfig("relu", d_in=d, d_sae=32, metadata={"site": "resid_post.0"}))
    with torch.no_grad():  # latent 9 reads dimension 5; the others read noise
        sae.W_enc.copy_(torch.randn(d, 32, generator=torch.Generator().manual_seed(0)) * 0.3)
        sae.W_enc[:, 9] = torch.eye(d)[5]
        sae.b_enc.fill_(-0.5)
        sae.b_dec.zero_()
    split_list = pr.splits(y, 1 / 3, 5, 0)
    pooled = pr.pool_sae(sae.eval(), ta)
    assert list(pr.top_k_mean_diff(pooled, y, 1)) == [9]
    correct = pr.probe_correct(pooled, y, (1,), split_list)
    assert correct["k1"].mean() == pytest.approx(1 - flip, abs=0.03)
