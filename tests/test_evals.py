"""Evaluation metrics against hand computations, the bootstrap, ΔCE identities, compare()."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_lm import tiny_lm

from saelab.data.corpus import Corpus
from saelab.data.tokens import pack
from saelab.errors import ShapeMismatchError
from saelab.evals.bootstrap import ContextStats, bootstrap_ci, safe_div
from saelab.evals.dictionaries import compare
from saelab.evals.downstream import prediction_mask
from saelab.evals.reconstruction import ReconAccumulator, recon_metrics
from saelab.evals.run import EvalConfig, evaluate, held_out_skip
from saelab.sae import SAEConfig, build_sae
from saelab.sae.testing import random_sae

TEXTS = [f"Document {i}: the quick brown fox jumps over the lazy dog, {i * 7} times. " * 3
         for i in range(60)]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


@pytest.fixture(scope="module")
def corpus():
    return Corpus.from_texts("mem", TEXTS)


def identity_sae(d: int, site: str = "resid_post.1"):
    """ReLU SAE with W_enc = [I, -I], W_dec = [I; -I]: x̂ = relu(x) - relu(-x) = x exactly."""
    sae = build_sae(SAEConfig("relu", d_in=d, d_sae=2 * d, metadata={"site": site}))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


# ------------------------------------------------------------------ reconstruction


def _accumulate(batches):
    acc, stats = ReconAccumulator(batches[0][2].shape[-1]), ContextStats()
    for x, x_hat, feats, mask in batches:
        stats.add(acc.update(x, x_hat, feats, mask))
    return acc, stats


def test_reconstruction_metrics_match_hand_computation():
    # One context, 4 positions; the last is masked out (a BOS-like outlier) and must not count.
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    x_hat = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 0.0]]])
    feats = torch.tensor([[[1.0, 0, 0], [0.5, 2.0, 0], [0, 0, 0], [1.0, 1.0, 1.0]]])
    mask = torch.tensor([[True, True, True, False]])
    acc, stats = _accumulate([(x, x_hat, feats, mask)])
    m = recon_metrics(stats.sums())

    mu = np.array([4 / 3, 2.0])  # mean of the three counted tokens
    xs, hs = x[0, :3].numpy(), x_hat[0, :3].numpy()
    total_var = ((xs - mu) ** 2).sum()  # = 114/9
    assert total_var == pytest.approx(114 / 9)
    assert m["fvu"] == pytest.approx(17 / (114 / 9))  # SSE = 0 + 1 + 16
    assert m["explained_variance"] == pytest.approx(1 - 17 / (114 / 9))
    assert m["mse"] == pytest.approx(17 / 3)
    assert m["mse_per_dim"] == pytest.approx(17 / 6)
    assert m["cosine"] == pytest.approx((1 + 1 + 0.6) / 3)  # cos of token 3: 9 / (5 * 3)
    assert m["l2_ratio"] == pytest.approx((1 + 0.5 + 0.6) / 3)
    assert m["relative_reconstruction_bias"] == pytest.approx(11 / 12)  # Σ‖x̂‖² / Σ x̂·x
    assert m["norm_in"] == pytest.approx((1 + 2 + 5) / 3)
    assert m["l0"] == pytest.approx((1 + 2 + 0) / 3)
    f = acc.features()
    assert f.n_tokens == 3
    np.testing.assert_allclose(f.density, [2 / 3, 1 / 3, 0])
    assert f.n_dead == 1 and f.dead_fraction == pytest.approx(1 / 3)
    assert f.l0_counts.tolist() == [1, 1, 1]
    # γ really is argmin_γ Σ‖x̂/γ − x‖².
    gammas = np.linspace(0.5, 1.5, 10001)
    losses = [((hs / g - xs) ** 2).sum() for g in gammas]
    assert gammas[int(np.argmin(losses))] == pytest.approx(11 / 12, abs=1e-3)


def test_fvu_uses_the_mean_of_the_whole_set_not_per_batch():
    g = torch.Generator().manual_seed(0)
    # Two batches with very different means: per-batch centring would hide that variance.
    xa = torch.randn(2, 5, 4, generator=g) + 10
    xb = torch.randn(2, 5, 4, generator=g) - 10
    ha, hb = xa + 0.3 * torch.randn(xa.shape, generator=g), xb + 0.3 * torch.randn(xb.shape, generator=g)
    ones = torch.ones(2, 5, dtype=torch.bool)
    fa, fb = torch.rand(2, 5, 8, generator=g), torch.rand(2, 5, 8, generator=g)
    _, stats = _accumulate([(xa, ha, fa, ones), (xb, hb, fb, ones)])
    fvu = recon_metrics(stats.sums())["fvu"]
    x, h = torch.cat([xa, xb]).reshape(-1, 4).double(), torch.cat([ha, hb]).reshape(-1, 4).double()
    expected = ((x - h) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fvu == pytest.approx(expected.item(), rel=1e-10)
    per_batch = np.mean([((b - c) ** 2).sum().item() / ((b - b.mean((0, 1))) ** 2).sum().item()
                         for b, c in ((xa, ha), (xb, hb))])
    assert per_batch > 50 * fvu  # the per-batch definition would be far off here


def test_dead_and_dense_fractions_and_density_histogram():
    fires = torch.zeros(1, 10, 4)
    fires[0, :, 0] = 1  # every token: dense
    fires[0, 3, 1] = 2  # 10% of tokens: not dense (dense means > 10%)
    fires[0, :2, 3] = 1  # 20%: dense; feature 2 never fires: dead
    x = torch.randn(1, 10, 3)
    acc, _ = _accumulate([(x, x, fires, torch.ones(1, 10, dtype=torch.bool))])
    f = acc.features()
    assert (f.n_dead, f.dead_fraction) == (1, 0.25)
    assert (f.n_dense, f.dense_fraction) == (2, 0.5)
    edges, counts = f.log10_density_histogram()
    assert counts.sum() == 3 and edges[0] <= -1 and edges[-1] == pytest.approx(0)
    js = f.to_json()
    assert js["dead_fraction"] == 0.25 and sum(js["log10_density_histogram"]["counts"]) == 3


# ------------------------------------------------------------------ bootstrap


def test_bootstrap_interval_matches_the_known_standard_error():
    rng = np.random.default_rng(1)
    n_ctx, sigma = 400, 2.0
    stats = ContextStats()
    stats.add({"n": np.ones(n_ctx), "v": rng.normal(5, sigma, n_ctx)})

    def mean_fn(s):
        return {"mean": safe_div(s["v"], s["n"])}

    lo, hi = bootstrap_ci(stats, mean_fn, n_boot=2000, seed=0)["mean"]
    half = 1.96 * sigma / np.sqrt(n_ctx)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_ci(stats, mean_fn, n_boot=2000, seed=0)["mean"] == (lo, hi)  # seeded


def test_bootstrap_resamples_contexts_so_correlated_tokens_widen_the_interval():
    # 100 contexts of 50 tokens: each context has its own offset (sd 1), tokens add little noise.
    # The mean's real standard error is ~1/sqrt(100) = 0.1; a token-level bootstrap would say
    # ~1/sqrt(5000) = 0.014. Per-context sums must give the former.
    rng = np.random.default_rng(2)
    offsets = rng.normal(0, 1, 100)
    tokens = offsets[:, None] + rng.normal(0, 0.1, (100, 50))
    stats = ContextStats()
    stats.add({"n": np.full(100, 50.0), "v": tokens.sum(1)})
    lo, hi = bootstrap_ci(stats, lambda s: {"m": s["v"] / s["n"]}, n_boot=2000, seed=0)["m"]
    assert (hi - lo) / 2 == pytest.approx(1.96 * tokens.mean(1).std() / 10, rel=0.2)


def test_bootstrap_with_one_context_gives_no_interval():
    stats = ContextStats()
    stats.add({"n": np.ones(1), "v": np.ones(1)})
    assert bootstrap_ci(stats, lambda s: {"m": s["v"] / s["n"]}, n_boot=100) == {"m": None}


# ------------------------------------------------------------------ downstream


def test_prediction_mask_excludes_special_inputs_and_targets():
    special = torch.tensor([[True, False, False, True, False]])
    assert prediction_mask(special).tolist() == [[False, True, False, False]]


def test_splicing_with_the_error_term_leaves_the_loss_unchanged(lm, corpus):
    sae = random_sae("topk", d_in=32, d_sae=64, k=4, metadata={"site": "resid_post.1"})
    r = evaluate(lm, sae, corpus=corpus, tokens=1024, context=64, batch_size=8, bootstrap=0,
                 keep_error=True)
    m = r["metrics"]
    assert abs(m["delta_ce"]["value"]) < 1e-6
    assert abs(m["kl_sae"]["value"]) < 1e-7
    assert m["ce_zero"]["value"] > m["ce_clean"]["value"]  # the ablation does something


def test_a_perfect_reconstruction_recovers_all_the_loss(lm, corpus):
    r = evaluate(lm, identity_sae(32), corpus=corpus, tokens=1024, context=64, batch_size=8,
                 bootstrap=0, mean_ablation=True)
    m = r["metrics"]
    assert m["fvu"]["value"] < 1e-10
    assert m["cosine"]["value"] == pytest.approx(1)
    assert m["relative_reconstruction_bias"]["value"] == pytest.approx(1)
    assert abs(m["delta_ce"]["value"]) < 1e-6
    assert m["loss_recovered"]["value"] == pytest.approx(1, abs=1e-4)
    assert m["loss_recovered_mean"]["value"] == pytest.approx(1, abs=1e-4)
    assert m["kl_score"]["value"] == pytest.approx(1, abs=1e-5)
    assert m["l0"]["value"] > 0


def test_clean_cross_entropy_matches_a_direct_forward(lm, corpus):
    r = evaluate(lm, identity_sae(32), corpus=corpus, tokens=512, context=64, batch_size=8,
                 bootstrap=0)
    total, n = 0.0, 0
    for ids, special in pack(corpus, lm.tokenizer, 64, batch_size=8, n_tokens=512):
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits.float()
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               ids[:, 1:].reshape(-1), reduction="none")
        keep = (~special[:, :-1] & ~special[:, 1:]).reshape(-1)
        total, n = total + ce[keep].sum().item(), n + int(keep.sum())
    assert r["metrics"]["ce_clean"]["value"] == pytest.approx(total / n, rel=1e-5)
    assert r["data"]["prediction_positions"] == n


def test_metrics_do_not_depend_on_the_batch_size(lm, corpus):
    sae = random_sae("relu", d_in=32, d_sae=64, metadata={"site": "resid_post.2"})
    a, b = (evaluate(lm, sae, corpus=corpus, tokens=1024, context=64, batch_size=bs, bootstrap=0,
                     downstream=False)["metrics"] for bs in (2, 16))
    for key in ("fvu", "mse", "cosine", "l0", "relative_reconstruction_bias"):
        assert a[key]["value"] == pytest.approx(b[key]["value"], rel=1e-5), key


def test_evaluate_writes_eval_json_and_report(lm, corpus, tmp_path):
    sae = random_sae("jumprelu", d_in=32, d_sae=64, metadata={"site": "resid_mid.1"})
    r = evaluate(lm, sae, corpus=corpus, tokens=2048, context=64, batch_size=8, bootstrap=200,
                 out=tmp_path)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["schema"] == r["schema"] == "saelab.eval/1"
    assert saved["data"]["n_contexts"] == 32 and saved["bootstrap"]["unit"] == "context"
    for key in ("fvu", "delta_ce", "loss_recovered", "kl_score", "l0", "relative_reconstruction_bias"):
        entry = saved["metrics"][key]
        lo, hi = entry["ci95"]
        assert lo <= hi and np.isfinite([lo, hi, entry["value"]]).all()
        assert key in saved["definitions"]
    assert np.load(tmp_path / "feature_density.npy", allow_pickle=False).shape == (64,)
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "loss_recovered" in html
    assert "http://" not in html and "https://" not in html and "<script" not in html


def test_held_out_skip_starts_after_the_training_text(lm, corpus):
    ctx = 64
    meta = {"site": "resid_post.1", "corpus_hash": corpus.sha256, "context_size": ctx,
            "train_config": {"tokens": 1000}}
    sae = random_sae("relu", d_in=32, d_sae=64, metadata=meta)
    skip, info = held_out_skip(sae.cfg, corpus, lm.tokenizer, ctx)
    # Harvest batches of 16 contexts: 16 * 63 non-BOS tokens already exceed 1000 (no separators
    # inside the first documents), so it read 16 contexts; plus the 4-batch margin.
    assert (skip, info["held_out"]) == (80, "yes")
    other = random_sae("relu", d_in=32, d_sae=64, metadata={**meta, "corpus_hash": "x"})
    assert held_out_skip(other.cfg, corpus, lm.tokenizer, ctx)[1]["held_out"] == "yes"
    with pytest.raises(Exception, match="no evaluation text"):
        evaluate(lm, sae, corpus=corpus, tokens=256, context=ctx, bootstrap=0, skip_contexts=10_000)


def test_held_out_skip_uses_the_contexts_the_run_read(lm, corpus):
    """A streaming run reads ahead into its shuffling buffer: the SAE records the contexts it
    read (`corpus_contexts`) and evaluation starts past them, not past the trained tokens."""
    ctx = 64
    meta = {"site": "resid_post.1", "corpus_hash": corpus.sha256, "context_size": ctx,
            "train_config": {"tokens": 1000}, "corpus_contexts": 40}
    sae = random_sae("relu", d_in=32, d_sae=64, metadata=meta)
    skip, info = held_out_skip(sae.cfg, corpus, lm.tokenizer, ctx)
    assert (skip, info["held_out"]) == (48, "yes")  # 40 read, rounded up to a 16-context batch
    half = held_out_skip(sae.cfg, corpus, lm.tokenizer, ctx // 2 + 1)[0]  # shorter eval contexts
    assert half == -(-48 * 63 // 32)
    endless = random_sae("relu", d_in=32, d_sae=64, metadata={**meta, "corpus_contexts": 10**9})
    assert held_out_skip(endless.cfg, corpus, lm.tokenizer, ctx)[1]["held_out"] == "no"


def test_eval_config_validates():
    with pytest.raises(ValueError, match="batch_size"):
        EvalConfig(batch_size=0)
    with pytest.raises(ValueError, match="keep_error"):
        EvalConfig(keep_error=True, downstream=False)


# ------------------------------------------------------------------ compare


def test_compare_self_and_permuted_copy():
    sae = random_sae("relu", d_in=16, d_sae=48, seed=3)
    assert compare(sae, sae).mcs == pytest.approx(1, abs=1e-6)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(0))
    scale = torch.rand(48, 1) + 0.5  # decoder norms do not matter, directions do
    w_perm = sae.W_dec.detach()[perm] * scale
    cmp = compare(sae, w_perm, hungarian=True)
    assert cmp.mcs == pytest.approx(1, abs=1e-6) and cmp.mcs_reverse == pytest.approx(1, abs=1e-6)
    # A's feature i is B's feature j where perm[j] == i.
    np.testing.assert_array_equal(cmp.matching.b_of_a, torch.argsort(perm).numpy())
    np.testing.assert_array_equal(cmp.best, torch.argsort(perm).numpy())
    assert cmp.matching.mean_cos == pytest.approx(1, abs=1e-6)


def test_compare_unrelated_dictionaries_and_bad_widths():
    a = random_sae("relu", d_in=16, d_sae=32, seed=1)
    b = random_sae("relu", d_in=16, d_sae=64, seed=2)
    cmp = compare(a, b, hungarian=True)
    assert 0 < cmp.mcs < 0.9 and len(cmp.max_cos) == 32 and len(cmp.max_cos_reverse) == 64
    assert len(cmp.matching.a) == 32 and cmp.matching.mean_cos <= cmp.mcs + 1e-9
    js = cmp.to_json(per_feature=True)
    assert len(js["max_cos"]) == 32 and sum(js["max_cos_histogram"]["counts"]) == 32
    with pytest.raises(ShapeMismatchError, match="d_in"):
        compare(a, random_sae("relu", d_in=8, d_sae=32))


# ------------------------------------------------------------------ command line


def test_eval_and_compare_commands(lm, tmp_path):
    import typer
    from typer.testing import CliRunner

    from saelab.evals.commands import register
    from saelab.sae import save_sae

    app = typer.Typer()
    register(app)
    model_dir = tmp_path / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text("\n\n\n".join(TEXTS))
    a, b = tmp_path / "a", tmp_path / "b"
    save_sae(random_sae("relu", d_in=32, d_sae=64, seed=1, metadata={"site": "resid_post.1"}), a)
    save_sae(random_sae("relu", d_in=32, d_sae=64, seed=2, metadata={"site": "resid_post.1"}), b)
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(a), "--model", str(model_dir), "--tokens", "512",
                              "--corpus", str(text), "--context", "64", "--bootstrap", "50",
                              "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout[res.stdout.index("{"):])
    assert out["sae"]["path"] == str(a) and (a / "eval" / "report.html").is_file()
    res = runner.invoke(app, ["compare", str(a), str(a), "--hungarian", "--json",
                              "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout[res.stdout.index("{"):])
    assert out["mcs"] == pytest.approx(1, abs=1e-6) and out["matching"]["mean_cos"] == pytest.approx(1, abs=1e-6)
    assert (tmp_path / "cmp" / "report.html").is_file()
    res = runner.invoke(app, ["eval", str(a), "--model", str(model_dir), "--batch-size", "0"])
    assert res.exit_code == 2 and "batch_size" in res.output
    # At another site than it was trained at: evaluated as asked, with a warning and a note.
    res = runner.invoke(app, ["eval", str(a), "--model", str(model_dir), "--tokens", "128",
                              "--corpus", str(text), "--context", "64", "--bootstrap", "0",
                              "--site", "resid_post.0", "--no-downstream", "--out",
                              str(tmp_path / "other")])
    assert res.exit_code == 0, res.output
    text_out = " ".join(res.output.split())
    assert "warning: the SAE was trained at site resid_post.1, and is evaluated at resid_post.0" in text_out
    written = json.loads((tmp_path / "other" / "eval.json").read_text())
    assert written["notes"][0].startswith("the SAE was trained at site resid_post.1")


# ------------------------------------------------------------------ embedded model


@pytest.mark.slow
def test_embedded_model_end_to_end(embedded_lm, tmp_path):
    """A PCA "SAE" (±top principal directions, b_dec = mean) at resid_post.6 on ~2k tokens."""
    from saelab.models.hooks import capture

    lm, site, n_pc = embedded_lm, "resid_post.6", 64
    batches = list(pack(Corpus.from_texts("fit", TEXTS), lm.tokenizer, 128, batch_size=8,
                        n_tokens=1024))
    xs = []
    for ids, special in batches:
        with capture(lm.model, site, arch=lm.arch) as cap:
            cap.run(input_ids=ids)
        xs.append(cap[site][~special])
    x = torch.cat(xs)
    mu = x.mean(0)
    _, _, v = torch.linalg.svd(x - mu, full_matrices=False)
    sae = build_sae(SAEConfig("relu", d_in=576, d_sae=2 * n_pc, metadata={"site": site}))
    with torch.no_grad():
        dirs = torch.cat([v[:n_pc], -v[:n_pc]])  # (2k, d)
        sae.W_dec.copy_(dirs)
        sae.W_enc.copy_(dirs.T)
        sae.b_dec.copy_(mu)
        sae.b_enc.zero_()
    r = evaluate(lm, sae.eval(), corpus="builtin:stdlib", tokens=2048, context=128, batch_size=8,
                 bootstrap=200, out=tmp_path)
    m = r["metrics"]
    assert 0 < m["fvu"]["value"] < 1
    assert 0 < m["cosine"]["value"] <= 1
    assert 1 < m["ce_clean"]["value"] < 6
    assert m["ce_zero"]["value"] > m["ce_sae"]["value"] > m["ce_clean"]["value"]
    assert 0 < m["loss_recovered"]["value"] < 1
    assert (tmp_path / "eval.json").is_file() and (tmp_path / "report.html").is_file()
    # SmolLM2's residual stream reaches 1e4, so x̂ + (x − x̂) is x only up to fp32 rounding.
    check = evaluate(lm, sae, corpus="builtin:stdlib", tokens=128, context=128, batch_size=1,
                     bootstrap=0, keep_error=True)
    assert abs(check["metrics"]["delta_ce"]["value"]) < 1e-4
