"""The dictionary study's settings, its grid, and the memory it needs.

    cfg = DictionariesConfig(widths=(1, 2, 4, 8), l1=(0.1, 0.3), seeds=2, tokens=150_000)
    specs = grid_specs(cfg, "resid_post.2", d_model=576)   # one SAESpec per grid point
    check_memory(cfg, specs, widths, budget)               # SaelabError past the budget

A grid point is (width multiple, sparsity, seed): the sparsity is the L1
coefficient for ReLU dictionaries (the original's) and k for top-k ones. The
seed changes the initialisation only: every dictionary reads the same
batches from one stream, which is what lets one model forward feed them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from saelab.checks import ABSURD, MAX_SEED, boolean, choice, integer, number
from saelab.errors import BadValueError, SaelabError
from saelab.train.config import MAX_COEF, MAX_WIDTH, SAESpec

ARCHS = ("relu", "topk")
SCHEMA = "saelab.study.dictionaries/1"


@dataclass(frozen=True)
class DictionariesConfig:
    """Every setting of the study (recorded in run.json)."""

    model: str = "smollm2-135m-instruct"
    site: str = "resid_post.2"
    """The dictionaries' site: an early residual site (the original: resid_post.2 of Pythia-70M)."""
    widths: tuple[int, ...] = (1, 2, 4, 8)
    """Dictionary sizes as multiples of the site's width."""
    arch: str = "relu"
    """relu (L1 penalty, as the original) or topk."""
    l1: tuple[float, ...] = (0.1, 0.3)
    """L1 coefficients (relu), on inputs scaled to unit mean squared norm."""
    k: tuple[int, ...] = (16, 32)
    """Active latents per token (topk)."""
    seeds: int = 2
    """Initialisation seeds per (width, sparsity)."""
    context: int = 25
    """Tokens per context (the original's 25)."""
    tokens: int = 150_000
    """Training tokens; every dictionary sees every one."""
    batch_size: int = 1024
    """Tokens per optimizer step. On 2 CPU cores the default grid costs 26, 14 and 8.3
    CPU-seconds per 1024 tokens at batches of 256, 512 and 1024 (dense ReLU matmuls run
    better large), so 1024."""
    lr: float = 1e-3
    """Adam learning rate of every dictionary (short CPU runs need more than the long-run 7e-5)."""
    corpus: str = "builtin"
    connect: bool = True
    """Also train one dictionary at the next residual site and at the next MLP output (the
    featured width and sparsity, first seed) and fit sparse linear connections to them."""
    eval_tokens: int = 2_000
    """Held-out tokens for L0, FVU, loss recovered and ΔCE (one full forward per dictionary)."""
    feature_tokens: int = 20_000
    """Tokens collected for the dashboards (top and uniform examples)."""
    connect_tokens: int = 8_000
    """Tokens on which the connections are fitted (the earlier and later features)."""
    connect_features: int = 48
    """Later features (the most frequent alive ones) whose connections are fitted."""
    connect_alpha: float = 0.01
    """Lasso penalty of the connection fit (scikit-learn's alpha, on standardised features)."""
    recur_threshold: float = 0.9
    """A feature recurs in another dictionary when its max cosine there is at least this."""
    featured: int = 6
    """Most recurring features shown with dashboards in the report."""
    index_ablate: int = 64
    """Features per feature index whose top example gets ablated text in its dashboard and
    the browser (the report's features get it for their top and uniform examples)."""
    max_back: int = 24
    """Earlier tokens deleted in turn by the ablated text."""
    seed: int = 0
    """Base seed: data order, and the first initialisation seed."""

    def __post_init__(self) -> None:
        choice("--arch", self.arch, ARCHS)
        _positive_list("--widths", self.widths, integer=True)
        _positive_list("--l1", self.l1, integer=False)
        _positive_list("--k", self.k, integer=True)
        integer("--seeds", self.seeds, low=1, high=1000)
        integer("--context", self.context, low=2, high=ABSURD)
        integer("--tokens", self.tokens, low=1, high=ABSURD)
        integer("--batch-size", self.batch_size, low=1, high=ABSURD)
        if self.tokens < self.batch_size:
            raise BadValueError(f"--tokens {self.tokens} is less than one batch "
                                f"(--batch-size {self.batch_size})")
        number("--lr", self.lr, low=0, low_open=True, high=1)
        boolean("--connect", self.connect)
        for name in ("eval_tokens", "feature_tokens", "connect_tokens"):
            integer(f"--{name.replace('_', '-')}", getattr(self, name), low=self.context,
                    high=ABSURD)
        integer("--connect-features", self.connect_features, low=1, high=100_000)
        number("--connect-alpha", self.connect_alpha, low=0, low_open=True, high=MAX_COEF)
        number("--recur-threshold", self.recur_threshold, low=0, low_open=True, high=1)
        integer("--featured", self.featured, low=0, high=1000)
        integer("--max-back", self.max_back, low=1, high=ABSURD)
        integer("--index-ablate", self.index_ablate, low=0, high=ABSURD)
        integer("--seed", self.seed, low=0, high=MAX_SEED - 1000)

    @property
    def sparsities(self) -> tuple[float, ...] | tuple[int, ...]:
        return self.l1 if self.arch == "relu" else self.k

    @property
    def sparsity_name(self) -> str:
        return "L1" if self.arch == "relu" else "k"


