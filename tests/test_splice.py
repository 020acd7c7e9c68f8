"""splice and edits: the error term keeps the model exact, edits change exactly what they say."""

import pytest
import torch
from tiny_models import TINY_FAMILIES, tiny_model
from tiny_models import tiny_sae as _sae

from saelab.errors import ShapeMismatchError, SiteError
from saelab.interventions.edits import (
    FeatureEdit,
    Frame,
    PatchEdit,
    SteerEdit,
    position_mask,
    steer_feature,
)
from saelab.interventions.splice import splice
from saelab.models.hooks import capture, patch
from saelab.sae import SAEConfig, build_sae

CASES = [(f, {}) for f in TINY_FAMILIES] + [("gpt_neox", {"use_parallel_residual": False})]
CASE_IDS = TINY_FAMILIES + ["gpt_neox_sequential"]
SITES = ["resid_post.1", "attn_z.1", "resid_mid.0", "mlp_out.2"]


def _ids(batch=2, pos=7, seed=0):
    return torch.randint(3, 60, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family, overrides", CASES, ids=CASE_IDS)
def test_splice_with_error_keeps_logits(family, overrides):
    model = tiny_model(family, **overrides)
    ids = _ids()
    with torch.no_grad():
        clean = _logits(model, ids)
    saes = [_sae(model, s, seed=i) for i, s in enumerate(SITES)]
    # With autograd on, the site really is x_hat + error (x_hat computed from the features).
    with splice(model, saes, detach_error=True, record=True) as sp:
        spliced = _logits(model, ids)
    assert torch.allclose(spliced, clean, atol=1e-5, rtol=0)
    assert set(sp.feats) == set(SITES) and sp.feats["attn_z.1"].shape[-1] == 96
    with torch.no_grad(), splice(model, saes, record=True) as sp:
        assert torch.equal(_logits(model, ids), clean)  # no-grad path: x itself
    # Without the error term the SAE's reconstruction error shows up, exactly as a patch by x_hat.
    with torch.no_grad():
        with splice(model, saes[0], keep_error=False):
            lossy = _logits(model, ids)
        with capture(model, SITES[0]) as acts:
            acts.run(input_ids=ids)
        x_hat = saes[0](acts[SITES[0]]).x_hat
        with patch(model, {SITES[0]: lambda x, ctx: x_hat}):
            assert torch.allclose(lossy, _logits(model, ids), atol=1e-5, rtol=0)
    assert not torch.allclose(lossy, clean, atol=1e-3)
    assert _hook_count(model) == 0


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk", "batchtopk"])
def test_every_architecture_splices_exactly(arch):
    model = tiny_model("gemma2")
    ids = _ids()
    sae = _sae(model, "resid_post.1", arch).eval()
    with torch.no_grad():
        clean = _logits(model, ids)
    with splice(model, sae, detach_error=True, record_grad=True) as sp:
        out = _logits(model, ids)
    assert torch.allclose(out, clean, atol=1e-5, rtol=0)
    out[:, -1].logsumexp(-1).sum().backward()
    feats, error = sp.feats["resid_post.1"], sp.errors["resid_post.1"]
    # The error is a detached leaf, so its grad is d metric / d site; features see it through W_dec.
    assert feats.grad is not None and error.grad is not None
    assert torch.allclose(feats.grad, error.grad @ sae.W_dec.T, atol=1e-5, rtol=1e-4)


def test_detached_error_blocks_gradient_upstream():
    model = tiny_model("llama")
    ids = _ids()
    sae = _sae(model, "resid_post.1")
    for p in sae.parameters():
        p.requires_grad_(False)

    def grad_at_resid_pre(**kw):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with splice(model, sae, **kw):
            model(inputs_embeds=emb, use_cache=False).logits[:, -1, 3].sum().backward()
        return emb.grad

    plain = grad_at_resid_pre(detach_error=False)
    detached = grad_at_resid_pre(detach_error=True)
    # Without detaching, the spliced site is x exactly, gradients included.
    model.zero_grad()
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=emb, use_cache=False).logits[:, -1, 3].sum().backward()
    assert torch.allclose(plain, emb.grad, atol=1e-5)
    assert not torch.allclose(detached, emb.grad, atol=1e-4)


def test_width_mismatch_names_both_widths_and_the_site():
    model = tiny_model("gemma2")  # attn_z is 64 wide, d_model 32
    sae = build_sae(SAEConfig("relu", 32, 64, metadata={"site": "attn_z.1"}))
    with pytest.raises(ShapeMismatchError, match=r"d_in=32.*attn_z\.1.*width 64"):
        splice(model, sae)
    with pytest.raises(ShapeMismatchError, match="width=16"):
        splice(model, [], edits=[SteerEdit("resid_post.0", torch.ones(16))])
    with pytest.raises(SiteError, match="no site"):
        splice(model, build_sae(SAEConfig("relu", 32, 64)))


def test_edit_mistakes_are_named():
    model = tiny_model("llama")
    a, b = _sae(model, "resid_post.0"), _sae(model, "resid_post.1")
    with pytest.raises(SiteError, match="set FeatureEdit.site"):
        splice(model, [a, b], edits=[FeatureEdit(1)])
    with pytest.raises(SiteError, match="no SAE is spliced there"):
        splice(model, [a], edits=[FeatureEdit(1, site="resid_post.2")])
    with pytest.raises(ValueError, match="out of range"):
        splice(model, [a], edits=[FeatureEdit(500)])
    with pytest.raises(ValueError, match="mode"):
        FeatureEdit(1, "bogus")
    with pytest.raises(ValueError, match="positions"):
        FeatureEdit(1, positions="later")


