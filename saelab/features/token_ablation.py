"""Ablated text: how much each earlier token matters to a feature's activation at a position.

    res = token_ablation(lm, sae, ids, position=41, feature=1234)
    res.deltas[i]       # act(with token res.deleted[i] removed) - res.base

For a feature active at `position` of a context, delete each of the `max_back`
tokens before it in turn (special tokens such as BOS are kept) and read the
feature at the same token, now one position earlier. The tokens before the
first deletable one are the same in every variant: they run once and their KV
cache is shared, and the variants (and the unablated suffix) run as one batch
on top of it - about 400 token-forwards per example instead of 17 full
contexts. Rows are right-padded: with causal attention the padding after the
read position cannot change it, so no mask is needed. Forwards stop at the
SAE's site.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.models.hooks import capture
from saelab.models.kv_cache import cache_kwargs


@dataclass
class AblationResult:
    """One example's token ablation."""

    feature: int
    position: int  # of the read token in the context
    base: float  # the feature's activation with nothing deleted
    deleted: list[int]  # context positions deleted, one per delta (ascending)
    deltas: list[float]  # activation after deleting that token, minus base


@dataclass(frozen=True)
class AblationItem:
    ids: Sequence[int]  # the context (only ids[:position + 1] matter)
    position: int
    feature: int
    special: Sequence[bool] | None = None  # tokens never deleted


def _variants(item: AblationItem, max_back: int) -> tuple[list[int], list[list[int]], list[int], list[int]]:
    """(shared prefix, suffix rows, read index in each row, deleted positions).

    Every row shares the tokens before the first deletable one, so they are run once
    and cached; the rows are the rest: the unablated suffix first, then one per deletion.
    """
    prefix = [int(t) for t in item.ids[: item.position + 1]]
    special = item.special or [False] * len(prefix)
    deleted = [j for j in range(max(0, item.position - max_back), item.position) if not special[j]]
    lo = deleted[0] if deleted else item.position
    rows = [prefix[lo:]] + [prefix[lo:j] + prefix[j + 1:] for j in deleted]
    reads = [item.position - lo] + [item.position - lo - 1] * len(deleted)
    return prefix[:lo], rows, reads, deleted


def _site_rows(lm, site: str, shared: list[int], rows: list[list[int]], reads: list[int],
               pad_id: int) -> Tensor:
    """Site activations [len(rows), d] at each row's read index, the rows continuing `shared`."""
    from transformers import DynamicCache

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    kwargs: dict = {}
    with torch.inference_mode():
        if shared:
            # Only layers up to the site fill the cache: the forward stops there, and so do
            # the rows' forwards that read it.
            cache = DynamicCache(config=lm.model.config)
            with capture(lm.model, site, arch=lm.arch) as cap:
                cap.run(input_ids=torch.tensor([shared], device=lm.device), **cache_kwargs(lm.model, cache),
                        use_cache=True)
            cache.batch_repeat_interleave(len(rows))
            kwargs = {**cache_kwargs(lm.model, cache), "use_cache": True}
        with capture(lm.model, site, arch=lm.arch) as cap:
            cap.run(input_ids=ids.to(lm.device), **kwargs)
        return cap[site][torch.arange(len(rows)), torch.tensor(reads)]  # (n, d)


@torch.no_grad()
def ablate_many(lm, sae, items: Sequence[AblationItem], *, max_back: int = 16,
                pad_id: int = 0) -> list[AblationResult]:
    """Token ablation of several (context, position, feature) examples: two forwards each
    (the shared prefix, cached; then all deletions as one batch), stopped at the SAE's site."""
    results = []
    for item in items:
        if not 0 <= item.position < len(item.ids):
            raise ValueError(f"position {item.position} is outside the context of {len(item.ids)} tokens")
        shared, rows, reads, deleted = _variants(item, max_back)
        x = _site_rows(lm, sae.cfg.site, shared, rows, reads, pad_id)
        acts = sae.encode(x.float())[:, item.feature].cpu()  # (n,)
        base = float(acts[0])
        results.append(AblationResult(item.feature, item.position, base, deleted,
                                      (acts[1:] - base).tolist()))
    return results


def token_ablation(lm, sae, ids: Sequence[int] | Tensor, position: int, feature: int, *,
                   special: Sequence[bool] | None = None, max_back: int = 16) -> AblationResult:
    """Token ablation of one example (see the module docstring)."""
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    return ablate_many(lm, sae, [AblationItem(ids, position, feature, special)],
                       max_back=max_back)[0]
