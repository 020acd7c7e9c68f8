"""Mergeable per-feature state of a dashboard collection: top-k contexts and the event log.

Two tensors-only objects, updated batch by batch and combined exactly by `merge`,
so that ranks of a `torchrun` job (or any split of a corpus) can each collect a
part and one process finishes the whole:

    FeatureState (one per SAE)
      n_tokens                  tokens seen (special tokens excluded)
      top_val  [F, k] float32   per feature, the k contexts with the largest max activation,
      top_ctx  [F, k] int64     ordered by (value desc, global context index asc);
      top_pos  [F, k] int64     position of the (first) max in that context.
                                Unused slots hold value 0, context -1, position -1.
      events                    every non-zero (context, position, feature, activation):
        ctx int64, pos int32, feat int32, act float32   [E] each

    Contexts (shared by the SAEs of one pass)
      ctx     [C] int64         global context index (see saelab.data.tokens.context_index)
      ids     [C, P] int32      token ids
      special [C, P] bool       special tokens (never counted, never an example)

The event log is what makes the "uniform examples" exact: bins are equal-width
over (0, max], and max is only known at the end, so every firing is kept (about
20 bytes per non-zero (token, feature): 32 MB for 50k tokens at L0 = 32) and the
bins are drawn from it in `summarize`. The top-k state is the bounded part and is
merged without loops: concatenate the current top with a batch's per-context
maxima and keep the k best of every row at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

EMPTY = -1  # context / position of an unused top-k slot


def _cat(chunks: list[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=dtype)


def select_top(val: Tensor, ctx: Tensor, pos: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the k best candidates of every row of [F, M]: by value desc, then context asc.

    The context tie-break makes the result independent of the order candidates
    arrived in, which is what makes `merge` exact (repeated text gives equal values).
    """
    by_ctx = torch.argsort(ctx, dim=1, stable=True)  # (F, M)
    by_val = torch.argsort(-val.gather(1, by_ctx), dim=1, stable=True)
    order = by_ctx.gather(1, by_val)[:, :k]  # (F, k)
    val, ctx, pos = val.gather(1, order), ctx.gather(1, order), pos.gather(1, order)
    unused = val <= 0
    return val.masked_fill(unused, 0.0), ctx.masked_fill(unused, EMPTY), pos.masked_fill(unused, EMPTY)


