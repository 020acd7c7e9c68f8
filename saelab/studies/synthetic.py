"""Are SAE-built activations as realistic as real ones? (after an SAE study on GPT-2)

    cfg = SyntheticConfig(n=1000, steps=100)
    result = run_synthetic(lm, sae, cfg, out="runs/synthetic")   # run.json, report.html, PNGs

Bases are real activations at the last position of 10-token windows of the
corpus. Each base A is perturbed towards a target T of each kind (a real
activation of another window, a Gaussian sample, or one of two SAE-built
activations, see synthetic_targets.py) by overwriting the site at the last
position with ``A + c·(T − A)``, and the model's reaction is read at the last
position: the L2 distance of the last-layer residual from the unperturbed one
and KL(clean ‖ perturbed) of the next-token distribution. The step where a
curve rises fastest (its blow-up) is compared across kinds: is the model as
sensitive towards SAE-built activations as towards real ones?

Only the last position changes, so the 9-token prefix runs once per base and
its KV cache is expanded to every (target, step) row: all steps of all targets
of a base are one batch of single-token forwards (`sweep`; `sweep_naive`
re-runs the whole window per step and is the check).

A curve is ``coefs[b, k, :]``: c = 0 first (the curve's own reference row), NaN
past the target (absolute mode stops there). Arrays are (bases B, kinds K, steps S).
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from saelab.checks import ABSURD, MAX_SEED, integer, number
from saelab.errors import SaelabError
from saelab.interventions.splice import one_site, unwrap
from saelab.models.hooks import capture, patch
from saelab.models.kv_cache import cache_kwargs, returned_cache
from saelab.studies.synthetic_report import blowups, plateau_length
from saelab.studies.synthetic_targets import (
    Gaussian,
    LatentStats,
    latent_stats,
    make_targets,
    sample_windows,
    site_acts,
)
from saelab.train.config import MAX_WIDTH

KINDS = ("real", "random", "synthetic-baseline", "synthetic-structured")
MODES = ("relative", "absolute")
Progress = Callable[[int, int], None]  # (done, total)
Stage = Callable[[str, int], Callable[[int], None]]  # (name, total) -> update(done)


@dataclass(frozen=True)
class SyntheticConfig:
    """Every setting of the study; recorded in run.json."""

    model: str = "smollm2-135m-instruct"
    """Model to study."""
    site: str = "resid_pre.1"
    """Site that is perturbed (an early residual site in the original)."""
    n: int = 1000
    """Base activations, one per 10-token window."""
    steps: int = 100
    """Points per curve: values of t in [0, 1] (relative), or n = 0..steps (absolute)."""
    mode: str = "relative"
    """relative: A + t·(T − A); absolute: A + step_size·n·(T − A)/‖T − A‖, cut at the target."""
    step_size: float = 0.5
    """Absolute mode and plateaus: step length in the site's units (the original's 0.5 at
    GPT-2 layer 1; SmolLM2 resid_pre.1 activations have norm ~47 and lie ~59 apart)."""
    prompt_len: int = 10
    """Tokens per window, BOS included when the tokenizer has one."""
    stats_prompts: int = 4096
    """Further windows whose last-position activations give the latent statistics
    and the Gaussian's mean and covariance."""
    corpus: str = "builtin"
    """Corpus the windows are cut from."""
    n_close: int = 10
    """synthetic-baseline: candidates closest in firing frequency."""
    n_top: int = 100
    """synthetic-structured: candidates for the new top latent, closest in frequency."""
    blowup_threshold: float = 0.02
    """A step s_i = d_i − d_{i−1} is a blow-up only above this fraction of the curve's max;
    a curve with none has its blow-up at its last step."""
    plateau_n: int = 200
    """Bases of the plateau experiment, the first of the study's (at most n; 0: skip it)."""
    plateau_threshold: float = 0.1
    """The plateau ends at the first step where L2 ≥ this fraction of the unperturbed
    last-layer residual norm."""
    sample_curves: int = 5
    """Curves per kind drawn in the report."""
    batch_rows: int = 512
    """Single-token rows per forward pass of the sweep."""
    seed: int = 0
    """Seed of the window choice, the Gaussian samples and the synthetic latent choices."""
    sae_tokens: int = 200_000
    """Training tokens of the SAE trained when none is given."""
    sae_width: int = 4608
    """Latents of the SAE trained when none is given."""
    sae_k: int = 32
    """Active latents per token of the SAE trained when none is given."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"SyntheticConfig.mode={self.mode!r}: expected one of {MODES}")
        for name, low in (("n", 2), ("steps", 2), ("prompt_len", 2), ("stats_prompts", 2),
                          ("n_close", 1), ("n_top", 1), ("plateau_n", 0), ("sample_curves", 0),
                          ("batch_rows", 1), ("sae_tokens", 1)):
            integer(name, getattr(self, name), low=low, high=ABSURD)
        integer("sae_width", self.sae_width, low=1, high=MAX_WIDTH)
        integer("sae_k", self.sae_k, low=1, high=self.sae_width)
        integer("seed", self.seed, low=0, high=MAX_SEED)
        # Step lengths in the site's units (residual norms are below 1e4); fractions <= 1.
        number("step_size", self.step_size, low=0, low_open=True, high=1e6)
        number("blowup_threshold", self.blowup_threshold, low=0, low_open=True, high=1)
        number("plateau_threshold", self.plateau_threshold, low=0, low_open=True, high=1e3)


class Curves(NamedTuple):
    """The model's reaction along each curve, measured at the last position."""

    l2: np.ndarray
    """(B, K, S) last-layer residual L2 distance from the curve's step 0; NaN past its end."""
    kl: np.ndarray
    """(B, K, S) KL(step 0 ‖ step s) of the next-token distribution, in nats."""
    ref_norm: np.ndarray
    """(B, K) norm of the last-layer residual at step 0."""


