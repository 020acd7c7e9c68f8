"""`saelab scope --kind transcoder` end to end on a tiny random model (2 layers, skip transcoders)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_lm import tiny_lm
from tiny_scope import saelab_app, save_tiny_llama, scope_cli
from typer.testing import CliRunner

from saelab.sae import load_sae
from saelab.sae.transcoder import Transcoder, load_transcoders
from saelab.scope import read_scope

SMALL = ["--kind", "transcoder", "--skip", "--layers", "all", "--widths", "64", "--l0", "4",
         "--arch", "batchtopk", "--tokens", "2048", "--batch-size", "512",
         "--eval-tokens", "512", "--feature-tokens", "512"]


_app = saelab_app


def _scope(model: Path, out: Path, *extra: str, args=SMALL):
    return scope_cli(model, out, *args, *extra)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", num_hidden_layers=2)


@pytest.fixture(scope="module")
def built(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tscope") / "s"
    res = _scope(model_dir, out)
    assert res.exit_code == 0, res.output
    assert "2 transcoders in" in " ".join(res.output.split())
    return out


def test_layout_on_disk(built):
    scope = read_scope(built)
    assert scope.kind == "transcoder" and scope.n_layers == 2 and len(scope.entries) == 2
    assert set(scope.stages) == {"train", "eval", "layout", "features", "report"}
    assert scope.settings["kind"] == "transcoder" and scope.settings["skip"] is True
    for layer, e in enumerate(scope.entries):
        assert e.status == "ok"
        assert (e.site, e.site_kind, e.layer, e.width, e.arch) == (
            f"mlp_in.{layer}", "mlp_in", layer, 64, "batchtopk")
        assert e.id == f"transcoder/layer_{layer}_width_64_l0_{round(e.average_l0)}"
        assert e.params == f"{e.id}/params.safetensors" and (built / e.params).is_file()
        assert (built / e.features / "index.json").is_file()
        assert e.metrics["l0"] == e.average_l0 > 0
        assert e.metrics["fvu_lo"] <= e.metrics["fvu"] <= e.metrics["fvu_hi"]
        assert {"delta_ce", "kl", "dead_frac", "dense_frac", "delta_ce_all", "kl_all"} <= set(
            e.metrics)
        assert "loss_recovered" not in e.metrics
        native = load_sae(built / e.native)
        assert isinstance(native, Transcoder) and native.cfg.skip
        assert (native.site, native.site_out) == (f"mlp_in.{layer}", f"mlp_out.{layer}")
        gemma = load_sae(built / e.id)  # Gemma Scope 2's transcoder file reads back
        assert isinstance(gemma, Transcoder) and gemma.site == f"mlp_in.{layer}"
    # the all-at-once numbers are one set's: the same in every row
    assert len({e.metrics["delta_ce_all"] for e in scope.entries}) == 1
    page = (built / "report.html").read_text()
    assert "Metrics against depth" in page and "Transcoders" in page


def test_circuit_tracer_set_loads_and_computes_as_the_native_folders(built):
    tset = load_transcoders(built / "circuit_tracer", dtype="float32")
    assert tset.layers == [0, 1]
    conf = (built / "circuit_tracer" / "config.yaml").read_text()
    assert "model_kind: transcoder_set" in conf and "feature_output_hook: hook_mlp_out" in conf
    g = torch.Generator().manual_seed(0)
    for e in read_scope(built).entries:
        native = load_sae(built / e.native, dtype="float32").eval()
        gemma = load_sae(built / e.id, dtype="float32").eval()
        x = torch.randn(128, native.d_in, generator=g) * 3
        with torch.no_grad():
            want = native(x)
            got = tset[e.layer].eval()(x)
            gs = gemma(x)
        assert (want.feats != 0).any()
        torch.testing.assert_close(got.output, want.output, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.feats, want.feats, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gs.output, want.output, rtol=1e-5, atol=1e-5)


def test_index_rows_equal_saelab_eval_of_the_set(built, model_dir, tmp_path):
    from saelab.scope.transcoders import index_metrics

    res = CliRunner().invoke(_app(), ["eval", str(built / "circuit_tracer"), "--model",
                                      str(model_dir), "--tokens", "512", "--out",
                                      str(tmp_path / "e"), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    for e in read_scope(built).entries:
        got = index_metrics(result, e.layer)
        assert got.keys() == e.metrics.keys()
        for k, v in got.items():
            assert v == pytest.approx(e.metrics[k], rel=1e-6, abs=1e-9), k


def test_resume_finishes_and_refuses_other_settings(built, model_dir):
    res = _scope(model_dir, built, "--resume")
    assert res.exit_code == 0 and "had already finished" in res.output, res.output
    res = _scope(model_dir, built, "--resume", args=[a if a != "--skip" else "--no-skip"
                                                     for a in SMALL])
    assert res.exit_code == 2 and "skip: was True, now False" in res.output, res.output


@pytest.mark.parametrize(("extra", "message"), [
    (["--sites", "resid_post"], "--kind transcoder trains at the MLPs"),
    (["--kind", "crosscoder"], "kind"),
    (["--memory-budget", "100KB"], "needs"),  # counted with the target's width too
])
def test_bad_input(model_dir, tmp_path, extra, message):
    res = _scope(model_dir, tmp_path / "s", *extra)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert not (tmp_path / "s" / "scope.json").exists()


def test_a_family_without_mlp_sites_is_refused():
    from types import SimpleNamespace

    from saelab.errors import SiteError
    from saelab.scope.plan import ScopeConfig, plan_saes

    lm = tiny_lm("llama", num_hidden_layers=2)
    taps = {k: v for k, v in lm.arch.taps.items() if k not in ("mlp_in", "mlp_out")}
    arch = SimpleNamespace(family="nomlp", n_layers=2, taps=taps)
    cfg = ScopeConfig(kind="transcoder", sites=("mlp",), widths=(64,), l0s=(4,))
    with pytest.raises(SiteError, match="this nomlp model has no MLP sites"):
        plan_saes(cfg, arch)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_replaced_forwards_from_the_layer_equal_whole_forwards(family, monkeypatch):
    """evaluate_transcoders runs each replaced forward from its block on; the numbers are
    those of whole-model forwards."""
    import contextlib

    from saelab.evals.run import EvalConfig
    from saelab.evals.transcoders import evaluate_transcoders
    from saelab.sae.testing import random_transcoder
    from saelab.scope import tail

    lm = tiny_lm(family)
    d = lm.arch.d_model
    tcs = {L: random_transcoder("relu", d_in=d, d_sae=2 * d, skip=True, layer=L, seed=L,
                                model_name=lm.name) for L in (1, lm.arch.n_layers - 1)}
    cfg = EvalConfig(tokens=128, context=32, batch_size=4, bootstrap=20)
    fast = evaluate_transcoders(lm, tcs, cfg)
    monkeypatch.setattr(tail, "skipping_blocks", lambda *a: contextlib.nullcontext())
    whole = evaluate_transcoders(lm, tcs, cfg)
    for L in ("1", str(lm.arch.n_layers - 1)):
        for name in ("delta_ce", "kl", "fvu"):
            assert fast["layers"][L]["metrics"][name]["value"] == pytest.approx(
                whole["layers"][L]["metrics"][name]["value"], rel=1e-6, abs=1e-9)
    for name in ("delta_ce", "kl"):
        assert fast["all_layers"]["metrics"][name]["value"] == pytest.approx(
            whole["all_layers"]["metrics"][name]["value"], rel=1e-6, abs=1e-9)
        assert fast["all_layers"]["metrics"][name]["value"] != 0


def test_some_layers_only_keep_their_layer_numbers_and_resume_after_a_kill(model_dir, tmp_path):
    """Killed after the layout stage, the scope resumes without training again. A
    circuit-tracer list says layer i is entry i: a set of layer 1 alone has no list, and
    reads back as layer 1 (refused as a full set: a replacement model needs layer 0)."""
    from saelab.sae.transcoder import TranscoderSetError

    out = tmp_path / "s"
    args = [a if a != "all" else "1" for a in SMALL] + ["--feature-tokens", "0", "--no-skip"]
    env = {**os.environ, "SAELAB_FAULT": "scope-layout:1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-m", "saelab", "scope", "--model", str(model_dir),
                             "--out", str(out), *args], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == 137, killed.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["done"] == ["train", "eval", "layout"]
    res = _scope(model_dir, out, "--resume", args=args)
    assert res.exit_code == 0, res.output
    scope = read_scope(out)
    assert scope.stages["train"] == record["stages"]["train"]  # not trained again
    assert "transcoders:" not in (out / "circuit_tracer" / "config.yaml").read_text()
    assert load_transcoders(out / "circuit_tracer", complete=False).layers == [1]
    with pytest.raises(TranscoderSetError, match="no transcoder for layer"):
        load_transcoders(out / "circuit_tracer")
    (entry,) = scope.entries
    assert entry.layer == 1 and entry.status == "ok" and entry.features is None
    assert not load_sae(out / entry.native).cfg.skip
