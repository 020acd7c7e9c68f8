"""Transcoders: read one site (the MLP's input), predict another (the MLP's output).

A transcoder is an SAE whose decoder writes another activation than the one its
encoder reads. It reuses the SAE machinery (relu, jumprelu, topk, batchtopk
activations) with its own widths::

    W_enc   [d_in, d_sae]      reads  cfg.site      (mlp_in.L)
    W_dec   [d_sae, d_out]     writes cfg.site_out  (mlp_out.L)
    b_enc   [d_sae]
    b_dec   [d_out]            an output bias: never subtracted from the input
    W_skip  [d_out, d_in]      skip transcoders only (`cfg.skip`), as SAELens stores it

    feats  = act((x) @ W_enc + b_enc)
    output = feats @ W_dec + b_dec + x @ W_skip.T

Example::

    tc = build_transcoder(TranscoderConfig("topk", d_in=576, d_sae=4608, k=32, skip=True,
                                           metadata={"site": "mlp_in.3", "site_out": "mlp_out.3"}))
    out = tc(x)                        # TranscoderOutput(output, feats, top_idx, top_vals)
    assert torch.allclose(out.output, tc.decode(out.feats) + tc.skip(x), atol=1e-5)

A set of per-layer transcoders (`TranscoderSet`, from `load_transcoders`) maps
layer -> transcoder. Files: a transcoder is never loaded as an SAE, nor an SAE as
a transcoder (`require_sae`, `require_transcoder`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from saelab.dims import Acts
from saelab.errors import SaelabError, ShapeMismatchError
from saelab.sae.base import SAE, SAEConfig, get_sae_class
from saelab.sae.batchtopk import BatchTopKSAE
from saelab.sae.topk import TopKSAE


class WrongKindError(SaelabError):
    """A transcoder where an SAE is needed, or an SAE where a transcoder is needed."""


class TranscoderSetError(SaelabError):
    """A transcoder set that cannot serve a model: a layer missing, mixed widths, another model."""


@dataclass(frozen=True)
class TranscoderConfig(SAEConfig):
    """An SAEConfig with an output width and an optional affine skip.

    `metadata["site"]` is the input site (``mlp_in.L``), `metadata["site_out"]` the
    output site (``mlp_out.L``). `apply_b_dec_to_input` must stay False: b_dec lives
    in the output space.
    """

    apply_b_dec_to_input: bool = False
    d_out: int | None = None
    """Width of the predicted activation; None means d_in."""
    skip: bool = False
    """Whether the transcoder has an affine skip ``x @ W_skip.T`` (a skip transcoder)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_out is None:
            object.__setattr__(self, "d_out", self.d_in)
        d_out = self.d_out
        if not isinstance(d_out, int) or isinstance(d_out, bool) or d_out <= 0:
            raise ValueError(f"TranscoderConfig.d_out={d_out!r}: expected a positive integer")
        if self.apply_b_dec_to_input:
            raise ValueError("a transcoder's b_dec is an output bias: apply_b_dec_to_input "
                             "must be False (fold it into b_enc first)")
        if not isinstance(self.skip, bool):
            raise ValueError(f"TranscoderConfig.skip={self.skip!r}: expected a bool")

    @property
    def site_out(self) -> str | None:
        return self.metadata.get("site_out")

    @property
    def layer(self) -> int | None:
        """The layer of the input site (``mlp_in.3`` -> 3), or None if it has none."""
        return site_layer(self.site)


class TranscoderOutput(NamedTuple):
    """What `Transcoder.forward` returns."""

    output: Float[Tensor, "*batch d_out"]
    """Prediction of the output site: decode(feats) + skip(x)."""
    feats: Float[Tensor, "*batch d_sae"]
    """Feature activations, dense."""
    top_idx: Int[Tensor, "*batch k"] | None = None
    """TopK only: indices of the k selected features."""
    top_vals: Float[Tensor, "*batch k"] | None = None
    """TopK only: their activations."""

    @property
    def x_hat(self) -> Tensor:
        """The same tensor as `output` (the name SAE code uses)."""
        return self.output


def site_layer(site: str | None) -> int | None:
    m = re.fullmatch(r"[a-z_]+\.(\d+)", site or "")
    return int(m.group(1)) if m else None


