"""Transcoders: the maths of every activation, the native files, sets and the kind checks."""

import pytest
import torch

from saelab.errors import SaelabError
from saelab.sae import load_sae, save_sae
from saelab.sae.testing import random_sae, random_transcoder
from saelab.sae.transcoder import (
    Transcoder,
    TranscoderSet,
    TranscoderSetError,
    WrongKindError,
    load_transcoders,
    require_sae,
    save_transcoders,
)

ARCHS = ("relu", "jumprelu", "topk", "batchtopk")


def _formula(tc, x):
    """The transcoder by its definition, from the raw tensors."""
    pre = x @ tc.W_enc + tc.b_enc
    if tc.cfg.architecture == "relu":
        f = pre.relu()
    elif tc.cfg.architecture == "jumprelu":
        f = pre * (pre > tc.threshold.clamp(min=0))
    elif tc.cfg.architecture == "batchtopk":
        f = pre * (pre > max(float(tc.threshold), 0.0))
    else:
        vals, idx = pre.relu().topk(tc.cfg.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, vals)
    out = f @ tc.W_dec + tc.b_dec
    if tc.W_skip is not None:
        out = out + x @ tc.W_skip.T
    return f, out


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_formula(arch, skip):
    tc = random_transcoder(arch, d_in=12, d_out=10, d_sae=40, skip=skip, layer=2)
    x = torch.randn(3, 5, 12)
    out = tc(x)
    f, y = _formula(tc, x)
    assert out.output.shape == (3, 5, 10) and out.feats.shape == (3, 5, 40)
    torch.testing.assert_close(out.feats, f)
    torch.testing.assert_close(out.output, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tc.decode(tc.encode(x)) + tc.skip(x), y, atol=1e-5, rtol=1e-5)
    assert (tc.site, tc.site_out, tc.layer) == ("mlp_in.2", "mlp_out.2", 2)
    assert (tc.d_in, tc.d_out, tc.d_sae) == (12, 10, 40)
    if not skip:
        assert tc.W_skip is None and not tc.skip(x).any()


def test_batchtopk_training_mode_keeps_k_per_token_on_average():
    tc = random_transcoder("batchtopk", d_in=12, d_out=10, d_sae=40, k=3).train()
    x = torch.randn(8, 12, requires_grad=True)
    out = tc(x)
    assert out.output.shape == (8, 10)
    assert int((out.feats != 0).sum()) <= 3 * 8
    out.output.sum().backward()  # differentiable end to end
    assert tc.W_dec.grad is not None and tc.W_enc.grad is not None


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_folder_round_trip(tmp_path, arch, skip):
    tc = random_transcoder(arch, d_in=12, d_out=10, d_sae=40, skip=skip, layer=1,
                           model_name="tiny")
    save_sae(tc, tmp_path / "tc")
    back = load_sae(tmp_path / "tc")
    assert isinstance(back, Transcoder) and back.cfg.skip == skip
    assert (back.site, back.site_out) == ("mlp_in.1", "mlp_out.1")
    x = torch.randn(6, 12)
    torch.testing.assert_close(back(x).output, tc(x).output, atol=1e-5, rtol=1e-5)
    import json

    raw = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    want = {"relu": "transcoder", "jumprelu": "jumprelu_transcoder", "batchtopk":
            "jumprelu_transcoder", "topk": "topk_transcoder"}[arch]
    if skip:
        want = want.replace("transcoder", "skip_transcoder")
    assert raw["architecture"] == want and raw["d_out"] == 10


def test_sae_and_transcoder_refuse_each_other(tmp_path):
    save_sae(random_transcoder("relu", layer=0), tmp_path / "tc")
    save_sae(random_sae("relu"), tmp_path / "sae")
    with pytest.raises(WrongKindError, match="is a transcoder .*not an SAE"):
        load_sae(tmp_path / "tc", expect="sae")
    with pytest.raises(WrongKindError, match="is an SAE .*not a transcoder"):
        load_sae(tmp_path / "sae", expect="transcoder")
    with pytest.raises(WrongKindError, match="is an SAE"):
        load_transcoders(tmp_path / "sae")
    assert require_sae(load_sae(tmp_path / "sae")) is not None
    with pytest.raises(SaelabError, match="stores SAEs, not transcoders"):
        save_sae(random_transcoder("relu"), tmp_path / "g", format="gemma-scope")


def test_set_round_trip_and_refusals(tmp_path):
    tcs = {L: random_transcoder("topk", layer=L, seed=L, model_name="tiny") for L in range(3)}
    tset = TranscoderSet(tcs)
    assert tset.layers == [0, 1, 2] and tset.model_name == "tiny" and tset.d_model == 16
    save_transcoders(tset, tmp_path / "set")
    back = load_transcoders(tmp_path / "set")
    assert back.layers == [0, 1, 2] and back.model_name == "tiny"
    x = torch.randn(4, 16)
    torch.testing.assert_close(back[2](x).output, tcs[2](x).output)
    back.check_model(n_layers=3, d_model=16, model_name="tiny")
    with pytest.raises(TranscoderSetError, match="layer\\(s\\) 3"):
        back.check_model(n_layers=4, d_model=16)
    with pytest.raises(TranscoderSetError, match="d_model 16 but the model's d_model is 32"):
        back.check_model(n_layers=3, d_model=32)
    with pytest.raises(TranscoderSetError, match="transcoders of tiny, not of other"):
        back.check_model(n_layers=3, d_model=16, model_name="other")
    with pytest.raises(TranscoderSetError, match="no transcoder for layer\\(s\\) 1"):
        TranscoderSet({0: tcs[0], 2: tcs[2]})
    with pytest.raises(TranscoderSetError, match="mixed widths"):
        TranscoderSet({0: tcs[0], 1: random_transcoder("topk", d_in=8, layer=1)})
    (tmp_path / "set" / "layer_1" / "cfg.json").unlink()
    (tmp_path / "set" / "layer_1" / "sae_weights.safetensors").unlink()
    with pytest.raises(TranscoderSetError, match="no transcoder for layer\\(s\\) 1"):
        load_transcoders(tmp_path / "set")


def test_sae_info_names_a_transcoder(tmp_path):
    from saelab.sae.info import format_info, sae_info

    save_sae(random_transcoder("jumprelu", d_in=12, d_out=10, skip=True, layer=3), tmp_path / "tc")
    info = sae_info(tmp_path / "tc")
    assert (info["kind"], info["d_out"], info["site_out"], info["skip"]) == (
        "transcoder", 10, "mlp_out.3", True)
    text = format_info(info)
    assert "skip transcoder" in text and "d_out=10" in text and "writes        mlp_out.3" in text
    save_sae(random_sae("relu"), tmp_path / "sae")
    assert sae_info(tmp_path / "sae")["kind"] == "sae"
