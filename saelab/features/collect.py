"""Collect feature dashboards' raw material in one streaming pass, for many SAEs at once.

    coll = collect(lm, {"l12": sae}, corpus="builtin", tokens=50_000)   # one forward per batch
    coll = collect_cache(ActivationStore("cache"), {"l12": sae})        # or from a harvest cache
    table = summarize(coll, "l12")          # per-feature stats and examples (saelab.features.summary)

One forward per batch feeds every SAE (stopped after the deepest site); each
SAE's non-zero activations become events (special tokens excluded), which
update a `FeatureState` (see state.py) without any loop over features or tokens.

Splitting and merging. Under torchrun each rank packs its own contexts
(``pack(rank=, world_size=)``, contexts keep their global index), collects them,
and `save_part` writes its state; `load_parts` merges the parts exactly:
summarizing the merge gives the same tables as one process over the whole
corpus (given the same activations).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.checks import ABSURD, MAX_SEED, PER_FEATURE, integer
from saelab.data.tokens import context_index, pack
from saelab.errors import SaelabError, ShapeMismatchError
from saelab.features.state import Contexts, FeatureState
from saelab.sae.topk import TopKSAE

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CollectConfig:
    """What to keep per feature."""

    top_k: int = 20
    """Top activating contexts per feature (one example per context, at its max)."""
    n_bins: int = 10
    """Equal-width activation bins over (0, max] for the uniform examples."""
    per_bin: int = 5
    """Examples drawn per bin (uniformly at random, by a seeded hash of token and feature)."""
    hist_bins: int = 32
    """Bins of the activation histogram over (0, max]."""
    left: int = 16
    """Tokens shown before the example's token (the window stays inside its context)."""
    right: int = 8
    """Tokens shown after it."""
    seed: int = 0
    """Seed of the bin sampling."""

    def __post_init__(self) -> None:
        # Per-feature counts: d_sae x 10^4 rows is already 10^8 at a 9216-wide SAE.
        for name, low, high in (("top_k", 1, PER_FEATURE), ("n_bins", 1, PER_FEATURE),
                                ("per_bin", 0, PER_FEATURE), ("hist_bins", 1, PER_FEATURE),
                                ("left", 0, ABSURD), ("right", 0, ABSURD), ("seed", 0, MAX_SEED)):
            integer(name, getattr(self, name), low=low, high=high)

    @property
    def window(self) -> int:
        return self.left + 1 + self.right


@dataclass
class Collection:
    """The merged state of a collection: one FeatureState per SAE and the contexts they index."""

    config: CollectConfig
    states: dict[str, FeatureState]
    contexts: Contexts = field(default_factory=Contexts)
    meta: dict[str, Any] = field(default_factory=dict)

    def merge(self, other: Collection) -> Collection:
        if self.config != other.config or set(self.states) != set(other.states):
            raise ValueError("cannot merge collections with different configs or SAEs")
        states = {name: s.merge(other.states[name]) for name, s in self.states.items()}
        meta = {**self.meta, "seconds": self.meta.get("seconds", 0) + other.meta.get("seconds", 0)}
        return Collection(self.config, states, self.contexts.merge(other.contexts), meta)

    @property
    def n_tokens(self) -> int:
        return next(iter(self.states.values())).n_tokens if self.states else 0


