"""What a scope trains: the settings (`ScopeConfig`, presets) and the SAEs they expand to.

A scope is one SAE per (site kind, layer, width, target L0). For the top-k family the
target is k itself. For JumpReLU it is reached by a target-L0 loss: the sparsity term
is λ·(L0/target − 1)² (SAESpec.target_l0) instead of Gemma Scope's λ·L0, so the mean
L0 is pulled to the target from above and below during training; the L0 measured on
held-out text is what the folder name `average_l0_N` and the index report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from saelab.checks import ABSURD, MAX_SEED, choice, integer, number
from saelab.errors import BadValueError, SaelabError, SiteError

ARCHS = ("jumprelu", "topk", "batchtopk")
KINDS = ("sae", "transcoder")
# A transcoder scope has one site kind: the MLP, read at mlp_in.L and predicted at mlp_out.L.
TRANSCODER_SITES = ("mlp",)
SCOPE_KINDS = ("resid_post", "attn_out", "mlp_out")  # Gemma Scope's three, the default
# jumprelu's λ of the target-L0 loss: on unit-mean-squared-norm inputs the reconstruction
# loss is ~0.1-1, so λ = 1 weighs an L0 twice the target like a poor reconstruction.
TARGET_L0_COEF = 1.0


@dataclass(frozen=True)
class ScopeConfig:
    """Everything a scope's result depends on (resume refuses when any of it changes)."""

    model: str = "smollm2-135m-instruct"
    sites: tuple[str, ...] = SCOPE_KINDS
    """Site kinds, each at every layer given."""
    layers: tuple[int, ...] | None = None
    """Layers; None = all of them."""
    widths: tuple[int, ...] = (1152,)
    """Latents per SAE; several = one SAE per width."""
    l0s: tuple[int, ...] = (32,)
    """Target L0 per SAE (k of the top-k family); several = one SAE per target."""
    arch: str = "batchtopk"
    tokens: int = 300_000
    """Training tokens (every SAE sees every token, from the same forwards)."""
    batch_size: int = 1024
    """Tokens per optimizer step."""
    lr: float | None = None
    """Adam learning rate; default the trainer's for the architecture and width."""
    eval_tokens: int = 4096
    """Held-out tokens every SAE is evaluated on (the same tokens for all)."""
    feature_tokens: int = 8192
    """Tokens the dashboards are collected over (one pass for all SAEs)."""
    ablate: int = 0
    """Features per SAE whose top example gets a token ablation on its dashboard."""
    corpus: str = "builtin"
    context: int = 128
    seed: int = 0
    dtype: str = "auto"
    """SAE compute dtype while training (auto: bf16 where the hardware has it)."""
    model_dtype: str = "auto"
    """dtype of the model forwards that feed training and dashboards (auto: bf16 where the
    hardware has it); the evaluation always runs the model in float32 (ΔCE is ~1e-2 nats)."""
    buffer_tokens: int = 16_384
    checkpoint_every: int = 100_000
    bootstrap: int = 1000
    kind: str = "sae"
    """sae, or transcoder: one transcoder per layer, mlp_in.L -> mlp_out.L (sites ("mlp",))."""
    skip: bool = False
    """Transcoders: learn an affine skip as well (skip transcoders)."""

    def __post_init__(self) -> None:
        choice("arch", self.arch, ARCHS)
        choice("kind", self.kind, KINDS)
        if self.kind == "transcoder" and tuple(self.sites) != TRANSCODER_SITES:
            raise BadValueError(f"--kind transcoder trains at the MLPs (mlp_in.L -> mlp_out.L), "
                                f"not at {', '.join(self.sites)}: give --sites mlp or leave "
                                "--sites out.")
        if self.skip and self.kind != "transcoder":
            raise BadValueError("--skip is for transcoders (--kind transcoder): an SAE has no skip.")
        if not self.sites:
            raise BadValueError("--sites is empty: give site kinds such as resid_post,mlp_out.")
        if not self.widths or not self.l0s:
            raise BadValueError("give at least one width (--widths) and one L0 (--l0).")
        for w in self.widths:
            integer("width", w, low=1, high=1 << 24)
        for k in self.l0s:
            integer("l0", k, low=1, high=min(self.widths))
        integer("tokens", self.tokens, low=1, high=ABSURD)
        integer("batch_size", self.batch_size, low=1, high=ABSURD)
        if self.tokens < self.batch_size:
            raise BadValueError(f"--tokens {self.tokens} is less than one batch ({self.batch_size}).")
        integer("eval_tokens", self.eval_tokens, low=1, high=ABSURD)
        integer("feature_tokens", self.feature_tokens, low=0, high=ABSURD)
        integer("ablate", self.ablate, low=0, high=ABSURD)
        integer("context", self.context, low=2, high=ABSURD)
        integer("seed", self.seed, low=0, high=MAX_SEED)
        integer("bootstrap", self.bootstrap, low=0, high=10**6)
        if self.lr is not None:
            number("lr", self.lr, low=0, low_open=True, high=1)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # kind and skip only when not an SAE scope's: SAE scopes built before they existed
        # keep resuming with the same settings
        if d["kind"] == "sae":
            d.pop("kind"), d.pop("skip")
        return json_ready(d)


