"""capture / patch: early stop, hook hygiene, patch semantics, positions under a KV cache."""

import pytest
import torch
from tiny_models import TINY_FAMILIES, tiny_model

from saelab.errors import ShapeMismatchError
from saelab.models.hooks import capture, patch
from saelab.models.kv_cache import cache_kwargs, returned_cache
from saelab.models.sites import describe

CASES = [(f, {}) for f in TINY_FAMILIES] + [("gpt_neox", {"use_parallel_residual": False})]
CASE_IDS = TINY_FAMILIES + ["gpt_neox_sequential"]
TOL = dict(atol=1e-5, rtol=0)


def _ids(batch=2, pos=7, seed=0):
    # Token 0 .. 60: never a GPT-2 eos (63) or the bos/eos ids of the others' early stop.
    return torch.randint(3, 60, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _logits(model, ids, **kw):
    return model(input_ids=ids, use_cache=False, **kw).logits


@pytest.mark.parametrize("family, overrides", CASES, ids=CASE_IDS)
@torch.no_grad()
def test_identity_patch_is_bit_identical(family, overrides):
    model = tiny_model(family, **overrides)
    ids = _ids()
    clean = _logits(model, ids)
    # Returning the same tensor skips the rewrite; a clone goes through it (and resid_mid's carry).
    for fn in (lambda x, ctx: x, lambda x, ctx: x.clone(), lambda x, ctx: None):
        with patch(model, {"*.*": fn}):
            assert torch.equal(_logits(model, ids), clean)
    assert torch.equal(_logits(model, ids), clean)


@pytest.mark.parametrize("family, overrides", CASES, ids=CASE_IDS)
@torch.no_grad()
def test_patches_that_must_agree(family, overrides):
    """Adding v at sites that feed the residual stream the same way gives the same logits."""
    model = tiny_model(family, **overrides)
    ids = _ids()
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))

    def add(x, ctx):
        return x + v

    def run(site):
        with patch(model, {site: add}):
            return _logits(model, ids)

    clean = _logits(model, ids)
    # resid_mid is captured at the MLP norm's input; the change must also reach the residual.
    assert torch.allclose(run("resid_mid.1"), run("attn_out.1"), **TOL)
    assert not torch.allclose(run("resid_mid.1"), clean, atol=1e-3)
    assert torch.allclose(run("mlp_out.1"), run("resid_post.1"), **TOL)
    assert torch.allclose(run("resid_post.1"), run("resid_pre.2"), **TOL)
    # What a capture sees inside the patch is the patched stream.
    with patch(model, {"resid_mid.1": add}), capture(model, "*.1", stop_early=False) as acts:
        acts.run(input_ids=ids)
    with capture(model, "resid_mid.1") as before:
        before.run(input_ids=ids)
    assert torch.allclose(acts["resid_mid.1"], before["resid_mid.1"] + v, **TOL)
    assert torch.allclose(acts["resid_post.1"], acts["resid_mid.1"] + acts["mlp_out.1"], **TOL)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@torch.no_grad()
def test_early_stop_gives_the_same_activations(family):
    model = tiny_model(family)
    arch = describe(model)
    ids = _ids()
    last_block = model.get_submodule(f"{arch.layers_path}.2")
    calls = []
    handle = last_block.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        sites = "attn_z.0,resid_mid.1,mlp_in.1"
        with capture(model, sites) as early:
            early.run(input_ids=ids)
        assert early.output is None and calls == []  # block 2 never ran
        with capture(model, sites, stop_early=False) as full:
            full.run(input_ids=ids)
        assert full.output is not None and calls == [1]
    finally:
        handle.remove()
    assert list(early) == ["attn_z.0", "resid_mid.1", "mlp_in.1"]
    for name in early:
        assert torch.equal(early[name], full[name])
    assert torch.equal(early["blocks.1.hook_resid_mid"], early["resid_mid.1"])  # aliases work


