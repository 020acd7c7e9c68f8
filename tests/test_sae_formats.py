"""SAE file formats: round trips, cross-format conversions, peers' files built by hand."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from saelab.sae import SAE, detect_format, load_sae, save_sae
from saelab.sae.commands import app
from saelab.sae.formats import FormatError
from saelab.sae.formats.gemma_scope import scope_folder
from saelab.sae.info import convert_sae, format_info, sae_info
from saelab.sae.testing import random_sae

ARCHS = ["relu", "jumprelu", "topk", "batchtopk"]
# format -> architectures it can store (others are refused with FormatError)
EXPRESSIBLE = {
    "saelens": set(ARCHS),
    "gemma-scope": {"relu", "jumprelu", "batchtopk"},
    "gemma-scope-2": {"relu", "jumprelu", "batchtopk"},
    "sparsify": {"topk"},
}


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(5, 9, 16, generator=torch.Generator().manual_seed(2))


def feats_and_recon(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = sae(x)
    return out.feats, out.x_hat


def same_tensors(a: SAE, b: SAE) -> None:
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


@pytest.mark.parametrize("fmt", list(EXPRESSIBLE))
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_round_trip(
    fmt: str, arch: str, apply_b_dec: bool, tmp_path: Path, x: torch.Tensor
) -> None:
    sae = random_sae(arch, apply_b_dec_to_input=apply_b_dec)
    if arch not in EXPRESSIBLE[fmt]:
        with pytest.raises(FormatError, match="stores"):
            save_sae(sae, tmp_path / "out", fmt)
        assert not (tmp_path / "out").exists()  # refused before anything was written
        return
    save_sae(sae, tmp_path / "out", fmt)
    assert detect_format(tmp_path / "out")[0] == fmt
    loaded = load_sae(tmp_path / "out")
    f0, x0 = feats_and_recon(sae, x)
    f1, x1 = feats_and_recon(loaded, x)
    exported = sae.for_export()
    # Identical tensors whenever the format stores the SAE as it is; a b_dec
    # subtraction folded into b_enc (Gemma Scope) or out of it (sparsify) rounds.
    exact = (
        fmt == "saelens"
        or (arch == "jumprelu" and not apply_b_dec)
        or fmt == "sparsify"
        and apply_b_dec
    )
    if exact:
        same_tensors(exported, loaded)
        assert loaded.cfg.replace(metadata={}) == exported.cfg.replace(metadata={})
        torch.testing.assert_close(f1, f0, rtol=0, atol=0)
    else:
        torch.testing.assert_close(f1, f0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1, x0, rtol=1e-5, atol=1e-5)
    assert exported.cfg.metadata.items() <= loaded.cfg.metadata.items()  # provenance survives
    assert loaded.cfg.site == "resid_post.3" and loaded.cfg.hook_name == "blocks.3.hook_resid_post"
    # Writing what was read gives back the same bytes' worth: a second trip is exact.
    save_sae(loaded, tmp_path / "again", fmt)
    again = load_sae(tmp_path / "again")
    same_tensors(loaded, again)
    assert again.cfg == loaded.cfg
    assert not list((tmp_path / "out").glob(".*.tmp"))  # no temporaries left behind


def test_cross_format_chains(tmp_path: Path, x: torch.Tensor) -> None:
    jr = random_sae("jumprelu")
    path = tmp_path / "a"
    save_sae(jr, path, "saelens")
    for i, fmt in enumerate(["gemma-scope", "gemma-scope-2", "saelens"]):
        convert_sae(path, tmp_path / f"jr{i}", fmt)
        path = tmp_path / f"jr{i}"
    torch.testing.assert_close(
        feats_and_recon(load_sae(path), x), feats_and_recon(jr, x), rtol=1e-5, atol=1e-5
    )

    tk = random_sae("topk", apply_b_dec_to_input=False)
    save_sae(tk, tmp_path / "t0", "saelens")
    convert_sae(tmp_path / "t0", tmp_path / "t1", "sparsify")
    convert_sae(tmp_path / "t1", tmp_path / "t2", "saelens")
    torch.testing.assert_close(
        feats_and_recon(load_sae(tmp_path / "t2"), x), feats_and_recon(tk, x), rtol=1e-5, atol=1e-5
    )


def test_gemma_scope_npz_by_hand(tmp_path: Path) -> None:
    """A params.npz in the published layout loads and matches the formula computed by hand."""
    rng = np.random.default_rng(0)
    d, w = 8, 16384
    params = {
        "W_enc": rng.normal(size=(d, w)).astype(np.float32) / 3,
        "W_dec": rng.normal(size=(w, d)).astype(np.float32),
        "b_enc": rng.normal(size=w).astype(np.float32) * 0.1,
        "b_dec": rng.normal(size=d).astype(np.float32),
        "threshold": rng.uniform(0.2, 0.8, size=w).astype(np.float32),
    }
    folder = tmp_path / "gemma-scope-2b-pt-res" / scope_folder(5, w, 12)
    assert str(folder).endswith("layer_5/width_16k/average_l0_12")
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **params)

    sae = load_sae(folder / "params.npz")
    x = rng.normal(size=(6, d)).astype(np.float32)
    pre = x @ params["W_enc"] + params["b_enc"]
    acts = (pre > params["threshold"]) * np.maximum(pre, 0)
    recon = acts @ params["W_dec"] + params["b_dec"]
    out = sae(torch.from_numpy(x))
    np.testing.assert_allclose(out.feats.detach().numpy(), acts, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.x_hat.detach().numpy(), recon, rtol=1e-4, atol=1e-4)
    assert (sae.cfg.architecture, sae.cfg.apply_b_dec_to_input) == ("jumprelu", False)
    m = sae.cfg.metadata
    assert (m["site"], m["hook_name"], m["model_name"], m["l0"]) == (
        "resid_post.5", "blocks.5.hook_resid_post", "google/gemma-2-2b", 12,
    )  # fmt: skip
    info = sae_info(folder)
    assert (info["format"], info["l0"], info["d_sae"]) == ("gemma-scope", 12, w)


def test_gemma_scope_2_by_hand(tmp_path: Path, x: torch.Tensor) -> None:
    ref = random_sae("jumprelu", apply_b_dec_to_input=False)
    folder = tmp_path / "resid_post" / "layer_7_width_16k_l0_medium"
    folder.mkdir(parents=True)
    save_file({k.lower(): v for k, v in ref.tensors().items()}, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "model_name": "gemma-3-270m",
        "hf_hook_point_in": "model.layers.7.output",
    }))  # fmt: skip
    sae = load_sae(folder)
    same_tensors(sae, ref)
    m = sae.cfg.metadata
    assert (m["site"], m["hook_name"], m["model_name"], m["l0_label"]) == (
        "resid_post.7", "blocks.7.hook_resid_post", "google/gemma-3-270m", "medium",
    )  # fmt: skip


def test_sparsify_by_hand(tmp_path: Path, x: torch.Tensor) -> None:
    """sparsify's own layout and its encode: topk(relu(linear(x - b_dec)))."""
    g = torch.Generator().manual_seed(3)
    enc_w, enc_b = torch.randn(64, 16, generator=g), torch.randn(64, generator=g) * 0.1
    W_dec, b_dec = torch.randn(64, 16, generator=g), torch.randn(16, generator=g)
    folder = tmp_path / "run" / "layers.6"
    folder.mkdir(parents=True)
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec},
              str(folder / "sae.safetensors"))  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 4, "normalize_decoder": True,
        "num_latents": 0, "k": 5, "multi_topk": False, "skip_connection": False, "d_in": 16,
    }))  # fmt: skip
    (tmp_path / "run" / "config.json").write_text(
        json.dumps({"model": "HuggingFaceTB/SmolLM2-135M"})
    )
    sae = load_sae(folder)
    vals, idx = torch.relu(torch.nn.functional.linear(x - b_dec, enc_w, enc_b)).topk(5)
    recon = (vals.unsqueeze(-1) * W_dec[idx]).sum(-2) + b_dec
    out = sae(x)
    torch.testing.assert_close(out.feats.gather(-1, idx), vals)
    torch.testing.assert_close(out.x_hat, recon, rtol=1e-5, atol=1e-5)
    assert (sae.cfg.site, sae.cfg.model_name, sae.cfg.k) == (
        "resid_post.6",
        "HuggingFaceTB/SmolLM2-135M",
        5,
    )


