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


@torch.no_grad()
def random_transcoder(
    architecture: str,
    d_in: int = 16,
    d_sae: int = 64,
    *,
    d_out: int | None = None,
    k: int = 4,
    skip: bool = False,
    layer: int = 0,
    seed: int = 0,
    dtype: str = "float32",
    model_name: str | None = None,
):
    """A random transcoder (eval mode) reading mlp_in.`layer`, writing mlp_out.`layer`;
    every parameter random as in `random_sae`, W_skip too when `skip`."""
    from saelab.sae.transcoder import TranscoderConfig, build_transcoder

    g = torch.Generator().manual_seed(seed)
    d_out = d_out or d_in
    meta = {"site": f"mlp_in.{layer}", "site_out": f"mlp_out.{layer}", "seed": seed}
    if model_name:
        meta["model_name"] = model_name
    cfg = TranscoderConfig(architecture, d_in=d_in, d_sae=d_sae, d_out=d_out,
                           k=k if architecture in ("topk", "batchtopk") else None, skip=skip,
                           dtype=dtype, metadata=meta)
    tc = build_transcoder(cfg)
    dt = cfg.torch_dtype
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dt)  # noqa: E731
    tc.W_enc.copy_(rand(d_in, d_sae) / d_in**0.5)
    tc.W_dec.copy_(rand(d_sae, d_out) * (0.5 + torch.rand(d_sae, 1, generator=g)).to(dt))
    tc.b_enc.copy_(rand(d_sae) * 0.1 - 0.5)
    tc.b_dec.copy_(rand(d_out) * 0.1)
    if skip:
        tc.W_skip.copy_(rand(d_out, d_in) / d_in**0.5)
    if architecture == "jumprelu":
        tc.threshold.copy_((torch.rand(d_sae, generator=g) * 0.4 + 0.05).to(dt))
    if architecture == "batchtopk":
        tc.threshold.fill_(0.2)
    return tc.eval()
