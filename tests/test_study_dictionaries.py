"""The dictionary study: MCS against a known dictionary, the connection fit, the logit lens's
token filter, the uniform bins, bad input, and the study end to end (tiny model) with resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_lm import tiny_lm

from saelab.errors import BadValueError, SaelabError, SiteError
from saelab.evals.dictionaries import compare
from saelab.studies.dictionaries_config import DictionariesConfig, parse_list
from saelab.studies.dictionaries_connect import fit_connections, weight_guess
from saelab.studies.dictionaries_eval import pareto_front
from saelab.train.config import SAESpec, TrainConfig
from saelab.train.objective import SAEObjective

# ------------------------------------------------------------------ a known dictionary


def _truth(d: int = 24, n_true: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_true, d, generator=g)
    return w / w.norm(dim=1, keepdim=True)


def _batch(truth: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """Each row: 3 random true features with magnitudes in [1, 2)."""
    codes = torch.zeros(n, truth.shape[0])
    idx = torch.rand(n, truth.shape[0], generator=g).topk(3, dim=1).indices
    codes.scatter_(1, idx, 1 + torch.rand(n, 3, generator=g))
    return codes @ truth


def _train(truth, width: int, steps: int, seed: int = 0) -> list[float]:
    """MCS(truth -> learned) after every 100 steps of the engine's ReLU objective."""
    cfg = TrainConfig(saes=(SAESpec("resid_post.0", arch="relu", width=width, k=1, l1=0.3),),
                      tokens=steps * 256, batch_size=256, lr=6e-3, seed=seed, warmup_steps=10)
    obj = SAEObjective(cfg.saes[0], truth.shape[1], cfg, torch.float32, {})
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for step in range(steps):
        obj.train_step(_batch(truth, 256, g), steps)
        if (step + 1) % 100 == 0:
            out.append(compare(truth, obj.sae.W_dec.detach()).mcs)
    return out


def test_mcs_against_the_true_dictionary_rises_with_training_and_width():
    truth = _truth()
    narrow = _train(truth, 24, 400)  # at most half the true features fit
    wide = _train(truth, 96, 400)
    assert wide[-1] > wide[0] + 0.15, wide  # training finds the true features
    assert all(b > a for a, b in zip(wide, wide[1:])), wide
    assert wide[-1] > 0.8, wide  # most of them
    assert wide[-1] > narrow[-1] + 0.08, (narrow, wide)  # a wider dictionary finds more
    random = compare(truth, torch.randn(96, truth.shape[1])).mcs
    assert narrow[-1] > random  # and even the narrow one beats chance


# ------------------------------------------------------------------ connections


def test_recurrence_claims_are_inconclusive_when_seeds_agree_only_by_chance():
    """Seed MCS at the random-dictionary floor at every width: claims 1 and 2 say so
    (holds None) instead of "does not hold"; one width well above it decides them."""
    from types import SimpleNamespace

    from saelab.studies.dictionaries_mcs import chance_mcs
    from saelab.studies.dictionaries_report import _claims

    # the floor rises with the number of rows and falls with d
    assert chance_mcs(64, 64, 64) < chance_mcs(512, 512, 64)
    assert chance_mcs(256, 256, 512) < chance_mcs(256, 256, 64) < 1
    cfg = SimpleNamespace(seeds=2, widths=(1, 2), recur_threshold=0.9, arch="relu")
    feat = SimpleNamespace(sparsity=0.1)
    row = {"feature": 3, "recurrence": 0.2, "outlier_dim_share": 0.5, "first_positions_share": 0.9}
    acts = {"recurring": {"features": [row], "uniform_outlier_share": 0.01, "uniform_first_share": 0.2,
                          "dictionary": "d"},
            "outlier_dims": [1], "outlier_dim_mean_sq": [9.0], "median_dim_mean_sq": 1.0}

    def by_width(seed_mcs):
        return [{"sparsity": 0.1, "width_mult": w, "seed_mcs": m, "chance_mcs": 0.14,
                 "seed_recurring": float(w)} for w, m in zip((1, 2), seed_mcs)]

    noise = _claims(cfg, feat, by_width((0.15, 0.16)), acts, {})
    assert noise[0]["holds"] is None and noise[1]["holds"] is None
    assert "no closer than random" in noise[0]["evidence"] and "0.150 vs 0.140" in noise[0]["evidence"]
    learned = _claims(cfg, feat, by_width((0.15, 0.6)), acts, {})
    assert learned[0]["holds"] is True and learned[1]["holds"] is True