def _dl_state_dict(cls: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A dictionary_learning state dict of class `cls`, with that class's key names."""
    D, F = 16, 64

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    if cls == "MatryoshkaBatchTopKSAE":
        return {"W_enc": r(D, F) / 4, "b_enc": r(F) * 0.1 - 0.3, "W_dec": r(F, D), "b_dec": r(D),
                "k": torch.tensor(4, dtype=torch.int), "threshold": torch.tensor(0.3),
                "group_sizes": torch.tensor([16, 48])}  # fmt: skip
    if cls == "JumpReluAutoEncoder":
        return {"W_enc": r(D, F) / 4, "b_enc": r(F) * 0.1, "W_dec": r(F, D), "b_dec": r(D),
                "threshold": torch.rand(F, generator=g) * 0.5}  # fmt: skip
    sd = {
        "encoder.weight": r(F, D) / 4,
        "encoder.bias": r(F) * 0.1 - 0.3,
        "decoder.weight": r(D, F),
    }
    if cls == "AutoEncoder":
        sd["bias"] = r(D)
    elif cls == "AutoEncoderNew":
        sd["decoder.bias"] = r(D)
    else:
        sd |= {"b_dec": r(D), "k": torch.tensor(4, dtype=torch.int), "threshold": torch.tensor(0.3)}
    return sd


def _dl_encode_decode(cls: str, sd: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, reconstruction) as dictionary_learning's own classes compute them."""
    if cls == "JumpReluAutoEncoder":  # raw input; features scaled by decoder row norms
        n = sd["W_dec"].norm(dim=1)
        pre = x @ sd["W_enc"] + sd["b_enc"]
        f = torch.relu(pre * (pre > sd["threshold"])) * n
        return f, (f / n) @ sd["W_dec"] + sd["b_dec"]
    if cls == "MatryoshkaBatchTopKSAE":
        post = torch.relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
        f = post * (post > sd["threshold"])
        return f, f @ sd["W_dec"] + sd["b_dec"]
    b_in = {"AutoEncoder": sd.get("bias"), "AutoEncoderNew": None}.get(cls, sd.get("b_dec"))
    post = torch.relu(
        (x if b_in is None else x - b_in) @ sd["encoder.weight"].T + sd["encoder.bias"]
    )
    if cls == "AutoEncoderTopK":
        v, i = post.topk(4)
        f = torch.zeros_like(post).scatter(-1, i, v)
    elif cls == "BatchTopKSAE":  # inference mode: the learned threshold
        f = post * (post > sd["threshold"])
    else:
        f = post
    b_out = {"AutoEncoder": sd.get("bias"), "AutoEncoderNew": sd.get("decoder.bias")}.get(
        cls, sd.get("b_dec")
    )
    return f, f @ sd["decoder.weight"].T + b_out


@pytest.mark.parametrize(
    "cls",
    [
        "AutoEncoder",
        "AutoEncoderNew",
        "AutoEncoderTopK",
        "BatchTopKSAE",
        "JumpReluAutoEncoder",
        "MatryoshkaBatchTopKSAE",
    ],
)
def test_dictionary_learning_by_hand(cls: str, tmp_path: Path, x: torch.Tensor) -> None:
    sd = _dl_state_dict(cls, torch.Generator().manual_seed(4))
    torch.save(sd, tmp_path / "ae.pt")
    trainer = {
        "dict_class": cls,
        "activation_dim": 16,
        "dict_size": 64,
        "lm_name": "EleutherAI/pythia-70m-deduped",
        "layer": 3,
        "submodule_name": "resid_post_layer_3",  # without it the site is unknown (no guess)
    }
    (tmp_path / "config.json").write_text(
        json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128}})
    )
    sae = load_sae(tmp_path)
    ref_f, ref_x = _dl_encode_decode(cls, sd, x)
    out = sae(x)
    torch.testing.assert_close(out.feats, ref_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.x_hat, ref_x, rtol=1e-4, atol=1e-4)
    assert (sae.cfg.site, sae.cfg.model_name) == ("resid_post.3", "EleutherAI/pythia-70m-deduped")
    assert 0 < (ref_f > 0).float().mean() < 0.6


