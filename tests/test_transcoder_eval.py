"""Transcoders in place of MLPs: the replacement itself, and `saelab eval` on transcoders."""

import json

import pytest
import torch
from tiny_lm import tiny_lm
from typer.testing import CliRunner

from saelab.errors import ShapeMismatchError
from saelab.evals.run import EvalConfig
from saelab.evals.transcoders import evaluate_transcoders
from saelab.interventions.splice import replace_mlps, splice
from saelab.models.hooks import capture
from saelab.sae.testing import random_transcoder
from saelab.sae.transcoder import WrongKindError, save_transcoders


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    return tiny_lm(request.param)


def _tcs(lm, layers=None, skip=True):
    d = lm.arch.d_model
    layers = range(lm.arch.n_layers) if layers is None else layers
    return {L: random_transcoder("relu", d_in=d, d_sae=4 * d, skip=skip, layer=L, seed=L,
                                 model_name=lm.name) for L in layers}


def _ids(lm):
    return lm.tokenizer(["the cat sat on the mat, said the dog"], return_tensors="pt").input_ids


@torch.no_grad()
def test_replacement_with_error_kept_is_the_model(lm):
    ids = _ids(lm)
    clean = lm.model(ids).logits
    with replace_mlps(lm, _tcs(lm), keep_error=True):
        kept = lm.model(ids).logits
    torch.testing.assert_close(kept, clean, atol=1e-4, rtol=1e-4)
    with replace_mlps(lm, _tcs(lm)):
        replaced = lm.model(ids).logits
    assert (replaced - clean).abs().max() > 1e-3


@torch.no_grad()
def test_replacement_writes_the_transcoder_output_and_chains(lm):
    ids = _ids(lm)
    tcs = _tcs(lm)
    with capture(lm.model, ["mlp_in.0", "mlp_in.1"], arch=lm.arch) as cap:
        lm.model(ids)
    with replace_mlps(lm, tcs, record=True) as rep:
        lm.model(ids)
    # layer 0 reads the clean input; its output is the transcoder's, exactly
    torch.testing.assert_close(rep.outputs[0], tcs[0](cap["mlp_in.0"]).output)
    # layer 1 reads what layer 0's replacement changed: not the clean input
    assert not torch.allclose(rep.outputs[1], tcs[1](cap["mlp_in.1"]).output, atol=1e-4)
    with replace_mlps(lm, {0: tcs[0]}, record=True) as one, capture(
            lm.model, "mlp_out.0", arch=lm.arch, stop_early=False) as out:
        lm.model(ids)
    torch.testing.assert_close(out["mlp_out.0"], one.outputs[0])


def test_kind_refusals_and_wrong_width(lm):
    tcs = _tcs(lm)
    with pytest.raises(WrongKindError, match="is a transcoder"):
        with splice(lm, tcs[0]):
            pass
    other = {0: random_transcoder("relu", d_in=lm.arch.d_model + 1, layer=0)}
    with pytest.raises(ShapeMismatchError):
        replace_mlps(lm, other)
    with pytest.raises(ShapeMismatchError, match="d_model"):
        evaluate_transcoders(lm, other, EvalConfig(tokens=64, context=32, bootstrap=0))


def test_evaluate_transcoders_metrics(lm, tmp_path):
    cfg = EvalConfig(tokens=256, context=32, batch_size=4, bootstrap=50)
    res = evaluate_transcoders(lm, _tcs(lm), cfg, out=tmp_path / "ev")
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["kind"] == "transcoders"
    assert set(res["layers"]) == {str(L) for L in range(lm.arch.n_layers)}
    for row in res["layers"].values():
        m = row["metrics"]
        assert m["fvu"]["value"] > 0 and m["l0"]["value"] > 0
        assert m["delta_ce"]["value"] is not None and m["kl"]["value"] >= 0
        assert 0 <= row["dead_fraction"] <= 1
    assert res["all_layers"]["metrics"]["delta_ce"]["value"] is not None
    # a transcoder that predicts the MLP exactly (its error added back) costs nothing:
    # checked through the same replacement with keep_error above; here the ΔCE of a
    # random transcoder is positive on average.
    assert res["all_layers"]["metrics"]["kl"]["value"] > 0


def test_cli_eval_on_a_transcoder_set(lm, tmp_path, monkeypatch):
    from saelab.cli import app

    save_transcoders(_tcs(lm), tmp_path / "set")
    import saelab.models.load as load

    monkeypatch.setattr(load, "load_model", lambda *a, **k: lm)
    monkeypatch.setattr("saelab.models.limits.config_max_positions", lambda *a, **k: None)
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "set"), "--model", lm.name, "--tokens",
                                 "64", "--context", "32", "--bootstrap", "0", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])  # after the progress bar
    assert out["kind"] == "transcoders" and out["all_layers"] is not None
