"""The local replacement model: the real Hugging Face model under hooks, linear in its sources.

    state = record_clean(model, ids, transcoders)      # one clean forward: logits, q/k, norm scales
    with frozen(model, state, mlp_fn) as tape:           # attention patterns and norm scales fixed
        model(input_ids=ids)
    tape.reads[3]            # mlp_in.3 (1, T, d) of this pass, in the autograd graph
    tape.final               # the lm_head's input (1, T, d)

Under `frozen` every norm's scale (1/rms, or 1/std for LayerNorm) is the one of
the clean pass, the attention patterns are the clean ones (the query and key
projections return their clean outputs, so only values carry a change), and
each MLP's output (site ``mlp_out.L``) is whatever `mlp_fn(layer, x)` returns
from its input ``x`` (site ``mlp_in.L``). With the transcoders' output plus the
error node (real output minus reconstruction) the pass gives the clean values
again, and the residual stream is an affine function of the embeddings, the
feature activations and the error nodes: what makes edges exact.

Nothing here is family code beyond the table of query/key projections
(`QK_MODULES`); norms are found by type (any ``*RMSNorm`` or LayerNorm) and
their formula (``w`` or ``1 + w``, centred or not) is checked against the
module's own output on the clean pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from saelab.errors import SaelabError
from saelab.models.hooks import capture, patch
from saelab.models.sites import Architecture, Site


class GraphError(SaelabError):
    """An attribution graph that cannot be built as asked (bad input, unsupported model)."""


# Modules whose outputs hold the queries and keys, per family, and how many leading
# features of the last dimension are queries and keys (None: the whole output).
# gpt_neox interleaves (q, k, v) per head: handled by `_qk_part`.
QK_MODULES: dict[str, tuple[str, ...]] = {
    "llama": ("self_attn.q_proj", "self_attn.k_proj"),
    "qwen2": ("self_attn.q_proj", "self_attn.k_proj"),
    "gemma2": ("self_attn.q_proj", "self_attn.k_proj"),
    "gemma3": ("self_attn.q_proj", "self_attn.k_proj"),
    "gpt2": ("attn.c_attn",),
    "gpt_neox": ("attention.query_key_value",),
}


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


@dataclass
class NormScale:
    """A norm frozen at its clean scale: ``y = (x - centre) * scale * weight + bias``."""

    scale: Tensor  # (..., 1): 1/rms (or 1/std) of the clean input, per row
    weight: Tensor | None
    bias: Tensor | None
    centre: bool
    offset: Tensor | float = 0.0  # clean output minus the formula's (the module's own rounding)

    def apply(self, x: Tensor) -> Tensor:
        xc = x - x.mean(-1, keepdim=True) if self.centre else x
        y = xc * self.scale.to(x.dtype)
        if self.weight is not None:
            y = y * self.weight.to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def frozen(self, x: Tensor) -> Tensor:
        """The frozen norm; equal to the module's own output, bit for bit, on the clean input."""
        return self.apply(x) + self.offset


def _norm_scale(module: nn.Module, x: Tensor, y: Tensor, path: str) -> NormScale:
    """Read the clean scale of a norm and find which formula the module uses (checked on y)."""
    centre = isinstance(module, nn.LayerNorm)
    eps = next((float(getattr(module, k)) for k in ("eps", "variance_epsilon", "epsilon")
                if hasattr(module, k)), 1e-6)
    xf = x.double()
    xc = xf - xf.mean(-1, keepdim=True) if centre else xf
    scale = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None) if centre else None
    candidates = [w, None] if w is None else [w.detach(), 1.0 + w.detach()]
    best, err = None, float("inf")
    for cand in candidates:
        ns = NormScale(scale, cand, None if b is None else b.detach(), centre)
        e = float((ns.apply(xf) - y.double()).abs().max())
        if e < err:
            best, err = ns, e
    tol = 1e-3 * max(1.0, float(y.double().abs().max()))
    if best is None or err > tol:
        raise GraphError(f"the norm {path} ({type(module).__name__}) computes neither "
                         "x/rms(x)*w, x/rms(x)*(1+w) nor a LayerNorm; attribution graphs cannot "
                         "freeze its scale. Use a model of a supported family.")
    best.scale = scale.to(x.dtype)
    best.offset = y.detach() - best.apply(x.detach())  # the module may compute in float32
    return best


@dataclass
class CleanState:
    """What one clean forward pass leaves for the frozen passes (batch of one prompt)."""

    ids: Tensor  # (1, T)
    logits: Tensor  # (1, T, V)
    mlp_in: dict[int, Tensor]  # layer -> (1, T, d)
    mlp_out: dict[int, Tensor]  # layer -> (1, T, d) real MLP output
    embed: Tensor  # (1, T, d) resid_pre.0: token (+ position) embedding as the blocks see it
    final: Tensor  # (1, T, d) the lm_head's input (after the final norm)
    qk: dict[str, Tensor]  # module path -> clean output
    norms: dict[str, NormScale]  # module path -> frozen norm
    mlp_out_paths: frozenset[str] = field(default_factory=frozenset)


def _qk_paths(model: nn.Module, arch: Architecture) -> list[str]:
    try:
        names = QK_MODULES[arch.family]
    except KeyError:
        raise GraphError(f"attribution graphs do not know where {arch.family} computes its "
                         f"queries and keys; supported: {', '.join(QK_MODULES)}.") from None
    return [f"{arch.layers_path}.{layer}.{name}" for layer in range(arch.n_layers) for name in names]


