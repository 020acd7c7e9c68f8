"""Site names, resolution, and the per-family table checked against hand computations."""

import pytest
import torch
from tiny_models import TINY_FAMILIES, tiny_model

from saelab.errors import SiteError
from saelab.models.hooks import capture
from saelab.models.sites import KINDS, RAW, Site, describe, list_sites, resolve_sites, site_width

# Every family, plus GPT-NeoX without the parallel residual (GPT-NeoX-20B style).
CASES = [(f, {}) for f in TINY_FAMILIES] + [("gpt_neox", {"use_parallel_residual": False})]
CASE_IDS = TINY_FAMILIES + ["gpt_neox_sequential"]
TOL = dict(atol=1e-5, rtol=0)


def _ids(seed=0):
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


# ---- names and resolution ---------------------------------------------------------------------


def test_site_names_and_transformerlens_aliases():
    expected = {
        "resid_pre": "blocks.3.hook_resid_pre", "resid_mid": "blocks.3.hook_resid_mid",
        "resid_post": "blocks.3.hook_resid_post", "attn_z": "blocks.3.attn.hook_z",
        "attn_out": "blocks.3.hook_attn_out", "mlp_in": "blocks.3.ln2.hook_normalized",
        "mlp_out": "blocks.3.hook_mlp_out",
    }
    for kind, tl in expected.items():
        site = Site(kind, 3)
        assert site.name == f"{kind}.3" and site.tl_name == tl
        assert Site.parse(tl) == site == Site.parse(site.name)
    assert Site(RAW, 3, "model.layers.3.mlp", "out").name == "model.layers.3.mlp:out"
    assert Site(RAW, 3, "model.layers.3.mlp", "out").tl_name is None


def test_depth_order():
    shuffled = [Site(k, layer) for layer in (1, 0) for k in reversed(KINDS)]
    assert [s.name for s in sorted(shuffled)] == [
        "resid_pre.0", "attn_z.0", "attn_out.0", "resid_mid.0", "mlp_in.0", "mlp_out.0",
        "resid_post.0", "resid_pre.1", "attn_z.1", "attn_out.1", "resid_mid.1", "mlp_in.1",
        "mlp_out.1", "resid_post.1"]
    assert Site("resid_post", 0) < Site("resid_pre", 1) < Site(RAW, 1, "model.layers.1.mlp", "out")


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    return model, describe(model)


def names(sites):
    return [s.name for s in sites]


@pytest.mark.parametrize("spec, expected", [
    ("resid_post.*", ["resid_post.0", "resid_post.1", "resid_post.2"]),
    ("*.1", [f"{k}.1" for k in KINDS]),
    ("attn_z.1*", ["attn_z.1"]),
    ("resid_post.2, attn_z.0,mlp_in.1", ["attn_z.0", "mlp_in.1", "resid_post.2"]),
    (["blocks.2.hook_resid_post", "blocks.0.attn.hook_z"], ["attn_z.0", "resid_post.2"]),
    ("blocks.*.hook_mlp_out", ["mlp_out.0", "mlp_out.1", "mlp_out.2"]),
    ("resid_post.-1", ["resid_post.2"]),
    ("resid_post.1,blocks.1.hook_resid_post,resid_post.*1", ["resid_post.1"]),  # de-duplicated
    ("model.layers.1.mlp:out, resid_post.1", ["resid_post.1", "model.layers.1.mlp:out"]),
    ("model.layers.*.self_attn.o_proj:in",
     [f"model.layers.{i}.self_attn.o_proj:in" for i in range(3)]),
    ("lm_head:out,model.embed_tokens:out,resid_pre.0",
     ["model.embed_tokens:out", "resid_pre.0", "lm_head:out"]),
])
def test_resolve(llama, spec, expected):
    _, arch = llama
    assert names(resolve_sites(arch, spec)) == expected


def test_resolve_accepts_sites_and_raw_layers(llama):
    _, arch = llama
    (raw,) = resolve_sites(arch, "model.layers.2.mlp:in")
    assert (raw.kind, raw.layer, raw.path, raw.direction) == (RAW, 2, "model.layers.2.mlp", "in")
    assert resolve_sites(arch, [Site("mlp_out", 0), "mlp_out.0"]) == [Site("mlp_out", 0)]


@pytest.mark.parametrize("spec, phrases", [
    ("resid.1", ["'resid'", "valid kinds: resid_pre", "layers 0..2"]),
    ("resid_post.3", ["layer 3", "out of range", "layers 0..2"]),
    ("resid_post.x", ["not an integer", "layers 0..2"]),
    ("foo.*", ["matches no site", "valid kinds"]),
    ("resid_post", ["'resid_post.0'", "'resid_post.*'"]),
    ("blocks.1.hook_nope", ["unknown TransformerLens hook", "blocks.L.hook_resid_post"]),
    # On RMSNorm models TransformerLens reads it before the weight: no site (tests/test_foreign_sites.py).
    ("blocks.1.ln2.hook_normalized", ["before the RMSNorm weight", "mlp_in.L"]),
    ("model.layers.1.mlp:mid", ["':in' or ':out'"]),
    ("model.layers.1.mlpp:out", ["no module 'model.layers.1.mlpp'", "model.layers.0.mlp"]),
    ("", ["no sites given"]),
])
def test_resolve_errors_say_what_exists(llama, spec, phrases):
    _, arch = llama
    with pytest.raises(SiteError) as err:
        resolve_sites(arch, spec)
    for phrase in phrases:
        assert phrase in str(err.value)


