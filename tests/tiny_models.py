"""Tiny random Hugging Face causal LMs, one per supported family, for tests.

Nothing is downloaded: each model is built from a config with a fixed seed, in
fp32 and eval mode, with eager attention so that results do not depend on
which fused kernel a torch build picks. The sizes are chosen to exercise shape
handling: the Gemma models have ``n_heads * head_dim != d_model`` and every
model has ``d_mlp != d_model``.

    from tiny_models import TINY_FAMILIES, tiny_model   # pytest puts tests/ on sys.path
    model = tiny_model("llama")
    sae = tiny_sae(model, "resid_post.1", "topk")        # random SAE with non-zero biases
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

TINY_FAMILIES = ["llama", "gemma2", "gemma3", "gpt2", "gpt_neox", "qwen2"]
VOCAB = 64


def _config(family: str, **overrides: Any) -> PretrainedConfig:
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=128)
    if family == "llama":
        from transformers import LlamaConfig

        cfg = LlamaConfig(**common, num_key_value_heads=2)
    elif family == "qwen2":
        from transformers import Qwen2Config

        cfg = Qwen2Config(**common, num_key_value_heads=2)
    elif family == "gemma2":
        from transformers import Gemma2Config

        cfg = Gemma2Config(**common, num_key_value_heads=2, head_dim=16, sliding_window=6)
    elif family == "gemma3":
        from transformers import Gemma3TextConfig

        # A short window with a mix of layer types, so the cached generation
        # tests run through a sliding-window cache that has actually slid.
        cfg = Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=16, sliding_window=6,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    elif family == "gpt2":
        from transformers import GPT2Config

        # GPT-2 uses its last token as both bos and eos.
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_inner=64, n_layer=3, n_head=4, n_positions=128,
                         bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    elif family == "gpt_neox":
        from transformers import GPTNeoXConfig

        # Pythia uses the parallel residual; tests flip it with use_parallel_residual=False.
        cfg = GPTNeoXConfig(**common, rotary_pct=0.5, use_parallel_residual=True)
    else:
        raise ValueError(f"unknown tiny family {family!r}; known: {TINY_FAMILIES}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random causal LM of `family` (one of TINY_FAMILIES), fp32, eval mode.

    `overrides` are set on the config, e.g. ``use_parallel_residual=False``.
    """
    cfg = _config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    # Random init leaves some norms at exactly 1 or 0 (Gemma's zero-centred
    # weights); jitter every parameter so that a wrong site cannot pass by luck.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_sae(model: torch.nn.Module, site: str, arch: str = "topk", d_sae: int = 96, seed: int = 0,
             k: int | None = None):
    """A random SAE of `arch` for `site` of `model` (cfg.site set), with non-zero biases."""
    from saelab.models.sites import describe, site_width
    from saelab.sae import SAEConfig, build_sae

    width = site_width(describe(model), site)
    if k is None and arch in ("topk", "batchtopk"):
        k = 6
    sae = build_sae(SAEConfig(arch, width, d_sae, k=k, metadata={"site": site}))
    with torch.no_grad():  # non-zero biases, so that b_dec and b_enc matter
        g = torch.Generator().manual_seed(seed)
        sae.reset_parameters_(g)
        sae.b_dec.copy_(0.1 * torch.randn(width, generator=g))
        sae.b_enc.copy_(0.05 * torch.randn(d_sae, generator=g))
    return sae
