"""Edit transcoder features inside the real model: the MLP keeps its output, minus what changed.

    edit = TranscoderEdit(layer=3, features=[17, 40], positions=[12], rows=[0])
    with edit_transcoders(lm, {3: tc}, [edit]):
        lm.model(input_ids=ids)
    generate(lm, prompts, transcoders={3: tc}, edits=[edit])      # the same, while sampling

At an edited layer the transcoder reads the MLP's input of this very forward
(``mlp_in.L``, or its own ``cfg.site``) and its features ``f = encode(x)`` are
edited to ``f'``; the MLP's real output ``y`` (``mlp_out.L``) becomes::

    y + (f' - f) @ W_dec

which is the transcoder's reconstruction with the edited features plus the error
node (real output minus reconstruction): zeroing features removes exactly
``act * W_dec[i]`` from the real output, as `splice` does for an SAE with its
error kept. Only the edited decoder rows are touched, and a token no edit covers
is left bit-identical (the hook returns nothing there). Edits reuse FeatureEdit's
modes, positions (absolute, per sample) and rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saelab.errors import SiteError
from saelab.interventions.edits import (
    FeatureEdit,
    Frame,
    Positions,
    apply_feature_edits,
    edit_mask,
    feature_index,
)
from saelab.interventions.mlp_patch import PatchMLPs
from saelab.models.hooks import PatchContext


@dataclass(frozen=True)
class TranscoderEdit:
    """Change the features of the transcoder of `layer` (see FeatureEdit for the fields)."""

    layer: int
    features: int | Sequence[int] | Tensor | None
    mode: str = "zero"
    value: float | Tensor = 0.0
    positions: Positions = "all"
    rows: Sequence[int] | None = None

    def __post_init__(self) -> None:
        self.feature_edit()  # FeatureEdit checks mode, value and positions

    def feature_edit(self) -> FeatureEdit:
        return FeatureEdit(self.features, self.mode, self.value, self.positions, None, self.rows)


class EditTranscoders(PatchMLPs):
    """Context manager: `edits` applied at each edited layer's MLP output (module docstring)."""

    def __init__(self, lm_or_model: Any, transcoders: Mapping[int, Any],
                 edits: Iterable[TranscoderEdit], *, frame: Frame | None = None, arch: Any = None):
        from saelab.interventions.splice import one_site, unwrap
        from saelab.sae.transcoder import require_transcoder

        self.model, self.arch = unwrap(lm_or_model, arch)
        self.frame = frame or Frame()
        self.edits: dict[int, list[FeatureEdit]] = {}
        self.tcs: dict[int, Any] = {}
        self.in_sites: dict[int, str] = {}
        for edit in edits:
            if edit.layer not in transcoders:
                raise SiteError(f"a TranscoderEdit of layer {edit.layer}, but no transcoder is given "
                                f"for it (layers {sorted(transcoders) or 'none'}).")
            tc = require_transcoder(transcoders[edit.layer], f"the transcoder for layer {edit.layer}")
            fe = edit.feature_edit()
            feature_index(fe, tc.cfg.d_sae, torch.device("cpu"))  # range check
            self.edits.setdefault(edit.layer, []).append(fe)
            self.tcs[edit.layer] = tc
            self.in_sites[edit.layer] = one_site(self.arch, tc.site or f"mlp_in.{edit.layer}",
                                                 "a transcoder's site")
        super().__init__(self.model, self.arch,
                         {layer: (self.in_sites[layer], self._edit(layer)) for layer in self.edits})

    def _edit(self, layer: int):
        tc, edits = self.tcs[layer], self.edits[layer]

        def fn(x: Tensor, y: Tensor, ctx: PatchContext) -> Tensor | None:
            masks = [edit_mask(e, ctx, self.frame, y.shape[0]) for e in edits]
            live = [(e, m) for e, m in zip(edits, masks, strict=True) if bool(m.any())]
            if not live:
                return None
            feats = tc.encode(x.to(tc.W_enc.dtype))  # (B, P, F)
            edited, touched = apply_feature_edits(feats, [e for e, _ in live], [m for _, m in live])
            diff = (edited - feats)[..., touched]  # (B, P, k)
            return y + (diff @ tc.W_dec[touched]).to(y.dtype)
        return fn


def edit_transcoders(lm_or_model: Any, transcoders: Mapping[int, Any], edits: Iterable[TranscoderEdit],
                     *, frame: Frame | None = None, arch: Any = None) -> EditTranscoders:
    """Context manager running the model with `edits` of `transcoders` ({layer: Transcoder}).

    Raises SiteError for an edit of a layer with no transcoder, ValueError for a feature
    out of range, WrongKindError when a "transcoder" is an SAE."""
    return EditTranscoders(lm_or_model, transcoders, edits, frame=frame, arch=arch)
