"""Harvest: model + sites + corpus -> an activation cache on disk.

The forwards come from the engine streaming training uses (engine.py): one
forward pass per batch feeds every site and stops right after the deepest
site, so harvesting layer 12 of a 30-layer model costs about 40% of a full
pass; packing runs ahead in a thread, and on CUDA batches are sized from free
memory and copied to the host beside the next forward. Each shard is complete or absent (see store.py), so
re-running the same command resumes after the last complete shard and
produces exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from saelab.atomic import disk_full
from saelab.checks import ABSURD, choice, integer
from saelab.data.corpus import load_corpus
from saelab.data.engine import contexts_per_forward, forward_chunks, token_batches
from saelab.data.store import Manifest, ShardWriter
from saelab.errors import BadValueError, SaelabError
from saelab.models.limits import check_positions, lm_max_positions
from saelab.models.load import LM
from saelab.models.sites import resolve_sites, site_width
from saelab.precision import DTYPES, dtype_name


@dataclass(frozen=True)
class HarvestConfig:
    sites: str | tuple[str, ...]
    """Sites to record: names, aliases, globs (`resid_post.12`, `attn_z.*`)."""
    corpus: str = "builtin"
    """Text source: `builtin`, a .txt/.jsonl/.parquet file, or `hf:org/name`."""
    tokens: int = 100_000
    """Tokens to record per site (special tokens not counted)."""
    context: int = 128
    """Tokens per context."""
    batch_size: int | None = None
    """Contexts per forward pass; None: `batch_tokens`, else 16 on the CPU and
    sized from free device memory on CUDA (engine.contexts_per_forward)."""
    batch_tokens: int | None = None
    """Tokens per forward pass (rounded down to whole contexts); excludes batch_size."""
    shard_tokens: int = 65_536
    """Tokens per shard file; a shard is the unit of resume."""
    store_dtype: str = "float32"
    """Dtype activations are stored in (float32, bfloat16 or float16)."""

    def __post_init__(self):
        integer("tokens", self.tokens, low=1, high=ABSURD)
        integer("context", self.context, low=2, high=ABSURD)
        if self.batch_size is not None:
            integer("batch_size", self.batch_size, low=1, high=ABSURD)
        if self.batch_tokens is not None:
            integer("batch_tokens", self.batch_tokens, low=1, high=ABSURD)
            if self.batch_size is not None:
                raise BadValueError("give either --batch-size (contexts) or --batch-tokens, "
                                    "not both.")
        integer("shard_tokens", self.shard_tokens, low=1, high=ABSURD)
        choice("store_dtype", self.store_dtype, tuple(DTYPES))


def harvest(lm: LM, config: HarvestConfig, out: str | Path,
            on_progress: Callable[[int, int], None] | None = None, *,
            rank: int = 0, world_size: int = 1) -> Manifest:
    """Record activations into `out`, resuming what is already there.

    `on_progress(tokens_done, tokens_target)` is called after every batch.
    With `world_size` > 1 this cache holds contexts rank, rank + world_size, ...
    of the corpus (one rank's slice, for data-parallel training).
    """
    check_positions("context", config.context, lm_max_positions(lm), lm.name)
    sites = resolve_sites(lm.arch, config.sites)
    corpus = load_corpus(config.corpus)
    store_dtype = DTYPES[config.store_dtype]
    identity = cache_identity(lm, sites, corpus, config.context, store_dtype, rank, world_size)
    kept = "every complete shard is kept and listed"
    with disk_full(out, kept):
        writer = ShardWriter(out, identity, tokens_target=config.tokens)
    manifest = writer.manifest
    if on_progress:
        on_progress(manifest.n_tokens, config.tokens)
    if manifest.n_tokens >= config.tokens:
        return manifest

    contexts_per_shard = max(1, config.shard_tokens // config.context)
    # A resumed run forwards the batches the first run did (same shards, same numerics),
    # unless the batch is given again; the choice is recorded in the manifest.
    explicit = config.batch_size is not None or config.batch_tokens is not None
    recorded = (manifest.forward or {}).get("batch_contexts")
    if not explicit and recorded:
        n_batch = recorded
    else:
        n_batch = contexts_per_forward(lm, config.context, len(sites),
                                       batch_size=config.batch_size,
                                       batch_tokens=config.batch_tokens)
    with disk_full(out, kept):
        writer.record_forward({"batch_contexts": n_batch,
                               "batch_tokens": n_batch * config.context,
                               "device": str(lm.device)})
    pending: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []
    pending_tokens = 0
    done = manifest.n_tokens
    # Resume: skip exactly the contexts already stored; packing is deterministic.
    batches = token_batches(corpus, lm.tokenizer, config.context, n_batch,
                            skip=manifest.n_contexts * world_size + rank, rank=rank,
                            world_size=world_size)
    chunks = forward_chunks(lm, sites, batches, store_dtype, to_host=True)
    writes = _ShardThread(writer, out, kept)
    try:
        for chunk in chunks:
            pending.append((chunk.ids, chunk.special, chunk.acts))
            pending_tokens += int((~chunk.special).sum())
            n_ctx = sum(p[0].shape[0] for p in pending)
            last = done + pending_tokens >= config.tokens
            if n_ctx >= contexts_per_shard or last:
                writes.submit(pending)
                done += pending_tokens
                pending, pending_tokens = [], 0
            if on_progress:
                on_progress(done + pending_tokens, config.tokens)
            if last:
                break
        writes.finish()
    finally:  # stop the threads now, not when the generators are collected
        writes.stop()
        chunks.close()
        batches.close()
    if done < config.tokens:
        raise SaelabError(f"corpus {corpus.name!r} ran out after {done} tokens; asked for "
                          f"{config.tokens}. Ask for fewer tokens or use a larger corpus.")
    return manifest


def cache_identity(lm: LM, sites, corpus, context: int, store_dtype: torch.dtype,
                   rank: int = 0, world_size: int = 1) -> dict:
    """What a cache of these activations holds (its manifest's identity); streaming
    training with --save-cache writes the same, so either can be trained from."""
    return {**lm.provenance(), "sites": {s.name: site_width(lm.arch, s) for s in sites},
            "store_dtype": dtype_name(store_dtype), "context": context,
            "corpus": corpus.name, "corpus_hash": corpus.sha256,
            "slice": f"{rank}/{world_size}"}


def _flush(writer: ShardWriter, pending) -> None:
    ids = torch.cat([p[0] for p in pending])
    special = torch.cat([p[1] for p in pending])
    acts = {site: torch.cat([p[2][site] for p in pending]) for site in pending[0][2]}
    writer.append(ids, special, acts)


class _ShardThread:
    """Writes shards in order in a background thread, one shard behind the forwards, so
    saving, fsync and sha256 (all GIL-free) overlap the next shard's forwards. A failed
    write is raised in the caller at its next `submit` or at `finish` (a full disk as
    DiskFullError); later shards are then dropped, so the cache stays a valid prefix."""

    def __init__(self, writer: ShardWriter, out, kept: str):
        self.writer, self.out, self.kept = writer, out, kept
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="saelab-shards", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (pending := self.queue.get()) is not None:
            if self.error is None:
                try:
                    _flush(self.writer, pending)
                except BaseException as err:  # noqa: BLE001 - raised in the caller
                    self.error = err

    def _raise(self) -> None:
        if self.error is not None:
            with disk_full(self.out, self.kept + f" ({len(self.writer.manifest.shards)} shards)"):
                raise self.error

    def submit(self, pending: list) -> None:
        self._raise()
        self.queue.put(pending)

    def finish(self) -> None:
        """Wait for every shard submitted; raise the first failed write."""
        self.stop()
        self._raise()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
