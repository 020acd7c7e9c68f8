"""Rewrite an MLP's output from the MLP's input of the same forward pass.

    def fn(x, y, ctx):                     # x: the input read at in_site, y: mlp_out.L (B, P, d)
        return y + f(x)                    # or None to leave y as it is
    with PatchMLPs(model, arch, {3: ("mlp_in.3", fn)}):
        model(input_ids=ids)

A patch function at each layer's input site stashes ``x`` (it returns nothing, so the
input is untouched) and the one at ``mlp_out.L`` pops it and hands it to ``fn`` with
the MLP's real output ``y``. Both are one `saelab.models.hooks.patch`, so hooks go
when the context is left, whatever happened inside, and the stash is emptied then.
`ReplaceMLPs` (transcoders in place of MLPs) and `EditTranscoders` (transcoder
features edited in the real model) are subclasses that pass their ``fns`` up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Self

from torch import Tensor, nn

from saelab.models.hooks import PatchContext, patch
from saelab.models.sites import Architecture

MLPFn = Callable[[Tensor, Tensor, PatchContext], Tensor | None]  # (x, y, ctx) -> new y, or None


class PatchMLPs:
    """Context manager: ``mlp_out.L <- fn(x, y, ctx)`` for each ``{L: (in_site, fn)}``.

    in_site: the canonical site whose value this forward is ``x`` (mlp_in.L as a rule).
    An empty mapping installs nothing."""

    def __init__(self, model: nn.Module, arch: Architecture, fns: Mapping[int, tuple[str, MLPFn]]):
        self.model, self.arch, self.fns = model, arch, fns
        self._inputs: dict[int, Tensor] = {}
        self._patch: Any = None

    def __enter__(self) -> Self:
        hooks: dict[str, Any] = {}
        for layer, (in_site, fn) in self.fns.items():
            hooks[in_site] = self._stash(layer)
            hooks[f"mlp_out.{layer}"] = self._rewrite(layer, fn)
        if hooks:
            self._patch = patch(self.model, hooks, arch=self.arch)
            self._patch.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._patch is not None:
            self._patch.__exit__(*exc)
        self._inputs.clear()

    def _stash(self, layer: int):
        def fn(x: Tensor, ctx: PatchContext) -> None:
            self._inputs[layer] = x
        return fn

    def _rewrite(self, layer: int, mlp_fn: MLPFn):
        def fn(y: Tensor, ctx: PatchContext) -> Tensor | None:
            return mlp_fn(self._inputs.pop(layer), y, ctx)
        return fn