class Transcoder(SAE):
    """Mixin over an SAE architecture class; build with `build_transcoder` / `transcoder_class`.

    Inputs may have any leading shape ``[..., d_in]``; outputs are ``[..., d_out]``.
    """

    cfg: TranscoderConfig
    W_skip: nn.Parameter | None

    def __init__(self, cfg: SAEConfig, *, init: bool = True):
        if not isinstance(cfg, TranscoderConfig):
            raise TypeError(f"{type(self).__name__} needs a TranscoderConfig, got {type(cfg).__name__}")
        super().__init__(cfg, init=False)
        dt = cfg.torch_dtype
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_out, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, dtype=dt))
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in, dtype=dt)) if cfg.skip else None
        if init:
            self.reset_parameters_()

    # ----------------------------------------------------------------- shape
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_out(self) -> int:
        return self.cfg.d_out

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def site(self) -> str | None:
        return self.cfg.site

    @property
    def site_out(self) -> str | None:
        return self.cfg.site_out

    @property
    def layer(self) -> int | None:
        return self.cfg.layer

    @torch.no_grad()
    def reset_parameters_(self, *args: Any, **kwargs: Any) -> None:
        super().reset_parameters_(*args, **kwargs)
        if self.W_skip is not None:
            self.W_skip.zero_()

    @classmethod
    def tensor_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        shapes = super().tensor_shapes(cfg)
        shapes["W_dec"] = (cfg.d_sae, cfg.d_out)
        shapes["b_dec"] = (cfg.d_out,)
        if cfg.skip:
            shapes["W_skip"] = (cfg.d_out, cfg.d_in)
        return shapes

    def tensors(self) -> dict[str, Tensor]:
        out = super().tensors()
        if self.W_skip is not None:
            out["W_skip"] = self.W_skip.detach().contiguous()
        return out

    # ----------------------------------------------------------------- maths
    def skip(self, x: Acts) -> Float[Tensor, "*batch d_out"]:
        """``x @ W_skip.T`` (zeros without a skip), in the transcoder's dtype."""
        x = x.to(self.W_enc.dtype)
        if self.W_skip is None:
            return x.new_zeros(*x.shape[:-1], self.cfg.d_out)
        return x @ self.W_skip.T

    def forward(self, x: Acts) -> TranscoderOutput:  # type: ignore[override]
        """``output = decode(encode(x)) + skip(x)``; top-k families decode sparsely."""
        pre = self.pre_acts(x)
        grad = torch.is_grad_enabled() and pre.requires_grad
        idx = vals = None
        if isinstance(self, TopKSAE):
            vals, idx = self.topk(pre)
            feats = torch.zeros_like(pre).scatter(-1, idx, vals) if grad else (
                pre.zero_().scatter_(-1, idx, vals))
            out = self.decode_sparse(idx, vals)
        elif isinstance(self, BatchTopKSAE) and self.training:
            feats, (rows, cols, v, n) = self._train_feats(pre, inplace=True)
            out = self.decode_sparse(cols, v, rows=rows, n_rows=n).reshape(
                *x.shape[:-1], self.cfg.d_out)
        else:
            feats = self.activation(pre, inplace=True)
            out = self.decode(feats)
        if self.W_skip is not None:
            out = out + self.skip(x)
        return TranscoderOutput(out, feats, idx, vals)

    # ----------------------------------------------------------------- utilities
    def for_export(self) -> Transcoder:
        """What files store: a BatchTopK transcoder becomes a JumpReLU one (θ on every feature)."""
        if not isinstance(self, BatchTopKSAE):
            return self
        cfg = self.cfg.replace(architecture="jumprelu", k=None).with_metadata(
            trained_architecture="batchtopk", batchtopk_k=self.cfg.k)
        t = {n: v for n, v in self.tensors().items() if n != "threshold"}
        t["threshold"] = self.threshold.to(self.cfg.torch_dtype).expand(self.cfg.d_sae).contiguous()
        return transcoder_class("jumprelu").from_tensors(cfg, t, source="BatchTopK transcoder")

    @torch.no_grad()
    def fold_scale_(self, scale: float | Tensor, scale_out: float | Tensor | None = None) -> None:
        """Fold input and output scalings into the weights.

        If trained on ``x' = scale * x`` to predict ``y' = scale_out * y`` (scalars),
        afterwards the transcoder maps raw x to raw y with the same feature activations.
        """
        s_in = float(scale)
        s_out = float(scale if scale_out is None else scale_out)
        if not (s_in > 0 and s_out > 0):
            raise ValueError(f"fold_scale_: scales must be positive, got {s_in}, {s_out}")
        self.W_enc.mul_(s_in)
        self.W_dec.div_(s_out)
        self.b_dec.div_(s_out)
        if self.W_skip is not None:
            self.W_skip.mul_(s_in / s_out)

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k is not None else ""
        sites = f", {c.site} -> {c.site_out}" if c.site else ""
        return (f"d_in={c.d_in}, d_out={c.d_out}, d_sae={c.d_sae}{k}, skip={c.skip}, "
                f"dtype={c.dtype}{sites}")


