"""BatchTopK SAE (Bussmann et al. 2024): top-k over the whole batch, one threshold at inference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from saelab.dims import Acts, Feats
from saelab.sae.base import SAE, SAEConfig, SAEOutput, register_sae
from saelab.sae.jumprelu import JumpReLUSAE
from saelab.sae.topk import refuse_rescaled_normalization


@register_sae
class BatchTopKSAE(SAE):
    """BatchTopK SAE: k active features per token on average over a batch.

        pre    = (x - b_dec * a) @ W_enc + b_enc
        train  f = the k·N largest entries of ReLU(pre) over all N tokens of the batch
        infer  f = ReLU(pre) · 1[pre > θ]       θ one scalar, EMA of the batches' smallest kept act
        x_hat  = f @ W_dec + b_dec               decoded from the active entries only

    `self.training` picks the mode. The trainer calls `update_threshold(feats)` after
    each training step. Files store it as a JumpReLU SAE with θ for every feature
    (`for_export`), as SAELens does, so any reader can use it.
    """

    architecture = "batchtopk"
    tensor_names = SAE.tensor_names + ("threshold",)
    threshold: Tensor

    def __init__(self, cfg: SAEConfig, *, init: bool = True):
        if cfg.k is None:
            raise ValueError(
                "a batchtopk SAE needs SAEConfig.k (average active features per token)"
            )
        super().__init__(cfg, init=init)
        # float64: an EMA with lr ~1e-2 loses its increments in float32/bfloat16.
        # -1 means "not estimated yet" (inference then keeps every positive act).
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float64))

    @classmethod
    def tensor_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        return {**super().tensor_shapes(cfg), "threshold": ()}

    @torch.no_grad()
    def update_threshold(self, acts: Tensor, *, lr: float = 0.01) -> float:
        """Move θ towards the smallest positive value in `acts` (a training step's feats)."""
        pos_min = torch.where(acts > 0, acts, torch.inf).min().double()
        if torch.isfinite(pos_min):
            if self.threshold < 0:
                self.threshold.copy_(pos_min)
            else:
                self.threshold.mul_(1 - lr).add_(lr * pos_min)
        return float(self.threshold)

    # -------------------------------------------------------------- inference
    def activation(self, pre: Float[Tensor, "*batch d_sae"], *, inplace: bool = False) -> Feats:
        if self.training:
            return self._train_feats(pre, inplace=inplace)[0]
        # F.threshold: y = x if x > t else 0, which with t = max(θ, 0) is ReLU(pre)·1[pre > θ].
        t = max(float(self.threshold.to(pre.dtype)), 0.0)
        grad = torch.is_grad_enabled() and pre.requires_grad
        return F.threshold_(pre, t, 0.0) if inplace and not grad else F.threshold(pre, t, 0.0)

    # -------------------------------------------------------------- training
    def batch_topk(self, pre: Float[Tensor, "N d_sae"]) -> tuple[Tensor, Tensor, Tensor]:
        """The k·N largest positive entries of ReLU(pre): (rows, cols, vals), rows ascending."""
        n, d_sae = pre.shape
        flat = pre.reshape(-1)  # ReLU(pre) is never formed: only positive entries can win
        if n == 0:
            empty = torch.zeros(0, dtype=torch.long, device=pre.device)
            return empty, empty, flat[empty]
        with torch.no_grad():
            # Each token's own top-k gives k·N values >= their minimum, so the batch's
            # (k·N)-th largest is >= it too: only entries above that floor can win,
            # which avoids a top-k over all N·d_sae entries (~4x faster on CPU).
            floor = pre.detach().topk(self.cfg.k, dim=-1, sorted=False).values.min()
            keep = flat.detach() >= floor if floor > 0 else flat.detach() > 0
            cand = keep.nonzero().squeeze(1)  # (C,) ascending
            budget = self.cfg.k * n
            if cand.numel() > budget:
                win = flat.detach()[cand].topk(budget, sorted=False).indices
                chosen = torch.zeros(cand.numel(), dtype=torch.bool, device=cand.device)
                chosen[win] = True
                cand = cand[chosen]  # a mask rather than a sort keeps the ascending order
        return cand // d_sae, cand % d_sae, flat[cand]

    def _train_feats(
        self, pre: Float[Tensor, "*batch d_sae"], *, inplace: bool
    ) -> tuple[Tensor, tuple]:
        """Dense batch-top-k feats, plus (rows, cols, vals, n_rows) for the sparse decode."""
        pre2 = pre.reshape(-1, self.cfg.d_sae)
        rows, cols, vals = self.batch_topk(pre2)
        flat_idx = rows * self.cfg.d_sae + cols
        if not inplace or (torch.is_grad_enabled() and pre.requires_grad):
            feats = torch.zeros(pre2.numel(), dtype=pre.dtype).index_put((flat_idx,), vals)
        else:
            feats = pre2.zero_().reshape(-1).index_put_((flat_idx,), vals)  # reuse pre's memory
        return feats.reshape(pre.shape), (rows, cols, vals, pre2.shape[0])

    def forward(self, x: Acts) -> SAEOutput:
        if not self.training:
            return super().forward(x)
        feats, (rows, cols, vals, n) = self._train_feats(self.pre_acts(x), inplace=True)
        x_hat = self.decode_sparse(cols, vals, rows=rows, n_rows=n)
        x_hat = x_hat.reshape(*x.shape[:-1], self.cfg.d_in)
        return SAEOutput(x_hat, feats, x.to(x_hat.dtype) - x_hat)

    # -------------------------------------------------------------- export
    def for_export(self) -> JumpReLUSAE:
        """The JumpReLU SAE with θ on every feature: identical to this SAE at inference."""
        cfg = self.cfg.replace(architecture="jumprelu", k=None).with_metadata(
            trained_architecture="batchtopk", batchtopk_k=self.cfg.k
        )
        tensors = {n: t for n, t in self.tensors().items() if n != "threshold"}
        theta = self.threshold.to(self.cfg.torch_dtype)
        tensors["threshold"] = theta.expand(self.cfg.d_sae).contiguous()
        return JumpReLUSAE.from_tensors(cfg, tensors, source="BatchTopKSAE")

    def normalize_decoder_(self, *, rescale_encoder: bool = True) -> Tensor:
        if rescale_encoder:
            raise refuse_rescaled_normalization(self.architecture)
        return super().normalize_decoder_(rescale_encoder=False)
