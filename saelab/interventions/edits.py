"""Edits: what to change in a forward pass, as small dataclasses.

Two kinds. A `FeatureEdit` changes SAE feature activations between encode and
decode (the SAE must be spliced at its site, see `splice`); a `SteerEdit` or
`PatchEdit` changes a site's activation directly and needs no SAE::

    FeatureEdit(features=[3, 17], mode="zero", positions="prompt")
    FeatureEdit(features=5, mode="set", value=8.0, positions="12:")      # clamp from position 12 on
    FeatureEdit(features=None, mode="mean", value=means)                 # mean-ablate every feature
    steer_feature(sae, 5, alpha=4.0, positions="generated")             # x += 4 * W_dec[5]
    PatchEdit("resid_post.3", stored, positions=[7])                     # stored: (T, d) or (B, T, d)

Positions are absolute token indices within each sample's own sequence (left
padding does not count), so an edit means the same thing under a KV cache,
under full recomputation and in any batch:

    "all"        every position
    "prompt"     the prompt (a forward pass without a cache, if no prompt length is known)
    "generated"  everything after the prompt
    "p:" / "a:b" from position p on / positions a..b-1
    7, [3, 5]    those positions

`rows` restricts an edit to some samples of the batch (sample indices).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.models.hooks import PatchContext

Positions = str | int | Sequence[int] | range
FEATURE_MODES = ("zero", "set", "clamp", "scale", "add", "mean")


@dataclass(frozen=True)
class FeatureEdit:
    """Change SAE feature activations: ``f[..., features] <- mode(f, value)`` at `positions`."""

    features: int | Sequence[int] | Tensor | None
    """Feature indices; None means every feature of the SAE."""
    mode: str = "zero"
    """zero | set (= clamp: f <- value) | scale (f <- f*value) | add (f <- f+value) |
    mean (f <- value[features], value holding the means of all d_sae features, or one per feature)."""
    value: float | Tensor = 0.0
    """A number, or a tensor with one entry per edited feature (or [d_sae] for mean)."""
    positions: Positions = "all"
    """Where the edit applies (see the module docstring)."""
    site: str | None = None
    """Which spliced SAE; may be left out when only one SAE is spliced."""
    rows: Sequence[int] | None = None
    """Samples of the batch to edit; None = all."""

    def __post_init__(self) -> None:
        if self.mode not in FEATURE_MODES:
            raise ValueError(f"FeatureEdit.mode={self.mode!r}; expected one of {', '.join(FEATURE_MODES)}")
        if self.mode == "mean" and not isinstance(self.value, Tensor):
            raise ValueError("FeatureEdit(mode='mean') needs value= the features' mean activations "
                             "(a tensor [d_sae], or one entry per edited feature)")
        _check_positions(self.positions, "FeatureEdit")


@dataclass(frozen=True)
class SteerEdit:
    """Add ``scale * vector`` to the activation at `site` at `positions` (needs no SAE)."""

    site: str
    vector: Tensor
    """[d] with d the site's width."""
    positions: Positions = "all"
    scale: float = 1.0
    rows: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.vector.dim() != 1:
            raise ValueError(f"SteerEdit.vector must be 1-d [d]; got shape {list(self.vector.shape)}")
        _check_positions(self.positions, "SteerEdit")


@dataclass(frozen=True)
class PatchEdit:
    """Overwrite the activation at `site` with a stored one at `positions` (needs no SAE).

    `value` is [d] (the same vector everywhere), [T, d] (indexed by absolute
    position) or [B, T, d] (by batch row and absolute position; positions past
    T are left alone).
    """

    site: str
    value: Tensor
    positions: Positions = "all"
    rows: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.value.dim() not in (1, 2, 3):
            raise ValueError(f"PatchEdit.value must be [d], [T, d] or [B, T, d]; got {list(self.value.shape)}")
        _check_positions(self.positions, "PatchEdit")


SiteEdit = SteerEdit | PatchEdit
Edit = FeatureEdit | SteerEdit | PatchEdit


def steer_feature(sae, feature: int, alpha: float, *, positions: Positions = "all",
                  rows: Sequence[int] | None = None) -> SteerEdit:
    """Steer along a feature's decoder direction: ``x += alpha * W_dec[feature]`` at the SAE's site.

    With the error term kept this equals ``FeatureEdit(feature, "add", alpha)``, without
    running the SAE at all.
    """
    if sae.cfg.site is None:
        raise ValueError("the SAE has no site in its metadata; build SteerEdit(site, vector) yourself")
    if not 0 <= feature < sae.cfg.d_sae:
        raise ValueError(f"feature {feature} is out of range for an SAE with d_sae={sae.cfg.d_sae}")
    return SteerEdit(sae.cfg.site, sae.W_dec[feature].detach().clone(), positions, alpha, rows)


# ---------------------------------------------------------------- positions


@dataclass
class Frame:
    """Where each batch row's tokens sit, so edits can use absolute positions.

    `generate` fills it in. Without it, rows are taken as unpadded and "prompt"
    means every position of a forward pass that starts at slot 0 (no cache).
    """

    pad: Tensor | None = None
    """[B] left-padding per row."""
    prompt_len: Tensor | None = None
    """[B] real prompt tokens per row."""

    def positions(self, ctx: PatchContext) -> Tensor:
        """[B or 1, P] absolute positions of this chunk's tokens (negative on left padding)."""
        slots = ctx.positions.reshape(1, -1)
        return slots if self.pad is None else slots - self.pad.to(slots.device).reshape(-1, 1)

    def is_prompt(self, ctx: PatchContext, pos: Tensor) -> Tensor:
        if self.prompt_len is None:
            return torch.full_like(pos, bool(ctx.positions[0] == 0), dtype=torch.bool)
        return pos < self.prompt_len.to(pos.device).reshape(-1, 1)


