"""Sparse autoencoders: five architectures on one small interface, and their file formats.

from saelab.sae import load_sae, save_sae
sae = load_sae("path/to/sae")           # SAELens, Gemma Scope 1/2, sparsify, dictionary_learning
out = sae(acts)                          # SAEOutput(x_hat, feats, error, top_idx, top_vals)
save_sae(sae, "out/dir", format="gemma-scope")
"""

from saelab.sae.base import (
    SAE,
    SAEConfig,
    SAEOutput,
    UnknownArchitectureError,
    build_sae,
    get_sae_class,
    register_sae,
    registered_architectures,
)
from saelab.sae.batchtopk import BatchTopKSAE
from saelab.sae.formats import detect_format, load_sae, save_sae
from saelab.sae.jumprelu import JumpReLUFn, JumpReLUSAE, StepFn
from saelab.sae.matryoshka import MatryoshkaBatchTopKSAE, matryoshka_widths, prefix_sae
from saelab.sae.relu import ReLUSAE, l1_penalty
from saelab.sae.topk import TopKSAE

__all__ = [
    "SAE",
    "SAEConfig",
    "SAEOutput",
    "UnknownArchitectureError",
    "build_sae",
    "get_sae_class",
    "register_sae",
    "registered_architectures",
    "ReLUSAE",
    "JumpReLUSAE",
    "TopKSAE",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
    "matryoshka_widths",
    "prefix_sae",
    "JumpReLUFn",
    "StepFn",
    "l1_penalty",
    "load_sae",
    "save_sae",
    "detect_format",
]
