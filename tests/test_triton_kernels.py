"""The Triton kernels of the top-k family equal the plain PyTorch path.

On a GPU these tests run the compiled kernels on CUDA tensors. Without one they run
under Triton's interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET=1
before Triton is imported), so CI checks what the kernels compute; the CUDA-only
tests at the end check the `auto` choice and a training run at a real shape."""

import json

import pytest
import torch
from synthetic import sparse_data, write_synthetic_cache

pytest.importorskip("triton")

from saelab.errors import BadValueError  # noqa: E402
from saelab.train import triton_ops  # noqa: E402
from saelab.train.config import SAESpec, TrainConfig  # noqa: E402
from saelab.train.kernels import choose_kernel, time_both  # noqa: E402
from saelab.train.objective import SAEObjective  # noqa: E402
from saelab.train.sparse_ops import (  # noqa: E402
    SparseCodes,
    SparseDecode,
    SparseEncodeGrad,
    _segment_starts,
    _segment_sum,
    gather_dot,
)
from saelab.train.trainer import train  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def dev():
    """Where the kernels run: CUDA, or CPU tensors under the interpreter."""
    if not triton_ops.available(DEVICE):
        pytest.skip("Triton cannot run here: no GPU and TRITON_INTERPRET unset")
    return DEVICE


