import json

import pytest
import torch
from synthetic import write_synthetic_cache

from saelab.errors import SaelabError, ShapeMismatchError
from saelab.sae.formats import load_sae
from saelab.train.config import SAESpec, TrainConfig
from saelab.train.trainer import train

TOKENS = 40_960


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    dictionary = write_synthetic_cache(folder, n_tokens=TOKENS)
    return folder, dictionary


def config(arch="topk", **kw) -> TrainConfig:
    spec = SAESpec("resid_post.0", arch=arch, width=128, k=3)
    base = dict(saes=(spec,), tokens=TOKENS, batch_size=512, warmup_steps=10, lr=3e-3,
                dead_tokens=5000, checkpoint_every=0)
    return TrainConfig(**(base | kw))


def mcs(true, learned):
    w = learned / learned.norm(dim=1, keepdim=True)
    return (true @ w.T).max(dim=1).values.mean().item()


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_topk_family_recovers_the_true_dictionary(cache, tmp_path, arch):
    folder, dictionary = cache
    result = train(config(arch, tokens=2 * TOKENS), folder, tmp_path)
    stats = result.final[f"resid_post.0-{arch}-128-k3"]
    assert stats["fvu"] < 0.35 and stats["l0"] == pytest.approx(3, abs=0.01)
    sae = load_sae(result.sae_dirs[f"resid_post.0-{arch}-128-k3"])
    assert mcs(dictionary, sae.W_dec.detach()) > 0.8


def test_saved_sae_takes_raw_activations(tmp_path):
    """Training sees inputs scaled to unit norm; the saved SAE takes the raw ones."""
    from synthetic import sparse_data

    write_synthetic_cache(tmp_path / "cache", n_tokens=TOKENS, scale=7.0)
    result = train(config(), tmp_path / "cache", tmp_path)
    trained_fvu = next(iter(result.final.values()))["fvu"]
    sae = load_sae(next(iter(result.sae_dirs.values())))
    x = sparse_data(TOKENS + 4096)[0][-4096:] * 7.0  # unseen rows, same dictionary
    fvu = ((sae(x).x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert fvu == pytest.approx(trained_fvu, abs=0.08)
    meta = json.loads((next(iter(result.sae_dirs.values())) / "cfg.json").read_text())["metadata"]
    assert meta["site"] == "resid_post.0" and meta["tokens_trained"] == TOKENS


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_dense_architectures_train(cache, tmp_path, arch):
    folder, _ = cache
    result = train(config(arch), folder, tmp_path)
    stats = next(iter(result.final.values()))
    assert stats["fvu"] < 0.5 and stats["loss"] == stats["loss"]  # finite
    load_sae(next(iter(result.sae_dirs.values())))


def test_several_saes_share_one_stream(cache, tmp_path):
    folder, _ = cache
    specs = (SAESpec("resid_post.0", "topk", 64, k=3), SAESpec("resid_post.0", "topk", 128, k=3))
    result = train(config(saes=specs), folder, tmp_path)
    assert len(result.sae_dirs) == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["sae"] for r in rows} == {s.label for s in specs}


def test_resume_ends_with_the_same_weights(cache, tmp_path):
    folder, _ = cache
    cfg = config(checkpoint_every=10_240, deterministic=True)
    whole = train(cfg, folder, tmp_path / "whole")

    class Stop(Exception):
        pass

    def stop_midway(done, total, stats):
        if done >= 25_000:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, folder, tmp_path / "parts", on_progress=stop_midway)
    assert (tmp_path / "parts" / "ckpt" / "latest.json").is_file()
    resumed = train(cfg, folder, tmp_path / "parts", resume=True)
    a = load_sae(next(iter(whole.sae_dirs.values())))
    b = load_sae(next(iter(resumed.sae_dirs.values())))
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


def test_resume_with_a_changed_config_is_refused(cache, tmp_path):
    folder, _ = cache
    train(config(), folder, tmp_path)
    with pytest.raises(SaelabError, match="batch_size: was 512, now 1024"):
        train(config(batch_size=1024), folder, tmp_path, resume=True)
    with pytest.raises(SaelabError, match="already holds a training run"):
        train(config(), folder, tmp_path)


def test_wrong_site_is_refused(cache, tmp_path):
    folder, _ = cache
    with pytest.raises(ShapeMismatchError, match="resid_post.0"):
        train(config(saes=(SAESpec("attn_z.3", "topk", 64, k=3),)), folder, tmp_path)


def test_nan_batches_are_skipped_then_refused(tmp_path):
    from saelab.data.store import ShardWriter

    writer = ShardWriter(tmp_path / "c", {"sites": {"resid_post.0": 8}, "model": "m",
                                          "model_hash": "", "corpus": "", "corpus_hash": "",
                                          "context": 8}, tokens_target=1)
    x = torch.randn(64, 8, 8)
    x[:, 2, 3] = float("nan")  # a NaN in every context: every batch is poisoned
    writer.append(torch.zeros(64, 8, dtype=torch.long), torch.zeros(64, 8, dtype=torch.bool),
                  {"resid_post.0": x})
    spec = SAESpec("resid_post.0", "topk", 16, k=2)
    with pytest.raises(SaelabError, match="NaN/inf"):
        train(TrainConfig(saes=(spec,), tokens=4096, batch_size=64, nan_limit=3),
              tmp_path / "c", tmp_path / "run")


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="arch='gated'"):
        SAESpec("resid_post.0", arch="gated")
    with pytest.raises(ValueError, match="k <= width"):
        SAESpec("resid_post.0", width=8, k=16)


