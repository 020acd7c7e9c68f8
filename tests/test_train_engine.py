"""The training engine on a device: where tensors live, and no host read-back in a step."""

import json

import pytest
import torch
from synthetic import sparse_data, write_synthetic_cache
from torch.utils._python_dispatch import TorchDispatchMode

from saelab.errors import SaelabError
from saelab.sae.formats import load_sae
from saelab.train.config import ARCHS, SAESpec, TrainConfig
from saelab.train.objective import SAEObjective
from saelab.train.trainer import plan_groups, resolve_device, train

aten = torch.ops.aten
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def device_selection(monkeypatch):
    """BatchTopK as it runs off the CPU (fixed-size selection, no read-back); the CPU's
    exact selection reads a count back, which costs nothing there."""
    import saelab.train.objective as objective_module

    monkeypatch.setattr(objective_module, "EXACT_BATCHTOPK_ON_CPU", False)


def objective(arch: str, device="cpu", **kw) -> SAEObjective:
    spec = SAESpec("resid_post.0", arch, 512, k=4)  # more latents than a batch fires
    cfg = TrainConfig(saes=(spec,), tokens=4096, batch_size=256, **({"dead_tokens": 1} | kw))
    return SAEObjective(spec, 32, cfg, torch.float32, {}, device=device)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_tensor_of_an_objective_lives_on_its_device(arch, device):
    obj = objective(arch, device)
    tensors = obj.tensors()
    assert {"W_enc", "W_dec", "since_fired", "fire_count", "scale", "stats"} <= set(tensors)
    assert (arch == "jumprelu") == ("threshold" in tensors)
    wrong = {name: t.device for name, t in tensors.items() if t.device.type != device}
    assert not wrong
    if device == "cpu":  # after a step: Adam's state and the scratch buffer too
        obj.train_step(sparse_data(256)[0], 8)
        state = [t for st in obj.opt.state.values() for t in st.values()]
        assert state and all(t.device.type == "cpu" for t in state)
        assert all(t.device.type == "cpu" for t in obj.tensors().values())


class SyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for the device: scalar reads (.item(),
    bool(), float()), and ops whose output size depends on the data (nonzero, boolean
    indexing, masked_select, bincount, unique...)."""

    READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
    DATA_SIZED = {aten.nonzero.default, aten.masked_select.default, aten.bincount.default,
                  aten._unique2.default, aten.unique_consecutive.default,
                  aten.repeat_interleave.Tensor, aten.argwhere.default}

    def __init__(self):
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS or func in self.DATA_SIZED:
            self.hits.append(str(func))
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            if any(i is not None and i.dtype == torch.bool for i in args[1]):
                self.hits.append(f"{func} with a boolean mask")
        return func(*args, **(kwargs or {}))


class PythonReads:
    """Records calls of Tensor.item / tolist / __bool__ / __float__ / __int__ while `on`."""

    def __init__(self):
        self.on, self.calls = False, []


@pytest.fixture
def python_reads(monkeypatch):
    reads = PythonReads()
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def patched(self, *a, _name=name, _orig=original, **k):
            if reads.on:
                reads.calls.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, patched)
    return reads


@pytest.mark.parametrize("arch", ARCHS)
def test_a_training_step_reads_nothing_back_to_the_host(arch, python_reads):
    obj = objective(arch)
    x = sparse_data(2048, d=32)[0]
    obj.train_step(x[:256], 8)  # the first step measures the input scale (a read is fine)
    obj.train_step(x[256:512], 8)
    obj.read_stats()  # dead latents now (dead_tokens=1): AuxK runs for the top-k family
    assert obj.any_dead or arch not in ("topk", "batchtopk")
    python_reads.on = True
    with SyncCounter() as counter:
        for i in range(2, 8):
            obj.train_step(x[i * 256:(i + 1) * 256], 8)
    python_reads.on = False
    assert counter.hits == [] and python_reads.calls == []
    stats = obj.read_stats()
    assert stats["l0"] > 0 and stats["fvu"] > 0 and 0 <= stats["dead"] <= 1  # means of 6 steps
    if arch in ("topk", "batchtopk"):
        assert stats["auxk"] > 0


def test_the_trainer_reads_statistics_only_at_log_steps(tmp_path, monkeypatch):
    write_synthetic_cache(tmp_path / "cache", n_tokens=16_384)
    spec = SAESpec("resid_post.0", "batchtopk", 64, k=3)
    cfg = TrainConfig(saes=(spec,), tokens=16_384, batch_size=512, log_every=8,
                      checkpoint_every=0, buffer_tokens=2048, dead_tokens=2000)
    step, read = SAEObjective.train_step, SAEObjective.read_stats
    hits, reads = [], []

    def counted_step(self, x, steps):
        if self.step_i == 0:
            return step(self, x, steps)
        with SyncCounter() as counter:
            step(self, x, steps)
        hits.extend(counter.hits)

    def counted_read(self):
        reads.append(self.step_i)
        return read(self)

    monkeypatch.setattr(SAEObjective, "train_step", counted_step)
    monkeypatch.setattr(SAEObjective, "read_stats", counted_read)
    train(cfg, tmp_path / "cache", tmp_path / "run")
    assert hits == []
    assert reads == [8, 16, 24, 32]  # 32 steps, read every 8
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [7, 15, 23, 31]


def test_masked_topk_codes_are_the_topk_codes():
    from saelab.train.sparse_ops import topk_codes, topk_codes_masked

    pre = torch.randn(50, 40)
    pre[3] = -1  # a row with no positive entry
    rows, cols = topk_codes(pre, 5)
    mrows, mcols, keep = topk_codes_masked(pre, 5)
    assert mrows.numel() == 250 and torch.equal(mrows[keep], rows) and torch.equal(mcols[keep], cols)


def test_fixed_size_batchtopk_selects_what_batchtopk_selects():
    from saelab.sae.base import SAEConfig, build_sae

    obj = objective("batchtopk")
    assert not obj.exact_batchtopk
    pre = torch.randn(256, 512)
    rows, cols, keep, capped = obj._batch_topk(pre)
    ref = build_sae(SAEConfig("batchtopk", d_in=4, d_sae=512, k=4))
    rrows, rcols, _ = ref.batch_topk(pre)
    got = sorted(zip(rows[keep].tolist(), cols[keep].tolist(), strict=True))
    assert got == sorted(zip(rrows.tolist(), rcols.tolist(), strict=True))
    assert capped.item() == 0  # no token came near 4k codes here


def test_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(SaelabError, match="sees no usable CUDA GPU"):
        resolve_device("cuda")


def test_an_sae_larger_than_the_budget_is_named():
    spec = SAESpec("resid_post.0", "topk", 4096, k=8)
    cfg = TrainConfig(saes=(spec,), tokens=4096, batch_size=1024)
    with pytest.raises(SaelabError, match=r"resid_post.0-topk-4096-k8 needs .* budget of 1.0 MiB"):
        plan_groups(cfg, list(cfg.saes), {"resid_post.0": 512}, 2**20, torch.float32, 4, 1024)


@CUDA
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_cpu_and_cuda_train_the_same_sae_in_fp32(tmp_path, arch):
    write_synthetic_cache(tmp_path / "cache", n_tokens=16_384)
    spec = SAESpec("resid_post.0", arch, 64, k=3)
    cfg = TrainConfig(saes=(spec,), tokens=16_384, batch_size=512, dtype="float32",
                      checkpoint_every=0, buffer_tokens=2048, lr=3e-3)
    a = train(cfg, tmp_path / "cache", tmp_path / "cpu", device="cpu")
    b = train(cfg, tmp_path / "cache", tmp_path / "cuda", device="cuda")
    sa, sb = load_sae(a.sae_dirs[spec.label]), load_sae(b.sae_dirs[spec.label])
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(sa, name), getattr(sb, name), rtol=1e-3, atol=1e-4)
    assert json.loads((tmp_path / "cuda" / "run.json").read_text())["device"] == "cuda"


@CUDA
def test_a_cuda_step_reads_nothing_back():
    obj = objective("batchtopk", "cuda")
    x = sparse_data(2048, d=32)[0].cuda()
    obj.train_step(x[:256], 8)
    obj.read_stats()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
    try:
        for i in range(1, 8):
            obj.train_step(x[i * 256:(i + 1) * 256], 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert obj.read_stats()["l0"] > 0


def test_the_sliced_gather_dot_equals_sampled_addmm():
    """The code-gradient path used off the CPU (sliced gathers) gives sampled_addmm's values."""
    from saelab.train.sparse_ops import SparseCodes, gather_dot, topk_codes

    a, b = torch.randn(300, 24), torch.randn(90, 24)
    rows, cols = topk_codes(torch.randn(300, 90), 7)
    expected = SparseCodes(rows, cols, (300, 90)).sampled_dot(a, b)
    torch.testing.assert_close(gather_dot(rows, cols, a, b, slice_elements=24 * 50), expected)
    torch.testing.assert_close(gather_dot(rows, cols, a, b), expected)
