"""What `attribute` returns: sparse (example, position, feature) attributions per site.

Layout of one site's `SiteAttribution` (nnz = active features summed over tokens)::

    index  (nnz, 3) long    example, position, feature; sorted by example then position
    act    (nnz,)           the feature's activation there (never 0)
    value  (nnz,)           its attribution, act * d metric / d act
    error  (E, T)           the error node's attribution per position, 0 past an example's end

Positions index each example's own tokens (`tokens[e]`), never padded columns.
`save` writes all of it to one safetensors file (tensors ``SITE/index`` ...
plus ``metric``, ``tokens`` and ``lengths``), `load` reads it back.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from saelab.errors import CorruptFileError


@dataclass
class SiteAttribution:
    """One SAE's attributions over all examples (layout in the module docstring)."""

    site: str
    d_sae: int
    index: Tensor  # (nnz, 3) long
    act: Tensor  # (nnz,)
    value: Tensor  # (nnz,)
    error: Tensor  # (E, T)

    @cached_property
    def _examples(self) -> Tensor:
        return self.index[:, 0].contiguous()

    def rows_of(self, example: int) -> slice:
        """The entries of `example` (a contiguous run, since `index` is sorted)."""
        lo, hi = torch.searchsorted(self._examples, torch.tensor([example, example + 1]))
        return slice(int(lo), int(hi))


@dataclass
class Pair:
    """One attributed (position, feature) of one example; feature None is the site's error node."""

    example: int
    site: str
    position: int
    token: int
    feature: int | None
    act: float
    value: float


