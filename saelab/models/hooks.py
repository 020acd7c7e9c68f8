"""Read (`capture`) and write (`patch`) activations at sites, as context managers.

    with capture(model, "resid_post.3,attn_z.1") as acts:
        acts.run(input_ids=ids)            # stops after the deepest site
    acts["resid_post.3"]                   # (B, P, d_model)

    def steer(x, ctx):                     # x: (B, P, d); ctx.positions: (P,)
        return x + v * (ctx.positions >= prompt_len)[:, None]
    with patch(model, {"resid_post.3": steer}):
        model.generate(ids, max_new_tokens=20)

Every site is read at a tap (a module's input or output, see `sites.FAMILIES`);
one hook per tapped module runs that module's sites in depth order. Tuple
outputs and positional-or-keyword inputs are unwrapped and rewrapped only in
`_read` / `_write`. Hooks are removed in `__exit__`, whatever happened inside.

Patch hooks are registered in front of all other hooks (``prepend=True``), so a
capture - or Hugging Face's own ``output_hidden_states`` recorder - sees the
patched values whichever context was entered first.

``resid_mid`` is tapped at the input of the norm before the MLP, but the block
adds the MLP output to its own reference to the unpatched tensor. A patch of
``resid_mid`` therefore rewrites the norm's input *and* adds the same change
(``new - old``) to the block's output, so that downstream sees
``resid_post = new_resid_mid + mlp(norm(new_resid_mid))``. For parallel-residual
GPT-NeoX no module sees resid_mid: it is computed as ``resid_pre + attn_out``,
and a patch adds its change to attn_out, the only term it can reach (the MLP
reads resid_pre), so a capture of attn_out inside that patch shows the change.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saelab.errors import ShapeMismatchError, SiteError
from saelab.models.sites import Architecture, Site, describe, resolve_sites


class _StopForward(Exception):
    """Raised by a capture hook once every site is recorded, to skip the rest of the model."""


@dataclass(frozen=True)
class PatchContext:
    """What a patch function knows besides the activation."""

    site: Site
    positions: Tensor  # (P,) indices of this chunk's tokens in the whole sequence (cache slots)
    call: int  # forward passes of the model since the patch was entered, from 0 (0 = prefill)


PatchFn = Callable[[Tensor, PatchContext], Tensor | None]  # None leaves the activation unchanged


@dataclass
class _Step:
    """One thing to do with the value flowing through a tapped module."""

    path: str
    direction: str
    order: tuple  # depth order of the steps that share a module
    action: Callable[[Tensor], Tensor | None]  # returns a replacement or None


# One place that knows where the tensor is in a module's inputs and outputs.
def _read(direction: str, payload: Any) -> Tensor:
    if direction == "in":
        args, kwargs = payload
        if args and isinstance(args[0], Tensor):
            return args[0]
        for key in ("hidden_states", "input", "x"):
            if isinstance(kwargs.get(key), Tensor):
                return kwargs[key]
        raise SiteError(f"found no tensor among the module's inputs (kwargs {sorted(kwargs)}); "
                        "tap its output or a submodule instead.")
    if isinstance(payload, Tensor):
        return payload
    return payload[0]  # tuples (output, weights, ...) and ModelOutputs hold the tensor first


def _write(direction: str, payload: Any, new: Tensor) -> Any:
    if direction == "in":
        args, kwargs = payload
        if args and isinstance(args[0], Tensor):
            return (new, *args[1:]), kwargs
        key = next(k for k in ("hidden_states", "input", "x") if isinstance(kwargs.get(k), Tensor))
        return args, {**kwargs, key: new}
    if isinstance(payload, Tensor):
        return new
    if isinstance(payload, tuple | list):
        return type(payload)((new, *payload[1:]))
    payload[next(iter(payload.keys()))] = new  # ModelOutput
    return payload


def _install(model: nn.Module, steps: list[_Step], prepend: bool) -> list[Any]:
    """Register one hook per (module, direction) running its steps in order; return the handles."""
    groups: dict[tuple[str, str], list[_Step]] = {}
    for step in sorted(steps, key=lambda s: s.order):
        groups.setdefault((step.path, step.direction), []).append(step)
    modules = {path: model.get_submodule(path) for path, _ in groups}  # fail before hooking anything

    def run(direction: str, group: list[_Step], payload: Any) -> Any:
        value = _read(direction, payload)
        changed = False
        for step in group:
            new = step.action(value)
            if new is not None and new is not value:
                value, changed = new, True
        return _write(direction, payload, value) if changed else None

    handles = []
    try:
        for (path, direction), group in groups.items():
            if direction == "in":
                def pre_hook(_m, args, kwargs, group=group):
                    return run("in", group, (args, kwargs))

                handles.append(modules[path].register_forward_pre_hook(
                    pre_hook, with_kwargs=True, prepend=prepend))
            else:
                def hook(_m, _args, output, group=group):
                    return run("out", group, output)

                handles.append(modules[path].register_forward_hook(hook, prepend=prepend))
    except BaseException:
        _remove(handles)
        raise
    return handles


def _remove(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class _Forwards:
    """Notices each forward pass of the base model: counts it and works out token positions."""

    def __init__(self, model: nn.Module, arch: Architecture, on_start: Callable[[], None]):
        self.base = model.get_submodule(arch.base_path)
        self.signature = inspect.signature(self.base.forward)
        self.on_start = on_start
        self.calls = -1
        self.positions: Tensor | None = None

    def install(self) -> Any:
        return self.base.register_forward_pre_hook(self._pre_hook, with_kwargs=True, prepend=True)

    def _pre_hook(self, _module, args, kwargs) -> None:
        self.calls += 1
        self.positions = _positions(self.signature, args, kwargs)
        self.on_start()

    def positions_for(self, value: Tensor) -> Tensor:
        if self.positions is not None and self.positions.shape[0] == value.shape[1]:
            return self.positions
        return torch.arange(value.shape[1], device=value.device)  # blocks called directly


def _positions(signature: inspect.Signature, args: tuple, kwargs: dict) -> Tensor | None:
    """Cache slots of this chunk: past length + arange(chunk), or the `cache_position` given."""
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = dict(kwargs)
    extra = bound.get("kwargs", {})  # **kwargs of the forward, when bound by name

    def get(key: str) -> Any:
        return bound.get(key, extra.get(key))

    if get("cache_position") is not None:  # transformers 4.x passes it
        return get("cache_position")
    tokens = get("input_ids")
    tokens = tokens if tokens is not None else get("inputs_embeds")
    if tokens is None:
        return None
    cache = get("cache")  # transformers >= 5.24
    cache = cache if cache is not None else get("past_key_values")
    if cache is None:
        past = 0
    elif hasattr(cache, "get_seq_length"):
        past = int(cache.get_seq_length())
    else:  # legacy tuple of (key, value) per layer, key (B, H, T, D)
        past = cache[0][0].shape[-2] if len(cache) and cache[0] is not None else 0
    return torch.arange(past, past + tokens.shape[1], device=tokens.device)


class Capture(Mapping[str, Tensor]):
    """Activations at sites, keyed by site name, from the latest forward pass.

    Enter it (``with capture(...) as acts``), then call ``acts.run(**inputs)``
    or the model itself. With ``stop_early`` the forward stops once every site
    is recorded; `run` swallows that stop (its ``.output`` is then None), and so
    does leaving the ``with`` block, but code after a bare ``model(...)`` in the
    block is then skipped - prefer `run`, and ``stop_early=False`` to capture
    during ``generate`` (only the last step's activations are kept).
    """

    def __init__(self, model: nn.Module, sites: Any, *, arch: Architecture | None = None,
                 stop_early: bool = True, detach: bool = True):
        self.model = model
        self.arch = arch or describe(model)
        self.sites = resolve_sites(self.arch, sites)
        self.stop_early = stop_early
        self.detach = detach
        self.output: Any = None  # the model output of `run`, None if stopped early
        self.acts: dict[str, Tensor] = {}
        self._resid_pre: dict[int, Tensor] = {}  # for computed resid_mid
        self._handles: list[Any] = []

    def run(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Call the model (without a KV cache unless asked) and return this pass's activations."""
        kwargs.setdefault("use_cache", False)
        self.output = None
        try:
            self.output = self.model(*args, **kwargs)
        except _StopForward:
            pass
        return self.acts

    def __enter__(self) -> Capture:
        forwards = _Forwards(self.model, self.arch, self._start)
        steps = [step for site in self.sites for step in self._steps(site)]
        self._handles = _install(self.model, steps, prepend=False)
        self._handles.append(forwards.install())
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        _remove(self._handles)
        return exc_type is not None and issubclass(exc_type, _StopForward)

    def _start(self) -> None:
        self.acts = {}  # a new dict: a caller may keep the previous pass's
        self._resid_pre = {}

    def _record(self, site: Site, value: Tensor) -> None:
        self.acts[site.name] = value.detach() if self.detach else value
        if self.stop_early and len(self.acts) == len(self.sites):
            raise _StopForward

    def _steps(self, site: Site) -> list[_Step]:
        tap = self.arch.tap(site)
        if tap is not None:
            return [_Step(*tap, site.sort_key, lambda v: self._record(site, v))]
        # resid_mid of a parallel-residual block: resid_pre + attn_out.
        block, attn_out = self.arch.tap(Site("resid_pre", site.layer)), self.arch.tap(
            Site("attn_out", site.layer))

        def stash(v: Tensor) -> None:
            self._resid_pre[site.layer] = v

        def record(v: Tensor) -> None:
            self._record(site, self._resid_pre.pop(site.layer) + v)
        return [_Step(*block, site.sort_key, stash), _Step(*attn_out, site.sort_key, record)]

    def __getitem__(self, key: str | Site) -> Tensor:
        name = key.name if isinstance(key, Site) else key
        if name not in self.acts and isinstance(key, str) and "*" not in key:
            try:  # aliases such as "blocks.3.hook_resid_post"
                name = resolve_sites(self.arch, key)[0].name
            except SiteError:
                pass
        if name not in self.acts:
            raise KeyError(f"{key!r} was not captured in the latest forward; captured: {list(self.acts)}")
        return self.acts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.acts)

    def __len__(self) -> int:
        return len(self.acts)


