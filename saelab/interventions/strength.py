"""Steering strength in site norms: a unit that means the same for every SAE.

Saved SAEs read raw activations, so the raw size of "add 1 to feature f" is
``||W_dec[f]||``: about the whole residual stream (~143 at SmolLM2's
resid_post.12) for an SAE trained by saelab, but 1 for one with unit decoder rows.
The CLI and the browser therefore take `add` and `clamp` strengths in **site
norms**, as Neuronpedia's steering scales its vectors by the site's norm:

    add s     x += s * N * W_dec[f] / ||W_dec[f]||      (a vector of norm s*N)
    clamp s   f  = s * N / ||W_dec[f]||                 (f's decoded part has norm s*N)

N is the site's mean activation norm over `REFERENCE_TEXT` (ordinary tokens: not
position 0, an attention sink of norm ~2e4, nor special tokens). So add 0.25
pushes a quarter of a typical residual vector along the feature's direction.
On the embedded model (resid_post.12, N ~145) the default 0.25 keeps the text
fluent while changing it; 0.5 already degrades it and 1 or more gives gibberish.
"""

from __future__ import annotations

import math
from typing import Any

DEFAULT_STRENGTH = 0.25
"""Default add / clamp strength, in site norms."""

UNITS = ("norm", "raw")
"""norm: site norms (above); raw: the SAE's own activation units (the old behaviour)."""

REFERENCE_TEXT = (
    "The river rises in the hills and runs for about two hundred miles to the sea. "
    "Along its banks there are farms, small towns and a few old mills, and in spring "
    "the water is high and fast. Most people who live there work on the land or in the "
    "shops of the market town, and on Saturdays they meet at the bridge to trade news. "
    "Children learn to swim in the shallow pools below the weir, and in the evening the "
    "light turns the water gold before the fog comes down from the hills."
)
"""Plain prose: the text the site norm N is measured on (fixed, so N is a property of model and site)."""


def site_norm(lm: Any, site: str, text: str = REFERENCE_TEXT) -> float:
    """Mean L2 norm of the activation at `site` over `text`'s ordinary tokens (float, > 0).

    Position 0 and special tokens are left out: they are attention sinks with norms
    hundreds of times the rest. The text is encoded as every context is (BOS first
    where the tokenizer has one).
    """
    import torch

    from saelab.data.tokens import context_bos_id, encode_prompts, special_token_mask
    from saelab.models.hooks import capture

    ids, _ = encode_prompts(lm.tokenizer, [text])
    bos = context_bos_id(lm.tokenizer)
    if bos is not None and int(ids[0, 0]) != bos:
        ids = torch.cat([torch.tensor([[bos]]), ids], dim=1)
    keep = ~special_token_mask(ids, lm.tokenizer)[0]
    keep[0] = False
    with torch.inference_mode(), capture(lm.model, site, arch=lm.arch) as cap:
        cap.run(input_ids=ids.to(lm.device))
    norms = cap[site][0].float().norm(dim=-1).cpu()
    return float(norms[keep].mean())


def activation_value(sae: Any, feature: int, strength: float, norm: float) -> float:
    """The raw activation amount that is `strength` site norms along `feature` (see the module doc).

    Raises ValueError for a feature out of range or a zero decoder row.
    """
    if not 0 <= feature < sae.cfg.d_sae:
        raise ValueError(f"feature {feature} is out of range for an SAE with d_sae={sae.cfg.d_sae}")
    row = float(sae.W_dec[feature].detach().float().norm())
    if not row > 0 or not math.isfinite(row):
        raise ValueError(f"feature {feature} has a zero decoder row: it writes nothing to steer with")
    return strength * norm / row
