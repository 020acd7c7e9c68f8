"""Training configuration: small frozen dataclasses, validated where they are made.

Resolved values (the site list, the dtype actually used) live in the run
record, never written back here, so a config always says what was asked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from saelab.checks import ABSURD, MAX_SEED, boolean, choice, integer, number
from saelab.errors import BadValueError
from saelab.precision import DTYPES

ARCHS = ("relu", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk")
TOPK_ARCHS = ("topk", "batchtopk", "matryoshka_batchtopk")
# 2^24 latents x a 4096-wide site is 2^36 float32 weights (256 GiB) per matrix: past any
# machine this runs on, so a larger width is a typo.
MAX_WIDTH = 2**24
MAX_COEF = 1e6
# Contexts in one model forward: 2^16 x 128 tokens is far past any device's memory.
PER_CHUNK = 2**16


@dataclass(frozen=True)
class SAESpec:
    """One SAE to train; several can share one activation stream."""

    site: str
    """Canonical site name, e.g. `resid_post.12`."""
    arch: str = "batchtopk"
    """relu, jumprelu, topk, batchtopk or matryoshka_batchtopk."""
    width: int = 4608
    """Number of latents (d_sae)."""
    k: int = 32
    """Active latents per token (topk, batchtopk)."""
    l1: float = 0.1
    """L1 coefficient (relu), on inputs scaled to unit mean squared norm."""
    l0_coef: float = 1e-2
    """L0 coefficient λ (jumprelu)."""
    groups: tuple[float, ...] = ()
    """matryoshka_batchtopk: fractions of the width in each nested group, summing to 1
    (dictionary_learning's group_fractions); () = 1/32, 1/16, 1/8, 1/4, 17/32."""
    target_l0: float = 0.0
    """jumprelu: when > 0 the sparsity loss is λ·(L0/target_l0 − 1)², which pulls the mean
    L0 to the target from either side, instead of λ·L0 (0: plain λ·L0, as Gemma Scope)."""
    target: str | None = None
    """A transcoder's target site (`mlp_out.12` for input `mlp_in.12`); None: an SAE of `site`."""
    skip: bool = False
    """Transcoders: learn an affine skip ``x @ W_skip.T`` besides the features."""
    tag: str = ""
    """Suffix of the label, so SAEs of one site, arch and width (other L1 coefficients or
    initialisation seeds, as in a study's grid) can train from one stream; it also seeds
    their initialisation (through the label)."""

    def __post_init__(self):
        choice("arch", self.arch, ARCHS)
        boolean("skip", self.skip)
        if self.skip and self.target is None:
            raise BadValueError("skip needs a transcoder (a target site): an SAE has no skip")
        if self.target is not None and self.target == self.site:
            raise BadValueError(f"a transcoder's target must differ from its input site, got "
                                f"{self.site} for both; train an SAE instead")
        integer("width", self.width, low=1, high=MAX_WIDTH)
        integer("k", self.k)
        if not 0 < self.k <= self.width:
            raise BadValueError(f"need 0 < k <= width, got k={self.k}, width={self.width}")
        # Inputs have unit mean squared norm: past MAX_COEF the first step kills every latent.
        number("l1", self.l1, low=0, high=MAX_COEF)
        number("l0_coef", self.l0_coef, low=0, high=MAX_COEF)
        object.__setattr__(self, "groups", tuple(self.groups))  # a list from JSON
        if self.groups and self.arch != "matryoshka_batchtopk":
            raise BadValueError(f"groups={self.groups} is for arch matryoshka_batchtopk, "
                                f"not {self.arch}; drop --groups")
        try:
            _ = self.matryoshka_widths
        except (ValueError, TypeError) as err:
            raise BadValueError(f"groups: {err}") from None
        number("target_l0", self.target_l0, low=0, high=self.width)
        if not isinstance(self.tag, str) or not all(c.isalnum() or c in "._" for c in self.tag):
            raise BadValueError(f"tag={self.tag!r}: use letters, digits, '.' and '_' only "
                                "(it becomes part of a folder name)")

    @property
    def label(self) -> str:
        kind = "" if self.target is None else ("skiptc-" if self.skip else "tc-")
        return f"{self.site}-{kind}{self.arch}-{self.width}" + (
            f"-k{self.k}" if self.arch in TOPK_ARCHS else "") + (
            f"-l0{self.target_l0:g}" if self.arch == "jumprelu" and self.target_l0 else "") + (
            f"-{self.tag}" if self.tag else "")

    @property
    def matryoshka_widths(self) -> list[int] | None:
        """matryoshka_batchtopk: the nested prefix widths (the last = width); else None."""
        if self.arch != "matryoshka_batchtopk":
            return None
        from saelab.sae.matryoshka import DEFAULT_FRACTIONS, widths_from_fractions

        return widths_from_fractions(self.width, self.groups or DEFAULT_FRACTIONS)

    @property
    def key(self) -> str:
        """The stream's buffer key: the site, or ``site>target`` for a transcoder."""
        from saelab.data.stream import pair_key

        return pair_key(self.site, self.target)

    @property
    def sites(self) -> tuple[str, ...]:
        return (self.site,) if self.target is None else (self.site, self.target)


@dataclass(frozen=True)
class TrainConfig:
    saes: tuple[SAESpec, ...]
    """The SAEs to train from one activation stream."""
    tokens: int = 2_000_000
    """Training tokens (per SAE; every SAE sees every token)."""
    batch_size: int = 4096
    """Tokens per optimizer step (global, across ranks)."""
    lr: float | None = None
    """Adam learning rate; default 2e-4 * sqrt(16384 / width) for top-k, 7e-5 relu, 2e-4 jumprelu."""
    beta1: float | None = None
    """Adam β1; default 0.9, or 0 for jumprelu (as Gemma Scope)."""
    beta2: float = 0.999
    """Adam β2."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up."""
    decay_start: float = 0.8
    """Fraction of training after which the learning rate decays linearly to 0."""
    sparsity_warmup: float = 0.05
    """Fraction of training over which the L1/L0 coefficient ramps up from 0."""
    b_dec_init: str = "mean"
    """Initial b_dec: `mean` or `geometric_median` of the first batch, or `zeros`."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss on dead latents (top-k family)."""
    dead_tokens: int = 1_000_000
    """A latent that has not fired for this many tokens counts as dead."""
    resample_every: int = 0
    """relu: resample dead latents every N steps (0: never)."""
    jumprelu_bandwidth: float = 1e-3
    """ε of the rectangle kernel of JumpReLU's pseudo-derivatives."""
    jumprelu_init_threshold: float = 1e-3
    """Initial JumpReLU threshold θ (on unit-mean-squared-norm inputs)."""
    dtype: str = "auto"
    """Compute dtype of the SAE matmuls (master weights stay fp32)."""
    kernel: str = "auto"
    """Path of the top-k family's sparse products: auto, torch or triton (train/kernels.py)."""
    seed: int = 0
    """Seeds initialisation and data order."""
    checkpoint_every: int = 500_000
    """Tokens between atomic checkpoints (0: only at the end)."""
    deterministic: bool = False
    """Deterministic algorithms, so a resumed run ends with the same weights."""
    outlier_factor: float = 10.0
    """Leave out attention-sink tokens with norm > this x the median (0: keep all)."""
    nan_limit: int = 10
    """Rows with NaN/inf activations are left out; training stops past this many batches' worth."""
    log_every: int = 10
    """Steps between reads of the training statistics (metrics.jsonl, progress bar): the
    only times a step's numbers come back from the device."""
    buffer_tokens: int = 65_536
    """Rows of each site held in the shuffling buffer (see saelab/data/stream.py)."""
    buffer_dtype: str = "auto"
    """Dtype of the buffer: auto (the cache's dtype; bfloat16 when streaming), float32..."""
    chunk_contexts: int = 16
    """Contexts per model forward when streaming (a cache is re-cut into the same chunks)."""

    def __post_init__(self):
        if not self.saes:
            raise BadValueError("saes is empty: give at least one SAE to train")
        labels = [s.label for s in self.saes]
        if len(set(labels)) != len(labels):
            raise BadValueError(f"two SAEs share a site, arch and width: {labels}")
        integer("tokens", self.tokens, low=1, high=ABSURD)
        integer("batch_size", self.batch_size, low=1, high=ABSURD)
        if self.tokens < self.batch_size:
            raise BadValueError(f"tokens={self.tokens} is less than one batch ({self.batch_size})")
        if self.lr is not None:
            number("lr", self.lr, low=0, low_open=True, high=1)
        if self.beta1 is not None:
            number("beta1", self.beta1, low=0, high=1)
        number("beta2", self.beta2, low=0, high=1)
        integer("warmup_steps", self.warmup_steps, low=0)
        number("decay_start", self.decay_start, low=0, high=1)
        number("sparsity_warmup", self.sparsity_warmup, low=0, high=1)
        choice("b_dec_init", self.b_dec_init, ("mean", "geometric_median", "zeros"))
        number("auxk_alpha", self.auxk_alpha, low=0)
        integer("dead_tokens", self.dead_tokens, low=1)
        integer("log_every", self.log_every, low=1, high=ABSURD)
        integer("buffer_tokens", self.buffer_tokens, low=1, high=ABSURD)
        integer("chunk_contexts", self.chunk_contexts, low=1, high=PER_CHUNK)
        choice("buffer_dtype", self.buffer_dtype, ("auto", *DTYPES))
        integer("resample_every", self.resample_every, low=0)
        number("jumprelu_bandwidth", self.jumprelu_bandwidth, low=0, low_open=True)
        number("jumprelu_init_threshold", self.jumprelu_init_threshold, low=0)
        integer("seed", self.seed, low=0, high=MAX_SEED)
        choice("kernel", self.kernel, ("auto", "torch", "triton"))
        if isinstance(self.dtype, str):  # a torch.dtype is taken as given
            choice("dtype", self.dtype, ("auto", *DTYPES))
        # 0 means only at the end; a negative count would checkpoint every step.
        integer("checkpoint_every", self.checkpoint_every, low=0)
        boolean("deterministic", self.deterministic)
        number("outlier_factor", self.outlier_factor, low=0)
        integer("nan_limit", self.nan_limit, low=0)

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> TrainConfig:
        raw = dict(raw)
        raw["saes"] = tuple(SAESpec(**s) for s in raw["saes"])
        return cls(**raw)