# ------------------------------------------------------------------ the sweep


def schedule(mode: str, steps: int, dist: Tensor, step_size: float = 0.5) -> Tensor:
    """(*dist.shape, S) coefficients c of A + c·(T − A); NaN past the target (absolute)."""
    if mode == "relative":
        return torch.linspace(0, 1, steps, dtype=torch.float64).expand(*dist.shape, steps).clone()
    n = torch.arange(steps + 1, dtype=torch.float64)
    d = dist.double()[..., None]
    c = torch.where(d > 0, n * step_size / d, torch.nan)
    c[..., 0] = 0.0
    return c.masked_fill(c > 1 + 1e-9, torch.nan)


def _logits_kwargs(model: Any) -> dict:
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _kl_to_refs(logits: Tensor, ref_lp: list[Tensor], ref_idx: Tensor) -> Tensor:
    """KL(ref ‖ row) per row, ref_lp[ref_idx[row]] its reference's log-probabilities; one
    reference at a time, so no (R, V) copy of the references is ever made."""
    lp = torch.log_softmax(logits.float(), -1)  # (R, V)
    kl = torch.empty(len(lp), device=lp.device)
    for r in ref_idx.unique().tolist():
        rows = ref_idx == r
        kl[rows] = (ref_lp[r].exp() * (ref_lp[r] - lp[rows])).sum(-1)
    return kl.clamp_min(0)  # exact KL ≥ 0; rounding may not be


def _finite(h: Tensor, logits: Tensor, site: str) -> None:
    if not (torch.isfinite(h).all() and torch.isfinite(logits).all()):
        raise SaelabError(f"the model produced NaN/inf after the patch at {site}; a target is "
                          "too large for its dtype, or the model overflows: load it in float32.")


def _groups(rows_per_base: list[int], max_rows: int) -> list[list[int]]:
    """Consecutive bases, as many per forward as fit in max_rows (at least one)."""
    groups: list[list[int]] = [[]]
    total = 0
    for b, r in enumerate(rows_per_base):
        if groups[-1] and total + r > max_rows:
            groups.append([])
            total = 0
        groups[-1].append(b)
        total += r
    return groups


