"""Training batches from a live model forward or from a cache, through one shuffling buffer.

Both sources produce the same thing: contexts in corpus order, in chunks of
`chunk` contexts (one model forward each; the cache re-cut into the chunks
its harvest forwarded), with every site's activations. From each chunk, per
site, the rows that training uses are kept: special tokens (BOS, separators,
chat markers) out, NaN/inf rows out (counted), attention-sink outliers out
(norm above `outlier_factor` x the chunk's median, see outliers.py). So
streaming and a cache of the same tokens give the same rows, and training
from either gives the same SAEs.

Each site's rows go into its own `ShuffleBuffer` (capacity in tokens): it is
filled, permuted, and the first half is emitted as batches; that half is then
refilled with the next rows and the buffer permuted again. A batch thus mixes
rows of about `capacity / context` contexts. The buffer's permutations come
from a generator seeded by (seed, site), and a site's rows never depend on
the other sites, so a site trains on the same batches whichever sites share
its pass (site groups give the same SAEs as one big group). A transcoder's input and
target sites share one buffer (key ``input>target``, rows joined on the last dimension),
so its pairs stay aligned through the filtering and the shuffle.

`BatchStream.state()` is what a checkpoint needs to rebuild the stream: the
source position (contexts consumed) and each buffer's rows, pending rows and
generator state. Restored, the stream yields exactly what it would have.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from saelab.data.engine import Chunk, forward_chunks, token_batches
from saelab.data.outliers import norm_outliers
from saelab.data.store import ActivationStore, ShardWriter
from saelab.errors import SaelabError


def chunk_rows(special: Tensor, acts: Tensor, outlier_factor: float) -> tuple[Tensor, int]:
    """The training rows [m, d] of one site in one chunk, and how many were NaN/inf.

    special [n, context] bool on the host; acts [n, context, d] on any device.
    Reads back one count (the rows kept), once per chunk, never per step.
    """
    d = acts.shape[-1]
    idx = (~special.reshape(-1)).nonzero().squeeze(1)  # host: no device read-back
    rows = acts.reshape(-1, d).index_select(0, idx.to(acts.device, non_blocking=True))
    finite = torch.isfinite(rows).all(-1)
    sinks = norm_outliers(rows, keep=finite, factor=outlier_factor) & finite
    keep = finite & ~sinks
    kept = rows[keep]
    return kept, len(rows) - len(kept) - int(sinks.sum())


class ShuffleBuffer:
    """One site's rows, shuffled: filled to `capacity`, permuted, half emitted, refilled."""

    def __init__(self, capacity: int, batch: int, seed: int, device: torch.device,
                 dtype: torch.dtype):
        if capacity < 2 * batch:
            raise SaelabError(f"the shuffling buffer holds {capacity} tokens, less than two "
                              f"batches ({2 * batch}); raise --buffer-tokens.")
        self.capacity, self.batch, self.device, self.dtype = capacity, batch, device, dtype
        self.gen = torch.Generator().manual_seed(seed)
        self.data: Tensor | None = None  # permuted rows of this round
        self.cursor = 0  # rows of `data` emitted
        self.limit = 0  # rows of `data` this round may emit
        self.pending: list[Tensor] = []  # rows not yet in the buffer, in order
        self.n_pending = 0

    def add(self, rows: Tensor) -> None:
        if len(rows):
            if rows.device != self.device and self.device.type == "cuda":
                rows = rows.pin_memory()
            self.pending.append(rows.to(self.device, self.dtype, non_blocking=True))
            self.n_pending += len(rows)

    def rows_wanted(self) -> int:
        """Rows to add before the next batch can be formed (0: it can)."""
        if self.data is not None and self.cursor + self.batch <= self.limit:
            return 0
        kept = 0 if self.data is None else len(self.data) - self.cursor
        return max(0, self.capacity - kept - self.n_pending)

    def next_batch(self) -> Tensor | None:
        """The next [batch, d] rows, or None when the rows ran out."""
        if self.data is None or self.cursor + self.batch > self.limit:
            self._new_round()
            if self.limit < self.batch:
                return None
        out = self.data[self.cursor:self.cursor + self.batch]
        self.cursor += self.batch
        return out

    def _new_round(self) -> None:
        kept = [] if self.data is None else [self.data[self.cursor:]]
        want = self.capacity - sum(len(t) for t in kept)
        pending = torch.cat(self.pending) if self.pending else None
        if pending is not None:
            kept.append(pending[:want])
            rest = pending[want:]
            self.pending, self.n_pending = ([rest] if len(rest) else []), len(rest)
        data = torch.cat(kept) if kept else torch.empty(0)
        perm = torch.randperm(len(data), generator=self.gen)
        self.data = data.index_select(0, perm.to(self.device, non_blocking=True))
        self.cursor = 0
        self.limit = min(self.capacity // 2, len(data)) // self.batch * self.batch

    def state(self, prefix: str) -> tuple[dict[str, Tensor], dict]:
        data = self.data[self.cursor:] if self.data is not None else None
        tensors = {f"{prefix}/rng": self.gen.get_state()}
        if data is not None:
            tensors[f"{prefix}/data"] = data.cpu()
        if self.pending:
            tensors[f"{prefix}/pending"] = torch.cat(self.pending).cpu()
        return tensors, {"limit": self.limit - self.cursor if data is not None else 0,
                         "started": data is not None}

    def load(self, prefix: str, tensors: dict[str, Tensor], info: dict) -> None:
        self.gen.set_state(tensors[f"{prefix}/rng"])
        self.data = None
        if info["started"]:
            self.data = tensors[f"{prefix}/data"].to(self.device, self.dtype)
        self.cursor, self.limit = 0, info["limit"]
        self.pending, self.n_pending = [], 0
        if f"{prefix}/pending" in tensors:
            self.add(tensors[f"{prefix}/pending"])


PAIR = ">"  # a buffer key "mlp_in.3>mlp_out.3": a transcoder's input and target rows, joined


def pair_key(site: str, target: str | None) -> str:
    """The buffer key of an objective: its site, or ``site>target`` for a transcoder, whose
    input and target rows must stay paired through the shuffle (one buffer, rows joined)."""
    return site if target is None else f"{site}{PAIR}{target}"


def key_sites(key: str) -> list[str]:
    """The sites a buffer key reads: one, or a transcoder's (input, target)."""
    return key.split(PAIR)


def source_sites(keys: list[str]) -> list[str]:
    """Every site the keys read, once, in order."""
    return list(dict.fromkeys(s for key in keys for s in key_sites(key)))


def key_acts(acts: dict[str, Tensor], key: str) -> Tensor:
    """A chunk's activations for a buffer key: a pair's sites joined on the last dim, so
    the same rows (tokens) are kept, dropped and shuffled together."""
    parts = [acts[s] for s in key_sites(key)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def site_seed(seed: int, site: str) -> int:
    return seed * 1_000_003 + zlib.crc32(site.encode())


class CacheContexts:
    """Contexts of an activation cache in order, in chunks of `chunk`, epoch after epoch.

    A harvest forwards `chunk` contexts at a time and its shards hold whole
    forwards, so these are the chunks the model produced.
    """

    def __init__(self, store: ActivationStore, sites: list[str], chunk: int, start: int = 0):
        self.store, self.sites, self.chunk = store, sites, chunk
        self.position = start  # contexts consumed, over all epochs
        self.total = store.manifest.n_contexts
        if self.total == 0:
            raise SaelabError(f"the cache {store.folder} holds no activations; harvest first.")

    def corpus_contexts(self) -> int:
        """Contexts of the corpus, from its start, that the cache's harvest read (a rank's
        slice r/N of the corpus spans N times its own contexts)."""
        slices = str(self.store.manifest.identity.get("slice", "0/1")).partition("/")[2]
        return self.total * (int(slices) if slices.isdigit() else 1)

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            offset = self.position % self.total
            shards = self.store.manifest.shards
            first, start_shard = 0, 0
            while first + shards[start_shard]["n_contexts"] <= offset:
                first += shards[start_shard]["n_contexts"]
                start_shard += 1
            parts: list[dict[str, Tensor]] = []  # views into loaded shards, in order
            n_held, skip = 0, offset - first
            for j in range(start_shard, len(self.store.manifest.shards)):
                shard = self.store.load_shard(j)
                parts.append({k: shard[k][skip:] for k in ("ids", "special", *self.sites)})
                n_held += len(parts[-1]["ids"])
                skip = 0
                while n_held >= self.chunk:
                    yield self._take(parts, self.chunk)
                    n_held -= self.chunk
            if n_held:  # the harvest's last forward (the stream's end), shorter
                yield self._take(parts, n_held)

    def _take(self, parts: list[dict[str, Tensor]], n: int) -> Chunk:
        """The first n contexts held in `parts` (removed from it)."""
        pieces, need = [], n
        while need:
            part = parts[0]
            m = min(need, len(part["ids"]))
            pieces.append({k: v[:m] for k, v in part.items()})
            rest = {k: v[m:] for k, v in part.items()}
            if len(rest["ids"]):
                parts[0] = rest
            else:
                parts.pop(0)
            need -= m
        whole = pieces[0] if len(pieces) == 1 else {
            k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
        self.position += n
        return Chunk(whole["ids"], whole["special"], {s: whole[s] for s in self.sites})


class ModelContexts:
    """A corpus packed into contexts and run through the model, `chunk` contexts per
    forward, every site from one forward stopped after the deepest.

    With a `writer` the chunks are also appended to a cache (harvest's layout):
    the contexts the cache lacks are forwarded first, so a resumed run's cache
    is complete too. `rank`/`world_size`: this rank's slice of the corpus.
    """

    def __init__(self, lm, sites: list[str], corpus, context: int, chunk: int,
                 dtype: torch.dtype, start: int = 0, rank: int = 0, world_size: int = 1,
                 writer: ShardWriter | None = None, shard_contexts: int = 512):
        self.lm, self.sites, self.corpus, self.context, self.chunk = lm, sites, corpus, context, chunk
        self.dtype, self.rank, self.world_size = dtype, rank, world_size
        self.writer, self.shard_contexts = writer, shard_contexts
        self.position = start
        self._written = writer.manifest.n_contexts if writer else None
        self._to_write: list[Chunk] = []

    def corpus_contexts(self) -> int:
        """Contexts of the corpus, from its start, read so far (every rank's slice)."""
        return self.position * self.world_size

    def __iter__(self) -> Iterator[Chunk]:
        begin = self.position if self.writer is None else min(self.position, self._written)
        at = begin
        batches = token_batches(self.corpus, self.lm.tokenizer, self.context, self.chunk,
                                skip=begin * self.world_size + self.rank, rank=self.rank,
                                world_size=self.world_size)
        for chunk in forward_chunks(self.lm, self.sites, batches, self.dtype):
            n = len(chunk.ids)
            if self.writer is not None and at >= self._written:
                self._write(chunk)
            at += n
            if at <= self.position:  # only the cache needed this one
                continue
            self.position = at
            yield chunk
        self.flush()

    def _write(self, chunk: Chunk) -> None:
        self._to_write.append(chunk)
        self._written += len(chunk.ids)
        if sum(len(c.ids) for c in self._to_write) >= self.shard_contexts:
            self.flush()

    def flush(self) -> None:
        """Write the chunks still held to the cache (at the end of a run)."""
        if self.writer is None or not self._to_write:
            return
        parts, self._to_write = self._to_write, []
        self.writer.append(torch.cat([c.ids for c in parts]), torch.cat([c.special for c in parts]),
                           {s: torch.cat([c.acts[s].cpu() for c in parts]) for s in self.sites})


class BatchStream:
    """{key: [batch, d]} training batches on `device`, from a context source.

    `sites` are buffer keys: a site, or a transcoder's ``input>target`` pair, whose
    batches are [batch, d_in + d_out] (see `pair_key`). batch: rows per buffer batch;
    with `take` = (rank, world_size) each rank keeps its slice of every batch (ranks
    sharing one cache).
    """

    def __init__(self, source, sites: list[str], *, batch: int, capacity: int, seed: int,
                 device: torch.device, dtype: torch.dtype, outlier_factor: float,
                 take: tuple[int, int] = (0, 1)):
        self.source, self.sites, self.outlier_factor, self.take = source, sites, outlier_factor, take
        self.buffers = {s: ShuffleBuffer(capacity, batch, site_seed(seed, s), device, dtype)
                        for s in sites}
        self.nonfinite_rows = 0
        self._chunks: Iterator[Chunk] | None = None
        self.tokens_read = 0

    def _pull(self) -> bool:
        if self._chunks is None:
            self._chunks = iter(self.source)
        chunk = next(self._chunks, None)
        if chunk is None:
            return False
        for site in self.sites:
            rows, bad = chunk_rows(chunk.special, key_acts(chunk.acts, site), self.outlier_factor)
            self.nonfinite_rows += bad
            self.buffers[site].add(rows)
        self.tokens_read += int((~chunk.special).sum())
        return True

    def next(self) -> dict[str, Tensor]:
        while any(b.rows_wanted() for b in self.buffers.values()):
            if not self._pull():
                break
        out = {}
        rank, world = self.take
        for site, buf in self.buffers.items():
            batch = buf.next_batch()
            if batch is None:
                raise SaelabError(f"the data ran out after {self.tokens_read:,} tokens at "
                                  f"{site}: ask for fewer --tokens or use a larger corpus.")
            n = len(batch) // world
            out[site] = batch[rank * n:(rank + 1) * n]
        return out

    def state(self) -> tuple[dict[str, Tensor], dict]:
        tensors, info = {}, {"position": self.source.position,
                             "nonfinite_rows": self.nonfinite_rows, "buffers": {}}
        for site, buf in self.buffers.items():
            t, i = buf.state(f"buffer/{site}")
            tensors |= t
            info["buffers"][site] = i
        return tensors, info

    def load(self, tensors: dict[str, Tensor], info: dict) -> None:
        self.source.position = info["position"]
        self.nonfinite_rows = info["nonfinite_rows"]
        self._chunks = None
        for site, buf in self.buffers.items():
            buf.load(f"buffer/{site}", tensors, info["buffers"][site])


def open_cache_writer(folder: str | Path, identity: dict, tokens: int) -> ShardWriter:
    """The cache `--save-cache` writes (refuses a folder holding another harvest)."""
    return ShardWriter(folder, identity, tokens_target=tokens)
