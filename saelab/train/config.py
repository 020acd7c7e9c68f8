"""Training configuration: small frozen dataclasses, validated where they are made.

Resolved values (the site list, the dtype actually used) live in the run
record, never written back here, so a config always says what was asked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ARCHS = ("relu", "jumprelu", "topk", "batchtopk")


@dataclass(frozen=True)
class SAESpec:
    """One SAE to train; several can share one activation stream."""

    site: str
    """Canonical site name, e.g. `resid_post.12`."""
    arch: str = "batchtopk"
    """relu, jumprelu, topk or batchtopk."""
    width: int = 4608
    """Number of latents (d_sae)."""
    k: int = 32
    """Active latents per token (topk, batchtopk)."""
    l1: float = 0.1
    """L1 coefficient (relu), on inputs scaled to unit mean squared norm."""
    l0_coef: float = 1e-2
    """L0 coefficient λ (jumprelu)."""

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r}; allowed: {', '.join(ARCHS)}")
        if self.width <= 0 or self.k <= 0 or self.k > self.width:
            raise ValueError(f"need 0 < k <= width, got k={self.k}, width={self.width}")
        if self.l1 < 0 or self.l0_coef < 0:
            raise ValueError(f"sparsity coefficients must be >= 0, got l1={self.l1}, "
                             f"l0_coef={self.l0_coef}")

    @property
    def label(self) -> str:
        return f"{self.site}-{self.arch}-{self.width}" + (
            f"-k{self.k}" if self.arch in ("topk", "batchtopk") else "")


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
            raise ValueError("saes is empty: give at least one SAE to train")
        labels = [s.label for s in self.saes]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two SAEs share a site, arch and width: {labels}")
        if self.tokens < self.batch_size:
            raise ValueError(f"tokens={self.tokens} is less than one batch ({self.batch_size})")
        if self.b_dec_init not in ("mean", "geometric_median", "zeros"):
            raise ValueError(f"b_dec_init={self.b_dec_init!r}; allowed: mean, "
                             "geometric_median, zeros")
        if not 0 <= self.decay_start <= 1 or not 0 <= self.sparsity_warmup <= 1:
            raise ValueError("decay_start and sparsity_warmup are fractions in [0, 1], got "
                             f"{self.decay_start} and {self.sparsity_warmup}")

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
