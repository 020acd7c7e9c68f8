"""Triton kernels for the top-k family's sparse products (the `triton` kernel).

The same two products as the plain path of `sparse_ops.py`, as Triton kernels:

    segment_sum(index, weight, starts, scale) -> out [n_seg, D]
        out[i] = Σ_{starts[i] <= j < starts[i+1]} scale[j] · weight[index[j]]
        the decode S·W_dec (segments = tokens) and both weight gradients Sᵀ·dx̂ and
        Gᵀ·xc (segments = latents, from the column sort SparseCodes makes once a step)
    sampled_dot(row_starts, cols, a, b) -> [nnz]
        ⟨a[n], b[cols[j]]⟩ for each entry j of row n: the code gradients

One program per (segment, block of D columns) / per row. Each reads the rows it
needs in place (no [nnz, D] gather), accumulates in fp32 and sums in a fixed
order without atomics, so a run is repeatable. The idea of writing these products
as kernels, not dense matmuls, is Gao et al. (2024), "Scaling and evaluating sparse
autoencoders", section A.5; sparsify's `TritonDecoder` is the peer's version.

Why a second path: on CUDA the plain path's code gradients are gathers in slices
(`gather_dot`), which write and re-read [slice, D] temporaries, and embedding_bag's
CUDA kernel is tuned for embedding lookups, not for these shapes. On the CPU the
plain path stays (embedding_bag and sampled_addmm are fast there, and Triton
compiles for GPUs). Under `TRITON_INTERPRET=1` Triton runs these kernels on CPU
tensors, which is how CI tests them equal to the plain path without a GPU; the
trainer's `auto` kernel on CUDA times both paths on the SAE's own shape, checks
they agree and keeps the faster (`choose_kernel`).

Raises ImportError (from `require`) when Triton is not installed.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

BLOCK_D = 128  # columns of D per program (a power of two; masked past D)
BLOCK_J = 16  # entries per inner step of a segment / row


def available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on `device`: Triton importable and either a
    CUDA device or the interpreter (`TRITON_INTERPRET=1`, CPU tensors)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_KERNELS: dict | None = None


def _kernels() -> dict:
    """Build the kernels on first use (so importing saelab never needs Triton, and the
    interpreter setting is read when a test has set it)."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def segment_sum_kernel(index_ptr, weight_ptr, starts_ptr, scale_ptr, out_ptr, D,
                           stride_w, stride_o, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
        seg = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = d < D
        start = tl.load(starts_ptr + seg)
        end = tl.load(starts_ptr + seg + 1)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for j0 in range(start, end, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            jmask = j < end
            idx = tl.load(index_ptr + j, mask=jmask, other=0).to(tl.int64)
            s = tl.load(scale_ptr + j, mask=jmask, other=0.0).to(tl.float32)
            w = tl.load(weight_ptr + idx[:, None] * stride_w + d[None, :],
                        mask=jmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * s[:, None], axis=0)
        tl.store(out_ptr + seg.to(tl.int64) * stride_o + d,
                 acc.to(out_ptr.dtype.element_ty), mask=dmask)

    @triton.jit
    def sampled_dot_kernel(row_starts_ptr, cols_ptr, a_ptr, b_ptr, out_ptr, D, stride_a,
                           stride_b, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        start = tl.load(row_starts_ptr + row)
        end = tl.load(row_starts_ptr + row + 1)
        a_row = a_ptr + row.to(tl.int64) * stride_a
        for j0 in range(start, end, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            jmask = j < end
            c = tl.load(cols_ptr + j, mask=jmask, other=0).to(tl.int64)
            acc = tl.zeros((BLOCK_J,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                dmask = d < D
                av = tl.load(a_row + d, mask=dmask, other=0.0).to(tl.float32)
                bv = tl.load(b_ptr + c[:, None] * stride_b + d[None, :],
                             mask=jmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(bv * av[None, :], axis=1)
            tl.store(out_ptr + j, acc.to(out_ptr.dtype.element_ty), mask=jmask)

    _KERNELS = {"segment_sum": segment_sum_kernel, "sampled_dot": sampled_dot_kernel,
                "cdiv": triton.cdiv}
    return _KERNELS


def segment_sum(index: Tensor, weight: Tensor, starts: Tensor, scale: Tensor) -> Tensor:
    """out[i] = Σ_j scale[j] · weight[index[j]] over segment i, j in [starts[i], starts[i+1]).

    index [nnz] (rows of weight), weight [R, D], starts [n_seg + 1] ascending, scale [nnz]
    -> [n_seg, D] in weight's dtype (empty segments give zero rows)."""
    k = _kernels()
    weight = weight.contiguous()
    n_seg, dim = len(starts) - 1, weight.shape[1]
    out = torch.empty(n_seg, dim, dtype=weight.dtype, device=weight.device)
    if n_seg == 0 or dim == 0:
        return out
    grid = (n_seg, k["cdiv"](dim, BLOCK_D))
    k["segment_sum"][grid](index.contiguous(), weight, starts.contiguous(),
                           scale.contiguous(), out, dim, weight.stride(0), out.stride(0),
                           BLOCK_J=BLOCK_J, BLOCK_D=BLOCK_D)
    return out


def sampled_dot(row_starts: Tensor, cols: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """⟨a[n], b[cols[j]]⟩ for each entry j of CSR row n: a [n_rows, D], b [R, D],
    row_starts [n_rows + 1], cols [nnz] -> [nnz] in a's dtype."""
    k = _kernels()
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty(len(cols), dtype=a.dtype, device=a.device)
    n_rows = len(row_starts) - 1
    if n_rows == 0 or len(cols) == 0:
        return out
    k["sampled_dot"][(n_rows,)](row_starts.contiguous(), cols.contiguous(), a, b, out,
                                a.shape[1], a.stride(0), b.stride(0),
                                BLOCK_J=BLOCK_J, BLOCK_D=BLOCK_D)
    return out
