"""How many CPU threads torch should use: the idle cores, not all of them.

OpenMP worker threads spin at every barrier. When other processes already
hold the cores, each of torch's threads waits for the slowest one at every
matrix product, and a forward pass gets many times slower rather than a
little: measured on this project's 2-core machine with two other busy
processes, one decoding step of SmolLM2 at batch 24 took 7.5 s with 2 threads
and 0.32 s with 1. So the command line gives torch the cores that are idle
(the core count minus the 1-minute load average, at least 1), unless
`SAELAB_THREADS` says otherwise; library users keep torch's own default.
"""

from __future__ import annotations

import os

ENV = "SAELAB_THREADS"


def idle_cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, round(cores - busy)))


def set_threads() -> int:
    """Apply `SAELAB_THREADS` or the idle core count to torch; returns the number used."""
    import torch

    wanted = os.environ.get(ENV, "").strip()
    if wanted:
        if not wanted.isdigit() or int(wanted) < 1:
            raise ValueError(f"{ENV}={wanted!r}: expected a positive integer")
        n = int(wanted)
    else:
        n = idle_cores()
    torch.set_num_threads(n)
    return n