def test_connection_fit_recovers_a_planted_sparse_map():
    rng = np.random.default_rng(0)
    n, f1 = 4000, 40
    early = rng.exponential(1.0, (n, f1)) * (rng.random((n, f1)) < 0.15)  # sparse, >= 0
    planted = {0: [(3, 2.0), (17, -1.0)], 1: [(5, 1.5)], 2: [(8, 1.0), (9, 1.0), (30, 0.7)]}
    late = np.zeros((n, 3))
    for t, terms in planted.items():
        for e, w in terms:
            late[:, t] += w * early[:, e]
    late += 0.05 * rng.standard_normal(late.shape)
    fit = fit_connections(early, late, [0, 1, 2], alpha=0.01)
    for i, terms in enumerate(planted.values()):
        support = {e for e, _ in terms}
        assert set(np.argsort(-np.abs(fit.coef[i]))[:len(support)].tolist()) == support
        assert np.sign(fit.coef[i][[e for e, _ in terms]]).tolist() == [np.sign(w) for _, w in terms]
        assert fit.r2[i] > 0.95
    top = fit.strongest(1)[0]
    assert (top[0], top[1]) == (5, 1)  # the one single-term map: standardised coefficient ~1
    # a map with no relation to the data has near-zero held-out R²
    noise = fit_connections(early, rng.standard_normal((n, 1)), [0], alpha=0.01)
    assert noise.r2[0] < 0.05


def test_weight_guess_is_decoder_times_encoder():
    dec, enc = np.arange(6.0).reshape(2, 3), np.ones((3, 4))
    assert weight_guess(dec, enc).tolist() == (dec @ enc).tolist()


# ------------------------------------------------------------------ logit lens filter


def test_high_norm_token_filter_removes_planted_rows():
    from saelab.features.logit_lens import logit_lens

    lm = tiny_lm("llama")
    W_U = lm.model.get_output_embeddings().weight
    saved = W_U.detach().clone()
    high, low = [10, 40, 77], [55]
    try:
        with torch.no_grad():
            W_U[high] *= 30
        # decoder rows pointing at the planted high-norm tokens would rank them first
        direction = W_U[high].detach().clone()
        lens = logit_lens(lm, direction, k=5)
        n_tokens = len(lm.tokenizer)  # rows past it are padding, left out too
        assert lens.filter.reasons.pop("padding") == list(range(n_tokens, len(W_U)))
        assert lens.filter.reasons == {"high_norm": high}
        assert not set(lens.top_ids.flatten().tolist()) & set(high)
        kept = logit_lens(lm, direction, k=5, z_max=1e9)  # no filter: they win
        assert kept.top_ids[:, 0].tolist() == high
        with torch.no_grad():  # a never-trained row: near-zero norm
            W_U.copy_(saved)
            W_U[low] *= 1e-4
        lens = logit_lens(lm, direction, k=5)
        assert {k: v for k, v in lens.filter.reasons.items() if k != "padding"} == {"low_norm": low}
        assert lens.filter.excluded[:n_tokens].nonzero().flatten().tolist() == low
    finally:
        with torch.no_grad():
            W_U.copy_(saved)


# ------------------------------------------------------------------ small pieces


def test_pareto_front():
    assert pareto_front([1, 2, 3, 2.5], [0.5, 0.3, 0.1, 0.4]) == [0, 1, 2]


