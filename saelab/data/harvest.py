"""Harvest: model + sites + corpus -> an activation cache on disk.

One forward pass per batch feeds every site, and the forward stops right
after the deepest site, so harvesting layer 12 of a 30-layer model costs
about 40% of a full pass. Each shard is complete or absent (see store.py), so
re-running the same command resumes after the last complete shard and
produces exactly what an uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from saelab.atomic import disk_full
from saelab.checks import ABSURD, choice, integer
from saelab.data.corpus import load_corpus
from saelab.data.store import Manifest, ShardWriter
from saelab.data.tokens import pack
from saelab.errors import SaelabError
from saelab.models.hooks import capture
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
    batch_size: int = 16
    """Contexts per forward pass."""
    shard_tokens: int = 65_536
    """Tokens per shard file; a shard is the unit of resume."""
    store_dtype: str = "float32"
    """Dtype activations are stored in (float32, bfloat16 or float16)."""

    def __post_init__(self):
        integer("tokens", self.tokens, low=1, high=ABSURD)
        integer("context", self.context, low=2, high=ABSURD)
        integer("batch_size", self.batch_size, low=1, high=ABSURD)
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
    pending: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []
    pending_tokens = 0
    done = manifest.n_tokens
    # Resume: skip exactly the contexts already stored; packing is deterministic.
    batches = pack(corpus, lm.tokenizer, config.context, batch_size=config.batch_size,
                   skip=manifest.n_contexts * world_size + rank, rank=rank,
                   world_size=world_size)
    for ids, special in batches:
        acts = _forward(lm, sites, ids, store_dtype)
        pending.append((ids, special, acts))
        pending_tokens += int((~special).sum())
        n_ctx = sum(p[0].shape[0] for p in pending)
        last = done + pending_tokens >= config.tokens
        if n_ctx >= contexts_per_shard or last:
            with disk_full(out, kept + f" ({len(manifest.shards)} shards)"):
                _flush(writer, pending)
            done += pending_tokens
            pending, pending_tokens = [], 0
        if on_progress:
            on_progress(done + pending_tokens, config.tokens)
        if last:
            break
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


@torch.inference_mode()
def _forward(lm: LM, sites, ids: torch.Tensor, store_dtype: torch.dtype
             ) -> dict[str, torch.Tensor]:
    ids = ids.to(lm.device)
    with capture(lm.model, sites, arch=lm.arch, stop_early=True) as cap:
        cap.run(input_ids=ids, use_cache=False)
    return {name: a.to("cpu", store_dtype) for name, a in cap.acts.items()}


def _flush(writer: ShardWriter, pending) -> None:
    ids = torch.cat([p[0] for p in pending])
    special = torch.cat([p[1] for p in pending])
    acts = {site: torch.cat([p[2][site] for p in pending]) for site in pending[0][2]}
    writer.append(ids, special, acts)