def _mlp_out_paths(arch: Architecture) -> frozenset[str]:
    """Modules whose output is mlp_out (Gemma's post-MLP norm): replaced, never frozen."""
    return frozenset(arch.tap(Site("mlp_out", layer))[0] for layer in range(arch.n_layers)
                     if arch.tap(Site("mlp_out", layer))[1] == "out")


def _lm_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise GraphError(f"{type(model).__name__} has no output embedding (lm_head); attribution "
                         "graphs need a causal LM.")
    return head


@torch.no_grad()
def record_clean(model: nn.Module, arch: Architecture, ids: Tensor) -> CleanState:
    """One clean forward of `ids` (1, T): logits and everything the frozen passes fix."""
    qk_paths = _qk_paths(model, arch)
    mlp_paths = _mlp_out_paths(arch)
    norm_paths = [n for n, m in model.named_modules() if _is_norm(m) and n not in mlp_paths]
    qk: dict[str, Tensor] = {}
    norms: dict[str, NormScale] = {}
    final: list[Tensor] = []
    handles = []

    def keep_qk(path: str):
        return lambda _m, _a, out: qk.__setitem__(path, out.detach().clone())

    def keep_norm(path: str):
        def hook(module, args, out):
            y = out[0] if isinstance(out, tuple) else out
            norms[path] = _norm_scale(module, args[0], y, path)
        return hook

    try:
        for path in qk_paths:
            handles.append(model.get_submodule(path).register_forward_hook(keep_qk(path)))
        for path in norm_paths:
            handles.append(model.get_submodule(path).register_forward_hook(keep_norm(path)))
        handles.append(_lm_head(model).register_forward_pre_hook(
            lambda _m, args: final.append(args[0].detach().clone())))
        sites = [f"mlp_in.{i}" for i in range(arch.n_layers)] + [
            f"mlp_out.{i}" for i in range(arch.n_layers)] + ["resid_pre.0"]
        with capture(model, sites, arch=arch, stop_early=False) as acts:
            out = model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n = arch.n_layers
    return CleanState(ids=ids, logits=out.logits.detach(),
                      mlp_in={i: acts[f"mlp_in.{i}"].clone() for i in range(n)},
                      mlp_out={i: acts[f"mlp_out.{i}"].clone() for i in range(n)},
                      embed=acts["resid_pre.0"].clone(), final=final[-1], qk=qk, norms=norms,
                      mlp_out_paths=mlp_paths)


@dataclass
class Tape:
    """What a frozen pass exposes: the reads (targets' inputs) and the write leaves."""

    reads: dict[int, Tensor] = field(default_factory=dict)  # layer -> mlp_in (1, T, d)
    final: Tensor | None = None  # (1, T, d) lm_head input
    logits: Tensor | None = None


MlpFn = Callable[[int, Tensor], Tensor]  # (layer, mlp_in (1, T, d)) -> mlp_out (1, T, d)


@contextlib.contextmanager
def frozen(model: nn.Module, arch: Architecture, state: CleanState, mlp_fn: MlpFn,
           embed: Tensor | None = None) -> Iterator[Tape]:
    """Hooks that turn `model` into the local replacement model while the context is open.

    mlp_fn: the output of each MLP from its input (the transcoder plus error node, or any
        other function). embed: what resid_pre.0 is replaced by (default: the clean value);
        the frozen model is affine in it.
    """
    tape = Tape()
    handles = []

    def freeze_qk(path: str):
        clean = state.qk[path]
        return lambda _m, _a, out: clean.to(out.dtype)

    def freeze_norm(path: str):
        ns = state.norms[path]

        def hook(_m, args, out):
            y = ns.frozen(args[0])
            return (y, *out[1:]) if isinstance(out, tuple) else y
        return hook

    def read_final(_m, args):
        tape.final = args[0]

    def read_in(layer: int):
        def fn(x, _ctx):
            tape.reads[layer] = x
        return fn

    def write_out(layer: int):
        return lambda _y, _ctx: mlp_fn(layer, tape.reads[layer])

    fns: dict[str, Any] = {"resid_pre.0": lambda _x, _ctx: (state.embed if embed is None else embed)}
    for layer in range(arch.n_layers):
        fns[f"mlp_in.{layer}"] = read_in(layer)
        fns[f"mlp_out.{layer}"] = write_out(layer)
    try:
        for path in state.qk:
            handles.append(model.get_submodule(path).register_forward_hook(freeze_qk(path)))
        for path in state.norms:
            handles.append(model.get_submodule(path).register_forward_hook(freeze_norm(path)))
        handles.append(_lm_head(model).register_forward_pre_hook(read_final))
        with patch(model, fns, arch=arch):
            yield tape
    finally:
        for h in handles:
            h.remove()


def run_frozen(model: nn.Module, arch: Architecture, state: CleanState, mlp_fn: MlpFn,
               embed: Tensor | None = None) -> Tape:
    """One forward of the frozen model on the clean prompt; the tape keeps its graph."""
    with frozen(model, arch, state, mlp_fn, embed) as tape:
        tape.logits = model(input_ids=state.ids, use_cache=False).logits
    return tape