# ---------------------------------------------------------------------- sparse kernels
def _codes(kind: str, pre: torch.Tensor, k: int):
    from saelab.sae.base import SAEConfig, build_sae
    from saelab.train.sparse_ops import topk_codes

    if kind == "batchtopk":  # a variable number per row, chosen across the batch
        sae = build_sae(SAEConfig("batchtopk", d_in=4, d_sae=pre.shape[1], k=k))
        rows, cols, _ = sae.batch_topk(pre)
        return rows, cols
    if kind == "none_active":
        return topk_codes(-pre.abs() - 1, k)
    return topk_codes(pre, k)  # k per row but fewer where under k entries are positive


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "none_active"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_kernels_match_dense_autograd(kind, dtype):
    """SparseEncodeGrad + SparseDecode give the dense autograd gradients of a top-k step."""
    from saelab.train.sparse_ops import SparseCodes, SparseDecode, SparseEncodeGrad

    n, d, f, k = 64, 16, 40, 5
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    ref = {"W_enc": torch.randn(d, f, generator=g) / d**0.5, "b_enc": torch.randn(f, generator=g),
           "W_dec": torch.randn(f, d, generator=g) / d**0.5, "b_dec": torch.randn(d, generator=g)}
    ref["b_enc"][:10] -= 5  # rarely active latents
    ref = {name: t.double().requires_grad_() for name, t in ref.items()}
    pre = ((x.double() - ref["b_dec"]) @ ref["W_enc"] + ref["b_enc"]).detach()
    pre[3] = -1.0  # a row without entries
    rows, cols = _codes(kind, pre, k)
    mask = torch.zeros(n, f, dtype=torch.bool)
    mask[rows, cols] = True
    per_row = mask.sum(1)
    assert per_row[3] == 0 and (kind == "none_active") == (rows.numel() == 0)
    if kind == "topk":  # k per row, fewer where fewer than k are positive
        assert per_row.max() == k and per_row.min() < k
    if kind == "batchtopk":
        assert per_row.sum() == k * n and per_row.max() > k

    # dense reference in float64: the pre-activations are recomputed with autograd
    acts = ((x.double() - ref["b_dec"]) @ ref["W_enc"] + ref["b_enc"]) * mask
    out = acts @ ref["W_dec"] + ref["b_dec"]
    (out - target.double()).pow(2).sum().backward()

    p = {name: t.detach().to(dtype).requires_grad_() for name, t in ref.items()}
    xc = x.to(dtype) - p["b_dec"]
    codes = SparseCodes(rows, cols, pre.shape)
    vals = SparseEncodeGrad.apply(xc.detach(), p["W_enc"], p["b_enc"], pre.to(dtype), codes,
                                  p["b_dec"])
    got = SparseDecode.apply(codes, vals, p["W_dec"]) + p["b_dec"]
    (got - target.to(dtype)).pow(2).sum().backward()

    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-4}
    torch.testing.assert_close(got.detach().double(), out.detach(), **tol)
    for name in ref:
        torch.testing.assert_close(p[name].grad.double(), ref[name].grad, **tol, msg=name)


def test_sparse_codes_need_rows_in_order():
    from saelab.train.sparse_ops import SparseCodes

    with pytest.raises(ValueError, match="ascending"):
        SparseCodes(torch.tensor([1, 0]), torch.tensor([0, 0]), (2, 2))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_bf16_compute_learns_what_fp32_learns(cache, tmp_path, arch):
    """bf16 compute (the default where the CPU has AMX): the encoder output stays bf16 and
    is reused across steps, the chosen values and all weights stay fp32, and the SAE
    recovers the dictionary as well as an fp32 run."""
    from synthetic import sparse_data

    from saelab.train.objective import SAEObjective

    folder, dictionary = cache
    fp32 = train(config(arch, tokens=2 * TOKENS), folder, tmp_path / "fp32")
    bf16 = train(config(arch, tokens=2 * TOKENS, dtype="bfloat16"), folder, tmp_path / "bf16")
    label = f"resid_post.0-{arch}-128-k3"
    assert bf16.final[label]["fvu"] == pytest.approx(fp32.final[label]["fvu"], abs=0.05)
    assert mcs(dictionary, load_sae(bf16.sae_dirs[label]).W_dec.detach()) > 0.8

    obj = SAEObjective(config(arch).saes[0], dictionary.shape[1], config(arch), torch.bfloat16, {})
    x = sparse_data(1024)[0]
    obj.train_step(x[:512], 4)
    buffer = obj._pre
    obj.train_step(x[512:], 4)
    assert obj._pre is buffer and buffer.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in obj.params)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in obj.params)
