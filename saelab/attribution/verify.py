"""Check attributions by intervening: ablate the top and bottom features, measure the metric.

    attr = attribute(lm, saes, prompts, metric)
    check = verify(lm, saes, attr, metric, n_top=5, n_bottom=5, together=5)
    check.correlation()          # Pearson r of predicted vs measured over single ablations
    check.rows()                 # one dict per ablation, for a table

For each example the `n_top` (position, feature) pairs with the largest
attribution and the `n_bottom` with the most negative are zeroed one at a
time (`FeatureEdit(mode="zero")` with the error term kept), then the top
`together` at once. ``predicted`` is the attribution (summed over the ablated
pairs) and ``measured`` is ``metric(clean) - metric(ablated)``: both are the
feature's contribution to the metric, so they should agree to first order.

With ``positions="all"`` features rather than pairs are ranked (by their
attribution summed over positions) and each is zeroed wherever it is active.
Every ablation is one batch row; rows of several examples share a forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from saelab.attribution.attribute import forward_logits, left_pad
from saelab.attribution.metrics import Metric, MetricBatch, as_metric
from saelab.attribution.result import Attribution
from saelab.data.tokens import pad_id
from saelab.interventions.edits import FeatureEdit, Frame
from saelab.interventions.splice import SAEs, bind_saes, splice, unwrap


@dataclass
class Check:
    """One ablation: what the attribution predicted and what zeroing the feature(s) did."""

    example: int
    kind: str  # "top", "bottom" or "together"
    site: str | None  # None when "together" spans several sites
    feature: int | None  # None for "together"
    position: int | None  # None: every position (positions="all") or several pairs
    predicted: float  # the attribution of what was ablated
    measured: float  # metric(clean) - metric(ablated)


@dataclass
class Verification:
    checks: list[Check]
    positions: str

    def correlation(self, kinds: Sequence[str] = ("top", "bottom")) -> float:
        """Pearson correlation of predicted and measured over the checks of `kinds` (nan if < 2)."""
        pts = [(c.predicted, c.measured) for c in self.checks if c.kind in kinds]
        return pearson([p for p, _ in pts], [m for _, m in pts])

    def rows(self) -> list[dict[str, Any]]:
        return [asdict(c) for c in self.checks]


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) < 2:
        return math.nan
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else math.nan


@dataclass
class _Row:
    example: int
    edits: list[FeatureEdit]  # without rows; renumbered per forward pass
    check: Check | None  # None for the clean row


def _candidates(attr: Attribution, e: int, n: int, largest: bool, positions: str,
                skip: dict) -> list[tuple[str, int, int | None, float]]:
    """(site, feature, position or None, predicted) of the n most extreme pairs or features."""
    if positions == "attributed":
        return [(p.site, p.feature, p.position, p.value)
                for p in attr.top(n, example=e, largest=largest, **skip)]
    found = []
    for site in attr.sites:
        feats, totals = attr.feature_totals(e, site)
        found += [(site, f, None, v) for f, v in zip(feats.tolist(), totals.tolist(), strict=True)]
    found.sort(key=lambda c: c[3], reverse=largest)
    return found[:n]


def _edit(site: str, feature: int, position: int | None) -> FeatureEdit:
    return FeatureEdit(feature, "zero", positions="all" if position is None else [position], site=site)


def _rows(attr: Attribution, examples: Sequence[int], n_top: int, n_bottom: int, together: int,
          positions: str, skip: dict) -> list[_Row]:
    rows = []
    for e in examples:
        rows.append(_Row(e, [], None))
        seen = set()
        for kind, n, largest in (("top", n_top, True), ("bottom", n_bottom, False)):
            for site, feat, pos, value in _candidates(attr, e, n, largest, positions, skip):
                if (site, feat, pos) in seen:  # few active features: top and bottom overlap
                    continue
                seen.add((site, feat, pos))
                rows.append(_Row(e, [_edit(site, feat, pos)], Check(e, kind, site, feat, pos, value, 0.0)))
        if together > 0:
            group = _candidates(attr, e, together, True, positions, skip)
            if group:
                group_sites = {site for site, *_ in group}
                check = Check(e, "together", group_sites.pop() if len(group_sites) == 1 else None,
                              None, None, sum(v for *_, v in group), 0.0)
                rows.append(_Row(e, [_edit(s, f, p) for s, f, p, _ in group], check))
    return rows


@torch.no_grad()
def verify(lm: Any, saes: SAEs, attr: Attribution, metric: Metric | str | Callable, *,
           n_top: int = 5, n_bottom: int = 5, together: int = 5, positions: str = "attributed",
           examples: Sequence[int] | None = None, batch_size: int = 16, tokenizer: Any = None,
           allow_multi: bool = False, skip_first: int = 0,
           skip_tokens: Collection[int] = ()) -> Verification:
    """Ablate the most positively and negatively attributed features of each example and
    compare the measured change of `metric` with the attribution (see the module docstring).

    saes and metric must be those `attr` was computed with. positions: "attributed"
    (zero a pair at its position) or "all" (zero a feature wherever it is active).
    skip_first, skip_tokens: as in `Attribution.top`, for the "attributed" pairs.
    """
    if positions not in ("attributed", "all"):
        raise ValueError(f"verify: positions={positions!r}; expected 'attributed' or 'all'")
    if min(n_top, n_bottom, together) < 0 or batch_size < 1:
        raise ValueError("verify: n_top, n_bottom and together must be >= 0, batch_size >= 1")
    model, arch = unwrap(lm)
    tokenizer = tokenizer or getattr(lm, "tokenizer", None)
    bound = bind_saes(arch, saes)
    missing = set(attr.sites) - set(bound)
    if missing:
        raise ValueError(f"verify: the attribution has sites {sorted(missing)} with no SAE given; "
                         "pass the SAEs it was computed with")
    metric = as_metric(metric, allow_multi=allow_multi)
    examples = list(range(attr.n_examples)) if examples is None else list(examples)
    skip = {"skip_first": skip_first, "skip_tokens": skip_tokens}
    rows = _rows(attr, examples, n_top, n_bottom, together, positions, skip)
    device = next(model.parameters()).device
    pad = pad_id(tokenizer) if tokenizer is not None else 0
    values = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, lengths = left_pad([attr.tokens[r.example] for r in chunk], pad, device)
        edits = [FeatureEdit(e.features, e.mode, positions=e.positions, site=e.site, rows=[j])
                 for j, r in enumerate(chunk) for e in r.edits]
        with splice(model, bound, edits=edits, frame=Frame(pad=ids.shape[1] - lengths), arch=arch):
            logits = forward_logits(model, ids, lengths)
        values += metric(logits, MetricBatch(ids, lengths, tokenizer)).tolist()
    clean = {r.example: v for r, v in zip(rows, values, strict=True) if r.check is None}
    checks = []
    for r, v in zip(rows, values, strict=True):
        if r.check is not None:
            r.check.measured = clean[r.example] - v
            checks.append(r.check)
    return Verification(checks, positions)
