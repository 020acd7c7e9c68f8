"""SAE architectures: the interface's properties, sparse vs dense paths, weight utilities."""

import pytest
import torch

from saelab.errors import SaelabError
from saelab.sae import (
    SAE,
    BatchTopKSAE,
    JumpReLUFn,
    SAEConfig,
    StepFn,
    UnknownArchitectureError,
    build_sae,
    l1_penalty,
    register_sae,
    registered_architectures,
)
from saelab.sae.testing import random_sae

ARCHS = ["relu", "jumprelu", "topk", "batchtopk"]


def dense_reference(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(feats, x_hat) computed naively from each class docstring's formula."""
    c = sae.cfg
    xin = x - sae.b_dec if c.apply_b_dec_to_input else x
    pre = xin @ sae.W_enc + sae.b_enc
    if c.architecture == "relu":
        f = torch.relu(pre)
    elif c.architecture == "jumprelu":
        f = torch.relu(pre) * (pre > sae.threshold)
    elif c.architecture == "topk":
        v, i = torch.relu(pre).topk(c.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, i, v)
    elif sae.training:  # batchtopk, training: the k*N largest over the flattened batch
        flat = torch.relu(pre).reshape(-1)
        v, i = flat.topk(c.k * flat.numel() // c.d_sae)
        f = torch.zeros_like(flat).scatter(0, i, v).reshape(pre.shape)
    else:
        f = torch.relu(pre) * (pre > sae.threshold.float())
    return f, f @ sae.W_dec + sae.b_dec


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))