@torch.inference_mode()
def sweep(lm: Any, site: str, windows: Tensor, targets: Tensor, coefs: Tensor,
          starts: Tensor | None = None, *, max_rows: int = 512,
          on_progress: Progress | None = None) -> Curves:
    """Perturb the last position of each window along its curves and read the model's reaction.

    windows (B, P) token ids; targets (B, K, d); coefs (B, K, S) with coefs[..., 0] == 0;
    starts (B, K, d) or None (the window's own activation). Row x of a batch gets
    ``a + c·(T − a)`` at `site`, a = its start; every other position is the clean prefix.
    """
    model, arch = unwrap(lm)
    site = one_site(arch, site, "the study's site")
    final = f"resid_post.{arch.n_layers - 1}"
    device = next(model.parameters()).device
    B, K, S = coefs.shape
    if not bool((coefs[..., 0] == 0).all()):
        raise ValueError("sweep: every curve must start at c = 0 (its reference row)")
    valid = torch.isfinite(coefs)
    l2, kl = np.full((B, K, S), np.nan), np.full((B, K, S), np.nan)
    ref_norm = np.full((B, K), np.nan)
    P = windows.shape[1]
    for group in _groups(valid.flatten(1).sum(1).tolist(), max_rows):
        g = torch.tensor(group)
        b, k, s = valid[g].nonzero(as_tuple=True)  # b indexes the group
        order = torch.argsort((s != 0).int(), stable=True)  # reference rows first
        b, k, s = b[order], k[order], s[order]
        prefix = returned_cache(model(input_ids=windows[g, :-1].to(device), use_cache=True))
        refs: dict[tuple[int, int], int] = {}  # (b, k) -> index into ref_h / ref_lp
        ref_h: list[Tensor] = []
        ref_lp: list[Tensor] = []
        for lo in range(0, len(b), max_rows):
            rb, rk, rs = b[lo:lo + max_rows], k[lo:lo + max_rows], s[lo:lo + max_rows]
            coef = coefs[g[rb], rk, rs].to(device)  # (R,)
            target = targets[g[rb], rk].to(device)  # (R, d)
            start = None if starts is None else starts[g[rb], rk].to(device)

            def write(x: Tensor, ctx: Any, coef=coef, target=target, start=start) -> Tensor:
                a = x[:, -1] if start is None else start.to(x.dtype)  # (R, d)
                return (a + coef[:, None].to(x.dtype) * (target.to(x.dtype) - a))[:, None]

            cache = copy.deepcopy(prefix)  # the forward appends to it: one copy per chunk
            cache.batch_select_indices(rb.to(device))
            with patch(model, {site: write}, arch=arch), \
                    capture(model, final, arch=arch, stop_early=False) as cap:
                cap.run(input_ids=windows[g[rb], -1:].to(device), **cache_kwargs(model, cache),
                        position_ids=torch.full((len(rb), 1), P - 1, device=device), use_cache=True)
            h, logits = cap[final][:, -1].float(), cap.output.logits[:, -1].float()  # (R, d), (R, V)
            _finite(h, logits, site)
            for i in (rs == 0).nonzero(as_tuple=True)[0].tolist():
                refs[int(rb[i]), int(rk[i])] = len(ref_h)
                ref_h.append(h[i])
                ref_lp.append(torch.log_softmax(logits[i], -1))
                ref_norm[group[int(rb[i])], int(rk[i])] = float(h[i].norm())
            idx = torch.tensor([refs[int(x), int(y)] for x, y in zip(rb, rk, strict=True)],
                               device=h.device)
            d = (h - torch.stack(ref_h)[idx]).norm(dim=-1)
            q = _kl_to_refs(logits, ref_lp, idx)
            rows = (np.asarray(group)[rb.numpy()], rk.numpy(), rs.numpy())
            l2[rows], kl[rows] = d.double().cpu().numpy(), q.double().cpu().numpy()
        if on_progress:
            on_progress(group[-1] + 1, B)
    return Curves(l2, kl, ref_norm)


