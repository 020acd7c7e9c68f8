"""Which dtype to compute in, decided by measuring what the hardware has.

bf16 matrix products are only fast where the hardware has bf16 units (AMX or
AVX512-BF16 on CPUs, tensor cores on GPUs). On a CPU without them PyTorch
emulates bf16 and it is several times *slower* than fp32 (measured on this
project's AVX2-only dev machine: fp32 ~110 GFLOP/s, bf16 ~15). So "auto"
means bf16 only where it pays, fp32 elsewhere; the choice is recorded in runs.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@functools.cache
def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """Turn "auto" or a dtype name into a torch dtype for compute on `device`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        kind = torch.device(device).type
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if kind == "cpu" and cpu_has_fast_bf16() else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