def capture(model: nn.Module, sites: Any, *, arch: Architecture | None = None,
            stop_early: bool = True, detach: bool = True) -> Capture:
    """Context manager recording activations at `sites` (names, aliases, globs; see resolve_sites)."""
    return Capture(model, sites, arch=arch, stop_early=stop_early, detach=detach)


class Patch:
    """Replace activations at sites by ``fn(activation, ctx)`` while the context is open.

    Several sites at once; a function returning None leaves its site unchanged,
    and a returned tensor is cast to the activation's dtype. Positions in `ctx`
    are cache slots, so under ``generate`` with a KV cache each decoding step
    sees only its new position (``ctx.positions == tensor([t])``).
    """

    def __init__(self, model: nn.Module, fns: Mapping[str | Site, PatchFn], *,
                 arch: Architecture | None = None):
        self.model = model
        self.arch = arch or describe(model)
        self.fns: list[tuple[Site, PatchFn]] = [
            (site, fn) for key, fn in fns.items() for site in resolve_sites(self.arch, key)]
        self._forwards = _Forwards(model, self.arch, self._start)
        self._delta: dict[int, Tensor] = {}  # resid_mid change still to reach the block output
        self._resid_pre: dict[int, Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> Patch:
        steps = [step for i, (site, fn) in enumerate(self.fns) for step in self._steps(i, site, fn)]
        self._handles = _install(self.model, steps, prepend=True)
        self._handles.append(self._forwards.install())
        return self

    def __exit__(self, *exc: Any) -> None:
        _remove(self._handles)

    def _start(self) -> None:
        self._delta, self._resid_pre = {}, {}

    def _apply(self, site: Site, fn: PatchFn, value: Tensor) -> Tensor | None:
        ctx = PatchContext(site, self._forwards.positions_for(value), self._forwards.calls)
        new = fn(value, ctx)
        if new is None or new is value:
            return None
        if new.shape != value.shape:
            raise ShapeMismatchError(f"the patch for {site.name} returned shape {tuple(new.shape)} "
                                     f"for an activation of shape {tuple(value.shape)}; return a "
                                     "tensor of the same shape (or None to leave it unchanged).")
        return new.to(value.dtype)

    def _steps(self, i: int, site: Site, fn: PatchFn) -> list[_Step]:
        order = (*site.sort_key, i)  # several functions on one site compose in the given order
        tap = self.arch.tap(site)
        if site.kind != "resid_mid":
            return [_Step(*tap, order, lambda v: self._apply(site, fn, v))]
        layer = site.layer
        block_in, block_out = self.arch.tap(Site("resid_pre", layer)), self.arch.tap(
            Site("resid_post", layer))

        def carry_on(v: Tensor) -> Tensor | None:  # the block's residual add never saw the patch
            delta = self._delta.pop(layer, None)
            return None if delta is None else v + delta

        if tap is not None:
            def at_norm(v: Tensor) -> Tensor | None:
                new = self._apply(site, fn, v)
                if new is not None:
                    self._delta[layer] = self._delta.get(layer, 0) + (new - v)
                return new
            return [_Step(*tap, order, at_norm), _Step(*block_out, order, carry_on)]

        def stash(v: Tensor) -> None:
            self._resid_pre[layer] = v

        def at_attn_out(v: Tensor) -> Tensor | None:
            # Parallel residual: resid_mid := resid_pre + attn_out and nothing else reads it,
            # so the change rides on attn_out; captures then still see mid = pre + attn_out.
            mid = self._resid_pre.pop(layer) + v
            new = self._apply(site, fn, mid)
            return None if new is None else v + (new - mid)

        attn_out = self.arch.tap(Site("attn_out", layer))
        return [_Step(*block_in, order, stash), _Step(*attn_out, order, at_attn_out)]


def patch(model: nn.Module, fns: Mapping[str | Site, PatchFn], *,
          arch: Architecture | None = None) -> Patch:
    """Context manager patching several sites at once: ``{site: fn(activation, ctx) -> new}``."""
    return Patch(model, fns, arch=arch)