@pytest.mark.parametrize(("changes", "needle"), [
    ({"widths": (0, 2)}, "--widths"), ({"widths": (-1,)}, "--widths"), ({"widths": ()}, "--widths"),
    ({"widths": (1.5,)}, "--widths"), ({"l1": (0.0,)}, "--l1"), ({"l1": (-1.0,)}, "--l1"),
    ({"l1": (float("nan"),)}, "--l1"), ({"l1": (1.0, 1.0)}, "repeated"), ({"arch": "gated"}, "--arch"),
    ({"seeds": 0}, "--seeds"), ({"tokens": 10, "batch_size": 1024}, "one batch"),
])
def test_bad_settings_are_refused(changes, needle):
    with pytest.raises(BadValueError, match=needle):
        DictionariesConfig(**changes)


def test_parse_list():
    assert parse_list("--widths", "1,2, 4", int) == (1, 2, 4)
    with pytest.raises(BadValueError, match="--l1"):
        parse_list("--l1", "1,x", float)


# ------------------------------------------------------------------ end to end

TINY = dict(model="tiny", site="resid_post.0", widths=(1, 2), l1=(1.0, 3.0), seeds=2, context=16,
            tokens=4096, batch_size=256, eval_tokens=128, feature_tokens=1024, connect_tokens=512,
            connect_features=4, featured=2, max_back=6, index_ablate=2)