@dataclass
class Attribution:
    """Attributions of every spliced SAE for a set of examples."""

    sites: dict[str, SiteAttribution]
    tokens: list[list[int]]  # each example's tokens (prompt and any continuation)
    metric: Tensor  # (E,) the metric on the clean model
    method: str  # "grad" or "ig"
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_examples(self) -> int:
        return len(self.tokens)

    def top(self, k: int = 20, *, example: int = 0, largest: bool = True,
            sites: list[str] | None = None, include_error: bool = False, skip_first: int = 0,
            skip_tokens: Collection[int] = ()) -> list[Pair]:
        """The k (position, feature) pairs of `example` with the largest (or, with
        largest=False, the most negative) signed attribution, over the chosen sites.

        skip_first: leave out positions < skip_first (position 0 is an attention sink whose
        features take most of the attribution of a chat prompt); skip_tokens: leave out the
        positions holding these token ids (special tokens such as <|im_start|>).
        """
        tokens = torch.tensor(self.tokens[example], dtype=torch.long)
        counted = torch.arange(len(tokens)) >= skip_first
        if len(skip_tokens):
            counted &= ~torch.isin(tokens, torch.tensor(sorted(skip_tokens), dtype=torch.long))
        cand: list[tuple[float, Pair]] = []
        for name in sites or list(self.sites):
            s = self.sites[name]
            rows = s.rows_of(example)
            index, act = s.index[rows], s.act[rows]
            vals = s.value[rows].masked_fill(~counted[index[:, 1]], math.nan)
            n = min(k, int((~vals.isnan()).sum()))
            # NaN marks a skipped position; topk would rank it first either way, so order by hand
            order = vals.nan_to_num(-math.inf if largest else math.inf).argsort(descending=largest)
            for i in order[:n].tolist():
                _, pos, feat = index[i].tolist()
                cand.append((float(vals[i]), self._pair(example, name, pos, feat, float(act[i]),
                                                       float(vals[i]))))
            if include_error:
                err = s.error[example, :len(self.tokens[example])]
                for pos, v in enumerate(err.tolist()):
                    if counted[pos]:
                        cand.append((v, self._pair(example, name, pos, None, float("nan"), v)))
        cand.sort(key=lambda c: c[0], reverse=largest)
        return [p for _, p in cand[:k]]

    def _pair(self, example: int, site: str, pos: int, feature: int | None, act: float,
              value: float) -> Pair:
        return Pair(example, site, pos, self.tokens[example][pos], feature, act, value)

    def feature_totals(self, example: int, site: str) -> tuple[Tensor, Tensor]:
        """(features, summed attribution over positions) of one example at one site."""
        s = self.sites[site]
        rows = s.rows_of(example)
        feats, inverse = torch.unique(s.index[rows, 2], return_inverse=True)
        totals = torch.zeros(feats.numel(), dtype=s.value.dtype).index_add_(0, inverse, s.value[rows])
        return feats, totals

    def totals(self) -> dict[str, dict[str, Tensor]]:
        """Per site, (E,) sums over positions of the feature and of the error attributions."""
        out = {}
        for name, s in self.sites.items():
            feats = torch.zeros(self.n_examples, dtype=s.value.dtype).index_add_(0, s.index[:, 0], s.value)
            out[name] = {"features": feats, "error": s.error.sum(-1)}
        return out

    # ------------------------------------------------------------ files

    def save(self, path: str | Path) -> Path:
        """Write everything to one safetensors file (atomically: temp file + rename)."""
        path = Path(path)
        lengths = torch.tensor([len(t) for t in self.tokens], dtype=torch.long)
        flat = torch.tensor([t for toks in self.tokens for t in toks], dtype=torch.long)
        tensors = {"metric": self.metric.detach().cpu().contiguous(), "tokens": flat,
                   "lengths": lengths}
        for name, s in self.sites.items():
            for key in ("index", "act", "value", "error"):
                tensors[f"{name}/{key}"] = getattr(s, key).detach().cpu().contiguous()
        meta = {"format": "saelab-attribution/1", "method": self.method,
                "sites": json.dumps({n: s.d_sae for n, s in self.sites.items()}),
                "settings": json.dumps(self.settings, default=str)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Attribution:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "saelab-attribution/1":
                raise CorruptFileError(f"{path} is not a saelab attribution file (format "
                                       f"{meta.get('format')!r}); write one with Attribution.save")
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        bounds = torch.cumsum(t["lengths"], 0).tolist()
        tokens = [t["tokens"][b - n:b].tolist() for b, n in zip(bounds, t["lengths"].tolist(), strict=True)]
        sites = {name: SiteAttribution(name, d_sae, *(t[f"{name}/{k}"] for k in ("index", "act", "value", "error")))
                 for name, d_sae in json.loads(meta["sites"]).items()}
        return cls(sites, tokens, t["metric"], meta["method"], json.loads(meta["settings"]))


# ---------------------------------------------------------------- dataset level


@dataclass
class FeatureStat:
    """How one feature shows up among the examples' top pairs."""

    site: str
    feature: int
    n_examples: int  # examples with the feature among their top-k pairs
    fraction: float  # of all examples
    n_pairs: int  # (example, position) pairs it holds in those top lists
    mean_value: float  # mean attribution over those pairs
    total_value: float
    peak_value: float  # the largest attribution (the most negative with largest=False)


def aggregate(attr: Attribution, k: int = 20, *, largest: bool = True,
              sites: list[str] | None = None) -> list[FeatureStat]:
    """Per feature, how often and how strongly it is among the examples' top-k pairs.

    Sorted by the number of examples, then by |total attribution|.
    """
    stats: dict[tuple[str, int], dict[str, Any]] = {}
    for e in range(attr.n_examples):
        for p in attr.top(k, example=e, largest=largest, sites=sites):
            s = stats.setdefault((p.site, p.feature), {"examples": set(), "values": []})
            s["examples"].add(e)
            s["values"].append(p.value)
    out = [FeatureStat(site, feat, len(s["examples"]), len(s["examples"]) / max(attr.n_examples, 1),
                       len(s["values"]), sum(s["values"]) / len(s["values"]), sum(s["values"]),
                       max(s["values"]) if largest else min(s["values"]))
           for (site, feat), s in stats.items()]
    out.sort(key=lambda f: (-f.n_examples, -abs(f.total_value)))
    return out