def test_detection_and_listing(tmp_path: Path) -> None:
    for i, arch in enumerate(["relu", "topk"]):
        save_sae(random_sae(arch), tmp_path / "suite" / f"sae{i}", "saelens")
    with pytest.raises(FormatError, match="sae0, sae1"):
        load_sae(tmp_path / "suite")
    assert detect_format(tmp_path / "suite" / "sae1" / "cfg.json") == (
        "saelens",
        tmp_path / "suite" / "sae1",
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="no SAE found"):
        load_sae(tmp_path / "empty")
    with pytest.raises(FormatError, match="does not exist"):
        load_sae(tmp_path / "nowhere")
    with pytest.raises(FormatError, match="unknown SAE format"):
        save_sae(random_sae("relu"), tmp_path / "x", "onnx")


def test_sparsity_and_info(tmp_path: Path) -> None:
    sae = random_sae(
        "batchtopk", metadata={"site": "attn_z.2", "model_name": "smollm2-135m-instruct"}
    )
    freq = torch.full((64,), 0.25)
    save_sae(sae, tmp_path, "saelens", log_sparsity=torch.log10(freq + 1e-10))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["reshape_activations"] == "hook_z"
    assert cfg["metadata"]["hook_name"] == "blocks.2.attn.hook_z"
    info = sae_info(tmp_path)
    assert info["l0"] == pytest.approx(16.0) and info["l0_source"] == "sparsity.safetensors"
    assert (info["trained_architecture"], info["k"], info["site"]) == ("batchtopk", 4, "attn_z.2")
    text = format_info(info)
    assert "jumprelu (trained as batchtopk), k=4" in text and "smollm2-135m-instruct" in text


