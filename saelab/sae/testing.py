"""Random SAEs for tests (no download): every parameter non-trivial, features sparse."""

from __future__ import annotations

from typing import Any

import torch

from saelab.sae.base import SAE, SAEConfig, build_sae


@torch.no_grad()
def random_sae(
    architecture: str,
    d_in: int = 16,
    d_sae: int = 64,
    *,
    k: int = 4,
    seed: int = 0,
    apply_b_dec_to_input: bool = True,
    dtype: str = "float32",
    metadata: dict[str, Any] | None = None,
) -> SAE:
    """An SAE in eval mode whose weights, biases and thresholds are all random.

    Encoder biases are negative and thresholds positive so that roughly a fifth of
    the features fire on standard-normal inputs; decoder rows do not have unit norm.
    """
    g = torch.Generator().manual_seed(seed)
    top = architecture in ("topk", "batchtopk")
    cfg = SAEConfig(
        architecture,
        d_in=d_in,
        d_sae=d_sae,
        k=k if top else None,
        apply_b_dec_to_input=apply_b_dec_to_input,
        dtype=dtype,
        metadata=metadata if metadata is not None else {"site": "resid_post.3", "seed": seed},
    )
    sae = build_sae(cfg)
    dt = cfg.torch_dtype
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dt)  # noqa: E731
    sae.W_enc.copy_(rand(d_in, d_sae) / d_in**0.5)
    sae.W_dec.copy_(rand(d_sae, d_in) * (0.5 + torch.rand(d_sae, 1, generator=g)).to(dt))
    sae.b_enc.copy_(rand(d_sae) * 0.1 - 0.5)
    sae.b_dec.copy_(rand(d_in) * 0.1)
    if architecture == "jumprelu":
        sae.threshold.copy_((torch.rand(d_sae, generator=g) * 0.4 + 0.05).to(dt))
    if architecture == "batchtopk":
        sae.threshold.fill_(0.2)
    return sae.eval()