@dataclass
class FeatureState:
    """Everything one SAE's collection keeps (see the module docstring)."""

    d_sae: int
    k: int
    n_tokens: int = 0
    top_val: Tensor = field(default=None)  # type: ignore[assignment]
    top_ctx: Tensor = field(default=None)  # type: ignore[assignment]
    top_pos: Tensor = field(default=None)  # type: ignore[assignment]
    _events: list[tuple[Tensor, Tensor, Tensor, Tensor]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.top_val is None:
            self.top_val = torch.zeros(self.d_sae, self.k)
            self.top_ctx = torch.full((self.d_sae, self.k), EMPTY, dtype=torch.int64)
            self.top_pos = torch.full((self.d_sae, self.k), EMPTY, dtype=torch.int64)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, ctx: Tensor, n_pos: int, tok: Tensor, feat: Tensor, act: Tensor,
               n_tokens: int) -> None:
        """Add one batch of events.

        ctx: [B] global context indices of the batch rows; tok: [E] flat token index
        (row * n_pos + position) of each event, feat: [E] feature, act: [E] > 0.
        n_tokens: non-special tokens in the batch.
        """
        B, F = len(ctx), self.d_sae
        row, pos = tok // n_pos, tok % n_pos
        self.n_tokens += int(n_tokens)
        self._events.append((ctx[row].to(torch.int64), pos.to(torch.int32),
                             feat.to(torch.int32), act.to(torch.float32)))
        # Per (context, feature): the max and the first position reaching it.
        cell = row * F + feat  # (E,)
        cmax = torch.zeros(B * F).scatter_reduce_(0, cell, act.float(), "amax")
        at_max = act.float() == cmax[cell]
        cpos = torch.full((B * F,), n_pos, dtype=torch.int64).scatter_reduce_(
            0, cell[at_max], pos[at_max].to(torch.int64), "amin")
        cand_val = cmax.view(B, F).T  # (F, B)
        cand_pos = cpos.view(B, F).T
        cand_ctx = ctx.to(torch.int64)[None, :].expand(F, B)
        self.top_val, self.top_ctx, self.top_pos = select_top(
            torch.cat([self.top_val, cand_val], 1), torch.cat([self.top_ctx, cand_ctx], 1),
            torch.cat([self.top_pos, cand_pos], 1), self.k)

    # ------------------------------------------------------------------ merge
    def events(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(ctx, pos, feat, act), all events so far, in arrival order."""
        if len(self._events) > 1:  # compact, so repeated calls stay cheap
            self._events = [tuple(torch.cat(col) for col in zip(*self._events))]  # type: ignore[misc]
        if not self._events:
            return (torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int32),
                    torch.empty(0, dtype=torch.int32), torch.empty(0))
        return self._events[0]

    def merge(self, other: FeatureState) -> FeatureState:
        """The state of both parts' data together (exact; the parts must cover disjoint contexts)."""
        if (self.d_sae, self.k) != (other.d_sae, other.k):
            raise ValueError(f"cannot merge states of d_sae/k {self.d_sae}/{self.k} and "
                             f"{other.d_sae}/{other.k}: they come from different collections")
        val, ctx, pos = select_top(torch.cat([self.top_val, other.top_val], 1),
                                   torch.cat([self.top_ctx, other.top_ctx], 1),
                                   torch.cat([self.top_pos, other.top_pos], 1), self.k)
        merged = FeatureState(self.d_sae, self.k, self.n_tokens + other.n_tokens, val, ctx, pos)
        merged._events = [self.events(), other.events()]
        return merged

    # ------------------------------------------------------------------ files
    def to_tensors(self, prefix: str = "") -> dict[str, Tensor]:
        ev_ctx, ev_pos, ev_feat, ev_act = self.events()
        return {f"{prefix}n_tokens": torch.tensor([self.n_tokens, self.d_sae, self.k]),
                f"{prefix}top_val": self.top_val, f"{prefix}top_ctx": self.top_ctx,
                f"{prefix}top_pos": self.top_pos, f"{prefix}ev_ctx": ev_ctx,
                f"{prefix}ev_pos": ev_pos, f"{prefix}ev_feat": ev_feat, f"{prefix}ev_act": ev_act}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], prefix: str = "") -> FeatureState:
        n_tokens, d_sae, k = (int(v) for v in t[f"{prefix}n_tokens"])
        state = cls(d_sae, k, n_tokens, t[f"{prefix}top_val"], t[f"{prefix}top_ctx"],
                    t[f"{prefix}top_pos"])
        state._events = [tuple(t[f"{prefix}ev_{c}"] for c in ("ctx", "pos", "feat", "act"))]  # type: ignore[list-item]
        return state


@dataclass
class Contexts:
    """The token ids of every context seen, by global context index (see the module docstring)."""

    ctx: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    ids: Tensor = field(default_factory=lambda: torch.empty(0, 0, dtype=torch.int32))
    special: Tensor = field(default_factory=lambda: torch.empty(0, 0, dtype=torch.bool))
    _chunks: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list, repr=False)

    def add(self, ctx: Tensor, ids: Tensor, special: Tensor) -> None:
        self._chunks.append((ctx.to(torch.int64), ids.to(torch.int32), special.to(torch.bool)))

    def _compact(self) -> None:
        if self._chunks:
            parts = ([(self.ctx, self.ids, self.special)] if len(self.ctx) else []) + self._chunks
            ctx, ids, special = (torch.cat(col) for col in zip(*parts))
            order = torch.argsort(ctx)
            self.ctx, self.ids, self.special = ctx[order], ids[order], special[order]
            self._chunks = []
            if len(self.ctx) > 1 and bool((self.ctx[1:] == self.ctx[:-1]).any()):
                raise ValueError("a context index occurs twice: the merged parts overlap")

    @property
    def n_pos(self) -> int:
        self._compact()
        return self.ids.shape[1]

    def rows(self, ctx: Tensor) -> Tensor:
        """Row of each global context index in `ids` (they must all be present)."""
        self._compact()
        return torch.searchsorted(self.ctx, ctx)

    def merge(self, other: Contexts) -> Contexts:
        self._compact()
        other._compact()
        out = Contexts()
        for part in (self, other):
            if len(part.ctx):
                out.add(part.ctx, part.ids, part.special)
        out._compact()
        return out

    def to_tensors(self) -> dict[str, Tensor]:
        self._compact()
        return {"ctx": self.ctx, "ids": self.ids, "special": self.special}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor]) -> Contexts:
        return cls(t["ctx"], t["ids"], t["special"])
