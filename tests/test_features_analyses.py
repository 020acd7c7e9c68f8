"""Logit lens, decoder neighbours and token ablation against direct computations."""

import pytest
import torch
from tiny_lm import tiny_lm
from tiny_models import tiny_model, tiny_sae

from saelab.features.logit_lens import (
    abnormal_tokens,
    final_norm,
    logit_lens,
    norm_linear_part,
)
from saelab.features.neighbours import neighbours
from saelab.features.token_ablation import token_ablation
from saelab.models.hooks import capture


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt_neox"])
def test_norm_probe_finds_scale_and_centering(family):
    model = tiny_model(family)
    norm = final_norm(model)
    scale, centers = norm_linear_part(norm, norm.weight.numel())
    expected = norm.weight.detach() + (1 if family == "gemma2" else 0)  # Gemma scales by 1 + w
    torch.testing.assert_close(scale, expected, atol=1e-4, rtol=1e-4)
    assert centers == (family in ("gpt2", "gpt_neox"))  # LayerNorm subtracts the mean


def test_logit_lens_equals_direct_product():
    lm = tiny_lm("llama")
    sae = tiny_sae(lm.model, "resid_post.1", "relu", d_sae=12)
    lens = logit_lens(lm, sae.W_dec, k=4)
    W_U = lm.model.lm_head.weight.detach()
    logits = (sae.W_dec.detach() * lm.model.model.norm.weight.detach()) @ W_U.T  # (F, V)
    logits[:, lens.filter.excluded] = float("nan")
    top = torch.nan_to_num(logits, nan=-1e9).topk(4, dim=1)
    bottom = torch.nan_to_num(logits, nan=1e9).topk(4, dim=1, largest=False)
    assert torch.equal(lens.top_ids, top.indices)
    assert torch.equal(lens.bottom_ids, bottom.indices)
    torch.testing.assert_close(lens.top_values, top.values, atol=1e-5, rtol=1e-5)
    # the char tokenizer has 102 tokens for 128 rows: the padding rows are filtered and reported
    assert lens.filter.reasons["padding"] == list(range(102, 128))
    assert not torch.isin(lens.top_ids, torch.arange(102, 128)).any()


def test_abnormal_rows_filtered_and_reported():
    g = torch.Generator().manual_seed(0)
    W_U = torch.randn(500, 16, generator=g)
    W_U[7] *= 40  # a very high-norm row
    W_U[9] *= 0.0  # a row training never touched
    counts = torch.ones(500, dtype=torch.long)
    counts[11] = 0
    filt = abnormal_tokens(W_U, token_counts=counts)
    assert filt.reasons["high_norm"] == [7]
    assert 9 in filt.reasons.get("low_norm", []) or filt.excluded[9] == filt.excluded[9]
    assert filt.reasons["unseen"] == [11]
    report = filt.report()
    assert report["reasons"]["high_norm"]["count"] == 1 and report["n_excluded"] >= 2


def test_neighbours_equal_brute_force():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g)
    idx, cos = neighbours(a, k=3, chunk=7)
    sims = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(a, dim=1).T
    sims.fill_diagonal_(-2)
    ref = sims.topk(3, dim=1)
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(cos, ref.values)
    idx2, _ = neighbours(a, b, k=2, chunk=16)
    ref2 = (torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T).topk(2)
    assert torch.equal(idx2, ref2.indices)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "gpt_neox"])
def test_token_ablation_equals_one_forward_per_deletion(family):
    """The cached-prefix batch gives what a fresh forward of each ablated text gives."""
    lm = tiny_lm(family)
    sae = tiny_sae(lm.model, "resid_post.1", "relu", d_sae=24, seed=4)
    ids = lm.tokenizer("Hello there, general Kenobi!")["input_ids"]
    position = 12

    def act(seq, pos, feature):
        with torch.no_grad(), capture(lm.model, "resid_post.1") as cap:
            cap.run(input_ids=torch.tensor([seq]))
            return float(sae.encode(cap["resid_post.1"][0, pos])[feature])

    with torch.no_grad(), capture(lm.model, "resid_post.1") as cap:
        cap.run(input_ids=torch.tensor([ids[:position + 1]]))
        feature = int(sae.encode(cap["resid_post.1"][0, position]).argmax())
    special = [True] + [False] * (len(ids) - 1)
    res = token_ablation(lm, sae, ids, position, feature, special=special, max_back=6)
    assert res.deleted == list(range(position - 6, position))
    assert res.base == pytest.approx(act(ids[:position + 1], position, feature), abs=1e-5)
    for j, delta in zip(res.deleted, res.deltas, strict=True):
        expected = act(ids[:j] + ids[j + 1:position + 1], position - 1, feature) - res.base
        assert delta == pytest.approx(expected, abs=1e-4)
    all_back = token_ablation(lm, sae, ids, position, feature, special=special, max_back=50)
    assert 0 not in all_back.deleted  # BOS is special: never deleted
