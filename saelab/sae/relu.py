"""The standard ReLU SAE (Anthropic's "Towards Monosemanticity"; SAELens "standard")."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from saelab.dims import Feats
from saelab.sae.base import SAE, register_sae


@register_sae
class ReLUSAE(SAE):
    """ReLU SAE.

        pre   = (x - b_dec * a) @ W_enc + b_enc        a = cfg.apply_b_dec_to_input
        f     = ReLU(pre)
        x_hat = f @ W_dec + b_dec

    Trained with ``|x - x_hat|^2 + lambda * l1_penalty(f, W_dec)``.
    """

    architecture = "relu"

    def activation(self, pre: Float[Tensor, "*batch d_sae"], *, inplace: bool = False) -> Feats:
        if inplace and not (torch.is_grad_enabled() and pre.requires_grad):
            return pre.relu_()  # skips a [tokens, d_sae] allocation
        return torch.relu(pre)


def l1_penalty(
    feats: Feats, W_dec: Float[Tensor, "d_sae d_in"] | None = None, *, p: float = 1.0
) -> Float[Tensor, ""]:
    """Mean over tokens of ``sum_i |f_i|^p * |W_dec[i]|``.

    Weighting by decoder row norms (pass `W_dec`) stops the optimiser from
    shrinking f while growing W_dec to dodge the penalty; with ``W_dec=None``
    it is the plain Lp penalty.
    """
    mag = feats.abs() if p == 1.0 else feats.abs().pow(p)
    if W_dec is not None:
        mag = mag * W_dec.norm(dim=1)
    return mag.sum(dim=-1).mean()
