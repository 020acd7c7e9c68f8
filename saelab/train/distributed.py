"""torch.distributed for training: data-parallel and site-sharded modes.

Run under torchrun, e.g. ``torchrun --nproc-per-node 2 -m saelab train ...``.
The backend is gloo on CPU and NCCL on GPUs, so the same code is tested on a
laptop and runs on a cluster.

- data parallel (default): every rank trains every SAE on its own share of
  each global batch (its slice of every batch of a shared cache, or, when
  streaming, batches from its own slice of the corpus: contexts r, r + N, ...;
  each rank then checkpoints its own stream); gradients and the statistics
  that steer training (input
  scale, b_dec init, which latents fired) are averaged or summed across ranks,
  so all ranks hold identical weights, equal (to float rounding) to a
  one-process run with the same global batch. BatchTopK selects its k·N
  activations per rank (as every peer does), so it matches only approximately.
- site sharded (``--shard-sites``): rank r trains the SAEs i with
  i % world_size == r on full batches, with no communication.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world_size
        return t

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


SINGLE = Dist()


def from_env(device: str = "cpu") -> Dist:
    """Join the process group torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size())


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
