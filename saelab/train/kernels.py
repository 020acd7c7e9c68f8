"""Which path the top-k family's sparse products take: plain PyTorch or Triton.

`--kernel auto` (the default) keeps the plain path (`sparse_ops.py`) on the CPU.
On CUDA with Triton importable it runs both paths once on the SAE's own shape
(its batch, d_in, width and k; random inputs, one forward and backward of the
encoder gather and the decode, after an untimed first call that compiles), checks
that they agree, and keeps the faster: the Triton kernels are measured where they
run, never assumed faster. A Triton kernel that fails to compile or disagrees is
reported and the plain path kept. `--kernel torch|triton` forces a path; forcing
Triton where it cannot run is an error. The choice and both timings go into
run.json, and a resumed run keeps its recorded choice.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from saelab.errors import BadValueError
from saelab.train import triton_ops
from saelab.train.objective import TOPK_FAMILY
from saelab.train.sparse_ops import SparseCodes, SparseDecode, SparseEncodeGrad, topk_codes_masked

KERNELS = ("auto", "torch", "triton")
AGREE = 1e-3  # largest difference between the paths, relative to the largest value
REPEATS = 3  # timed runs of each path (the fastest counts)


@dataclass
class KernelChoice:
    name: str  # "torch" or "triton"
    why: str
    ms: dict[str, float] = field(default_factory=dict)  # per path, one forward+backward

    def record(self) -> dict:
        return asdict(self)


def choose_kernel(requested: str, device: torch.device, d_in: int, width: int, k: int,
                  batch: int) -> KernelChoice:
    """The path for a top-k SAE of this shape on `device` (see the module docstring).

    Raises BadValueError for an unknown name, or for "triton" where Triton cannot run
    (not installed, or a CPU without TRITON_INTERPRET=1)."""
    if requested not in KERNELS:
        raise BadValueError(f"kernel must be one of {', '.join(KERNELS)}, got {requested!r}")
    if requested == "torch":
        return KernelChoice("torch", "asked for")
    can = triton_ops.available(device)
    if requested == "triton":
        if not can:
            raise BadValueError(
                f"--kernel triton cannot run on {device}: Triton kernels need a CUDA device "
                "and the triton package (or TRITON_INTERPRET=1 with CPU tensors, for tests). "
                "Use --kernel auto or torch.")
        return KernelChoice("triton", "asked for")
    if device.type != "cuda" or not can:
        why = "plain path on the CPU" if device.type != "cuda" else "triton is not installed"
        return KernelChoice("torch", why)
    return time_both(device, d_in, width, k, batch)


def time_both(device: torch.device, d_in: int, width: int, k: int, batch: int) -> KernelChoice:
    """`auto` on a device where Triton runs: both paths timed on this shape, compared, and
    the faster kept; the plain path where Triton fails or disagrees (with a warning)."""
    try:
        t_plain, ref = _time_path("torch", device, d_in, width, k, batch)
        t_triton, got = _time_path("triton", device, d_in, width, k, batch)
    except Exception as err:  # a compile failure or an out-of-memory error: keep the plain path
        warnings.warn(f"the Triton kernels failed on {device} ({type(err).__name__}: {err}); "
                      "training with the plain PyTorch path", stacklevel=2)
        return KernelChoice("torch", f"triton failed: {type(err).__name__}")
    ms = {"torch": round(t_plain * 1e3, 3), "triton": round(t_triton * 1e3, 3)}
    worst = max(_relative_gap(a, b) for a, b in zip(ref, got, strict=True))
    if not worst <= AGREE:
        warnings.warn(f"the Triton kernels disagree with the plain path on {device} "
                      f"(relative difference {worst:.2g}); training with the plain path",
                      stacklevel=2)
        return KernelChoice("torch", f"triton disagreed ({worst:.2g})", ms)
    name = "triton" if t_triton < t_plain else "torch"
    return KernelChoice(name, "faster on this shape", ms)


def choose_kernels(requested: str, specs: list, widths: dict[str, int], device: torch.device,
                   batch: int, previous: dict | None = None) -> dict[str, dict]:
    """Per SAE label (specs: SAESpec), the path of its sparse products, chosen once per
    shape; `previous` (a run.json's `kernel`) keeps a resumed run's recorded choice, since
    the timing may come out otherwise now. Dense architectures: "dense autograd"."""
    chosen: dict[str, dict] = {}
    by_shape: dict[tuple, dict] = {}
    for s in specs:
        if s.arch not in TOPK_FAMILY:
            chosen[s.label] = {"name": "dense autograd"}
            continue
        prev = (previous or {}).get(s.label)
        if isinstance(prev, dict) and prev.get("name") in ("torch", "triton"):
            chosen[s.label] = prev
            continue
        shape = (widths[s.site], s.width, s.k)  # a transcoder's d_out is timed as d_in
        if shape not in by_shape:
            by_shape[shape] = choose_kernel(requested, device, *shape, batch).record()
        chosen[s.label] = by_shape[shape]
    return chosen


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = a.abs().max().clamp_min(1e-12)
    return float((a - b).abs().max() / scale)


def _time_path(kernel: str, device: torch.device, d_in: int, width: int, k: int,
               batch: int) -> tuple[float, list[torch.Tensor]]:
    """Best of REPEATS timed forward+backward passes of the sparse products on random
    inputs of this shape (seeded: both paths see the same), and the outputs and grads."""
    gen = torch.Generator().manual_seed(0)
    xc = torch.randn(batch, d_in, generator=gen).to(device)
    W_enc = (torch.randn(d_in, width, generator=gen) / math.sqrt(d_in)).to(device)
    W_dec = torch.randn(width, d_in, generator=gen).to(device)
    b_enc = torch.zeros(width, device=device)
    grad_out = torch.randn(batch, d_in, generator=gen).to(device)
    for p in (W_enc, W_dec, b_enc):
        p.requires_grad_(True)
    with torch.no_grad():
        pre = torch.addmm(b_enc, xc, W_enc)
    rows, cols, _ = topk_codes_masked(pre, min(k, width))
    best = math.inf
    for i in range(REPEATS + 1):  # the first call compiles (Triton) and warms the allocator
        for p in (W_enc, W_dec, b_enc):
            p.grad = None
        _sync(device)
        start = time.perf_counter()
        codes = SparseCodes(rows, cols, pre.shape, check=False, kernel=kernel)
        vals = SparseEncodeGrad.apply(xc, W_enc, b_enc, pre, codes, None)
        out = SparseDecode.apply(codes, vals, W_dec)
        out.backward(grad_out)
        _sync(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return best, [out.detach(), W_enc.grad, W_dec.grad, b_enc.grad]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
