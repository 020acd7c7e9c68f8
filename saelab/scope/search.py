"""Search across a whole scope: which features of every SAE fire on each token of a prompt.

    ids = prompt_ids(lm, "The cat sat")                  # (1, P), BOS first as contexts are
    acts = encode_all(lm, {"resid_post/layer_3/...": sae, ...}, ids)   # {id: (P, F)}
    hits = top_features(acts, top=5)                     # {id: [[(feature, act), ...] per token]}

Neuronpedia's search by inference over all SAEs at once: ONE forward of the model
reads every SAE's site (saelab.models.hooks.capture, stopped after the deepest
site), then each SAE encodes its own site's activations. The activations are read
from the clean forward - the same numbers a separate capture of each site gives -
so an SAE's features do not depend on which other SAEs are searched with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from saelab.data.tokens import context_bos_id, encode_prompts
from saelab.models.hooks import capture


class PromptTooLong(ValueError):
    """A prompt over the token limit of the search."""


def prompt_ids(lm: Any, text: str, max_tokens: int = 256) -> Tensor:
    """`text` as a (1, P) int64 batch that opens with the context BOS, as collected contexts do
    (position 0 is an attention sink with a huge norm; a special token sits there, never a word).

    Raises PromptTooLong when P > max_tokens.
    """
    ids, _ = encode_prompts(lm.tokenizer, [text])
    bos = context_bos_id(lm.tokenizer)
    if bos is not None and int(ids[0, 0]) != bos:
        ids = torch.cat([torch.tensor([[bos]]), ids], dim=1)
    if ids.shape[1] > max_tokens:
        raise PromptTooLong(f"the prompt has {ids.shape[1]} tokens; at most {max_tokens}")
    return ids


@torch.inference_mode()
def encode_all(lm: Any, saes: Mapping[str, Any], ids: Tensor) -> dict[str, Tensor]:
    """Every SAE's feature activations on `ids` (1, P), from one forward: {name: (P, d_sae)} float32.

    Each SAE reads the site its config names (`sae.cfg.site`); SAEs that share a site
    share the captured tensor. Raises SiteError for a site the model lacks.
    """
    sites = sorted({sae.cfg.site for sae in saes.values()})
    if not sites:
        return {}
    with capture(lm.model, sites, arch=lm.arch) as cap:
        cap.run(input_ids=ids.to(lm.device))
    return {name: sae.encode(cap[sae.cfg.site][0].to(sae.W_enc.dtype)).float().cpu()
            for name, sae in saes.items()}


def top_features(acts: Mapping[str, Tensor], top: int = 5) -> dict[str, list[list[tuple[int, float]]]]:
    """The `top` strongest active features on each token, per SAE: {name: [[(feature, act)] per token]}.

    Only features with activation > 0 are listed, strongest first (ties: lower id first).
    """
    out = {}
    for name, feats in acts.items():
        k = min(top, feats.shape[1])
        vals, idx = feats.topk(k, dim=1)
        out[name] = [[(int(i), float(v)) for v, i in zip(vals[p], idx[p], strict=True) if v > 0]
                     for p in range(feats.shape[0])]
    return out
