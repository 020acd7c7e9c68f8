"""The synthetic-activation study: the cached sweep against recomputation, the target recipes,
the curve readers, errors, and the study end to end (tiny model; embedded model when slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_lm import tiny_lm
from tiny_models import TINY_FAMILIES, tiny_model

from saelab.data.corpus import Corpus
from saelab.errors import SaelabError, ShapeMismatchError, SiteError
from saelab.sae.testing import random_sae
from saelab.studies.synthetic import SyntheticConfig, run_synthetic, schedule, sweep, sweep_naive
from saelab.studies.synthetic_commands import run_study
from saelab.studies.synthetic_report import blowup_step, plateau_length, summarize
from saelab.studies.synthetic_targets import (
    Gaussian,
    latent_stats,
    profiles,
    synthetic_baseline,
    synthetic_structured,
    unit_decoder,
)

TEXTS = [f"Document {i}: the quick brown fox jumps over the lazy dog, {i * 7} times. " * 3
         for i in range(60)]


# ------------------------------------------------------------------ the sweep


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_cached_batched_sweep_equals_naive_recomputation(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    B, K, P, d = 3, 2, 10, 32
    windows = torch.randint(1, 60, (B, P), generator=g)
    targets = 3 * torch.randn(B, K, d, generator=g)
    dist = 10 * torch.rand(B, K, generator=g) + 1
    for mode in ("relative", "absolute"):
        coefs = schedule(mode, 8, dist, step_size=1.5)
        for starts in (None, torch.randn(B, K, d, generator=g)):
            # max_rows=7 splits each base's rows over several forwards (and cache copies)
            fast = sweep(model, "resid_pre.1", windows, targets, coefs, starts, max_rows=7)
            slow = sweep_naive(model, "resid_pre.1", windows, targets, coefs, starts)
            for a, b in ((fast.l2, slow.l2), (fast.kl, slow.kl), (fast.ref_norm, slow.ref_norm)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # NaN tails must match too
            assert np.nanmax(fast.l2) > 1 and np.nanmax(fast.kl) > 1e-3  # the patch did something
            assert (fast.l2[..., 0] == 0).all()
            if mode == "absolute":
                assert np.isnan(fast.l2).any()  # some curves were cut at their target
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_schedule_relative_and_absolute():
    rel = schedule("relative", 5, torch.tensor([3.0]))
    assert rel[0].tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    ab = schedule("absolute", 6, torch.tensor([2.2, 0.0]), step_size=0.5)
    assert ab[0, :5].tolist() == pytest.approx([0, 0.5 / 2.2, 1 / 2.2, 1.5 / 2.2, 2 / 2.2])
    assert torch.isnan(ab[0, 5:]).all()  # 2.5 > 2.2: past the target
    assert ab[1, 0] == 0 and torch.isnan(ab[1, 1:]).all()  # target == base: only the start


# ------------------------------------------------------------------ targets


def _codes_and_stats(seed: int = 0):
    sae = random_sae("topk", d_in=16, d_sae=256, k=8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(2000, 16, generator=g)
    bases = torch.randn(40, 16, generator=g)
    return sae, latent_stats(sae, pool), sae.encode(bases)


def test_synthetic_baseline_keeps_l0_and_the_activation_values():
    sae, stats, base_codes = _codes_and_stats()
    g = torch.Generator().manual_seed(1)
    for f in base_codes:
        new = synthetic_baseline(f, stats.freq, g)
        assert int((new > 0).sum()) == int((f > 0).sum()) > 0  # no latent got two activations
        assert torch.equal(new[new > 0].sort().values, f[f > 0].sort().values)
        assert not torch.equal(new, f)
        # every new latent is among the 10 closest in frequency to one of the old ones,
        # counting past those already taken (at most L0 - 1 of them)
        old, l0 = (f > 0).nonzero(as_tuple=True)[0], int((f > 0).sum())
        for j in (new > 0).nonzero(as_tuple=True)[0]:
            closer = [int(((stats.freq - stats.freq[i]).abs() < (stats.freq[j] - stats.freq[i]).abs())
                          .sum()) - 1 for i in old if i != j]  # - 1: latent i itself
            assert min(closer) < 10 + l0 - 1


def test_synthetic_structured_matches_the_cosine_profile_better_than_baseline():
    sae, stats, base_codes = _codes_and_stats()
    w = unit_decoder(sae)
    g = torch.Generator().manual_seed(2)
    base = torch.stack([synthetic_baseline(f, stats.freq, g) for f in base_codes])
    structured = torch.stack([synthetic_structured(f, stats.freq, stats.mean_cos, w, g)
                              for f in base_codes])
    for f, new in zip(base_codes, structured, strict=True):
        assert torch.equal(new[new > 0].sort().values, f[f > 0].sort().values)
    _, mismatch = profiles(sae, base_codes, {"synthetic-baseline": base,
                                             "synthetic-structured": structured})
    assert mismatch["synthetic-structured"] < 0.5 * mismatch["synthetic-baseline"]


def test_latent_statistics_by_hand():
    sae, stats, _ = _codes_and_stats()
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0))  # the pool again
    f = sae.encode(x)
    assert torch.allclose(stats.freq, (f > 0).double().mean(0))
    assert np.array_equal(stats.l0, (f > 0).sum(1).numpy())
    top = f.argmax(1)
    w = unit_decoder(sae)
    cos = [float(w[j] @ w[top[n]]) for n in range(50) for j in (f[n] > 0).nonzero()[:, 0]
           if j != top[n]]
    assert np.allclose(np.sort(stats.cos_to_top[:len(cos)]), np.sort(cos), atol=1e-6)


def test_gaussian_matches_the_mean_and_covariance():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 8, generator=g)
    x = torch.randn(20_000, 8, generator=g) @ mix.T + torch.arange(8.0)
    gauss = Gaussian.fit(x)
    s = gauss.sample(50_000, torch.Generator().manual_seed(1)).double()
    cov = torch.cov(x.double().T)
    scale = cov.diagonal().max().sqrt()
    assert (s.mean(0) - x.double().mean(0)).abs().max() < 0.05 * scale
    assert (torch.cov(s.T) - cov).abs().max() < 0.05 * cov.abs().max()
    few = Gaussian.fit(x[:4]).sample(10, g)  # rank 3 < 8 dimensions: still samples
    assert torch.isfinite(few).all()


# ------------------------------------------------------------------ reading curves


def test_blowup_step_on_crafted_curves():
    step = np.r_[np.zeros(30), 10 * np.ones(70)]
    assert blowup_step(step, 0.02) == 30
    assert blowup_step(np.linspace(0, 1, 100), 0.02) == 99  # rises 1% per step: no blow-up
    assert blowup_step(np.zeros(50), 0.02) == 49
    rng = np.random.default_rng(0)
    x = np.arange(100)
    noisy = 5 / (1 + np.exp(-(x - 60) / 1.5)) + 0.05 * rng.standard_normal(100)
    assert abs(blowup_step(noisy, 0.02) - 60) <= 2
    assert blowup_step(np.array([0, 0, 5, 5, np.nan, np.nan]), 0.02) == 2  # a NaN tail is ignored
    assert blowup_step(np.array([0.0, 1, 2, np.nan]), 0.9) == 2  # the last finite step
    assert blowup_step(np.array([0.0, 10, 10, 10]), 0.02) == 0  # s_0 = s_1, first of ties


def test_blowup_summary_has_intervals_and_paired_differences():
    real = np.array([10.0, 12, 14, 16, 18, 20])
    random = real + np.array([3.0, 4, 5, 3, 4, 5])  # every base's random target blows up 3-5 steps later
    out = summarize({"real": real, "random": random})
    assert out["real"]["diff_vs_ref"] is None and out["real"]["ks"] is None
    lo, hi = out["real"]["ci95"]
    assert lo < 15 < hi  # the mean, 15, inside its bootstrap interval
    diff = out["random"]["diff_vs_ref"]
    assert diff["mean"] == pytest.approx(4.0) and diff["n"] == 6
    assert 3 <= diff["ci95"][0] < 4 < diff["ci95"][1] <= 5  # paired: the shift is sure though the spreads overlap


def test_plateau_length():
    assert plateau_length(np.array([0, 0.1, 0.2, 1.5, 2]), 1.0) == 3
    assert plateau_length(np.array([0, 0.1, 0.2, np.nan]), 1.0) == 3  # never: censored at its length
    assert plateau_length(np.array([2.0, 3.0]), 1.0) == 0


# ------------------------------------------------------------------ the study on a tiny model


def _tiny_study(tmp_path, sae=None, site="resid_pre.1", lm=None, corpus_name="mem"):
    lm = lm or tiny_lm("llama")
    sae = sae if sae is not None else random_sae("topk", d_in=32, d_sae=128, k=6,
                                                 metadata={"site": site})
    cfg = SyntheticConfig(site=site, n=8, steps=6, stats_prompts=200, plateau_n=4, n_top=20)
    return run_synthetic(lm, sae, cfg, tmp_path, corpus=Corpus.from_texts(corpus_name, TEXTS))


def test_study_on_a_tiny_model_writes_its_files(tmp_path):
    lm = tiny_lm("llama")
    lm.name = "tiny<script>alert(1)</script>"  # model and corpus names reach the page escaped
    result = _tiny_study(tmp_path, lm=lm, corpus_name="<b>mem</b>")
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["n"] == 8 and run["site"] == "resid_pre.1"
    for kind in ("real", "random", "synthetic-baseline", "synthetic-structured"):
        steps = run["results"]["per_curve"]["blowup_l2"][kind]
        assert len(steps) == 8 and all(0 <= s < 6 for s in steps)
        ks = run["results"]["blowup"]["kl"][kind]["ks"]
        assert (ks is None) == (kind == "real") and (ks is None or 0 <= ks <= 1)
    assert set(run["results"]["plateau"]["lengths"]) == set(result["results"]["plateau"]["lengths"])
    for kind in ("random", "synthetic-baseline"):
        diff = run["results"]["blowup"]["l2"][kind]["diff_vs_ref"]
        paired = np.subtract(run["results"]["per_curve"]["blowup_l2"][kind],
                             run["results"]["per_curve"]["blowup_l2"]["real"])
        assert diff["n"] == 8 and diff["mean"] == pytest.approx(paired.mean())
    html = (tmp_path / "report.html").read_text()
    assert "paired Δ vs real" in html
    assert "<script" not in html and "&lt;script&gt;" in html and "&lt;b&gt;mem" in html
    assert html.count("data:image/png") >= 10
    assert len(list(tmp_path.glob("*.png"))) >= 10 and (tmp_path / "curves.npz").is_file()


def test_sae_site_mismatch_unknown_site_and_nan_activations(tmp_path):
    with pytest.raises(ShapeMismatchError, match=r"d_in=16.*width 32"):
        _tiny_study(tmp_path, sae=random_sae("topk", d_in=16, d_sae=64, k=4))
    with pytest.raises(SiteError):
        _tiny_study(tmp_path, site="resid_pre.9")
    lm = tiny_lm("llama")
    with torch.no_grad():
        lm.model.get_input_embeddings().weight[5:50] = torch.nan
    with pytest.raises(SaelabError, match="NaN"):
        _tiny_study(tmp_path, lm=lm)


def test_config_validates():
    with pytest.raises(ValueError, match="mode"):
        SyntheticConfig(mode="sideways")
    with pytest.raises(ValueError, match="plateau_n"):
        SyntheticConfig(plateau_n=-1)
    with pytest.raises(ValueError, match="steps"):
        SyntheticConfig(steps=1)


# ------------------------------------------------------------------ the embedded model


@pytest.fixture(scope="module")
def embedded_study(embedded_lm, tmp_path_factory):
    """A reduced study on the embedded model with a quickly trained SAE (20k tokens)."""
    out = tmp_path_factory.mktemp("synthetic")
    cfg = SyntheticConfig(n=8, steps=20, stats_prompts=512, plateau_n=4, sae_tokens=20_000,
                          sae_width=1152, sae_k=16)
    return cfg, out, run_study(cfg, out, lm=embedded_lm)


@pytest.mark.slow
def test_embedded_model_reduced_study(embedded_study, embedded_lm, monkeypatch):
    cfg, out, result = embedded_study
    run = json.loads((out / "run.json").read_text())
    res = run["results"]
    for metric in ("l2", "kl"):
        for kind, s in res["blowup"][metric].items():
            assert 0 <= s["mean"] <= cfg.steps - 1 and s["n"] == cfg.n
            assert kind == "real" or 0 <= s["ks"] <= 1
    stats = res["real_stats"]
    assert 1 <= stats["l0"]["mean"] <= 200 and 0 < stats["top_share"]["mean"] <= 1
    assert -1 <= stats["mean_cos"] <= 1 and 0 < stats["fvu"] < 1
    curves = np.load(out / "curves.npz")
    assert curves["l2"].shape == (cfg.n, 4, cfg.steps)
    assert (curves["l2"][..., 0] == 0).all() and (curves["l2"][..., -1] > 0).all()
    assert (out / "report.html").is_file() and (out / "blowup_l2_cdf.png").is_file()
    # A second run reuses the trained SAE: neither harvest nor training runs again.
    import saelab.data.harvest as harvest
    import saelab.studies.synthetic as synthetic
    import saelab.train.trainer as trainer

    monkeypatch.setattr(harvest, "harvest", lambda *a, **k: pytest.fail("harvested again"))
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("the SAE was retrained"))
    monkeypatch.setattr(synthetic, "run_synthetic", lambda lm, sae, cfg, out, **kw: kw["sae_path"])
    assert run_study(cfg, out, lm=embedded_lm) == result["sae"]["path"]


@pytest.mark.slow
def test_eval_sensitivity_through_the_cli(embedded_study):
    import typer
    from typer.testing import CliRunner

    from saelab.evals.commands import register

    _, out, result = embedded_study
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # two commands, so `eval` stays a subcommand
    res = CliRunner().invoke(app, ["eval", result["sae"]["path"], "--tokens", "256", "--bootstrap",
                                   "0", "--no-downstream", "--sensitivity", "--sensitivity-n", "8",
                                   "--out", str(out / "eval"), "--json"])
    assert res.exit_code == 0, res.output
    sens = json.loads((out / "eval" / "eval.json").read_text())["sensitivity"]
    assert sens["n"] == 8 and sens["steps"] == 100
    for kind in ("synthetic-baseline", "synthetic-structured"):
        assert 0 <= sens["ks"][kind]["l2"] <= 1 and 0 <= sens["ks"][kind]["kl"] <= 1
    assert sens["skip_windows"] > 0  # held-out text, after the SAE's training tokens
