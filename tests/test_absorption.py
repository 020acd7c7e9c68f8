"""Feature absorption: a planted absorbing latent is found, none is found where none was
planted, and a model that does not know first letters gets no number."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_lm import tiny_lm

from saelab.evals import absorption as ab
from saelab.sae import SAEConfig, build_sae

D, LETTERS_USED, PER_LETTER, N_ABSORBERS = 24, 4, 160, 3


def synthetic_words(seed: int = 0):
    """Words of 4 letters (a-d): x = 2 e_letter + noise; every 12th 'a' word also carries a
    token direction u_j (j = 0..2), the words an absorbing latent will take over."""
    rng = np.random.default_rng(seed)
    letters = np.repeat(np.arange(LETTERS_USED), PER_LETTER)
    X = 2 * np.eye(D)[letters] + 0.05 * rng.normal(size=(len(letters), D))
    token = np.full(len(letters), -1)
    a_words = np.flatnonzero(letters == 0)[::12]
    token[a_words] = np.arange(len(a_words)) % N_ABSORBERS
    X[a_words] += 2 * np.eye(D)[LETTERS_USED + token[a_words]]
    perm = rng.permutation(len(letters))
    wa = ab.WordActs(words=[f"w{i}" for i in range(len(letters))], X=X.astype(np.float32),
                     letters=letters, train=np.sort(perm[: len(perm) * 3 // 4]),
                     test=np.sort(perm[len(perm) * 3 // 4:]))
    return wa, token


def dictionary(planted: bool):
    """ReLU SAE: latent L reads and writes e_L (L < 4). Planted: latent 'a' is silenced by
    the token directions, and latents 4..6 read u_j and write (e_a + u_j)/sqrt(2) - they
    absorb 'a' on those words."""
    sae = build_sae(SAEConfig("relu", d_in=D, d_sae=32, metadata={"site": "resid_post.0"}))
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_dec.copy_(torch.randn(32, D, generator=torch.Generator().manual_seed(0)) * 0.1)
        sae.b_enc.fill_(-1.0)
        sae.b_enc[LETTERS_USED + N_ABSORBERS:] = -100.0  # filler latents never fire
        sae.b_dec.zero_()
        for li in range(LETTERS_USED):
            sae.W_enc[:, li] = eye[li]
            sae.W_dec[li] = eye[li]
        if planted:
            for j in range(N_ABSORBERS):
                u = eye[LETTERS_USED + j]
                sae.W_enc[:, 0] -= 3 * u
                sae.W_enc[:, LETTERS_USED + j] = 2 * u
                sae.W_dec[LETTERS_USED + j] = (eye[0] + u) / 2**0.5
    return sae.eval()


CFG = ab.AbsorptionConfig(min_letters=LETTERS_USED, bootstrap=200)


def test_a_planted_absorbing_latent_is_found():
    wa, token = synthetic_words()
    res = ab.absorption_from_acts(dictionary(planted=True), wa, CFG)
    json.dumps(res)
    assert res["model_knows_letters"] and res["passing_letters"] == ["a", "b", "c", "d"]
    assert res["per_letter"]["a"]["main_latents"] == [0]
    absorbed = {f"w{i}" for i in np.flatnonzero(token >= 0)} & {f"w{i}" for i in wa.test}
    flagged = {w["word"]: w for w in res["words"]}
    assert set(flagged) == absorbed and len(absorbed) >= 2
    for name, row in flagged.items():
        assert row["full_absorption"] and row["absorption_fraction"] == 1.0
        assert row["top_latent"] == LETTERS_USED + token[int(name[1:])]
    a = res["per_letter"]["a"]
    assert a["full_absorption_rate"] == pytest.approx(len(absorbed) / a["n_probe_true_positives"])
    assert all(res["per_letter"][x]["absorption_fraction"] == 0 for x in "bcd")
    m = res["metrics"]["mean_full_absorption_rate"]
    assert m["value"] == pytest.approx(a["full_absorption_rate"] / 4)
    assert m["ci95"][0] <= m["value"] <= m["ci95"][1]


def test_no_absorption_where_none_was_planted():
    wa, _ = synthetic_words()
    res = ab.absorption_from_acts(dictionary(planted=False), wa, CFG)
    assert res["words"] == []
    assert res["metrics"]["mean_absorption_fraction"]["value"] == 0
    assert res["metrics"]["mean_full_absorption_rate"]["value"] == 0
    assert res["metrics"]["mean_num_main_latents"] == 1


def test_word_absorption_follows_saebench_partial_case():
    cfg = ab.AbsorptionConfig()
    direction = np.array([1.0, 0.0])
    cos = np.array([1.0, 0.6, 0.05])
    # main latent carries 0.5 of P = 2; absorber (cos 0.6, act 2.5) carries 1.5 -> 1.5 / 2.0
    row = ab.word_absorption(np.array([2.0, 0.0]), np.array([0.5, 2.5, 9.0]), direction, cos,
                             [0], cfg)
    assert row["absorption_fraction"] == pytest.approx(1.5 / 2.0)
    assert not row["full_absorption"]  # the main latent fired
    assert row["absorbing_latents"] == [1]  # latent 2's cosine is under 0.1


def test_a_model_that_does_not_know_letters_gets_no_number():
    rng = np.random.default_rng(0)
    wa, _ = synthetic_words()
    wa.X = rng.normal(size=wa.X.shape).astype(np.float32)  # no letter information at all
    res = ab.absorption_from_acts(dictionary(planted=True), wa, CFG)
    assert not res["model_knows_letters"] and res["metrics"] is None
    assert "absorption means nothing here" in res["notes"][0]


def test_absorption_on_a_tiny_model_end_to_end(tmp_path):
    lm = tiny_lm("llama")
    sae = build_sae(SAEConfig("relu", d_in=32, d_sae=64, metadata={"site": "resid_post.1"}))
    res = ab.absorption(lm, sae, n_words=52, icl_examples=3, bootstrap=10, cache_dir=tmp_path)
    json.dumps(res)
    assert res["site"] == "resid_post.1" and res["n_words"] == 52  # a-z and A-Z
    assert res["model_knows_letters"] is False and res["metrics"] is None
    assert len(list(tmp_path.glob("first-letter-*.npy"))) == 1  # the model pass is cached
    other = ab.absorption(lm, sae, n_words=40, icl_examples=3, bootstrap=10, cache_dir=tmp_path)
    assert other["n_words"] == 40  # other words: a cache miss, never the 52 words' rows
    assert len(list(tmp_path.glob("first-letter-*.npy"))) == 2
    with pytest.raises(ab.ModelTooWeakError, match="does not know first letters"):
        ab.absorption(lm, sae, n_words=52, icl_examples=3, cache_dir=tmp_path, strict=True)


def test_a_scale_folded_into_the_decoder_changes_nothing():
    """Latents 100x smaller with decoder rows 100x longer reconstruct the same: the same
    absorption (SAEBench's a_i cos_i would assume unit rows and see 100x less)."""
    wa, _ = synthetic_words()
    plain = ab.absorption_from_acts(dictionary(planted=True), wa, CFG)
    sae = dictionary(planted=True)
    with torch.no_grad():
        sae.W_enc /= 100
        sae.b_enc /= 100
        sae.W_dec *= 100
    scaled = ab.absorption_from_acts(sae, wa, CFG)
    for key in ("mean_absorption_fraction", "mean_full_absorption_rate"):
        assert scaled["metrics"][key]["value"] == pytest.approx(plain["metrics"][key]["value"])
        assert plain["metrics"][key]["value"] > 0
    assert [w["word"] for w in scaled["words"]] == [w["word"] for w in plain["words"]]