@torch.inference_mode()
def sweep_naive(lm: Any, site: str, windows: Tensor, targets: Tensor, coefs: Tensor,
                starts: Tensor | None = None) -> Curves:
    """`sweep` the slow, obvious way: the whole window re-run for every step. For checking."""
    model, arch = unwrap(lm)
    site = one_site(arch, site, "the study's site")
    final = f"resid_post.{arch.n_layers - 1}"
    device = next(model.parameters()).device
    B, K, S = coefs.shape
    l2, kl = np.full((B, K, S), np.nan), np.full((B, K, S), np.nan)
    ref_norm = np.full((B, K), np.nan)
    extra = _logits_kwargs(model)
    for b in range(B):
        for k in range(K):
            ref = None
            for s in range(S):
                c = float(coefs[b, k, s])
                if not np.isfinite(c):
                    continue
                start = None if starts is None else starts[b, k]

                def write(x: Tensor, ctx: Any, c=c, start=start, target=targets[b, k]) -> Tensor:
                    a = x[:, -1] if start is None else start.to(x.dtype).to(x.device)
                    new = x.clone()
                    new[:, -1] = a + c * (target.to(x.dtype).to(x.device) - a)
                    return new

                with patch(model, {site: write}, arch=arch), \
                        capture(model, final, arch=arch, stop_early=False) as cap:
                    cap.run(input_ids=windows[b:b + 1].to(device), **extra)
                h, lp = cap[final][0, -1].float(), torch.log_softmax(cap.output.logits[0, -1].float(), -1)
                _finite(h, lp, site)
                if ref is None:
                    ref = (h, lp)
                    ref_norm[b, k] = float(h.norm())
                l2[b, k, s] = float((h - ref[0]).norm())
                kl[b, k, s] = max(float((ref[1].exp() * (ref[1] - lp)).sum()), 0.0)
    return Curves(l2, kl, ref_norm)


# ------------------------------------------------------------------ the study


def _no_stage(name: str, total: int) -> Callable[[int], None]:
    return lambda done: None


@dataclass
class Measured:
    """Everything one run measured, before summaries and plots."""

    kinds: tuple[str, ...]
    windows: Tensor  # (B, P)
    bases: Tensor  # (B, d)
    targets: Tensor  # (B, K, d)
    codes: dict[str, Tensor]  # kind -> (B, F) latent codes of the synthetic targets
    base_codes: Tensor  # (B, F)
    stats: LatentStats  # on the statistics windows
    gauss: Gaussian  # fitted to the statistics windows' activations
    curves: Curves
    steps: dict[str, np.ndarray]  # "l2"/"kl" -> (B, K) blow-up steps
    seconds: dict[str, float]


def measure(lm: Any, sae: Any, site: str, cfg: SyntheticConfig, *,
            kinds: Sequence[str] = KINDS, corpus: Any = None, skip_windows: int = 0,
            stage: Stage = _no_stage) -> Measured:
    """Windows, activations, latent statistics, targets, and the sweep of every base."""
    from saelab.data.corpus import load_corpus

    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    corpus = corpus if corpus is not None else load_corpus(cfg.corpus)
    windows = sample_windows(corpus, lm.tokenizer, cfg.n + cfg.stats_prompts, cfg.prompt_len,
                             cfg.seed, skip=skip_windows)
    acts = site_acts(lm, site, windows)
    bases, pool = acts[:cfg.n], acts[cfg.n:]
    was_training = sae.training
    sae.eval()  # BatchTopK: the inference threshold, not the batch-level top-k
    try:
        stats, gauss = latent_stats(sae, pool), Gaussian.fit(pool)
        targets, codes, base_codes = make_targets(sae, bases, stats, gauss, kinds, cfg)
    finally:
        sae.train(was_training)
    seconds["activations and targets"] = time.perf_counter() - clock

    clock = time.perf_counter()
    dist = (targets - bases[:, None]).norm(dim=-1)  # (B, K)
    coefs = schedule(cfg.mode, cfg.steps, dist, cfg.step_size)
    update = stage("sweep", cfg.n)
    curves = sweep(lm, site, windows[:cfg.n], targets, coefs, max_rows=cfg.batch_rows,
                   on_progress=lambda done, total: update(done))
    seconds["sweep"] = time.perf_counter() - clock
    return Measured(tuple(kinds), windows[:cfg.n], bases, targets, codes, base_codes, stats,
                    gauss, curves, blowups(curves, cfg.blowup_threshold), seconds)


