"""The shape vocabulary used in docstrings, jaxtyping annotations and comments.

    batch    sequences in a batch                      (B)
    pos      token positions in a sequence             (P)
    tokens   flattened batch*pos rows                  (N)
    d_model  residual stream width of the model        (D)
    d_in     input width of an SAE (= width of its site)
    d_sae    number of SAE latents / features          (F)
    k        active latents per token (top-k family)   (K)
    layer    transformer block index                   (L)
    vocab    tokenizer vocabulary size                 (V)

Intermediates carry trailing shape comments, e.g. ``acts  # (N, F)``.
"""

from jaxtyping import Bool, Float, Int
from torch import Tensor

Acts = Float[Tensor, "*batch d_in"]
Feats = Float[Tensor, "*batch d_sae"]
TokenIds = Int[Tensor, "batch pos"]
TokenMask = Bool[Tensor, "batch pos"]

__all__ = ["Acts", "Feats", "TokenIds", "TokenMask", "Float", "Int", "Bool", "Tensor"]
