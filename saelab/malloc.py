"""Keep freed CPU memory for reuse instead of returning it to the kernel (glibc only).

PyTorch's CPU tensors come straight from malloc, which has no cache of its own
worth the name for tensors this size: glibc serves a block past its mmap
threshold with a fresh mmap and unmaps it when freed, and trims freed memory at
the top of the heap. A training step makes the same temporaries every step (an
SAE's [width, d_in] gradient products, bf16 weight copies, top-k outputs: 1-30 MB
each), so every step page-faults them in again: on 2 AMD EPYC cores a 576->9216
TopK step in bf16 spent ~25 of its ~245 ms in those faults. With blocks up to
32 MB served from the heap and the heap trimmed only past 1 GiB free, the same
step takes ~220 ms (`python bench/train.py`, which measures it beside the peers).

Blocks larger than the threshold still come from mmap and go back when freed, so
the process holds at most its peak of small blocks; nothing else changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed mmap threshold on 64-bit
TRIM_THRESHOLD = 1 << 30

_done = False


def keep_freed_memory() -> bool:
    """Apply the settings above once per process; True where they took effect (Linux
    with glibc), False elsewhere (a no-op on musl, macOS, Windows)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; musl has no mallopt symbol (AttributeError above)
    _done = (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
             and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    return _done
