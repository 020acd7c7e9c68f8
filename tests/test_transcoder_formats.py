"""Transcoder files written by hand as each peer lays them out: read, computed by the peer's
formula, written back tensor for tensor (golden round trips)."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from saelab.errors import SaelabError
from saelab.sae import load_sae, save_sae
from saelab.sae.transcoder import (
    Transcoder,
    TranscoderSetError,
    WrongKindError,
    load_transcoders,
    save_transcoders,
)

D, F = 12, 40


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _x():
    return _rand(7, D, seed=99)


def _ct_layer(layer, *, skip=False, jump=False):
    t = {"W_enc": _rand(F, D, seed=layer) / D**0.5, "W_dec": _rand(F, D, seed=10 + layer),
         "b_enc": _rand(F, seed=20 + layer) * 0.1 - 0.2, "b_dec": _rand(D, seed=30 + layer)}
    if skip:
        t["W_skip"] = _rand(D, D, seed=40 + layer) / D
    if jump:
        t["activation_function.threshold"] = torch.rand(F, generator=torch.Generator().manual_seed(5)) * 0.3
    return t


def _ct_formula(t, x):
    pre = x @ t["W_enc"].T + t["b_enc"]
    th = t.get("activation_function.threshold")
    f = pre.relu() if th is None else pre * (pre > th)
    out = f @ t["W_dec"] + t["b_dec"]
    return out + x @ t["W_skip"].T if "W_skip" in t else out


@pytest.mark.parametrize("skip,jump", [(False, False), (True, True)])
def test_circuit_tracer_set(tmp_path, skip, jump):
    src = tmp_path / "ct"
    src.mkdir()
    layers = {L: _ct_layer(L, skip=skip, jump=jump) for L in range(3)}
    for L, t in layers.items():
        save_file(t, str(src / f"layer_{L}.safetensors"))
    (src / "config.yaml").write_text(yaml.safe_dump({
        "model_name": "google/gemma-2-2b", "model_kind": "transcoder_set",
        "feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "hook_mlp_out",
        "transcoders": [f"hf://someone/some-transcoders/layer_{L}.safetensors" for L in range(3)]}))
    tset = load_transcoders(src)
    assert tset.layers == [0, 1, 2] and tset.model_name == "google/gemma-2-2b"
    x = _x()
    for L, t in layers.items():
        tc = tset[L]
        assert (tc.site, tc.site_out, tc.cfg.skip) == (f"mlp_in.{L}", f"mlp_out.{L}", skip)
        torch.testing.assert_close(tc(x).output, _ct_formula(t, x), atol=1e-5, rtol=1e-5)
    save_transcoders(tset, tmp_path / "back", format="circuit-tracer")
    conf = yaml.safe_load((tmp_path / "back" / "config.yaml").read_text())
    assert conf["model_kind"] == "transcoder_set" and conf["feature_output_hook"] == "hook_mlp_out"
    assert conf["transcoders"] == [f"layer_{L}.safetensors" for L in range(3)]
    for L, t in layers.items():
        back = load_file(str(tmp_path / "back" / f"layer_{L}.safetensors"))
        assert set(back) == set(t)
        for name in t:
            torch.testing.assert_close(back[name], t[name])
    again = load_transcoders(tmp_path / "back")
    torch.testing.assert_close(again[1](x).output, tset[1](x).output)


def test_circuit_tracer_refusals(tmp_path):
    src = tmp_path / "ct"
    src.mkdir()
    for L in (0, 2):
        save_file(_ct_layer(L), str(src / f"layer_{L}.safetensors"))
    conf = {"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
            "feature_output_hook": "mlp.hook_out"}
    (src / "config.yaml").write_text(yaml.safe_dump(conf))
    with pytest.raises(TranscoderSetError, match="no transcoder for layer\\(s\\) 1"):
        load_transcoders(src)
    (src / "config.yaml").write_text(yaml.safe_dump(conf | {"model_kind": "cross_layer_transcoder"}))
    with pytest.raises(SaelabError, match="cross-layer"):
        load_transcoders(src)
    (src / "config.yaml").write_text(yaml.safe_dump(conf | {"transcoders": ["layer_0.safetensors",
                                                                             "layer_1.safetensors"]}))
    with pytest.raises(SaelabError, match="layer 1's file layer_1.safetensors is not at"):
        load_transcoders(src)


def test_gemma_scope_2_transcoder_transposes_the_skip(tmp_path):
    folder = tmp_path / "transcoder_all" / "layer_4_width_16k_l0_small_affine"
    folder.mkdir(parents=True)
    d_out = 10  # unequal widths: a transpose mistake cannot pass
    t = {"w_enc": _rand(D, F) / D**0.5, "w_dec": _rand(F, d_out, seed=1), "b_enc": _rand(F, seed=2) * 0.1,
         "b_dec": _rand(d_out, seed=3), "threshold": torch.full((F,), 0.1),
         "affine_skip_connection": _rand(D, d_out, seed=4) / D}
    save_file(t, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "type": "transcoder", "model_name": "gemma-3-270m",
        "hf_hook_point_in": "model.layers.4.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.4.post_feedforward_layernorm.output",
        "affine_connection": True, "width": F}))
    tc = load_sae(folder)
    assert isinstance(tc, Transcoder) and (tc.site, tc.site_out) == ("mlp_in.4", "mlp_out.4")
    assert tc.W_skip.shape == (d_out, D)
    x = _x()
    pre = x @ t["w_enc"] + t["b_enc"]
    want = (pre * (pre > 0.1)) @ t["w_dec"] + t["b_dec"] + x @ t["affine_skip_connection"]
    torch.testing.assert_close(tc(x).output, want, atol=1e-5, rtol=1e-5)
    save_sae(tc, tmp_path / "back", format="gemma-scope-2")
    back = load_file(str(tmp_path / "back" / "params.safetensors"))
    for name, value in t.items():
        torch.testing.assert_close(back[name], value)
    conf = json.loads((tmp_path / "back" / "config.json").read_text())
    assert conf["type"] == "transcoder" and conf["affine_connection"] is True
    assert conf["hf_hook_point_out"] == "model.layers.4.post_feedforward_layernorm.output"


def test_saelens_skip_transcoder(tmp_path):
    folder = tmp_path / "sl"
    folder.mkdir()
    t = {"W_enc": _rand(D, F) / D**0.5, "W_dec": _rand(F, D, seed=1), "b_enc": _rand(F, seed=2) * 0.1,
         "b_dec": _rand(D, seed=3), "W_skip": _rand(D, D, seed=4) / D}
    save_file(t, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "skip_transcoder", "d_in": D, "d_sae": F, "d_out": D, "dtype": "float32",
        "apply_b_dec_to_input": False, "hook_name_out": "blocks.1.hook_mlp_out",
        "metadata": {"model_name": "gpt2", "hook_name": "blocks.1.ln2.hook_normalized",
                     "sae_lens_version": "6.5.0"}}))
    tc = load_sae(folder)
    assert (tc.site, tc.site_out, tc.cfg.skip) == ("mlp_in.1", "mlp_out.1", True)
    x = _x()
    want = (x @ t["W_enc"] + t["b_enc"]).relu() @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T
    torch.testing.assert_close(tc(x).output, want, atol=1e-5, rtol=1e-5)
    save_sae(tc, tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "sae_weights.safetensors"))
    assert set(back) == set(t)
    for name, value in t.items():
        torch.testing.assert_close(back[name], value)
    cfg = json.loads((tmp_path / "back" / "cfg.json").read_text())
    assert cfg["architecture"] == "skip_transcoder" and cfg["hook_name_out"] == "blocks.1.hook_mlp_out"
    assert cfg["metadata"]["hook_name"] == "blocks.1.ln2.hook_normalized"


def test_sparsify_skip_transcoder(tmp_path):
    folder = tmp_path / "run" / "layers.3.mlp"
    folder.mkdir(parents=True)
    t = {"encoder.weight": _rand(F, D) / D**0.5, "encoder.bias": _rand(F, seed=2) * 0.1,
         "W_dec": _rand(F, D, seed=1), "b_dec": _rand(D, seed=3), "W_skip": _rand(D, D, seed=4) / D}
    save_file(t, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": F,
        "k": 5, "multi_topk": False, "skip_connection": True, "transcode": True, "d_in": D}))
    (folder.parent / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M"}))
    tc = load_sae(folder)
    assert (tc.site, tc.site_out, tc.cfg.k) == ("mlp_in.3", "mlp_out.3", 5)
    x = _x()
    vals, idx = (x @ t["encoder.weight"].T + t["encoder.bias"]).topk(5, dim=-1)  # no b_dec subtracted
    f = torch.zeros(7, F).scatter(-1, idx, vals.relu())
    want = f @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T
    torch.testing.assert_close(tc(x).output, want, atol=1e-5, rtol=1e-5)
    save_sae(tc, tmp_path / "back", format="sparsify")
    back = load_file(str(tmp_path / "back" / "sae.safetensors"))
    assert set(back) == set(t)
    for name, value in t.items():
        torch.testing.assert_close(back[name], value)
    cfg = json.loads((tmp_path / "back" / "cfg.json").read_text())
    assert cfg["transcode"] is True and cfg["skip_connection"] is True


def test_sae_file_is_never_a_transcoder(tmp_path):
    from saelab.sae.testing import random_sae

    for fmt in ("saelens", "gemma-scope-2", "sparsify"):
        sae = random_sae("topk" if fmt == "sparsify" else "jumprelu", d_in=D)
        save_sae(sae, tmp_path / fmt, format=fmt)
        assert not isinstance(load_sae(tmp_path / fmt), Transcoder)
        with pytest.raises(WrongKindError, match="is an SAE"):
            load_sae(tmp_path / fmt, expect="transcoder")
