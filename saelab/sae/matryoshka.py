"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): nested dictionaries.

The latents are split into groups; the prefixes ``[0, w_1), [0, w_2), ... [0, d_sae)``
(`matryoshka_widths`, strictly increasing, the last = d_sae) are each trained to
reconstruct the input alone, so early latents learn general features that later
ones refine rather than absorb. Encoding and inference are BatchTopK's; only the
training loss differs (saelab/train/objective.py). The widths live in
``cfg.metadata["matryoshka_widths"]``.

Files: as SAELens does, a trained Matryoshka SAE is saved as a JumpReLU SAE with
θ on every feature; its cfg.json metadata keeps ``trained_architecture =
"matryoshka_batchtopk"`` and ``matryoshka_widths``, so the groups survive a
round trip (`matryoshka_widths(sae)` reads them from either form).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saelab.sae.base import SAE, SAEConfig, register_sae
from saelab.sae.batchtopk import BatchTopKSAE
from saelab.sae.jumprelu import JumpReLUSAE

ARCH = "matryoshka_batchtopk"
# dictionary_learning's example group fractions: small general groups first.
DEFAULT_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32)


def widths_from_fractions(d_sae: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[int]:
    """Cumulative prefix widths of groups holding `fractions` of d_sae (they must sum to 1).

    Each group gets at least one latent; the last width is d_sae. Raises ValueError
    naming the fractions when they are not positive or do not sum to 1.
    """
    fr = [float(f) for f in fractions]
    if not fr or any(not f > 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
        raise ValueError(f"Matryoshka group fractions {fr}: expected positive fractions "
                         "of the width that sum to 1, e.g. 0.25,0.75")
    if len(fr) > d_sae:
        raise ValueError(f"{len(fr)} Matryoshka groups need at least {len(fr)} latents; "
                         f"width is {d_sae}")
    widths, total = [], 0.0
    for i, f in enumerate(fr):
        total += f
        lo = widths[-1] + 1 if widths else 1
        widths.append(max(lo, min(round(total * d_sae), d_sae - (len(fr) - 1 - i))))
    widths[-1] = d_sae
    return widths


def check_widths(widths: Sequence[int], d_sae: int) -> list[int]:
    """`widths` as a list, if strictly increasing positive integers ending at d_sae."""
    w = list(widths)
    ok = (w and all(isinstance(v, int) and not isinstance(v, bool) for v in w) and w[0] > 0
          and all(a < b for a, b in zip(w, w[1:], strict=False)) and w[-1] == d_sae)
    if not ok:
        raise ValueError(f"matryoshka_widths={w!r}: expected strictly increasing positive "
                         f"integers ending at d_sae={d_sae}")
    return w


def matryoshka_widths(sae: SAE) -> list[int] | None:
    """The prefix widths of a Matryoshka SAE (trained or loaded from a file), else None."""
    widths = sae.cfg.metadata.get("matryoshka_widths")
    return check_widths(widths, sae.cfg.d_sae) if widths else None


@torch.no_grad()
def prefix_sae(sae: SAE, width: int) -> SAE:
    """The SAE made of the first `width` latents alone (any architecture).

    Every architecture here decides each latent from its own pre-activation at
    inference (ReLU, per-feature or global thresholds) except TopK, whose per-token
    top-k competes across latents; for TopK the prefix keeps k (capped at width), so
    its activations can differ from the full SAE's.
    """
    if not 0 < width <= sae.cfg.d_sae:
        raise ValueError(f"prefix width {width} outside 1..d_sae={sae.cfg.d_sae}")
    t = sae.tensors()
    sliced = {"W_enc": t["W_enc"][:, :width], "W_dec": t["W_dec"][:width], "b_enc": t["b_enc"][:width],
              "b_dec": t["b_dec"]}
    if "threshold" in t:
        sliced["threshold"] = t["threshold"] if t["threshold"].ndim == 0 else t["threshold"][:width]
    k = None if sae.cfg.k is None else min(sae.cfg.k, width)
    cfg = sae.cfg.replace(d_sae=width, k=k).with_metadata(matryoshka_widths=None)
    sliced = {n: v.contiguous() for n, v in sliced.items()}
    return type(sae).from_tensors(cfg, sliced, source=f"prefix {width}").train(sae.training)


@register_sae
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK SAE whose latent prefixes ``[0, w_i)`` each reconstruct the input.

        train  loss = mean_i ‖x − (Σ_{j < w_i} f_j W_dec[j] + b_dec)‖²     over the levels i
        infer  as BatchTopK: f = ReLU(pre)·1[pre > θ]

    `cfg.metadata["matryoshka_widths"]` gives the w_i (the last = d_sae); without
    it the SAE has one level and is a plain BatchTopK SAE.
    """

    architecture = ARCH

    def __init__(self, cfg: SAEConfig, *, init: bool = True):
        widths = cfg.metadata.get("matryoshka_widths") or [cfg.d_sae]
        self.widths = check_widths(widths, cfg.d_sae)
        super().__init__(cfg, init=init)

    def for_export(self) -> JumpReLUSAE:
        """The JumpReLU SAE with θ on every feature, its metadata naming the levels."""
        out = super().for_export()
        out.cfg = out.cfg.with_metadata(trained_architecture=ARCH, matryoshka_widths=self.widths)
        return out