def test_bad_site_and_memory_budget(tmp_path):
    from saelab.studies.dictionaries import run_dictionaries

    lm = tiny_lm("llama")
    with pytest.raises(SiteError):
        run_dictionaries(lm, DictionariesConfig(**TINY | {"site": "resid_post.9"}), tmp_path / "a")
    with pytest.raises(SiteError, match="next layer"):  # the last layer has no next site
        run_dictionaries(lm, DictionariesConfig(**TINY | {"site": "resid_post.2"}), tmp_path / "b")
    with pytest.raises(SaelabError, match="memory budget"):
        run_dictionaries(lm, DictionariesConfig(**TINY), tmp_path / "c", memory_budget=100_000)
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_study_end_to_end_with_interruption_and_resume(tmp_path):
    from saelab.features.index import FeatureIndex
    from saelab.studies.dictionaries import run_dictionaries

    lm = tiny_lm("llama")
    cfg = DictionariesConfig(**TINY)
    out = tmp_path / "study"

    class Stop(Exception):
        pass

    def interrupt(name, total):
        def update(done):
            if name.startswith("train") and done >= 12 * 256:  # past the checkpoint at 8 steps
                raise Stop

        return update

    with pytest.raises(Stop):
        run_dictionaries(lm, cfg, out, stage=interrupt)
    assert (out / "train" / "ckpt").is_dir() and not (out / "run.json").exists()
    with pytest.raises(SaelabError, match="--resume"):
        run_dictionaries(lm, cfg, out)
    with pytest.raises(SaelabError, match="other settings"):
        run_dictionaries(lm, DictionariesConfig(**TINY | {"seeds": 1}), out, resume=True)
    result = run_dictionaries(lm, cfg, out, resume=True)

    res = result["results"]
    assert len(res["grid"]) == 2 * 2 * 2
    for r in res["grid"]:
        assert r["l0"] > 0 and 0 < r["fvu"] < 2 and np.isfinite(r["delta_ce"])
    assert res["pareto"] and len(res["claims"]) == 3
    mcs = np.asarray(res["mcs"])
    assert mcs.shape == (8, 8) and np.allclose(np.diag(mcs), 1) and (mcs < 1.0001).all()
    for name in ("report.html", "mcs_vs_width.png", "recurring_vs_width.png", "pareto.png",
                 "max_cos_hist.png", "metrics_vs_sparsity.png", "metrics_vs_width.png"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert "The original&#x27;s claims" in html and "<script" not in html.split("<body>")[0]
    ablated = html.split("Ablated text: top and uniform examples")  # in each feature card
    assert len(ablated) > 1 and all(">bin " in part.split('class="card"')[0] for part in ablated[1:])
    assert set(result["connection_sites"]) == {"resid_post.1", "mlp_out.1"}
    conn = json.loads((out / "connections.json").read_text())["connections"]["pairs"]
    assert set(conn) == {"resid_post.1", "mlp_out.1"}
    run = json.loads((out / "run.json").read_text())
    assert {"train", "evaluate", "compare", "features", "activations", "ablation"} <= set(run["seconds"])

    # uniform bins: equal-width over (0, max], counts add up to the firings, per_bin examples
    index = FeatureIndex.open(result["feature_indexes"][result["featured"]["label"]])
    n_bins, per_bin = (index.meta["collection"]["config"][k] for k in ("n_bins", "per_bin"))
    checked = 0
    for f in range(index.d_sae):
        feat = index.feature(f)
        if not feat["count"]:
            continue
        assert sum(feat["bin_counts"]) == feat["count"]
        top = feat["max_act"]
        shown = {}
        for e in index.examples(f):
            if e["kind"] == "bin":
                lo, hi = e["bin"] * top / n_bins, (e["bin"] + 1) * top / n_bins
                assert lo - 1e-5 <= e["act"] <= hi + 1e-5
                shown[e["bin"]] = shown.get(e["bin"], 0) + 1
        for b in range(n_bins):
            assert shown.get(b, 0) == min(per_bin, feat["bin_counts"][b])
        checked += 1
    assert checked > 5

    # a finished study resumes to the same results without training again
    again = run_dictionaries(lm, cfg, out, resume=True)
    assert again["results"]["grid"] == res["grid"]
    assert again["seconds"]["train"] == result["seconds"]["train"]


def test_topk_grid_and_labels():
    from saelab.studies.dictionaries_config import grid_specs

    cfg = DictionariesConfig(arch="topk", widths=(1, 4), k=(8, 16), seeds=2)
    specs, points = grid_specs(cfg, "resid_post.2", 64, ("resid_post.3", "mlp_out.3"))
    assert len(specs) == 2 * 2 * 2 + 2 and len({s.label for s in specs}) == len(specs)
    assert {(s.width, s.k) for s in specs[:8]} == {(64, 8), (64, 16), (256, 8), (256, 16)}
    assert [p.role for p in points[-2:]] == ["connect", "connect"]
    assert all(s.width == 256 and s.k == 8 for s in specs[-2:])  # featured width and k
    with pytest.raises(BadValueError, match="--k"):
        grid_specs(DictionariesConfig(arch="topk", widths=(1,), k=(100,)), "resid_post.2", 64)


@pytest.mark.parametrize("args", [
    ["--widths", "0,2"], ["--widths", "1,x"], ["--l1", "-0.1"], ["--l1", "0"], ["--arch", "gated"],
])
def test_cli_refuses_bad_lists_before_loading_anything(args, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import saelab.models.load
    from saelab.cli import app

    def reached(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(saelab.models.load, "load_model", reached)
    result = CliRunner().invoke(app, ["study", "dictionaries", "--out", str(tmp_path / "d"), *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output


def test_spec_tag_names_and_seeds_grid_points_apart():
    a = SAESpec("resid_post.2", arch="relu", width=64, k=1, l1=0.1, tag="l1_0.1.s0")
    b = SAESpec("resid_post.2", arch="relu", width=64, k=1, l1=0.1, tag="l1_0.1.s1")
    assert a.label == "resid_post.2-relu-64-l1_0.1.s0" and a.label != b.label
    assert SAESpec("resid_post.2").label == "resid_post.2-batchtopk-4608-k32"  # no tag: unchanged
    cfg = TrainConfig(saes=(a, b), tokens=256, batch_size=256)
    wa, wb = (SAEObjective(s, 16, cfg, torch.float32, {}).sae.W_enc for s in (a, b))
    assert not torch.equal(wa, wb)  # the tag seeds the initialisation
    with pytest.raises(BadValueError, match="tag"):
        SAESpec("resid_post.2", tag="../x")
