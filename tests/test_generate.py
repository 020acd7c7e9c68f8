"""generate: the cached loop equals full recomputation and HF generate; seeds are per sample."""

import pytest
import torch
from tiny_models import TINY_FAMILIES, tiny_model
from tiny_models import tiny_sae as _sae

from saelab.interventions.commands import run_generate
from saelab.interventions.edits import FeatureEdit, PatchEdit, SteerEdit, steer_feature
from saelab.interventions.generate import generate
from saelab.interventions.splice import splice
from saelab.models.hooks import capture

# Different lengths, so the batch is left-padded (by up to 4 tokens).
PROMPTS = [[5, 9, 14, 3, 22, 40, 7], [11, 12, 13], [30, 31, 8, 17, 50], [6, 6, 21, 44]]


def _model(family, eos=None):
    model = tiny_model(family)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 0
    return model


def _edits(model):
    """A feature clamp on generated tokens, a prompt-only ablation and a steer from position 6 on."""
    sae = _sae(model, "resid_mid.1", "relu", d_sae=64)
    v = 2.0 * torch.randn(32, generator=torch.Generator().manual_seed(3))
    return sae, [FeatureEdit([1, 5], "set", 3.0, positions="generated"),
                 FeatureEdit(None, "zero", positions="prompt", rows=[0, 2]),
                 SteerEdit("attn_out.0", v, positions="6:")]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_cached_generation_with_edits_equals_full_recomputation(family):
    model = _model(family)
    sae, edits = _edits(model)
    for temperature, top_p in ((0.0, 1.0), (1.0, 0.9)):
        kw = dict(max_new_tokens=9, temperature=temperature, top_p=top_p, seeds=[4, 5, 6, 7],
                  saes=sae, edits=edits, record_features=True)
        cached = generate(model, PROMPTS, **kw)
        full = generate(model, PROMPTS, use_cache=False, **kw)
        assert cached.tokens == full.tokens
        for a, b in zip(cached.samples, full.samples, strict=True):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)
            fa, fb = a.features["resid_mid.1"], b.features["resid_mid.1"]
            assert torch.allclose(fa.vals, fb.vals, atol=1e-4)
        plain = generate(model, PROMPTS, **{**kw, "edits": None})
        assert plain.tokens != cached.tokens  # the edits did something
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


@pytest.mark.parametrize("family", TINY_FAMILIES)
@torch.no_grad()
def test_greedy_without_edits_equals_hf_generate(family):
    eos = 63 if family == "gpt2" else 2
    model = _model(family, eos=[eos, 17])  # 17 is common enough to stop some rows early
    ours = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)[:, width:]
    for sample, row in zip(ours.samples, hf.tolist(), strict=True):
        assert sample.tokens == row[:len(sample.tokens)]
        if sample.stop == "eos":
            assert sample.tokens[-1] in (eos, 17)
            assert all(t == 0 for t in row[len(sample.tokens):])
        else:
            assert len(sample.tokens) == 10


def test_seeded_sampling_is_per_sample():
    model = _model("llama")
    sae, edits = _edits(model)
    kw = dict(max_new_tokens=8, temperature=1.0, saes=sae, edits=edits[:1])
    together = generate(model, PROMPTS, seeds=[10, 11, 12, 13], **kw)
    assert generate(model, PROMPTS, seeds=[10, 11, 12, 13], **kw).tokens == together.tokens
    one_by_one = generate(model, PROMPTS, seeds=[10, 11, 12, 13], batch_size=1, **kw)
    assert one_by_one.tokens == together.tokens
    shuffled = generate(model, [PROMPTS[i] for i in (3, 1, 2)], seeds=[13, 11, 12], **kw)
    assert shuffled.tokens == [together.tokens[i] for i in (3, 1, 2)]
    other = generate(model, PROMPTS, seeds=[20, 21, 22, 23], **kw)
    assert other.tokens != together.tokens
    assert generate(model, PROMPTS, seeds=10, **kw).tokens == together.tokens  # 10 + i


def test_rows_edit_only_their_samples_across_batches():
    model = _model("qwen2")
    v = 4.0 * torch.randn(32, generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=6, temperature=0)
    plain = generate(model, PROMPTS, **kw)
    steered = generate(model, PROMPTS, edits=[SteerEdit("resid_post.0", v, rows=[2])], batch_size=3, **kw)
    assert [steered.tokens[i] == plain.tokens[i] for i in range(4)] == [True, True, False, True]
    # A stored activation per sample ([B, T, d]) is split the same way.
    stored = torch.randn(4, 20, 32, generator=torch.Generator().manual_seed(1))
    patched = generate(model, PROMPTS, edits=[PatchEdit("resid_post.0", stored, positions="generated")],
                       batch_size=3, **kw)
    alone = generate(model, PROMPTS[3:], edits=[PatchEdit("resid_post.0", stored[3:], positions="generated")],
                     **kw)
    assert patched.tokens[3] == alone.tokens[0]


