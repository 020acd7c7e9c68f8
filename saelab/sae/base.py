"""The SAE interface: bare parameters, `encode` / `decode` / `forward -> SAEOutput`.

Every architecture stores the same tensors in the SAELens / Gemma Scope
orientation (row-vector convention, ``x @ W``)::

    W_enc      [d_in, d_sae]
    W_dec      [d_sae, d_in]     row i is the direction feature i writes
    b_enc      [d_sae]
    b_dec      [d_in]
    threshold  [d_sae]           jumprelu only (batchtopk keeps one scalar)

and differs only in the activation applied to ``pre = (x - a*b_dec) @ W_enc + b_enc``
(``a = cfg.apply_b_dec_to_input``). Architectures live one per file and register
themselves by name, so files and configs can name them.

Example::

    sae = build_sae(SAEConfig("topk", d_in=576, d_sae=9216, k=64))
    out = sae(x)                          # SAEOutput(x_hat, feats, error, top_idx, top_vals)
    assert torch.allclose(out.x_hat + out.error, x)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from saelab.dims import Acts, Feats
from saelab.errors import CorruptFileError, SaelabError, ShapeMismatchError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Below this fraction of non-zero features a dense ``f`` is decoded by gathering
# its non-zero rows of W_dec. Measured on a 2-core CPU at 576 -> 9216: the
# gather costs ~0.7 ms per active feature per 4096 tokens plus a ~40 ms scan,
# the dense matmul ~250 ms, so the two cross near 10% density.
SPARSE_DECODE_MAX_DENSITY = 0.05


class UnknownArchitectureError(SaelabError):
    """An architecture name that no registered SAE class answers to."""


@dataclass(frozen=True)
class SAEConfig:
    """What an SAE is: its architecture, widths and where it came from."""

    architecture: str
    """Registered architecture name: relu, jumprelu, topk, batchtopk (see `registered_architectures`)."""
    d_in: int
    """Width of the activations the SAE reads (the site's width)."""
    d_sae: int
    """Number of features (latents)."""
    k: int | None = None
    """Active features per token for topk; average per token for batchtopk; else None."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (False for Gemma Scope)."""
    dtype: str = "float32"
    """Parameter and compute dtype: float32, float64, bfloat16 or float16."""
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)
    """Provenance, JSON-serializable: model_name, site (saelab name, e.g. resid_post.12),
    hook_name (TransformerLens name), corpus, corpus_hash, tokens_trained, seed, l0,
    versions. Written to cfg.json["metadata"] by the native format."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SAEConfig.{name}={value!r}: expected a positive integer")
        if self.k is not None and not (isinstance(self.k, int) and 0 < self.k <= self.d_sae):
            raise ValueError(
                f"SAEConfig.k={self.k!r}: expected an integer in 1..d_sae={self.d_sae}, or None"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"SAEConfig.dtype={self.dtype!r}: expected one of {sorted(DTYPES)}")
        # A private copy, so that mutating the caller's dict cannot change a frozen config.
        object.__setattr__(self, "metadata", dict(self.metadata))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def site(self) -> str | None:
        return self.metadata.get("site")

    @property
    def model_name(self) -> str | None:
        return self.metadata.get("model_name")

    @property
    def hook_name(self) -> str | None:
        return self.metadata.get("hook_name")

    def replace(self, **changes: Any) -> SAEConfig:
        return replace(self, **changes)

    def with_metadata(self, **entries: Any) -> SAEConfig:
        """A copy with `entries` merged into metadata (None values remove a key)."""
        merged = {**self.metadata, **entries}
        return replace(self, metadata={k: v for k, v in merged.items() if v is not None})


class SAEOutput(NamedTuple):
    """What `SAE.forward` returns."""

    x_hat: Float[Tensor, "*batch d_in"]
    """Reconstruction of the input."""
    feats: Float[Tensor, "*batch d_sae"]
    """Feature activations, dense."""
    error: Float[Tensor, "*batch d_in"]
    """x - x_hat (in the SAE's dtype): splicing x_hat + error reproduces x."""
    top_idx: Int[Tensor, "*batch k"] | None = None
    """TopK only: indices of the k selected features (entries with value 0 are inactive)."""
    top_vals: Float[Tensor, "*batch k"] | None = None
    """TopK only: their activations, aligned with top_idx."""


_REGISTRY: dict[str, type[SAE]] = {}


def register_sae(cls: type[SAE]) -> type[SAE]:
    """Class decorator: make `cls` loadable by its `architecture` name. Duplicates are refused."""
    name = cls.architecture
    if name in _REGISTRY:
        old = _REGISTRY[name]
        raise ValueError(
            f"SAE architecture {name!r} is already registered by "
            f"{old.__module__}.{old.__qualname__}; pick another name for {cls.__qualname__}"
        )
    _REGISTRY[name] = cls
    return cls


def registered_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_sae_class(architecture: str) -> type[SAE]:
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise UnknownArchitectureError(
            f"unknown SAE architecture {architecture!r}; registered architectures are "
            f"{', '.join(registered_architectures())}. Register a new one with "
            "@saelab.sae.register_sae."
        ) from None


def build_sae(cfg: SAEConfig, *, init: bool = True) -> SAE:
    """A new SAE of `cfg.architecture`, randomly initialised unless `init=False`."""
    return get_sae_class(cfg.architecture)(cfg, init=init)


def _flat(x: Tensor, width: int) -> Tensor:
    return x.reshape(-1, width)


class SAE(nn.Module):
    """Base class: parameters, the shared encoder affine map, decoders and weight utilities.

    Subclasses set `architecture`, implement `activation`, and extend `tensor_names`.
    Inputs may have any leading shape ``[..., d_in]``; they are cast to the
    SAE's dtype (compute happens in the weights' dtype).
    """

    architecture: ClassVar[str] = ""
    tensor_names: ClassVar[tuple[str, ...]] = ("W_enc", "W_dec", "b_enc", "b_dec")

    def __init__(self, cfg: SAEConfig, *, init: bool = True):
        super().__init__()
        if cfg.architecture != self.architecture:
            raise ValueError(
                f"{type(self).__name__} needs SAEConfig.architecture={self.architecture!r}, "
                f"got {cfg.architecture!r}"
            )
        self.cfg = cfg
        dt, d_in, d_sae = cfg.torch_dtype, cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, dtype=dt))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, dtype=dt))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dt))
        if init:
            self.reset_parameters_()

    # ----------------------------------------------------------------- weights
    @torch.no_grad()
    def reset_parameters_(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows, encoder = decoder transpose, zero biases."""
        w = torch.randn(self.W_dec.shape, generator=generator)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        if self.W_enc.shape != w.T.shape:  # a transcoder writing another width than it reads
            w = torch.randn(self.W_enc.shape[::-1], generator=generator)
            w /= w.norm(dim=1, keepdim=True)
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @classmethod
    def tensor_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        shapes = {
            "W_enc": (cfg.d_in, cfg.d_sae),
            "W_dec": (cfg.d_sae, cfg.d_in),
            "b_enc": (cfg.d_sae,),
            "b_dec": (cfg.d_in,),
            "threshold": (cfg.d_sae,),
        }
        return {name: shapes[name] for name in cls.tensor_names}

    def tensors(self) -> dict[str, Tensor]:
        """The canonical tensors by name (detached, contiguous), as files store them."""
        return {name: getattr(self, name).detach().contiguous() for name in self.tensor_names}

    @classmethod
    def from_tensors(
        cls, cfg: SAEConfig, tensors: dict[str, Tensor], *, source: str = "tensors"
    ) -> SAE:
        """Check names, shapes and finiteness of `tensors`, then build the SAE.

        Nothing is built unless every check passes. `source` names the file in errors.
        """
        sae_cls = get_sae_class(cfg.architecture) if cls is SAE else cls
        expected = sae_cls.tensor_shapes(cfg)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing)}")
            if extra:
                parts.append(f"unexpected {', '.join(extra)}")
            raise CorruptFileError(
                f"{source}: {' and '.join(parts)}. A {cfg.architecture} SAE needs exactly "
                f"{', '.join(expected)}; found {', '.join(sorted(tensors)) or 'nothing'}. "
                "Check that the file holds this kind of SAE, or re-save it."
            )
        for name, shape in expected.items():
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise ShapeMismatchError(
                    f"{source}: tensor {name} has shape {list(t.shape)} but d_in={cfg.d_in}, "
                    f"d_sae={cfg.d_sae} need {list(shape)}. The config and the weights "
                    "disagree; re-save the SAE."
                )
            if not t.is_floating_point():
                raise CorruptFileError(f"{source}: tensor {name} has dtype {t.dtype}, not a float")
            bad = (~torch.isfinite(t)).sum().item()
            if bad:
                raise CorruptFileError(
                    f"{source}: tensor {name} has {bad} NaN/inf value(s) of {t.numel()}; "
                    "the SAE is unusable. Re-train or re-download it."
                )
        sae = sae_cls(cfg, init=False)
        with torch.no_grad():
            for name in expected:
                getattr(sae, name).copy_(tensors[name].to(cfg.torch_dtype))
        return sae

    def for_export(self) -> SAE:
        """The SAE that files store (BatchTopK exports itself as a JumpReLU SAE)."""
        return self

    # ----------------------------------------------------------------- maths
    def pre_acts(self, x: Acts) -> Float[Tensor, "*batch d_sae"]:
        """``pre = (x - b_dec*apply_b_dec_to_input) @ W_enc + b_enc``, in the SAE's dtype."""
        lead = x.shape[:-1]
        x2 = _flat(x.to(self.W_enc.dtype), self.cfg.d_in)
        if self.cfg.apply_b_dec_to_input:
            x2 = x2 - self.b_dec
        pre = torch.addmm(self.b_enc, x2, self.W_enc)  # (N, F)
        return pre.reshape(*lead, self.cfg.d_sae)

    def activation(self, pre: Float[Tensor, "*batch d_sae"], *, inplace: bool = False) -> Feats:
        """Feature activations from pre-activations (the architecture's non-linearity).

        `inplace` lets the result reuse `pre`'s memory when no gradient is needed.
        """
        raise NotImplementedError

    def encode(self, x: Acts) -> Feats:
        """Dense feature activations ``[..., d_sae]``."""
        return self.activation(self.pre_acts(x), inplace=True)

    def decode(self, feats: Feats) -> Float[Tensor, "*batch d_in"]:
        """``x_hat = feats @ W_dec + b_dec``.

        When few features are active (and no gradient to `feats` is needed, since
        a gradient must reach inactive features too) only the active rows of
        W_dec are gathered; otherwise a dense matmul.
        """
        lead = feats.shape[:-1]
        f = _flat(feats.to(self.W_dec.dtype), self.cfg.d_sae)  # (N, F)
        sparse_ok = f.shape[0] > 0 and not (torch.is_grad_enabled() and f.requires_grad)
        if sparse_ok and torch.count_nonzero(f).item() <= SPARSE_DECODE_MAX_DENSITY * f.numel():
            rows, cols = f.nonzero(as_tuple=True)  # row-major, so grouped by row
            x_hat = self.decode_sparse(cols, f[rows, cols], rows=rows, n_rows=f.shape[0])
        else:
            x_hat = torch.addmm(self.b_dec, f, self.W_dec)
        return x_hat.reshape(*lead, self.W_dec.shape[1])  # d_in (a transcoder's d_out)

    def decode_sparse(
        self,
        idx: Int[Tensor, "*shape"],
        vals: Float[Tensor, "*shape"],
        *,
        rows: Tensor | None = None,
        n_rows: int | None = None,
    ) -> Float[Tensor, "*batch d_in"]:
        """``x_hat`` from active features only, never touching the inactive rows of W_dec.

        Either `idx`/`vals` are ``[..., k]`` (k features per token), or they are flat
        ``[nnz]`` with `rows` giving each entry's token (sorted ascending) and `n_rows`
        the number of tokens. Differentiable in `vals` and W_dec.
        """
        vals = vals.to(self.W_dec.dtype)
        if rows is None:
            lead = idx.shape[:-1]
            k = idx.shape[-1]
            out = F.embedding_bag(
                idx.reshape(-1, k), self.W_dec, per_sample_weights=vals.reshape(-1, k), mode="sum"
            )  # (N, D)
            return (out + self.b_dec).reshape(*lead, self.W_dec.shape[1])
        assert n_rows is not None, "flat sparse decode needs n_rows"
        offsets = torch.searchsorted(rows, torch.arange(n_rows, device=rows.device))
        out = F.embedding_bag(idx, self.W_dec, offsets, per_sample_weights=vals, mode="sum")
        return out + self.b_dec

    def forward(self, x: Acts) -> SAEOutput:
        feats = self.encode(x)
        x_hat = self.decode(feats)
        return SAEOutput(x_hat, feats, x.to(x_hat.dtype) - x_hat)

    # ----------------------------------------------------------------- utilities
    @torch.no_grad()
    def W_dec_norms(self) -> Float[Tensor, " d_sae"]:
        return self.W_dec.norm(dim=1)

    def _rescale_features_(self, n: Tensor) -> None:
        """Multiply every feature's pre-activation (and anything compared with it) by n."""
        self.W_enc.mul_(n)
        self.b_enc.mul_(n)

    @torch.no_grad()
    def normalize_decoder_(self, *, rescale_encoder: bool = True) -> Tensor:
        """Give every row of W_dec unit norm; returns the old norms.

        With `rescale_encoder` the encoder is scaled by the same norms, so feature i
        grows by its norm and ``x_hat`` is unchanged (ReLU and JumpReLU are positively
        homogeneous). Without it, this is the projection a trainer applies after each
        step, which changes the outputs.
        """
        n = self.W_dec.norm(dim=1).clamp_min(torch.finfo(self.W_dec.dtype).tiny)
        self.W_dec.div_(n[:, None])
        if rescale_encoder:
            self._rescale_features_(n)
        return n

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the part of W_dec.grad along each decoder row (keeps row norms fixed to first order)."""
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec
        # addcmul_ subtracts coef·w in place: no [d_sae, d_in] temporary for it (each one
        # costs a training step a pass over 5M floats at 576 x 9216)
        coef = torch.linalg.vecdot(g, w) / torch.linalg.vecdot(w, w).clamp_min(
            torch.finfo(w.dtype).tiny)
        g.addcmul_(coef[:, None], w, value=-1)

    @torch.no_grad()
    def fold_scale_(self, scale: float | Tensor) -> None:
        """Fold an input scaling into the weights, so the SAE takes raw activations.

        If the SAE was trained on ``x' = scale * x`` (scale a scalar or ``[d_in]``),
        afterwards ``sae(x).x_hat == sae_before(scale * x).x_hat / scale`` and the
        feature activations are the same.
        """
        s = torch.as_tensor(scale, dtype=self.W_enc.dtype)
        if s.numel() not in (1, self.cfg.d_in) or not torch.all(s > 0):
            raise ValueError(
                f"fold_scale_: scale must be positive, a scalar or [{self.cfg.d_in}]; "
                f"got shape {list(s.shape)}"
            )
        s_col = s.reshape(-1, 1) if s.numel() > 1 else s  # scales W_enc's d_in rows
        self.W_enc.mul_(s_col)
        self.W_dec.div_(s)
        self.b_dec.div_(s)

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k is not None else ""
        site = f", site={c.site}" if c.site else ""
        return f"d_in={c.d_in}, d_sae={c.d_sae}{k}, dtype={c.dtype}{site}"


def n_params(sae: SAE) -> int:
    return sum(math.prod(t.shape) for t in sae.tensors().values())
