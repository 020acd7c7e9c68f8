"""`saelab scope` end to end on a tiny random model: 2 layers x 3 site kinds x 2 sparsities."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_lm import tiny_lm
from tiny_scope import saelab_app, save_tiny_llama, scope_cli
from typer.testing import CliRunner

from saelab.sae import load_sae
from saelab.scope import read_scope

KINDS = ("resid_post", "attn_out", "mlp_out")
SMALL = ["--sites", ",".join(KINDS), "--layers", "all", "--widths", "64", "--l0", "4,8",
         "--arch", "batchtopk", "--tokens", "4096", "--batch-size", "512",
         "--eval-tokens", "1024", "--feature-tokens", "1024"]


_app = saelab_app


def _scope(model: Path, out: Path, *extra: str):
    return scope_cli(model, out, *SMALL, *extra)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", num_hidden_layers=2)


@pytest.fixture(scope="module")
def built(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scope") / "s"
    res = _scope(model_dir, out)
    assert res.exit_code == 0, res.output
    return out


def test_layout_on_disk(built):
    scope = read_scope(built)
    assert len(scope.entries) == 12 and scope.n_layers == 2 and scope.kind == "sae"
    assert {(e.site_kind, e.layer, e.target_l0) for e in scope.entries} == {
        (k, layer, t) for k in KINDS for layer in (0, 1) for t in (4, 8)}
    assert set(scope.stages) == {"train", "eval", "layout", "features", "report"}
    assert scope.machine["matmul_gflops"]["float32"] > 0
    for e in scope.entries:
        assert e.status == "ok"
        kind, layer, width, l0 = e.id.split("/")
        assert (kind, layer, width) == (e.site_kind, f"layer_{e.layer}", "width_64")
        assert l0.startswith(f"average_l0_{round(e.average_l0)}")
        # batchtopk: k is the target; inference uses the threshold learnt over the (short) run
        assert 0.5 * e.target_l0 < e.metrics["l0"] == e.average_l0 < 1.5 * e.target_l0
        assert e.params == f"{e.id}/params.npz" and (built / e.params).is_file()
        assert (built / e.features / "index.json").is_file()
        assert e.metrics["fvu_lo"] <= e.metrics["fvu"] <= e.metrics["fvu_hi"]
        assert {"delta_ce", "loss_recovered", "kl", "dead_frac", "dense_frac"} <= set(e.metrics)
    import pyarrow.parquet as pq

    rows = pq.read_table(built / "scope.parquet").to_pydict()
    assert rows["id"] == [e.id for e in scope.entries]
    assert rows["metric_delta_ce"] == [e.metrics["delta_ce"] for e in scope.entries]
    page = (built / "report.html").read_text()
    assert "Metrics against depth" in page and "L0–ΔCE trade-off" in page and "GFLOP/s" in page


def test_params_npz_decodes_like_the_native_folder(built):
    """Gemma Scope's formula on params.npz: pre = x W_enc + b_enc, f = pre·1[pre > θ],
    x̂ = f W_dec + b_dec, equals the native SAE's forward."""
    g = torch.Generator().manual_seed(0)
    for e in read_scope(built).entries:
        with np.load(built / e.params, allow_pickle=False) as npz:
            p = {k: npz[k].astype(np.float64) for k in npz.files}
        assert set(p) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
        native = load_sae(built / e.native, dtype="float32").eval()
        x = torch.randn(256, native.cfg.d_in, generator=g) * 3
        pre = x.double().numpy() @ p["W_enc"] + p["b_enc"]
        f = pre * (pre > p["threshold"])
        x_hat = f @ p["W_dec"] + p["b_dec"]
        with torch.no_grad():
            want = native(x).x_hat.double().numpy()
        assert (f != 0).any()
        np.testing.assert_allclose(x_hat, want, rtol=1e-4, atol=1e-4)


def test_index_rows_equal_separate_saelab_eval_runs(built, model_dir, tmp_path):
    app = _app()
    for e in read_scope(built).entries[::5]:
        res = CliRunner().invoke(app, ["eval", str(built / e.native), "--model", str(model_dir),
                                       "--tokens", "1024", "--out", str(tmp_path / "e"), "--json"])
        assert res.exit_code == 0, res.output
        from saelab.scope.run import index_metrics

        got = index_metrics(json.loads((tmp_path / "e" / "eval.json").read_text()))
        assert got.keys() == e.metrics.keys()
        for k, v in got.items():
            assert v == pytest.approx(e.metrics[k], rel=1e-9, abs=1e-12), k