@cache
def transcoder_class(architecture: str) -> type[Transcoder]:
    """The transcoder class of an SAE architecture (relu, jumprelu, topk, batchtopk)."""
    base = get_sae_class(architecture)
    name = f"{base.__name__.removesuffix('SAE')}Transcoder"
    return type(name, (Transcoder, base), {"__module__": __name__, "__qualname__": name})


def build_transcoder(cfg: TranscoderConfig, *, init: bool = True) -> Transcoder:
    """A new transcoder of `cfg.architecture`, randomly initialised unless `init=False`."""
    return transcoder_class(cfg.architecture)(cfg, init=init)


def transcoder_from_tensors(cfg: TranscoderConfig, tensors: dict[str, Tensor], *,
                            source: str = "tensors") -> Transcoder:
    """Check names, shapes and finiteness of `tensors` (W_skip iff cfg.skip), then build."""
    return transcoder_class(cfg.architecture).from_tensors(cfg, tensors, source=source)


def is_transcoder(obj: Any) -> bool:
    return isinstance(obj, Transcoder)


def require_sae(obj: Any, source: str = "the file") -> SAE:
    """`obj` if it is an SAE; a transcoder is refused, naming what it is (WrongKindError)."""
    if isinstance(obj, Transcoder):
        raise WrongKindError(
            f"{source} is a transcoder (reads {obj.site or 'one site'}, writes "
            f"{obj.site_out or 'another'}), not an SAE; this command needs an SAE. "
            "Use it where transcoders are taken (saelab eval, saelab graph --transcoders).")
    return obj


def require_transcoder(obj: Any, source: str = "the file") -> Transcoder:
    """`obj` if it is a transcoder; an SAE is refused, naming what it is (WrongKindError)."""
    if not isinstance(obj, Transcoder):
        site = getattr(getattr(obj, "cfg", None), "site", None)
        raise WrongKindError(
            f"{source} is an SAE ({getattr(obj.cfg, 'architecture', '?')}, reads and "
            f"reconstructs {site or 'one site'}), not a transcoder; a transcoder reads mlp_in.L "
            "and predicts mlp_out.L. Train one with saelab train --kind transcoder.")
    return obj