EDITS = [
    FeatureEdit([3, 7], "zero"),
    FeatureEdit(5, "set", 4.0, positions=[1, 4]),
    FeatureEdit([0, 2, 9], "scale", torch.tensor([2.0, -1.0, 0.5]), positions="3:"),
    FeatureEdit(11, "add", 2.5, positions="prompt"),
    FeatureEdit(None, "mean", torch.linspace(0, 1, 96), positions="2:5", rows=[1]),
]


@pytest.mark.parametrize("edit", EDITS, ids=lambda e: e.mode)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_edit_changes_site_by_decode_difference(edit, grad):
    model = tiny_model("qwen2")
    ids, site = _ids(), "resid_mid.1"
    sae = _sae(model, site, "relu")
    with torch.no_grad(), capture(model, site) as acts:
        acts.run(input_ids=ids)
    x = acts[site]
    with torch.set_grad_enabled(grad), splice(model, sae, edits=[edit]):
        with capture(model, site, detach=True) as edited_acts:
            edited_acts.run(input_ids=ids)
    with torch.no_grad():
        f = sae.encode(x)
        g = f.clone()
        pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        mask = position_mask(edit.positions, pos, torch.ones_like(pos, dtype=torch.bool))
        if edit.rows is not None:
            mask[[r for r in range(ids.shape[0]) if r not in edit.rows]] = False
        cols = torch.arange(96) if edit.features is None else torch.as_tensor(edit.features).reshape(-1)
        value = torch.as_tensor(edit.value, dtype=f.dtype)
        new = {"zero": 0 * g[..., cols], "set": value.expand_as(g[..., cols]),
               "scale": g[..., cols] * value, "add": g[..., cols] + value,
               "mean": value.expand_as(g[..., cols])}[edit.mode]
        g[..., cols] = torch.where(mask[..., None], new, g[..., cols])
        expected = x + sae.decode(g) - sae.decode(f)
    assert mask.any()
    assert torch.allclose(edited_acts[site], expected, atol=1e-5, rtol=0)
    untouched = ~mask
    if not grad:  # the no-grad path leaves unedited tokens bit-identical
        assert torch.equal(edited_acts[site][untouched], x[untouched])


@torch.no_grad()
def test_steering_a_feature_equals_adding_to_it():
    model = tiny_model("gpt2")
    ids, sae = _ids(), _sae(model, "resid_post.1")
    with splice(model, sae, edits=[FeatureEdit(4, "add", 3.0, positions="4:")]):
        by_feature = _logits(model, ids)
    with splice(model, [], edits=[steer_feature(sae, 4, 3.0, positions="4:")]):
        by_steering = _logits(model, ids)
    clean = _logits(model, ids)
    assert torch.allclose(by_feature, by_steering, atol=1e-5, rtol=0)
    assert torch.equal(by_feature[:, :4], clean[:, :4])  # causal: nothing before position 4 moves
    assert not torch.allclose(by_feature[:, 4:], clean[:, 4:], atol=1e-3)


@torch.no_grad()
def test_patch_edit_puts_a_stored_activation_in_place():
    model = tiny_model("gpt_neox")
    site, ids, other = "resid_mid.1", _ids(seed=0), _ids(seed=1)
    with capture(model, site) as acts:
        acts.run(input_ids=other)
    stored = acts[site]  # (B, T, d)
    for value, check in ((stored, stored), (stored[1], stored[1].expand_as(stored))):
        with splice(model, [], edits=[PatchEdit(site, value, positions=[2, 5])]):
            with capture(model, site) as patched:
                patched.run(input_ids=ids)
        assert torch.allclose(patched[site][:, [2, 5]], check[:, [2, 5]], atol=1e-6)
        with capture(model, site) as clean:
            clean.run(input_ids=ids)
        assert torch.equal(patched[site][:, :2], clean[site][:, :2])


def test_position_masks_with_a_frame():
    # Row 0 is left-padded by 2; prompts of 3 and 5 tokens; this chunk holds slots 0..6.
    frame = Frame(pad=torch.tensor([2, 0]), prompt_len=torch.tensor([3, 5]))

    class Ctx:
        positions = torch.arange(7)
    pos = frame.positions(Ctx)
    assert pos.tolist() == [[-2, -1, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]]
    prompt = frame.is_prompt(Ctx, pos)
    as_list = {spec: position_mask(spec, pos, prompt).int().tolist()
               for spec in ("all", "prompt", "generated", "2:", "1:3", 4)}
    assert as_list["all"] == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]
    assert as_list["prompt"] == [[0, 0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0]]
    assert as_list["generated"] == [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1, 1]]
    assert as_list["2:"] == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]]
    assert as_list["1:3"] == [[0, 0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0, 0]]
    assert as_list[4] == [[0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 0, 0]]


@pytest.mark.slow
def test_embedded_model_splices_exactly(embedded_lm):
    lm = embedded_lm
    ids = lm.tokenizer(["The capital of France is", "Lists end when"], return_tensors="pt",
                       padding=True)["input_ids"]
    with torch.no_grad():
        clean = lm.model(input_ids=ids, use_cache=False).logits
    saes = [_sae(lm.model, "resid_post.12", "topk", d_sae=512, k=16),
            _sae(lm.model, "attn_z.8", "relu", d_sae=512, seed=1)]
    with splice(lm, saes, detach_error=True, record_grad=True) as sp:
        out = lm.model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(out, clean, atol=1e-5, rtol=0)
    out[:, -1].logsumexp(-1).sum().backward()
    assert sp.feats["resid_post.12"].grad.abs().sum() > 0