def _check_positions(spec: Positions, owner: str) -> None:
    if isinstance(spec, str):
        if spec in ("all", "prompt", "generated"):
            return
        start, colon, stop = spec.partition(":")
        if colon and start.strip().isdigit() and (not stop.strip() or stop.strip().isdigit()):
            return
        raise ValueError(f"{owner}.positions={spec!r}; expected 'all', 'prompt', 'generated', "
                         "'p:' (from p on), 'a:b', an int or a list of ints")
    items = [spec] if isinstance(spec, int) else list(spec)
    if any(not isinstance(p, int) or p < 0 for p in items):
        raise ValueError(f"{owner}.positions={spec!r}: positions are absolute indices >= 0")


def position_mask(spec: Positions, pos: Tensor, prompt: Tensor) -> Tensor:
    """[B, P] bool: which of the tokens at absolute positions `pos` the edit covers."""
    real = pos >= 0  # left padding is never edited
    if isinstance(spec, str):
        if spec == "all":
            return real
        if spec == "prompt":
            return real & prompt
        if spec == "generated":
            return real & ~prompt
        start, _, stop = spec.partition(":")
        mask = pos >= int(start)
        return mask & (pos < int(stop)) if stop.strip() else mask
    wanted = torch.as_tensor([spec] if isinstance(spec, int) else list(spec), device=pos.device)
    return torch.isin(pos, wanted)


def _row_mask(rows: Sequence[int] | None, mask: Tensor) -> Tensor:
    if rows is None:
        return mask
    keep = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    keep[torch.as_tensor(list(rows), dtype=torch.long, device=mask.device)] = True
    return mask & keep[:, None]


def edit_mask(edit: Edit, ctx: PatchContext, frame: Frame, batch: int) -> Tensor:
    """[B, P] bool mask of the tokens `edit` changes in this chunk."""
    pos = frame.positions(ctx)
    mask = position_mask(edit.positions, pos, frame.is_prompt(ctx, pos))
    return _row_mask(edit.rows, mask.expand(batch, -1))


# ---------------------------------------------------------------- applying


def feature_index(edit: FeatureEdit, d_sae: int, device: torch.device) -> Tensor:
    """[k] long indices of the edited features."""
    if edit.features is None:
        return torch.arange(d_sae, device=device)
    idx = torch.as_tensor(edit.features, dtype=torch.long, device=device).reshape(-1)
    if idx.numel() and (idx.min() < 0 or idx.max() >= d_sae):
        raise ValueError(f"FeatureEdit features {idx.tolist()[:8]} out of range for d_sae={d_sae}")
    return idx


def _new_values(edit: FeatureEdit, old: Tensor, idx: Tensor) -> Tensor:
    value = torch.as_tensor(edit.value).to(device=old.device, dtype=old.dtype)
    if edit.mode == "mean" and value.numel() != idx.numel():
        value = value.reshape(-1)[idx]  # means of all d_sae features
    if edit.mode == "zero":
        return torch.zeros_like(old)
    if edit.mode in ("set", "clamp", "mean"):
        return torch.broadcast_to(value, old.shape)
    if edit.mode == "scale":
        return old * value
    return old + value  # add


def apply_feature_edits(feats: Tensor, edits: Sequence[FeatureEdit], masks: Sequence[Tensor]
                        ) -> tuple[Tensor, Tensor]:
    """Edited copy of `feats` [B, P, F] (differentiable) and the [k] features any edit touched.

    Edits compose in order; masks are the edits' [B, P] token masks.
    """
    new = feats.clone()
    touched = []
    for edit, mask in zip(edits, masks, strict=True):
        idx = feature_index(edit, feats.shape[-1], feats.device)
        old = new[..., idx]  # (B, P, k)
        new[..., idx] = torch.where(mask[..., None], _new_values(edit, old, idx), old)
        touched.append(idx)
    return new, torch.unique(torch.cat(touched)) if touched else feats.new_zeros(0, dtype=torch.long)


def apply_site_edit(edit: SiteEdit, x: Tensor, mask: Tensor, frame: Frame, ctx: PatchContext) -> Tensor:
    """`x` [B, P, d] after a steering or patching edit at the tokens in `mask` [B, P]."""
    if isinstance(edit, SteerEdit):
        v = edit.vector.to(device=x.device, dtype=x.dtype) * edit.scale
        return x + mask[..., None].to(x.dtype) * v
    value = edit.value.to(device=x.device, dtype=x.dtype)
    if value.dim() == 1:
        stored = value.expand_as(x)
    else:
        pos = frame.positions(ctx).expand(x.shape[0], -1)  # (B, P)
        inside = (pos >= 0) & (pos < value.shape[-2])
        mask = mask & inside
        at = pos.clamp(0, value.shape[-2] - 1)
        if value.dim() == 2:
            stored = value[at]  # (B, P, d)
        else:
            if value.shape[0] != x.shape[0]:
                raise ValueError(f"PatchEdit at {edit.site}: value has {value.shape[0]} rows, the "
                                 f"batch {x.shape[0]}; give [T, d] or one row per sample")
            stored = torch.gather(value, 1, at[..., None].expand(-1, -1, value.shape[-1]))
    return torch.where(mask[..., None], stored, x)