def _positive_list(where: str, values: tuple, *, integer: bool) -> None:
    if not values:
        raise BadValueError(f"{where}: give at least one value")
    for v in values:
        ok = isinstance(v, int) if integer else isinstance(v, int | float)
        if isinstance(v, bool) or not ok or not v > 0 or v != v or v == float("inf"):
            kind = "positive integers" if integer else "positive numbers"
            raise BadValueError(f"{where} {v!r}: expected {kind}, e.g. "
                                f"{'1,2,4,8' if integer else '1,2,4'}")
    if len(set(values)) != len(values):
        raise BadValueError(f"{where} {list(values)}: a value is repeated")


def parse_list(where: str, text: str, kind: type) -> tuple:
    """'1,2,4' -> (1, 2, 4) (kind int or float); a clear error for anything else."""
    try:
        return tuple(kind(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise BadValueError(f"{where} {text!r}: expected comma-separated "
                            f"{'integers' if kind is int else 'numbers'}, e.g. 1,2,4") from None


class Point(NamedTuple):
    """One dictionary of the grid (or a connection site's)."""

    label: str
    site: str
    width_mult: int
    sparsity: float
    seed: int
    role: str  # "grid" or "connect"


def _tag(cfg: DictionariesConfig, sparsity, seed: int) -> str:
    value = f"l1_{sparsity:g}" if cfg.arch == "relu" else f"k{sparsity}"
    return f"{value}.s{seed}".replace("-", "m").replace("+", "")


def _spec(cfg: DictionariesConfig, site: str, width: int, sparsity, seed: int) -> SAESpec:
    if width > MAX_WIDTH:
        raise BadValueError(f"--widths: a width of {width} latents is past the limit {MAX_WIDTH}")
    if cfg.arch == "relu":
        return SAESpec(site, arch="relu", width=width, k=1, l1=float(sparsity),  # k: unused
                       tag=_tag(cfg, sparsity, seed))
    if sparsity > width:
        raise BadValueError(f"--k {sparsity} is larger than the narrowest dictionary ({width} latents)")
    return SAESpec(site, arch="topk", width=width, k=int(sparsity), tag=_tag(cfg, sparsity, seed))


def featured_width(widths: tuple[int, ...]) -> int:
    """The upper-middle width (4x of 1..8x, the original's): the featured and connection
    dictionaries'."""
    return sorted(widths)[len(widths) // 2]


def featured_sparsity(values: tuple):
    """The middle sparsity (the lower middle of an even count)."""
    return sorted(values)[(len(values) - 1) // 2]


def grid_specs(cfg: DictionariesConfig, site: str, d_model: int,
               connect_sites: tuple[str, ...] = ()) -> tuple[list[SAESpec], list[Point]]:
    """Every dictionary to train, with its grid coordinates; connection dictionaries last."""
    specs, points = [], []
    for mult in cfg.widths:
        for sparsity in cfg.sparsities:
            for s in range(cfg.seeds):
                spec = _spec(cfg, site, mult * d_model, sparsity, cfg.seed + s)
                specs.append(spec)
                points.append(Point(spec.label, site, mult, sparsity, cfg.seed + s, "grid"))
    mult, sparsity = featured_width(cfg.widths), featured_sparsity(cfg.sparsities)
    for other in connect_sites:
        spec = _spec(cfg, other, mult * d_model, sparsity, cfg.seed)
        specs.append(spec)
        points.append(Point(spec.label, other, mult, sparsity, cfg.seed, "connect"))
    return specs, points


def check_memory(specs: list[SAESpec], site_widths: dict[str, int], batch: int,
                 buffer_tokens: int, budget: int) -> int:
    """Bytes the one-pass grid needs (every objective plus each site's shuffling buffer);
    SaelabError when that is past `budget`."""
    import torch

    from saelab.train.objective import SAEObjective

    need = sum(SAEObjective.nbytes(s, site_widths[s.site], batch, torch.float32) for s in specs)
    need += sum(2 * buffer_tokens * w * 2 for w in site_widths.values())  # bf16 rows + copy
    if need > budget:
        raise SaelabError(
            f"the grid of {len(specs)} dictionaries needs {need / 2**30:.2f} GiB to train in one "
            f"pass, more than the memory budget of {budget / 2**30:.2f} GiB. Give fewer or "
            "smaller --widths, fewer --l1/--k values or --seeds, a smaller --batch-size, or "
            "raise --memory-budget.")
    return need