def test_cli(tmp_path: Path) -> None:
    save_sae(random_sae("topk"), tmp_path / "src", "saelens")
    runner = CliRunner()
    res = runner.invoke(app, ["info", str(tmp_path / "src"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["architecture"] == "topk"
    res = runner.invoke(
        app, ["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "sparsify"]
    )
    assert res.exit_code == 0 and "sparsify" in res.output
    res = runner.invoke(
        app, ["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "sparsify"]
    )
    assert res.exit_code == 2 and "not empty" in res.output
    res = runner.invoke(
        app, ["convert", str(tmp_path / "src"), str(tmp_path / "gs"), "--to", "gemma-scope"]
    )
    assert res.exit_code == 2 and "JumpReLU SAEs only" in res.output
    assert not (tmp_path / "gs").exists()


@pytest.mark.parametrize(
    "cls",
    [
        "AutoEncoder",
        "AutoEncoderNew",
        "AutoEncoderTopK",
        "JumpReluAutoEncoder",
        "MatryoshkaBatchTopKSAE",
    ],
)
def test_dictionary_learning_class_from_keys(cls: str, tmp_path: Path, x: torch.Tensor) -> None:
    """Without config.json the class is inferred from the state dict's keys."""
    sd = _dl_state_dict(cls, torch.Generator().manual_seed(6))
    torch.save(sd, tmp_path / "ae.pt")
    if cls == "AutoEncoderTopK":  # the same keys as BatchTopKSAE: loaded as TopK, with a warning
        with pytest.warns(UserWarning, match="fit AutoEncoderTopK and BatchTopKSAE alike"):
            sae = load_sae(tmp_path / "ae.pt")
    else:
        sae = load_sae(tmp_path / "ae.pt")
    assert sae.cfg.metadata["dictionary_learning_class"] == cls
    torch.testing.assert_close(sae(x).feats, _dl_encode_decode(cls, sd, x)[0], rtol=1e-5, atol=1e-5)


def test_saved_hook_name_is_the_sites_tensor(tmp_path: Path) -> None:
    """cfg.json's hook_name tells SAELens what to hook: mlp_in is TransformerLens's
    ln2.hook_normalized only on LayerNorm models (on RMSNorm ones TL reads it before the weight)."""
    for model, hook in (("gpt2", "blocks.2.ln2.hook_normalized"), ("smollm2-135m-instruct", None)):
        sae = random_sae("relu", metadata={"site": "mlp_in.2", "model_name": model,
                                           "hook_name": "blocks.2.ln2.hook_normalized"})
        save_sae(sae, tmp_path / model, "saelens")
        cfg = json.loads((tmp_path / model / "cfg.json").read_text())
        assert cfg["metadata"].get("hook_name") == hook
        assert load_sae(tmp_path / model).cfg.site == "mlp_in.2"