def json_ready(obj: Any) -> Any:
    """Tuples as lists, so that a config compares equal to its JSON round trip."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    return obj


# quick: the CPU preset (see README "Scope" for its measured time; 400k tokens, because
# at 300k mid-depth resid_post.15 ended at held-out FVU 0.253, past the 0.25 asked); its 90 SAEs and
# their shuffling buffers take ~7.5 GB (SAEObjective.nbytes at batch 1024 + 2 x 16,384
# rows x 576 x bf16 per site), so they train in one pass on a machine with ~10 GB free.
# full: a GPU's.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(sites=SCOPE_KINDS, layers=None, widths=("2x",), l0s=(32,), arch="batchtopk",
                  tokens=400_000, batch_size=1024, eval_tokens=2048, feature_tokens=8192,
                  ablate=0, buffer_tokens=16_384, checkpoint_every=100_000),
    "full": dict(sites=SCOPE_KINDS, layers=None, widths=("4x", "16x"), l0s=(16, 32, 64),
                 arch="jumprelu", tokens=40_000_000, batch_size=4096, eval_tokens=65_536,
                 feature_tokens=1_000_000, ablate=64, buffer_tokens=262_144,
                 checkpoint_every=2_000_000),
}


def preset_settings(name: str | None, d_model: int) -> dict[str, Any]:
    """A preset's settings with widths written as multiples of d_model ("4x") resolved."""
    if name is None:
        return {}
    choice("preset", name, tuple(PRESETS))
    out = dict(PRESETS[name])
    out["widths"] = tuple(parse_width(w, d_model) for w in out["widths"])
    return out


def parse_width(text: Any, d_model: int) -> int:
    """1152, "1152" or "2x" (times d_model) -> latents."""
    t = str(text).strip().lower()
    try:
        return int(float(t[:-1]) * d_model) if t.endswith("x") else int(t)
    except ValueError:
        raise BadValueError(f"--widths: {text!r} is not a width; give latents (2304) or a "
                            "multiple of d_model (4x).") from None


@dataclass(frozen=True)
class PlannedSAE:
    """One SAE of the scope: where, how wide, which target, and the trainer's spec."""

    site_kind: str
    layer: int
    width: int
    target_l0: int
    spec: Any  # saelab.train.config.SAESpec

    @property
    def site(self) -> str:
        return f"{self.site_kind}.{self.layer}"

    @property
    def label(self) -> str:
        return self.spec.label


def scope_kinds(arch: Any) -> list[str]:
    """The site kinds this model family can hold a scope SAE at (read and patched at a module)."""
    from saelab.models.sites import KINDS

    return [k for k in KINDS if arch.taps.get(k) is not None]


def plan_saes(cfg: ScopeConfig, arch: Any) -> list[PlannedSAE]:
    """Every SAE of the scope, by depth then kind, width and target.

    Raises SiteError for a layer out of range or a site kind the family lacks (naming
    the kinds it has).
    """
    from saelab.train.config import SAESpec

    kinds = scope_kinds(arch)
    if cfg.kind == "transcoder" and not {"mlp_in", "mlp_out"} <= set(kinds):
        raise SiteError(f"this {arch.family} model has no MLP sites (mlp_in, mlp_out) to train "
                        f"transcoders at; it has: {', '.join(kinds)}. Build an SAE scope instead.")
    for kind in cfg.sites if cfg.kind == "sae" else ():
        if kind not in kinds:
            raise SiteError(f"site kind {kind!r} is not one this {arch.family} model has for a "
                            f"scope; it has: {', '.join(kinds)}.")
    layers = list(range(arch.n_layers)) if cfg.layers is None else list(cfg.layers)
    for layer in layers:
        if not 0 <= layer < arch.n_layers:
            raise SiteError(f"layer {layer} is out of range: {cfg.model} has {arch.n_layers} "
                            f"layers, 0..{arch.n_layers - 1}.")
    if len(set(layers)) != len(layers):
        raise BadValueError(f"--layers lists a layer twice: {layers}")
    if cfg.kind == "transcoder":
        return _plan_transcoders(cfg, sorted(layers))
    out = []
    for layer in sorted(layers):
        for kind in cfg.sites:
            for width in cfg.widths:
                for target in cfg.l0s:
                    if cfg.arch == "jumprelu":
                        spec = SAESpec(f"{kind}.{layer}", arch="jumprelu", width=width,
                                       k=min(32, width), l0_coef=TARGET_L0_COEF,
                                       target_l0=float(target))
                    else:
                        spec = SAESpec(f"{kind}.{layer}", arch=cfg.arch, width=width, k=target)
                    out.append(PlannedSAE(kind, layer, width, target, spec))
    return out


def _plan_transcoders(cfg: ScopeConfig, layers: list[int]) -> list[PlannedSAE]:
    """One transcoder per (layer, width, target): reads mlp_in.L, predicts mlp_out.L; its
    site kind in the index is mlp_in (the site its features read)."""
    from saelab.train.config import SAESpec

    out = []
    for layer in layers:
        io = {"site": f"mlp_in.{layer}", "target": f"mlp_out.{layer}", "skip": cfg.skip}
        for width in cfg.widths:
            for target in cfg.l0s:
                if cfg.arch == "jumprelu":
                    spec = SAESpec(**io, arch="jumprelu", width=width, k=min(32, width),
                                   l0_coef=TARGET_L0_COEF, target_l0=float(target))
                else:
                    spec = SAESpec(**io, arch=cfg.arch, width=width, k=target)
                out.append(PlannedSAE("mlp_in", layer, width, target, spec))
    return out


def parse_list(text: str | None, name: str) -> tuple[str, ...] | None:
    """"a,b,c" -> ("a", "b", "c"); None/"" -> None."""
    if text is None or not text.strip():
        return None
    return tuple(t.strip() for t in text.split(",") if t.strip())


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """"all" or None -> None (every layer); "0,3,5" or "0-4" -> the layers."""
    if text is None or text.strip().lower() == "all":
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise SaelabError(f"--layers {text!r}: give all, or layers such as 0,3,5 or 0-4."
                              ) from None
    return tuple(out)
