"""How many CPU threads torch should use: the idle cores, not all of them.

OpenMP worker threads spin at every barrier. When other processes already
hold the cores, each of torch's threads waits for the slowest one at every
matrix product, and a forward pass gets many times slower rather than a
little: measured on this project's 2-core machine with two other busy
processes, one decoding step of SmolLM2 at batch 24 took 7.5 s with 2 threads
and 0.32 s with 1. So the command line gives torch the cores that are idle
now, unless `SAELAB_THREADS` says otherwise; library users keep torch's own
default. "Now" is a 0.2 s sample of /proc/stat, not the 1-minute load average,
which still counts a `pip install` that ended seconds ago (it made `make demo`
start on one core of an idle machine).
"""

from __future__ import annotations

import os
import time

ENV = "SAELAB_THREADS"
SAMPLE_SECONDS = 0.2
MAX_THREADS = 4096  # more is a typo (torch would try to start them)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(cores: int) -> float:
    """How many cores other processes keep busy: sampled over SAMPLE_SECONDS, else the load average."""
    first = _cpu_times()
    if first is not None:
        time.sleep(SAMPLE_SECONDS)
        second = _cpu_times()
        if second is not None and second[1] > first[1]:
            return cores * (second[0] - first[0]) / (second[1] - first[1])
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def idle_cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, round(cores - busy_cores(cores))))


def set_threads() -> int:
    """Apply `SAELAB_THREADS` or the idle core count to torch; returns the number used."""
    import torch

    wanted = os.environ.get(ENV, "").strip()
    if wanted:
        if not wanted.isdigit() or not 1 <= int(wanted) <= MAX_THREADS:
            from saelab.errors import BadValueError

            raise BadValueError(f"{ENV}={wanted!r} (or --threads): expected an integer in "
                                f"1..{MAX_THREADS}")
        n = int(wanted)
    else:
        n = idle_cores()
    torch.set_num_threads(n)
    return n