def test_unsupported_family_names_the_supported_ones():
    from transformers import AutoModelForCausalLM, OPTConfig

    cfg = OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                    num_attention_heads=2, word_embed_proj_dim=16)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(SiteError) as err:
        describe(model)
    for phrase in ("'opt'", "llama", "gemma2", "gemma3", "gpt2", "gpt_neox", "qwen2", ":out"):
        assert phrase in str(err.value)


# ---- the table, per family ------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_describe_and_widths(family):
    model = tiny_model(family)
    arch = describe(model)
    head_dim = 16 if family.startswith("gemma") else 8
    assert (arch.family, arch.n_layers, arch.d_model, arch.d_attn_z, arch.d_mlp) == (
        family, 3, 32, 4 * head_dim, 64)
    assert arch.parallel_residual == (family == "gpt_neox")
    assert describe(model.get_submodule(arch.base_path)).layers_path.count(".") == 0  # base model
    listed = list_sites(arch)
    assert [s for s, _ in listed] == sorted(s for s, _ in listed) and len(listed) == 3 * len(KINDS)
    assert {s.kind: w for s, w in listed if s.layer == 0} == {
        k: (4 * head_dim if k == "attn_z" else 32) for k in KINDS}
    attn_z_path, _ = arch.tap(Site("attn_z", 1))
    assert site_width(arch, f"{attn_z_path}:in") == 4 * head_dim
    assert site_width(arch, f"{arch.layers_path}.1:out") == 32
    with pytest.raises(SiteError, match="names 3 sites"):
        site_width(arch, "resid_post.*")


def test_raw_site_of_unknown_width(llama):
    _, arch = llama
    with pytest.raises(SiteError, match="capture it once"):
        site_width(arch, "model.layers.0.mlp.act_fn:out")


def _family_parts(model, arch, layer):
    """(z -> attn_out, mlp_in -> mlp_out, final norm), written out by hand for each family."""
    block = model.get_submodule(f"{arch.layers_path}.{layer}")
    f = arch.family
    if f in ("llama", "qwen2"):
        return block.self_attn.o_proj, block.mlp, model.model.norm
    if f.startswith("gemma"):
        return (lambda z: block.post_attention_layernorm(block.self_attn.o_proj(z)),
                lambda x: block.post_feedforward_layernorm(block.mlp(x)), model.model.norm)
    if f == "gpt2":
        return (lambda z: block.attn.resid_dropout(block.attn.c_proj(z)), block.mlp,
                model.transformer.ln_f)
    return block.attention.dense, block.mlp, model.gpt_neox.final_layer_norm


# The norm in front of each family's MLP.
MLP_NORM = {"llama": "post_attention_layernorm", "qwen2": "post_attention_layernorm",
            "gemma2": "pre_feedforward_layernorm", "gemma3": "pre_feedforward_layernorm",
            "gpt2": "ln_2", "gpt_neox": "post_attention_layernorm"}


@pytest.mark.parametrize("family, overrides", CASES, ids=CASE_IDS)
@torch.no_grad()
def test_site_values_match_hand_computation(family, overrides):
    model = tiny_model(family, **overrides)
    arch = describe(model)
    ids = _ids()
    with capture(model, "*.*", stop_early=False) as acts:
        acts.run(input_ids=ids, output_hidden_states=True)
    hidden = acts.output.hidden_states
    assert len(acts) == 3 * len(KINDS)
    assert torch.allclose(acts["resid_pre.0"], hidden[0], **TOL)
    for L in range(arch.n_layers):
        a = {k: acts[f"{k}.{L}"] for k in KINDS}
        assert torch.allclose(a["resid_mid"], a["resid_pre"] + a["attn_out"], **TOL)
        assert torch.allclose(a["resid_post"], a["resid_mid"] + a["mlp_out"], **TOL)
        to_attn_out, to_mlp_out, final_norm = _family_parts(model, arch, L)
        assert torch.allclose(to_attn_out(a["attn_z"]), a["attn_out"], **TOL)
        assert torch.allclose(to_mlp_out(a["mlp_in"]), a["mlp_out"], **TOL)
        # The MLP reads the normalized resid_mid, or resid_pre under the parallel residual.
        norm = getattr(model.get_submodule(f"{arch.layers_path}.{L}"), MLP_NORM[arch.family])
        mlp_reads = a["resid_pre"] if arch.parallel_residual else a["resid_mid"]
        assert torch.allclose(norm(mlp_reads), a["mlp_in"], **TOL)
        if L + 1 < arch.n_layers:
            assert torch.equal(acts[f"resid_pre.{L + 1}"], a["resid_post"])
            # HF's hidden_states[L + 1] is block L's output, except the last one (below).
            assert torch.allclose(hidden[L + 1], a["resid_post"], **TOL)
        else:
            # HF replaces the last hidden state by the final norm's output.
            assert torch.allclose(hidden[-1], final_norm(a["resid_post"]), **TOL)
