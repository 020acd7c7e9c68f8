"""Run a model from block L on: the spliced forwards of a scope's evaluation.

A spliced forward changes nothing before its site, so the blocks before the site's
block would recompute the clean forward exactly. `tail_logits` skips them: while it
runs, blocks 0..L-1 return the clean input of block L (captured in the clean
forward) without computing anything, and the model's own forward does the rest
(embedding lookup, masks and rotary tables, blocks L.., final norm, unembedding,
any logit soft-capping), so every family runs its own code and block L sees the
very tensor it saw in the clean forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn


def block_list(lm: Any) -> nn.ModuleList:
    return lm.model.get_submodule(lm.arch.layers_path)


@contextlib.contextmanager
def skipping_blocks(lm: Any, layer: int, block_input: Tensor, tuple_output: bool) -> Iterator[None]:
    """Blocks before `layer` return `block_input` (the clean input of block `layer`)."""
    blocks = block_list(lm)
    value = (block_input,) if tuple_output else block_input

    def skip(*_args: Any, **_kwargs: Any) -> Any:
        return value

    changed = []
    try:
        for i in range(layer):
            blocks[i].forward = skip  # an instance attribute: nn.Module.__call__ finds it first
            changed.append(blocks[i])
        yield
    finally:
        for block in changed:
            del block.forward


def tail_logits(lm: Any, ids: Tensor, layer: int, block_input: Tensor, patches: dict,
                tuple_output: bool) -> Tensor:
    """Logits (B, P, V) of the forward with `patches` ({site: fn}, see models.hooks.patch),
    computed from block `layer` on. block_input: (B, P, d) the clean input of that block."""
    from saelab.models.hooks import patch

    with skipping_blocks(lm, layer, block_input, tuple_output), \
            patch(lm.model, patches, arch=lm.arch):
        return lm.model(input_ids=ids, use_cache=False).logits
