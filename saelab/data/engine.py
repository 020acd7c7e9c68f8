"""The forward engine shared by `saelab harvest` and streaming training.

corpus -> packed contexts -> one model forward per batch, every site recorded,
stopped after the deepest site -> `Chunk`s (ids, special, {site: acts}).

- Tokenization and packing run in a background thread (`prefetch`), a couple
  of batches ahead, while the model runs: the tokenizers' Rust code and
  torch's kernels release the GIL, so the forward never waits on them.
- Batches are sized in tokens (`contexts_per_forward`); on CUDA the default
  comes from the device's free memory (`auto_batch_tokens`), on the CPU it is
  16 contexts as it always was.
- With `to_host` on CUDA the activations are cast on the device and copied
  into pinned host memory on a side stream, non-blocking; a chunk is handed
  out only once its copy's event has completed, one forward later, so the
  copy of batch n overlaps the forward of batch n + 1. On the CPU the same
  code runs with the copy done in place (nothing to overlap).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.errors import SaelabError

CPU_BATCH_CONTEXTS = 16  # the CPU default: what harvest always forwarded
MAX_AUTO_TOKENS = 1 << 16  # beyond ~64k tokens a forward gains nothing measurable
_MEMORY_SHARE = 0.25  # of free device memory a forward's transients may take


@dataclass
class Chunk:
    """Consecutive contexts: ids/special [n, context] on the host, acts {site: [n, context, d]}."""

    ids: Tensor
    special: Tensor
    acts: dict[str, Tensor]


def bytes_per_token(arch, n_sites: int, itemsize: int, context: int, n_heads: int) -> int:
    """Device bytes one token of a forward holds at its peak: the residual stream, the
    attention's q/k/v/out and scores, the MLP's hidden (x3 for gated MLPs), and the
    recorded sites (two batches of them: one forwarding, one being copied out)."""
    d, d_mlp = arch.d_model, arch.d_mlp
    transient = 6 * d + 4 * arch.d_attn_z + 3 * d_mlp + 2 * n_heads * context
    return itemsize * transient + 2 * n_sites * d * 4


def auto_batch_tokens(free_bytes: int, per_token: int, context: int) -> int:
    """Tokens per forward that fit a quarter of `free_bytes`: a power of two number of
    contexts (stable from run to run), at least one, at most MAX_AUTO_TOKENS tokens."""
    fit = int(free_bytes * _MEMORY_SHARE) // max(1, per_token) // context
    cap = max(1, MAX_AUTO_TOKENS // context)
    n = min(max(1, fit), cap)
    return (1 << (n.bit_length() - 1)) * context


def contexts_per_forward(lm, context: int, n_sites: int, *, batch_size: int | None = None,
                         batch_tokens: int | None = None) -> int:
    """Contexts in one forward: `batch_size` contexts, or `batch_tokens` // context, or
    (neither given) 16 on the CPU and `auto_batch_tokens` of free memory on CUDA."""
    if batch_size is not None and batch_tokens is not None:
        raise SaelabError("give either a batch size in contexts or in tokens (--batch-tokens), "
                          "not both.")
    if batch_size is not None:
        return batch_size
    if batch_tokens is not None:
        if batch_tokens < context:
            raise SaelabError(f"--batch-tokens {batch_tokens} is less than one context "
                              f"({context} tokens); raise it or lower --context.")
        return batch_tokens // context
    device = torch.device(lm.device)
    if device.type != "cuda":
        return CPU_BATCH_CONTEXTS
    free, _ = torch.cuda.mem_get_info(device)
    itemsize = next(lm.model.parameters()).element_size()
    n_heads = getattr(lm.model.config, "num_attention_heads", 1)
    per = bytes_per_token(lm.arch, n_sites, itemsize, context, n_heads)
    return auto_batch_tokens(free, per, context) // context


_END = object()


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """`items` produced by a background thread, up to `depth` ahead, in order.

    An exception in the producer is raised here, at the item it replaced.
    Closing this generator early (a `break`, an error downstream) stops the
    producer at its next item and joins it.
    """
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                out.put((True, item))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            out.put((False, err))
            return
        out.put((True, _END))

    thread = threading.Thread(target=produce, name="saelab-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = out.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                out.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def token_batches(corpus, tokenizer, context: int, contexts: int, *, skip: int = 0,
                  rank: int = 0, world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """`pack`'s (ids, special) batches of `contexts` contexts, produced ahead in a thread."""
    from saelab.data.tokens import pack

    return prefetch(pack(corpus, tokenizer, context, batch_size=contexts, skip=skip, rank=rank,
                         world_size=world_size))


def forward_chunks(lm, sites, batches: Iterable[tuple[Tensor, Tensor]], dtype: torch.dtype, *,
                   to_host: bool = False) -> Iterator[Chunk]:
    """One forward per batch, every site from it, stopped after the deepest site.

    sites: resolved `Site`s or their names. acts come in `dtype`, on the model's
    device, or with `to_host` on the host (pinned memory, copied one forward
    behind on CUDA: see the module doc).
    """
    from saelab.models.hooks import capture
    from saelab.models.sites import resolve_sites

    device = torch.device(lm.device)
    names = [s.name for s in resolve_sites(lm.arch, sites)]
    overlap = to_host and device.type == "cuda"
    copier = torch.cuda.Stream(device) if overlap else None
    waiting: tuple[Chunk, torch.cuda.Event] | None = None
    for ids, special in batches:
        # Hooks and inference mode only around the forward: never across a yield, so the
        # consumer's own code (a training step, another forward) runs unhooked.
        with torch.inference_mode(), capture(lm.model, names, arch=lm.arch,
                                             stop_early=True) as cap:
            if device.type == "cuda":
                ids_dev = ids.pin_memory().to(device, non_blocking=True)
            else:
                ids_dev = ids.to(device)
            acts = cap.run(input_ids=ids_dev, use_cache=False)
            if not overlap:
                chunk = Chunk(ids, special, {s: acts[s].to("cpu" if to_host else device, dtype)
                                             for s in names})
            else:
                copier.wait_stream(torch.cuda.current_stream(device))
                host = {}
                with torch.cuda.stream(copier):
                    for s in names:
                        acts[s].record_stream(copier)  # kept from the allocator until read
                        src = acts[s].to(dtype)
                        src.record_stream(copier)
                        host[s] = torch.empty(src.shape, dtype=dtype, pin_memory=True)
                        host[s].copy_(src, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(copier)
        if not overlap:
            yield chunk
            continue
        if waiting is not None:  # the previous batch's copy ran beside this forward
            waiting[1].synchronize()
            yield waiting[0]
        waiting = (Chunk(ids, special, host), done)
    if waiting is not None:
        waiting[1].synchronize()
        yield waiting[0]