def test_resume_after_a_kill_and_refusals(model_dir, tmp_path):
    out = tmp_path / "s"
    args = [sys.executable, "-m", "saelab", "scope", "--model", str(model_dir), "--out", str(out),
            *SMALL, "--layers", "1", "--l0", "4", "--feature-tokens", "0"]
    env = {**os.environ, "SAELAB_FAULT": "scope-eval:1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 137, killed.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["done"] == ["train", "eval"]
    trained = record["stages"]["train"]
    # no --resume: refused; other settings: refused, the difference shown
    res = CliRunner().invoke(_app(), ["scope", "--model", str(model_dir), "--out", str(out),
                                      *SMALL, "--layers", "1", "--l0", "4", "--feature-tokens", "0"])
    assert res.exit_code == 2 and "--resume" in res.output
    res = CliRunner().invoke(_app(), ["scope", "--model", str(model_dir), "--out", str(out),
                                      *SMALL, "--layers", "1", "--l0", "4", "--feature-tokens", "0",
                                      "--tokens", "8192", "--resume"], env={"COLUMNS": "300"})
    assert res.exit_code == 2
    assert "tokens: was 4096, now 8192" in " ".join(res.output.split())
    env.pop("SAELAB_FAULT")
    done = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    scope = read_scope(out)
    assert scope.stages["train"] == trained  # not trained again
    assert [e.status for e in scope.entries] == ["ok"] * 3
    assert all(e.features is None for e in scope.entries)


@pytest.mark.parametrize(("extra", "message"), [
    (["--layers", "2"], "layer 2 is out of range"),
    (["--sites", "resid_post,attn_zz"], "site kind 'attn_zz' is not one this llama model has"),
    (["--memory-budget", "100KB"], "needs"),
    (["--l0", "100"], "l0"),
])
def test_bad_input(model_dir, tmp_path, extra, message):
    res = _scope(model_dir, tmp_path / "s", *extra)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert not (tmp_path / "s" / "scope.json").exists()


def test_site_kind_error_lists_the_kinds():
    from saelab.errors import SiteError
    from saelab.scope.plan import ScopeConfig, plan_saes

    lm = tiny_lm("llama", num_hidden_layers=2)
    with pytest.raises(SiteError, match="it has: resid_pre, attn_z, attn_out, resid_mid, mlp_in, "
                                        "mlp_out, resid_post"):
        plan_saes(ScopeConfig(sites=("attn",), widths=(64,), l0s=(4,)), lm.arch)


def test_jumprelu_target_l0_loss_reaches_each_target():
    """The documented JumpReLU method: λ·(L0/target − 1)² pulls the mean L0 to each target."""
    from saelab.train.config import SAESpec, TrainConfig
    from saelab.train.objective import SAEObjective

    def final_l0(target: float) -> float:
        spec = SAESpec("resid_post.0", arch="jumprelu", width=64, l0_coef=1.0, target_l0=target)
        cfg = TrainConfig(saes=(spec,), tokens=256 * 200, batch_size=256, lr=1e-2,
                          sparsity_warmup=0.0)
        obj = SAEObjective(spec, 16, cfg, torch.float32, {"site": "resid_post.0"})
        g = torch.Generator().manual_seed(0)
        mix = torch.randn(64, 16, generator=g)
        for i in range(cfg.steps):  # sparse codes through a random dictionary
            codes = torch.rand(256, 64, generator=g) * (torch.rand(256, 64, generator=g) < 0.1)
            obj.train_step(codes @ mix, cfg.steps)
            if i == cfg.steps - 21:
                obj.read_stats()  # the mean over the last 20 steps follows
        return obj.read_stats()["l0"]

    l0s = [final_l0(t) for t in (2, 8, 24)]
    assert l0s[0] < l0s[1] < l0s[2]
    for got, want in zip(l0s, (2, 8, 24), strict=True):
        assert want / 2.5 < got < want * 2.5, (got, want)
    assert SAESpec("a.0", arch="jumprelu", width=64, target_l0=8).label.endswith("-l08")


def test_presets_expand_to_every_layer_and_kind():
    from saelab.scope.commands import resolve_config
    from saelab.scope.plan import plan_saes

    lm = tiny_lm("llama", num_hidden_layers=30)
    none = dict(sites=None, layers=None, widths=None, l0=None, arch=None, tokens=None,
                eval_tokens=None, feature_tokens=None, batch_size=None, corpus=None,
                context=None, seed=None)
    quick = resolve_config("m", 32, preset="quick", **none)
    planned = plan_saes(quick, lm.arch)
    assert len(planned) == 90 and {p.width for p in planned} == {64}
    assert {p.site_kind for p in planned} == {"resid_post", "attn_out", "mlp_out"}
    full = resolve_config("m", 32, preset="full", **none)
    assert full.widths == (128, 512) and full.arch == "jumprelu" and len(full.l0s) == 3
    assert full.tokens >= 10_000_000
    assert len(plan_saes(full, lm.arch)) == 90 * 2 * 3
    mine = resolve_config("m", 32, preset="quick", **{**none, "layers": "0-2", "l0": "8,16"})
    assert mine.layers == (0, 1, 2) and mine.l0s == (8, 16) and mine.arch == "batchtopk"