def csr(n_rows: int, n_cols: int, nnz: int, seed: int):
    """Random (rows ascending, cols) with empty rows and rows longer than one block."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, n_rows, (nnz,), generator=g).sort().values
    rows[rows == 1] = 2  # row 1 is empty
    rows = rows.sort().values
    return rows, torch.randint(0, n_cols, (nnz,), generator=g)


@pytest.mark.parametrize("dim", [7, 128, 300])  # under, at and past one block of D
def test_segment_sum_and_sampled_dot_equal_the_plain_path(dev, dim):
    rows, cols = csr(9, 20, 150, seed=dim)  # ~17 entries per row: more than BLOCK_J
    g = torch.Generator().manual_seed(1)
    weight, scale = torch.randn(20, dim, generator=g), torch.randn(150, generator=g)
    a = torch.randn(9, dim, generator=g)
    rows, cols, weight, scale, a = (t.to(dev) for t in (rows, cols, weight, scale, a))
    starts = _segment_starts(rows, 9)
    got = triton_ops.segment_sum(cols, weight, starts, scale)
    want = _segment_sum(cols, weight, starts, scale)
    assert got[1].abs().max() == 0  # the empty row
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(triton_ops.sampled_dot(starts, cols, a, weight),
                               gather_dot(rows, cols, a, weight), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_both_functions_give_the_same_gradients_on_either_path(dev, kind):
    from saelab.sae.base import SAEConfig, build_sae
    from saelab.train.sparse_ops import topk_codes

    n, d, f, k = 48, 12, 40, 4
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    init = {"W_enc": torch.randn(d, f, generator=g), "b_enc": torch.randn(f, generator=g),
            "W_dec": torch.randn(f, d, generator=g), "b_dec": torch.randn(d, generator=g)}
    x, target = x.to(dev), target.to(dev)
    init = {name: t.to(dev) for name, t in init.items()}
    pre = (x - init["b_dec"]) @ init["W_enc"] + init["b_enc"]
    if kind == "batchtopk":
        sae = build_sae(SAEConfig("batchtopk", d_in=d, d_sae=f, k=k)).to(dev)
        rows, cols, _ = sae.batch_topk(pre)
    else:
        rows, cols = topk_codes(pre, k)
    grads = {}
    for kernel in ("torch", "triton"):
        p = {name: t.clone().requires_grad_() for name, t in init.items()}
        codes = SparseCodes(rows, cols, pre.shape, kernel=kernel)
        vals = SparseEncodeGrad.apply((x - p["b_dec"]).detach(), p["W_enc"], p["b_enc"], pre,
                                      codes, p["b_dec"])
        out = SparseDecode.apply(codes, vals, p["W_dec"]) + p["b_dec"]
        (out - target).pow(2).sum().backward()
        grads[kernel] = {"out": out.detach()} | {name: t.grad for name, t in p.items()}
    for name, want in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][name], want, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_training_steps_on_the_triton_path_equal_the_plain_ones(dev, arch):
    spec = SAESpec("resid_post.0", arch, 64, k=4)
    # Adam's first steps move a weight by ~lr whatever its gradient's size, so gradients
    # of ~1e-8 that differ in the last bits between the paths move weights apart by a
    # fraction of lr: a small lr, and the tolerance of the CPU-vs-CUDA test
    cfg = TrainConfig(saes=(spec,), tokens=4 * 64, batch_size=64, dead_tokens=1, lr=3e-3)
    batches = [sparse_data(64, d=16, seed=s)[0].to(dev) for s in range(4)]
    weights = {}
    for kernel in ("torch", "triton"):
        obj = SAEObjective(spec, 16, cfg, torch.float32, {}, device=dev, kernel=kernel)
        for x in batches:
            obj.train_step(x, len(batches))
        weights[kernel] = {"W_enc": obj.sae.W_enc.detach(), "W_dec": obj.sae.W_dec.detach(),
                           "b_dec": obj.sae.b_dec.detach()}
    for name, want in weights["torch"].items():
        torch.testing.assert_close(weights["triton"][name], want, rtol=1e-3, atol=1e-4, msg=name)


def test_run_json_records_the_kernel_and_a_resume_keeps_it(dev, tmp_path):
    write_synthetic_cache(tmp_path / "cache", n_tokens=1024, d=16)
    spec = SAESpec("resid_post.0", "topk", 64, k=4)
    cfg = TrainConfig(saes=(spec,), tokens=512, batch_size=128, kernel="triton",
                      checkpoint_every=256)
    train(cfg, tmp_path / "cache", tmp_path / "run", device=str(dev))
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["config"]["kernel"] == "triton"
    assert record["kernel"][spec.label] == {"name": "triton", "why": "asked for", "ms": {}}
    again = train(cfg, tmp_path / "cache", tmp_path / "run", resume=True, device=str(dev))
    assert again.already_finished


def test_auto_keeps_the_plain_path_on_the_cpu_and_triton_needs_a_gpu(monkeypatch):
    assert choose_kernel("auto", torch.device("cpu"), 16, 64, 4, 128).name == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BadValueError, match="CUDA device"):
        choose_kernel("triton", torch.device("cpu"), 16, 64, 4, 128)
    with pytest.raises(BadValueError, match="auto, torch, triton"):
        choose_kernel("fast", torch.device("cpu"), 16, 64, 4, 128)


def test_auto_times_both_paths_and_falls_back_when_triton_fails_or_disagrees(dev, monkeypatch):
    """The choice `auto` makes on CUDA, run where the kernels run (the interpreter on CI)."""
    choice = time_both(dev, 16, 64, 4, 32)
    assert choice.why == "faster on this shape" and choice.name in ("torch", "triton")
    assert set(choice.ms) == {"torch", "triton"} and min(choice.ms.values()) > 0

    def broken(*args):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(triton_ops, "segment_sum", broken)
    with pytest.warns(UserWarning, match="failed"):
        choice = time_both(dev, 16, 64, 4, 32)
    assert (choice.name, choice.why) == ("torch", "triton failed: RuntimeError")

    def wrong(index, weight, starts, scale):
        return _segment_sum(index, weight, starts, scale) * 1.01

    monkeypatch.setattr(triton_ops, "segment_sum", wrong)
    with pytest.warns(UserWarning, match="disagree"):
        choice = time_both(dev, 16, 64, 4, 32)
    assert choice.name == "torch" and choice.why.startswith("triton disagreed")


@CUDA
def test_cuda_auto_times_both_paths_and_they_agree():
    choice = choose_kernel("auto", torch.device("cuda"), 576, 9216, 32, 4096)
    assert choice.why == "faster on this shape", choice
    assert set(choice.ms) == {"torch", "triton"}


@CUDA
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_cuda_triton_training_equals_the_plain_path(arch):
    spec = SAESpec("resid_post.0", arch, 4096, k=32)
    cfg = TrainConfig(saes=(spec,), tokens=8 * 1024, batch_size=1024)
    batches = [sparse_data(1024, d=256, seed=s)[0].cuda() for s in range(8)]
    weights = {}
    for kernel in ("torch", "triton"):
        obj = SAEObjective(spec, 256, cfg, torch.float32, {}, device="cuda", kernel=kernel)
        for x in batches:
            obj.train_step(x, len(batches))
        weights[kernel] = obj.sae.W_dec.detach()
    torch.testing.assert_close(weights["triton"], weights["torch"], rtol=1e-3, atol=1e-4)
