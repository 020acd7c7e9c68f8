"""TopK SAE (Gao et al. 2024; sparsify), decoded sparsely."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from saelab.dims import Acts, Feats
from saelab.sae.base import SAE, SAEConfig, SAEOutput, register_sae


def _needs_grad(t: Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def refuse_rescaled_normalization(name: str) -> ValueError:
    return ValueError(
        f"normalize_decoder_(rescale_encoder=True) on a {name} SAE would change which "
        "features win the top-k (each feature's pre-activation grows by its decoder norm), "
        "so the outputs could not stay the same. Use rescale_encoder=False for the "
        "unit-norm projection a trainer applies after each step."
    )


@register_sae
class TopKSAE(SAE):
    """TopK SAE: exactly k features per token (fewer if fewer are positive).

        pre        = (x - b_dec * a) @ W_enc + b_enc
        vals, idx  = topk(ReLU(pre), k)                    per token
        f          = scatter(idx, vals)                     dense [.., d_sae]
        x_hat      = Σ_j vals_j · W_dec[idx_j] + b_dec      only k rows of W_dec gathered

    `forward` returns `top_idx` / `top_vals` [.., k] besides the dense `feats`.
    This is sparsify's ``topk(relu(linear(x - b_dec)))`` and SAELens's topk.
    """

    architecture = "topk"

    def __init__(self, cfg: SAEConfig, *, init: bool = True):
        if cfg.k is None:
            raise ValueError("a topk SAE needs SAEConfig.k (active features per token)")
        super().__init__(cfg, init=init)

    def topk(
        self, pre: Float[Tensor, "*batch d_sae"]
    ) -> tuple[Float[Tensor, "*batch k"], Int[Tensor, "*batch k"]]:
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        # topk then ReLU keeps the same set as topk of ReLU(pre): ReLU is monotone.
        return (torch.relu(vals) if _needs_grad(vals) else vals.relu_()), idx

    def activation(self, pre: Float[Tensor, "*batch d_sae"], *, inplace: bool = False) -> Feats:
        vals, idx = self.topk(pre)
        if inplace and not _needs_grad(pre):
            return pre.zero_().scatter_(-1, idx, vals)  # reuse pre's memory
        return torch.zeros_like(pre).scatter(-1, idx, vals)

    def encode_topk(self, x: Acts) -> tuple[Float[Tensor, "*batch k"], Int[Tensor, "*batch k"]]:
        """(top_vals, top_idx), each ``[..., k]``, without building the dense features."""
        return self.topk(self.pre_acts(x))

    def forward(self, x: Acts) -> SAEOutput:
        pre = self.pre_acts(x)
        vals, idx = self.topk(pre)
        if _needs_grad(pre):
            feats = torch.zeros_like(pre).scatter(-1, idx, vals)
        else:
            feats = pre.zero_().scatter_(-1, idx, vals)
        x_hat = self.decode_sparse(idx, vals)
        return SAEOutput(x_hat, feats, x.to(x_hat.dtype) - x_hat, idx, vals)

    def normalize_decoder_(self, *, rescale_encoder: bool = True) -> Tensor:
        if rescale_encoder:
            raise refuse_rescaled_normalization(self.architecture)
        return super().normalize_decoder_(rescale_encoder=False)