@torch.no_grad()
def test_recorded_features_are_those_at_the_predicting_positions():
    model = _model("gemma3")
    sae = _sae(model, "resid_post.1", "topk", d_sae=64, k=4)
    out = generate(model, PROMPTS[:2], max_new_tokens=5, temperature=0, saes=sae,
                   record_features=True, top_features=4)
    for sample in out.samples:
        seq = torch.tensor([sample.prompt_tokens + sample.tokens])
        with capture(model, "resid_post.1") as acts:
            acts.run(input_ids=seq)
        feats = sae.encode(acts["resid_post.1"])[0]  # (T, F)
        rec = sample.features["resid_post.1"]
        assert rec.positions.tolist() == list(range(len(sample.prompt_tokens) - 1, seq.shape[1] - 1))
        expected = feats[rec.positions].topk(4, dim=-1)
        assert torch.allclose(rec.vals.sort(-1).values, expected.values.sort(-1).values, atol=1e-5)


def test_bad_arguments():
    model = _model("llama")
    with pytest.raises(ValueError, match="seeds"):
        generate(model, PROMPTS, seeds=[1, 2])
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, ["text"])
    with pytest.raises(ValueError, match="top_p"):
        generate(model, PROMPTS, top_p=0)


@pytest.mark.slow
def test_embedded_greedy_matches_hf_and_steering_changes_text(embedded_lm):
    lm = embedded_lm
    prompts = ["Give me a short list of rivers.", "What is the capital of France?"]
    ours = generate(lm, prompts, chat=True, max_new_tokens=12, temperature=0)
    tok = lm.tokenizer
    enc = [tok(s.prompt)["input_ids"] for s in ours.samples]
    assert [s.prompt_tokens for s in ours.samples] == enc
    for sample in ours.samples:  # one at a time: HF's own padding is not what is under test
        ids = torch.tensor([sample.prompt_tokens])
        hf = lm.model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
        assert sample.tokens == hf[:len(sample.tokens)]
    # A large random direction at a mid layer, and a feature of a random SAE pushed hard.
    norm = 4 * 4700  # resid_post.12's mean norm is ~4.7e3 (a few huge sink positions)
    v = torch.randn(576, generator=torch.Generator().manual_seed(0))
    steer = SteerEdit("resid_post.15", v / v.norm() * 0.05 * norm, positions="generated")
    steered = generate(lm, prompts, chat=True, max_new_tokens=12, temperature=0, edits=[steer])
    assert all(a != b for a, b in zip(steered.texts, ours.texts, strict=True))
    sae = _sae(lm.model, "resid_post.12", "topk", d_sae=256, k=8)
    by_feature = generate(lm, prompts[:1], chat=True, max_new_tokens=12, temperature=0, saes=sae,
                          edits=[FeatureEdit(7, "add", 400.0)])
    assert by_feature.texts[0] != ours.texts[0]
    with splice(lm, [], edits=[steer_feature(sae, 7, 400.0)]):
        same = lm.model.generate(torch.tensor([ours.samples[0].prompt_tokens]), max_new_tokens=12,
                                 do_sample=False)[0, len(ours.samples[0].prompt_tokens):].tolist()
    assert same[:len(by_feature.tokens[0])] == by_feature.tokens[0]


@pytest.mark.slow
def test_run_generate_side_by_side(embedded_lm, tmp_path):
    from saelab.sae import save_sae

    sae = _sae(embedded_lm.model, "resid_post.12", "topk", d_sae=256, k=8)
    save_sae(sae, tmp_path / "sae")
    result = run_generate(embedded_lm, "Name a colour.", chat=True, sae=tmp_path / "sae", feature=7,
                          mode="add", strength=2.0, n=2, max_new_tokens=8, seed=3)
    rows = result.rows()
    assert [r["seed"] for r in rows] == [3, 4]
    assert all(r["edited"] != r["unedited"] for r in rows)
    settings = result.to_json()["settings"]
    assert settings["site"] == "resid_post.12" and settings["unit"] == "norm"
    # 2 site norms: the random SAE's unit-norm row is scaled to 2 N (N ~145 at resid_post.12)
    assert 50 < settings["site_norm"] < 500
    assert settings["value"] == pytest.approx(2.0 * settings["site_norm"] / float(sae.W_dec[7].detach().norm()))
    raw = run_generate(embedded_lm, "Name a colour.", chat=True, sae=sae, feature=7, strength=2.0,
                       unit="raw", n=1, max_new_tokens=4)
    assert raw.settings["value"] == 2.0 and raw.settings["site_norm"] is None