def plateaus(lm: Any, site: str, m: Measured, cfg: SyntheticConfig,
             on_progress: Progress | None = None) -> tuple[dict[str, np.ndarray],
                                                           dict[str, np.ndarray]]:
    """Plateau lengths from each kind's activation (real = the base itself) towards fresh
    Gaussian samples, in absolute steps: ({kind: (n,) lengths}, {kind: (n,) censored}); a
    censored curve never reached the threshold and counts its length."""
    n, K = min(cfg.plateau_n, cfg.n), len(m.kinds)
    starts = torch.stack([m.bases[:n] if kind == "real" else m.targets[:n, i]
                          for i, kind in enumerate(m.kinds)], dim=1)  # (n, K, d)
    ends = m.gauss.sample(n * K, torch.Generator().manual_seed(cfg.seed + 3)).reshape(n, K, -1)
    coefs = schedule("absolute", cfg.steps, (ends - starts).norm(dim=-1), cfg.step_size)
    curves = sweep(lm, site, m.windows[:n], ends, coefs, starts, max_rows=cfg.batch_rows,
                   on_progress=on_progress)
    thresholds = cfg.plateau_threshold * curves.ref_norm  # (n, K)
    lengths = {kind: np.array([plateau_length(curves.l2[b, i], thresholds[b, i]) for b in range(n)])
               for i, kind in enumerate(m.kinds)}
    with np.errstate(invalid="ignore"):  # NaN past a curve's end never reaches the threshold
        censored = {kind: ~(curves.l2[:, i] >= thresholds[:, i, None]).any(-1)
                    for i, kind in enumerate(m.kinds)}
    return lengths, censored


def run_synthetic(lm: Any, sae: Any, cfg: SyntheticConfig, out: str | Path | None = None, *,
                  stage: Stage = _no_stage, sae_path: str | None = None,
                  corpus: Any = None) -> dict:
    """The whole study on a loaded model and SAE; with `out`, writes run.json, report.html,
    the PNGs and curves.npz there. Returns the run.json dict."""
    from saelab.data.corpus import load_corpus
    from saelab.studies.synthetic_report import (
        DEFINITIONS,
        QUESTION,
        make_figures,
        results_json,
        versions,
        write_run,
    )
    from saelab.studies.synthetic_targets import check_sae, profiles

    started = time.perf_counter()
    site = check_sae(lm, sae, cfg.site, sae_path or "the SAE")
    corpus = corpus if corpus is not None else load_corpus(cfg.corpus)
    m = measure(lm, sae, site, cfg, corpus=corpus, stage=stage)
    seconds = dict(m.seconds)
    plateau = censored = None
    if cfg.plateau_n:
        clock = time.perf_counter()
        update = stage("plateaus", min(cfg.plateau_n, cfg.n))
        plateau, censored = plateaus(lm, site, m, cfg, on_progress=lambda done, total: update(done))
        seconds["plateaus"] = time.perf_counter() - clock
    pooled, mismatch = profiles(sae, m.base_codes, m.codes)
    results = results_json(m, plateau, censored, mismatch)
    seconds["total"] = time.perf_counter() - started
    result = {
        "schema": "saelab.study.synthetic/1",
        "question": QUESTION,
        "config": asdict(cfg),
        "site": site,
        "model": lm.provenance(),
        "sae": {"path": sae_path, "architecture": sae.cfg.architecture, "d_in": sae.cfg.d_in,
                "d_sae": sae.cfg.d_sae, "k": sae.cfg.k, "trained_site": sae.cfg.site},
        "corpus": {"name": corpus.name, "sha256": corpus.sha256},
        "seeds": {"windows": cfg.seed, "random targets": cfg.seed + 1,
                  "synthetic latent choices": cfg.seed + 2, "plateau Gaussian samples": cfg.seed + 3},
        "definitions": DEFINITIONS,
        "versions": versions(),
        "seconds": seconds,
        "results": results,
    }
    if out is not None:
        write_run(Path(out), result, make_figures(m, m.kinds, plateau, pooled, cfg.sample_curves),
                  m.curves, m.kinds)
    return result