def test_registry() -> None:
    assert set(ARCHS) <= set(registered_architectures())
    with pytest.raises(UnknownArchitectureError, match="relu, topk"):
        build_sae(SAEConfig("gated", d_in=4, d_sae=8))
    assert issubclass(UnknownArchitectureError, SaelabError)

    class Dup(SAE):
        architecture = "relu"

    with pytest.raises(ValueError, match="already registered"):
        register_sae(Dup)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="d_sae"):
        SAEConfig("relu", d_in=4, d_sae=0)
    with pytest.raises(ValueError, match="k="):
        SAEConfig("topk", d_in=4, d_sae=8, k=9)
    with pytest.raises(ValueError, match="dtype"):
        SAEConfig("relu", d_in=4, d_sae=8, dtype="int8")
    with pytest.raises(ValueError, match="needs SAEConfig.k"):
        build_sae(SAEConfig("topk", d_in=4, d_sae=8))
    meta = {"site": "resid_post.1"}
    cfg = SAEConfig("relu", d_in=4, d_sae=8, metadata=meta)
    meta["site"] = "changed"
    assert cfg.site == "resid_post.1"  # the frozen config keeps its own copy
    assert cfg.with_metadata(site=None, seed=3).metadata == {"seed": 3}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_forward_matches_formula(arch: str, apply_b_dec: bool, x: torch.Tensor) -> None:
    sae = random_sae(arch, apply_b_dec_to_input=apply_b_dec)
    with torch.no_grad():
        out = sae(x)
        feats = sae.encode(x)
        x_hat = sae.decode(feats)
        ref_f, ref_x = dense_reference(sae, x)
    assert out.feats.shape == (3, 7, 64) and out.x_hat.shape == x.shape
    torch.testing.assert_close(out.feats, feats, rtol=0, atol=0)
    torch.testing.assert_close(out.x_hat, x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats, ref_f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.x_hat, ref_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.error, x - out.x_hat)
    assert 0 < (feats > 0).float().mean() < 0.5  # the test SAE is genuinely sparse
    if arch == "topk":
        assert out.top_idx.shape == out.top_vals.shape == (3, 7, 4)
        assert torch.equal(feats.gather(-1, out.top_idx), out.top_vals)
    else:
        assert out.top_idx is None and out.top_vals is None


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_decode_equals_dense(arch: str, x: torch.Tensor) -> None:
    sae = random_sae(arch)
    with torch.no_grad():
        f = sae.encode(x)
        dense = f @ sae.W_dec + sae.b_dec
        torch.testing.assert_close(sae.decode(f), dense, rtol=1e-5, atol=1e-5)  # sparse path
        rows, cols = f.reshape(-1, 64).nonzero(as_tuple=True)
        flat = sae.decode_sparse(cols, f.reshape(-1, 64)[rows, cols], rows=rows, n_rows=21)
        torch.testing.assert_close(flat.reshape(x.shape), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_training_path_gradients(arch: str, x: torch.Tensor) -> None:
    """The top-k family's sparse forward gives the same values and gradients as dense maths."""
    sae = random_sae(arch).train()
    out = sae(x)
    grads = torch.autograd.grad(out.x_hat.pow(2).sum(), list(sae.parameters()))
    ref_f, ref_x = dense_reference(sae, x)
    ref_grads = torch.autograd.grad(ref_x.pow(2).sum(), list(sae.parameters()))
    torch.testing.assert_close(out.feats, ref_f)
    torch.testing.assert_close(out.x_hat, ref_x, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    if arch == "batchtopk":
        assert (out.feats != 0).sum() <= 4 * 21
        assert len(set((out.feats != 0).sum(-1).flatten().tolist())) > 1  # varies per token


def test_batchtopk_threshold_and_export(x: torch.Tensor) -> None:
    sae = random_sae("batchtopk").train()
    sae.threshold.fill_(-1.0)
    feats = sae(x).feats
    kept_min = feats[feats > 0].min().item()
    assert sae.update_threshold(feats) == pytest.approx(kept_min)  # first call: set directly
    assert sae.update_threshold(feats * 0 + 2 * kept_min, lr=0.5) == pytest.approx(1.5 * kept_min)
    sae.eval()
    jr = sae.for_export()
    assert jr.cfg.architecture == "jumprelu" and jr.cfg.metadata["batchtopk_k"] == 4
    assert torch.all(jr.threshold == jr.threshold[0])
    with torch.no_grad():
        torch.testing.assert_close(jr(x).feats, sae(x).feats, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_normalize_decoder_keeps_outputs(arch: str, x: torch.Tensor) -> None:
    sae = random_sae(arch)
    with torch.no_grad():
        before = sae(x)
        if arch in ("topk", "batchtopk"):
            # Rescaling the encoder by decoder norms changes which features win a top-k.
            with pytest.raises(ValueError, match="rescale_encoder=False"):
                sae.normalize_decoder_()
            sae.normalize_decoder_(rescale_encoder=False)
        else:
            norms = sae.normalize_decoder_()
            after = sae(x)
            torch.testing.assert_close(after.x_hat, before.x_hat, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(after.feats, before.feats * norms, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sae.W_dec_norms(), torch.ones(64))


def test_normalize_decoder_with_log_threshold(x: torch.Tensor) -> None:
    sae = random_sae("jumprelu")
    sae.use_log_threshold_()
    with torch.no_grad():
        before = sae(x).x_hat
        sae.normalize_decoder_()
        torch.testing.assert_close(sae(x).x_hat, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("vector", [False, True])
def test_fold_scale(arch: str, vector: bool, x: torch.Tensor) -> None:
    sae = random_sae(arch)
    s = torch.rand(16) + 0.5 if vector else torch.tensor(3.7)
    with torch.no_grad():
        before = sae(s * x)  # the SAE was trained on scaled activations
        sae.fold_scale_(s)
        after = sae(x)  # ... and now takes raw ones
    torch.testing.assert_close(after.feats, before.feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after.x_hat, before.x_hat / s, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="positive"):
        sae.fold_scale_(-1.0)


def test_remove_parallel_grad() -> None:
    sae = random_sae("relu")
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_grad_()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5


def test_jumprelu_pseudo_derivatives() -> None:
    eps = 0.1
    th = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    z = torch.tensor([[0.47, 0.56, 0.9], [0.30, 0.52, 0.46]], requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    (JumpReLUFn.apply(z, th, eps) * g).sum().backward()
    # inside the window |z - θ| < ε/2: d/dθ = -(θ/ε)·g; d/dz = H(z - θ)·g
    assert th.grad.tolist() == pytest.approx([-(0.5 / eps) * 1, -(0.5 / eps) * 5, -(0.5 / eps) * 6])
    assert z.grad.tolist() == [[0, 2, 3], [0, 5, 0]]
    th.grad = None
    (StepFn.apply(z.detach(), th, eps) * g).sum().backward()
    assert th.grad.tolist() == pytest.approx([-(1 / eps) * 1, -(1 / eps) * 5, -(1 / eps) * 6])


def test_jumprelu_training_reaches_log_threshold(x: torch.Tensor) -> None:
    sae = random_sae("jumprelu").train()
    sae.bandwidth = 0.5
    sae.use_log_threshold_()
    names = dict(sae.named_parameters())
    assert "parametrizations.threshold.original" in names  # Adam sees log θ
    pre = sae.pre_acts(x)
    loss = (sae.decode(sae.activation(pre)) - x).pow(2).sum() + sae.l0(pre).mean()
    loss.backward()
    log_th = names["parametrizations.threshold.original"]
    assert log_th.grad is not None and log_th.grad.abs().sum() > 0
    torch.testing.assert_close(sae.threshold, log_th.exp())
    assert set(sae.tensors()) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    sae.use_plain_threshold_()
    assert "threshold" in dict(sae.named_parameters())


def test_log_threshold_needs_positive() -> None:
    sae = random_sae("jumprelu")
    with torch.no_grad():
        sae.threshold[0] = 0.0
    with pytest.raises(ValueError, match="positive thresholds"):
        sae.use_log_threshold_()


def test_l1_penalty() -> None:
    f = torch.tensor([[1.0, -2.0, 0.0]])
    W_dec = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 1.0]])
    assert l1_penalty(f).item() == 3.0
    assert l1_penalty(f, W_dec).item() == 1 * 5 + 2 * 1


def test_dtype_and_leading_dims() -> None:
    sae = random_sae("topk", dtype="float64")
    x = torch.randn(2, 3, 4, 16)  # float32 in, computed in float64
    out = sae(x)
    assert out.x_hat.dtype == torch.float64 and out.feats.shape == (2, 3, 4, 64)
    assert BatchTopKSAE.tensor_shapes(sae.cfg.replace(architecture="batchtopk"))["threshold"] == ()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_empty_batch_and_caller_pre_untouched(arch: str, mode: str) -> None:
    sae = getattr(random_sae(arch), mode)()
    with torch.no_grad():
        out = sae(torch.randn(0, 16))
        assert out.x_hat.shape == (0, 16) and out.feats.shape == (0, 64)
        pre = sae.pre_acts(torch.randn(5, 16))
        kept = pre.clone()
        sae.activation(pre)  # not inplace: a caller's pre-activations stay as they were
    assert torch.equal(pre, kept)
