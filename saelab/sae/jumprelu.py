"""JumpReLU SAE (Rajamanoharan et al. 2024; Gemma Scope) and its straight-through estimators."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.utils import parametrize

from saelab.dims import Feats
from saelab.sae.base import SAE, SAEConfig, register_sae


def rectangle(u: Tensor) -> Tensor:
    """The kernel K(u) = 1[-1/2 < u < 1/2]."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class StepFn(torch.autograd.Function):
    """H(z - θ), the Heaviside step, with a pseudo-derivative for θ only.

    forward   H(z - θ)
    d/dz      0
    d/dθ      -(1/ε) K((z - θ)/ε)          K = rectangle, ε = bandwidth
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        g_th = -(1.0 / eps) * rectangle((z - threshold) / eps) * grad
        return None, g_th.sum_to_size(threshold.shape), None


class JumpReLUFn(torch.autograd.Function):
    """z · H(z - θ), with the true gradient for z and a pseudo-derivative for θ.

    forward   z · H(z - θ)
    d/dz      H(z - θ)
    d/dθ      -(θ/ε) K((z - θ)/ε)
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        g_z = (z > threshold) * grad
        g_th = -(threshold / eps) * rectangle((z - threshold) / eps) * grad
        return g_z, g_th.sum_to_size(threshold.shape), None


class _Exp(nn.Module):
    """θ = exp(log θ): Adam then moves θ multiplicatively and θ stays positive."""

    def forward(self, log_threshold: Tensor) -> Tensor:
        return log_threshold.exp()

    def right_inverse(self, threshold: Tensor) -> Tensor:
        return threshold.log()


@register_sae
class JumpReLUSAE(SAE):
    """JumpReLU SAE, the Gemma Scope architecture.

        pre   = (x - b_dec * a) @ W_enc + b_enc        a = cfg.apply_b_dec_to_input
        f     = pre · 1[pre > θ]                        θ = threshold, per feature
        x_hat = f @ W_dec + b_dec

    At inference θ is clamped at 0, i.e. ``f = ReLU(pre) · 1[pre > θ]`` exactly as
    SAELens and Gemma Scope compute it (the same thing whenever θ >= 0).

    Training (STUDIES.md §3): loss ``|x - x_hat|^2 + λ·L0`` with ``L0 = Σ H(pre - θ)``
    (`l0`); the gradient reaches θ through the rectangle-kernel pseudo-derivatives
    of `JumpReLUFn` and `StepFn` with bandwidth ε (`self.bandwidth`, 0.001 for
    inputs normalised to unit mean squared norm). Call `use_log_threshold_()` to
    train log θ while `threshold` still reads θ.
    """

    architecture = "jumprelu"
    tensor_names = SAE.tensor_names + ("threshold",)

    def __init__(self, cfg: SAEConfig, *, init: bool = True, bandwidth: float = 0.001):
        super().__init__(cfg, init=False)
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=cfg.torch_dtype))
        self.bandwidth = bandwidth
        if init:
            self.reset_parameters_()

    @torch.no_grad()
    def reset_parameters_(
        self, generator: torch.Generator | None = None, *, init_threshold: float = 0.001
    ) -> None:
        super().reset_parameters_(generator)
        self._set_threshold_(torch.full_like(self.threshold, init_threshold))

    def activation(self, pre: Float[Tensor, "*batch d_sae"], *, inplace: bool = False) -> Feats:
        th = self.threshold
        if torch.is_grad_enabled() and (pre.requires_grad or th.requires_grad):
            return JumpReLUFn.apply(pre, th.clamp(min=0), self.bandwidth)
        keep = pre > th.clamp(min=0)
        zero = pre.new_zeros(())
        return torch.where(keep, pre, zero, out=pre) if inplace else torch.where(keep, pre, zero)

    def l0(self, pre: Float[Tensor, "*batch d_sae"]) -> Float[Tensor, "*batch"]:
        """Active features per token, Σ H(pre - θ), differentiable in θ (the L0 penalty)."""
        return StepFn.apply(pre, self.threshold, self.bandwidth).sum(dim=-1)

    # -------------------------------------------------------- log-threshold
    def use_log_threshold_(self) -> None:
        """Train log θ instead of θ (torch parametrization); `threshold` still reads θ."""
        if parametrize.is_parametrized(self, "threshold"):
            return
        th = self.threshold.detach()
        if not torch.all(th > 0):
            raise ValueError(
                f"log-threshold training needs positive thresholds; {(th <= 0).sum().item()} of "
                f"{th.numel()} are <= 0 (min {th.min().item():.3g}). Clamp them first, e.g. "
                "with sae.threshold.data.clamp_(min=1e-3)."
            )
        parametrize.register_parametrization(self, "threshold", _Exp())

    def use_plain_threshold_(self) -> None:
        """Undo `use_log_threshold_`, keeping the current θ as a plain parameter."""
        if parametrize.is_parametrized(self, "threshold"):
            parametrize.remove_parametrizations(self, "threshold", leave_parametrized=True)

    @torch.no_grad()
    def _set_threshold_(self, value: Tensor) -> None:
        if parametrize.is_parametrized(self, "threshold"):
            self.parametrizations.threshold.original.copy_(value.log())
        else:
            self.threshold.copy_(value)

    def _rescale_features_(self, n: Tensor) -> None:
        super()._rescale_features_(n)
        self._set_threshold_(self.threshold * n)