@torch.no_grad()
def test_bare_forward_inside_capture_is_stopped_quietly():
    model = tiny_model("llama")
    with capture(model, "resid_post.0") as acts:
        model(_ids())
        raise AssertionError("not reached: the forward stops after resid_post.0")
    assert acts["resid_post.0"].shape == (2, 7, 32)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hooks_are_gone_after_an_exception(family):
    model = tiny_model(family)
    ids = _ids()
    with torch.no_grad():
        clean = _logits(model, ids)
    before = _hook_count(model)

    def boom(x, ctx):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        with capture(model, "*.*", stop_early=False), patch(model, {"resid_post.0": lambda x, c: x * 2,
                                                                      "mlp_out.1": boom}):
            assert _hook_count(model) > before
            model(ids)
    assert _hook_count(model) == before
    with pytest.raises(ShapeMismatchError, match="resid_post.1 returned shape"):
        with patch(model, {"resid_post.1": lambda x, c: x[:, :1]}):
            model(ids)
    assert _hook_count(model) == before
    with torch.no_grad():
        assert torch.equal(_logits(model, ids), clean)


def test_capture_can_keep_the_graph():
    model = tiny_model("qwen2")
    with capture(model, "resid_post.1", detach=False) as acts:
        acts.run(input_ids=_ids())
    acts["resid_post.1"].sum().backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None


@torch.no_grad()
def test_raw_module_sites():
    model = tiny_model("llama")
    block = model.model.layers[1]
    sites = "model.layers.1.mlp:out,model.layers.1.self_attn:in,mlp_out.1,model.layers.1.input_layernorm:in"
    with capture(model, sites) as acts:
        acts.run(input_ids=_ids())
    assert torch.equal(acts["model.layers.1.mlp:out"], acts["mlp_out.1"])
    # self_attn gets hidden_states as a keyword argument
    assert torch.equal(acts["model.layers.1.self_attn:in"],
                       block.input_layernorm(acts["model.layers.1.input_layernorm:in"]))


@torch.no_grad()
def test_several_sites_at_once_and_call_counter():
    model = tiny_model("gemma3")
    seen = []

    def record(x, ctx):
        seen.append((ctx.site.name, ctx.call, x.shape[-1]))

    with patch(model, {"attn_z.1": record, "resid_post.0,mlp_in.2": record}):
        model(_ids())
        model(_ids())
    assert seen == [(n, call, w) for call in (0, 1)
                    for n, w in (("resid_post.0", 32), ("attn_z.1", 64), ("mlp_in.2", 32))]


def _fresh_generator_model(family):
    model = tiny_model(family)
    model.generation_config.eos_token_id = None  # run every step; the recompute below never stops
    model.generation_config.pad_token_id = 0
    return model


def _position_edit(v):
    # An edit that depends on absolute positions, so a wrong position shows up in the logits.
    def edit(x, ctx):
        return x + torch.sin(ctx.positions.to(x.dtype))[:, None] * v
    return edit


@pytest.mark.parametrize("family", TINY_FAMILIES)
@torch.no_grad()
def test_edit_under_cached_generate_equals_full_recomputation(family):
    model = _fresh_generator_model(family)
    prompt, steps = _ids(pos=5), 8  # 13 tokens: past the Gemma sliding window of 6
    v = 3.0 * torch.randn(32, generator=torch.Generator().manual_seed(2))
    positions = []

    def edit(x, ctx):
        positions.append(ctx.positions.tolist())
        return _position_edit(v)(x, ctx)

    with patch(model, {"resid_mid.0": edit, "attn_out.1": _position_edit(-v)}):
        out = model.generate(prompt, max_new_tokens=steps, do_sample=False, use_cache=True,
                             output_logits=True, return_dict_in_generate=True)
    assert positions == [list(range(5))] + [[5 + t] for t in range(steps - 1)]

    seq = prompt
    with patch(model, {"resid_mid.0": _position_edit(v), "attn_out.1": _position_edit(-v)}):
        for t in range(steps):
            logits = _logits(model, seq)[:, -1]
            assert torch.allclose(logits, out.logits[t], atol=1e-4, rtol=0)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(seq, out.sequences)
    plain = model.generate(prompt, max_new_tokens=steps, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    assert not torch.allclose(plain.logits[-1], out.logits[-1], atol=1e-3)  # the edit did something


@torch.no_grad()
def test_positions_with_a_manual_cache():
    model = tiny_model("llama")
    seen = []
    ids = _ids(pos=4)
    with patch(model, {"resid_pre.0": lambda x, ctx: seen.append(ctx.positions.tolist())}):
        out = model(input_ids=ids, use_cache=True)
        model(input_ids=ids[:, :2], **cache_kwargs(model, returned_cache(out)), use_cache=True)
        model(input_ids=ids)  # a fresh pass starts again at 0
    assert seen == [[0, 1, 2, 3], [4, 5], [0, 1, 2, 3]]