# ------------------------------------------------------------------ sets
class TranscoderSet(Mapping[int, Transcoder]):
    """Per-layer transcoders of one model: ``layer -> Transcoder``, layers 0..n-1 with none missing.

    Raises TranscoderSetError (at construction) for a layer missing from 0 to the last
    (unless `complete=False`: some layers only, for evaluation), mixed d_in / d_out, or
    mixed model names.
    """

    def __init__(self, transcoders: Mapping[int, Transcoder], *, model_name: str | None = None,
                 source: str = "the transcoder set", complete: bool = True):
        if not transcoders:
            raise TranscoderSetError(f"{source}: holds no transcoder")
        self.source = source
        self._by_layer = dict(sorted(transcoders.items()))
        layers = list(self._by_layer)
        missing = sorted(set(range(layers[-1] + 1)) - set(layers))
        if missing and complete:
            raise TranscoderSetError(
                f"{source}: no transcoder for layer(s) {', '.join(map(str, missing))} (it has "
                f"{_ranges(layers)}); a replacement model needs every MLP from layer 0. "
                "Train the missing layers (saelab train --kind transcoder --sites 'mlp.*').")
        widths = {(tc.d_in, tc.d_out) for tc in self._by_layer.values()}
        if len(widths) > 1:
            raise TranscoderSetError(
                f"{source}: transcoders of mixed widths (d_in, d_out) {sorted(widths)}; one set "
                "holds one model's transcoders, all of its d_model.")
        names = {tc.cfg.model_name for tc in self._by_layer.values()} - {None}
        if model_name is None and len(names) > 1:
            raise TranscoderSetError(f"{source}: transcoders of several models {sorted(names)}")
        self.model_name = model_name or (names.pop() if names else None)
        self.d_in, self.d_out = widths.pop()

    def __getitem__(self, layer: int) -> Transcoder:
        return self._by_layer[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self._by_layer)

    def __len__(self) -> int:
        return len(self._by_layer)

    @property
    def layers(self) -> list[int]:
        return list(self._by_layer)

    @property
    def d_model(self) -> int:
        return self.d_out

    def to(self, *args: Any, **kwargs: Any) -> TranscoderSet:
        for tc in self._by_layer.values():
            tc.to(*args, **kwargs)
        return self

    def eval(self) -> TranscoderSet:
        for tc in self._by_layer.values():
            tc.eval()
        return self

    def check_model(self, *, n_layers: int, d_model: int, model_name: str | None = None) -> None:
        """Refuse (TranscoderSetError) unless this set covers exactly that model's layers and width.

        A set whose model name differs from `model_name` is refused too (both must be known).
        """
        if self.d_in != d_model or self.d_out != d_model:
            raise TranscoderSetError(
                f"{self.source}: transcoders of d_model {self.d_in} but the model's d_model is "
                f"{d_model}; they were trained on another model ({self.model_name or 'unnamed'}).")
        if model_name and self.model_name and not _same_model(model_name, self.model_name):
            raise TranscoderSetError(
                f"{self.source}: transcoders of {self.model_name}, not of {model_name}; "
                f"pass --model {self.model_name} or transcoders trained on {model_name}.")
        if self.layers != list(range(n_layers)):
            missing = sorted(set(range(n_layers)) - set(self.layers))
            extra = sorted(set(self.layers) - set(range(n_layers)))
            what = (f"no transcoder for layer(s) {_ranges(missing)}" if missing
                    else f"transcoders for layer(s) {_ranges(extra)} past the model's last")
            raise TranscoderSetError(
                f"{self.source}: {what}; the model has {n_layers} layers (0..{n_layers - 1}) "
                "and a replacement model needs one transcoder per MLP.")

    def __repr__(self) -> str:
        return (f"TranscoderSet({self.model_name or 'unnamed model'}, layers "
                f"{_ranges(self.layers)}, d_model={self.d_in})")


def _same_model(a: str, b: str) -> bool:
    norm = lambda s: s.lower().rsplit("/", 1)[-1]  # noqa: E731  hub org prefixes differ
    return norm(a) == norm(b)


def _ranges(layers: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out) or "none"


def load_transcoders(path: str | os.PathLike[str], *, dtype: str | None = None,
                     model_name: str | None = None, complete: bool = True) -> TranscoderSet:
    """The transcoder set at `path`.

    `path` is a circuit-tracer set (``config.yaml`` + ``layer_i.safetensors``), a
    folder of transcoder folders (any format `load_sae` reads; a training run's
    ``saes/train``), or one transcoder folder (a set of one layer). Each layer is read
    from its input site. Raises WrongKindError when a file holds an SAE,
    TranscoderSetError for a layer missing (unless `complete=False`), two of one layer
    or mixed widths.
    """
    from saelab.sae.formats import transcoder_sets

    return transcoder_sets.load(Path(path), dtype=dtype, model_name=model_name,
                                complete=complete)


def save_transcoders(tset: TranscoderSet | Mapping[int, Transcoder],
                     path: str | os.PathLike[str], format: str = "saelens") -> Path:
    """Write a set: one folder per layer (``layer_L``, format `format`), or with
    ``format="circuit-tracer"`` a config.yaml and layer_L.safetensors. Returns the folder."""
    from saelab.sae.formats import transcoder_sets

    return transcoder_sets.save(tset, Path(path), format=format)


def check_widths(tc: Transcoder, d_in: int, d_out: int, source: str) -> None:
    if (tc.d_in, tc.d_out) != (d_in, d_out):
        raise ShapeMismatchError(f"{source}: transcoder maps {tc.d_in} -> {tc.d_out}, "
                                 f"but the sites have widths {d_in} -> {d_out}")