@torch.no_grad()
def sparse_events(sae: Any, x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(token, feature, act) of every non-zero activation of `sae` on rows `keep` of x [N, d].

    TopK SAEs never build the dense [N, F] matrix: their k values per token are the events.
    """
    rows = keep.nonzero().squeeze(1)  # (n,) only non-special tokens are encoded
    xs = x[rows]
    if isinstance(sae, TopKSAE):
        vals, idx = sae.encode_topk(xs)  # (n, k)
        hit = vals > 0
        slot_row = torch.arange(len(rows), device=idx.device)[:, None].expand_as(idx)
        return rows[slot_row[hit]], idx[hit], vals[hit].float()
    feats = sae.encode(xs)  # (n, F)
    r, f = feats.nonzero(as_tuple=True)
    return rows[r], f, feats[r, f].float()


class Collector:
    """Feed it batches (context indices, ids, special mask, activations by site)."""

    def __init__(self, saes: Mapping[str, Any], config: CollectConfig = CollectConfig()):
        if not saes:
            raise SaelabError("nothing to collect: no SAE was given")
        self.saes = dict(saes)
        self.config = config
        self.collection = Collection(config, {
            name: FeatureState(sae.cfg.d_sae, config.top_k) for name, sae in self.saes.items()})
        self.sites = {name: site_of(sae, name) for name, sae in self.saes.items()}

    def add(self, ctx: Tensor, ids: Tensor, special: Tensor, acts: Mapping[str, Tensor]) -> int:
        """Add one batch; returns its number of counted (non-special) tokens."""
        B, P = ids.shape
        keep = ~special.reshape(-1)
        n = int(keep.sum())
        self.collection.contexts.add(ctx, ids, special)
        for name, sae in self.saes.items():
            # encode where the SAE lives (a GPU when there is one); state stays on the CPU
            x = acts[self.sites[name]].reshape(B * P, -1).to(sae.W_enc.device)
            tok, feat, act = sparse_events(sae, x, keep.to(x.device))
            self.collection.states[name].update(ctx, P, tok.cpu(), feat.cpu(), act.cpu(), n)
        return n


def site_of(sae: Any, name: str) -> str:
    site = sae.cfg.site
    if site is None:
        raise SaelabError(f"SAE {name!r} records no site (cfg.metadata['site']); dashboards need "
                          "to know where it reads. Set it, e.g. with `saelab sae convert --site`.")
    return site


def collect(lm: Any, saes: Mapping[str, Any], *, corpus: Any = "builtin", tokens: int = 50_000,
            context: int = 128, batch_size: int = 16, config: CollectConfig = CollectConfig(),
            rank: int = 0, world_size: int = 1, on_progress: Progress | None = None) -> Collection:
    """One pass of the model over `tokens` tokens of `corpus` (this rank's share of them)."""
    from saelab.data.corpus import Corpus, load_corpus
    from saelab.models.hooks import capture
    from saelab.models.sites import resolve_sites, site_width

    collector = Collector(saes, config)
    sites = resolve_sites(lm.arch, sorted(set(collector.sites.values())))
    for name, sae in saes.items():
        site = collector.sites[name]
        if site_width(lm.arch, site) != sae.cfg.d_in:
            raise SaelabError(f"SAE {name!r} expects d_in={sae.cfg.d_in} but site {site} of "
                              f"{lm.name} has width {site_width(lm.arch, site)}; use this SAE's model.")
    corpus_obj = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    batches = pack(corpus_obj, lm.tokenizer, context, batch_size=batch_size, n_tokens=tokens,
                   rank=rank, world_size=world_size)
    start, done, row = time.perf_counter(), 0, 0
    share = tokens // world_size
    with torch.inference_mode():
        for ids, special in batches:
            ctx = torch.tensor([context_index(row + i, rank=rank, world_size=world_size)
                                for i in range(len(ids))])
            row += len(ids)
            with capture(lm.model, sites, arch=lm.arch, stop_early=True) as cap:
                cap.run(input_ids=ids.to(lm.device), use_cache=False)
            acts = {name: a.float() for name, a in cap.acts.items()}
            done += collector.add(ctx, ids, special, acts)
            if on_progress:
                on_progress(min(done, share), share)
    if done == 0:
        raise SaelabError(f"corpus {corpus_obj.name!r} gave no tokens to collect on")
    coll = collector.collection
    coll.meta = {"source": "corpus", "corpus": corpus_obj.name, "corpus_hash": corpus_obj.sha256,
                 "context": context, "tokens_asked": tokens, "rank": rank,
                 "world_size": world_size, "model": lm.name, "model_hash": lm.source_hash,
                 "seconds": time.perf_counter() - start}
    return coll


def collect_cache(store: Any, saes: Mapping[str, Any], *, config: CollectConfig = CollectConfig(),
                  tokens: int | None = None, rank: int = 0, world_size: int = 1,
                  on_progress: Progress | None = None) -> Collection:
    """One pass over an activation cache (`saelab.data.store.ActivationStore`); no model needed.

    Shards are read in order; rank r takes shards r, r + world_size, ... Context
    indices count the cache's contexts from 0 in shard order.
    """
    collector = Collector(saes, config)
    missing = sorted(set(collector.sites.values()) - set(store.sites))
    if missing:
        raise SaelabError(f"the cache {store.folder} holds sites {list(store.sites)}, "
                          f"not {', '.join(missing)} that the SAEs read")
    for name, site in collector.sites.items():  # same site name, another model's width
        if store.sites[site] != collector.saes[name].cfg.d_in:
            raise ShapeMismatchError(
                f"SAE {name!r} reads d_in={collector.saes[name].cfg.d_in} but the cache "
                f"{store.folder} holds {site} at width {store.sites[site]}: it was harvested from another "
                "model. Use a cache of the SAE's model, or no --cache.")
    start, done, first = time.perf_counter(), 0, 0
    target = tokens or store.manifest.n_tokens
    for i, entry in enumerate(store.manifest.shards):
        n_ctx = entry["n_contexts"]
        if i % world_size == rank:
            shard = store.load_shard(i)
            ctx = torch.arange(first, first + n_ctx)
            acts = {site: shard[site].float() for site in set(collector.sites.values())}
            done += collector.add(ctx, shard["ids"], shard["special"], acts)
            if on_progress:
                on_progress(min(done, target), target)
        first += n_ctx
        if tokens is not None and done >= tokens:
            break
    coll = collector.collection
    ident = store.manifest.identity
    coll.meta = {"source": "cache", "cache": str(store.folder), "corpus": ident.get("corpus"),
                 "corpus_hash": ident.get("corpus_hash"), "context": ident.get("context"),
                 "model": ident.get("model"), "model_hash": ident.get("model_hash"),
                 "rank": rank, "world_size": world_size, "seconds": time.perf_counter() - start}
    return coll


# ---------------------------------------------------------------- parts on disk


def save_part(coll: Collection, path: str | Path) -> Path:
    """Write a collection (one rank's part) as one safetensors file, config and meta in its header."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"ctx.{k}": v for k, v in coll.contexts.to_tensors().items()}
    for i, state in enumerate(coll.states.values()):
        tensors.update(state.to_tensors(prefix=f"sae{i}."))
    header = {"config": json.dumps(asdict(coll.config)), "saes": json.dumps(list(coll.states)),
              "meta": json.dumps(coll.meta, default=str)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def load_part(path: str | Path) -> Collection:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as fh:
        header = fh.metadata()
    tensors = load_file(str(path))
    names = json.loads(header["saes"])
    states = {name: FeatureState.from_tensors(tensors, prefix=f"sae{i}.")
              for i, name in enumerate(names)}
    ctx = Contexts.from_tensors({k[4:]: v for k, v in tensors.items() if k.startswith("ctx.")})
    return Collection(CollectConfig(**json.loads(header["config"])), states, ctx,
                      json.loads(header["meta"]))


def load_parts(paths: Iterable[str | Path]) -> Collection:
    """Merge the parts written by `save_part` (e.g. one per torchrun rank)."""
    parts: Iterator[Collection] = (load_part(p) for p in paths)
    merged = next(parts, None)
    if merged is None:
        raise SaelabError("no collection parts to merge")
    for part in parts:
        merged = merged.merge(part)
    return merged
