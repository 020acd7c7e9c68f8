"""What the synthetic-activation study perturbs: real activations, Gaussian samples, SAE-built ones.

    windows = sample_windows(corpus, tokenizer, n, 10, seed)   # (n, 10), BOS first
    acts = site_acts(lm, "resid_pre.1", windows)                # (n, d) at the last position
    stats = latent_stats(sae, pool)                             # measured on real activations
    gauss = Gaussian.fit(pool)                                  # their mean and full covariance
    f = sae.encode(base)                                        # (F,)
    codes = synthetic_baseline(f, stats.freq, g)                # same values, other latents
    codes = synthetic_structured(f, stats.freq, stats.mean_cos, unit_decoder(sae), g)
    target = sae.decode(codes)

Both synthetic recipes keep the base's latent activations (the same multiset of
values, so the same L0) and move each one to another latent:

- baseline: a random latent among the `n_close` (10) whose firing frequency is
  closest to the old latent's, never one already used;
- structured: the new top latent is, among the `n_top` (100) closest in
  frequency to the old top latent, the one whose decoder cosine with it is
  closest to the *measured* mean cosine of active latents to the top latent;
  then each other activation goes to the unused latent whose cosine with the
  new top latent best matches the old latent's cosine with the old top latent.

Latents are visited in descending activation order, so the largest activations
get first pick.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelab.dims import Float
from saelab.errors import SaelabError, ShapeMismatchError
from saelab.interventions.splice import one_site, unwrap
from saelab.models.hooks import capture
from saelab.models.sites import site_width

# Frequencies are counts / N (N ≤ ~1e5), so ties are exact; a jitter far below
# 1/N breaks them at random instead of by latent index (float64 keeps it).
_TIE_JITTER = 1e-12


@dataclass(frozen=True)
class LatentStats:
    """SAE latent statistics measured on real activations of one model and site."""

    freq: Float[Tensor, " d_sae"]
    """Firing frequency of each latent (float64), over the pool's tokens."""
    mean_cos: float
    """Mean decoder cosine of the non-top active latents to each token's top latent."""
    l0: np.ndarray
    """(N,) active latents per token."""
    top_share: np.ndarray
    """(N,) top latent's activation / sum of the token's activations (NaN when none is active)."""
    cos_to_top: np.ndarray
    """(M,) decoder cosines of every non-top active latent to its token's top latent."""
    fvu: float
    """Fraction of variance the SAE leaves unexplained on the pool."""


@dataclass(frozen=True)
class Gaussian:
    """A Gaussian with the mean and full covariance of a set of activations (float64)."""

    mean: Float[Tensor, " d"]
    cov: Float[Tensor, "d d"]

    @classmethod
    def fit(cls, x: Float[Tensor, "N d"]) -> Gaussian:
        x = x.double()
        return cls(x.mean(0), torch.cov(x.T))

    def sample(self, n: int, generator: torch.Generator) -> Float[Tensor, "n d"]:
        """float32 samples. Through the eigendecomposition, so a rank-deficient covariance
        (fewer activations than dimensions) still samples, within its span."""
        evals, evecs = torch.linalg.eigh(self.cov)
        root = evecs * evals.clamp_min(0).sqrt()  # (d, d): cov = root @ root.T
        z = torch.randn(n, len(self.mean), generator=generator, dtype=torch.float64)
        return (self.mean + z @ root.T).float()


# ------------------------------------------------------------------ real activations


def sample_windows(corpus: Any, tokenizer: Any, n: int, length: int, seed: int,
                   skip: int = 0) -> Tensor:
    """(n, length) windows of the packed corpus, drawn at random from its first 4n, with no
    special token after the first position (BOS opens each window when the tokenizer has one)."""
    from saelab.data.tokens import pack

    pool = [ids[~special[:, 1:].any(1)]
            for ids, special in pack(corpus, tokenizer, length, batch_size=4096,
                                     n_tokens=(skip + 4 * n) * length, skip=skip)]
    ids = torch.cat(pool) if pool else torch.zeros(0, length, dtype=torch.long)
    if len(ids) < n:
        raise SaelabError(f"corpus {getattr(corpus, 'name', corpus)!r} gave {len(ids)} usable "
                          f"{length}-token windows, {n} are needed; use a larger corpus or "
                          "fewer bases / statistics windows.")
    pick = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:n]
    return ids[pick]


@torch.inference_mode()
def site_acts(lm: Any, site: str, windows: Tensor, batch: int = 256) -> Tensor:
    """(n, d) float32 activations at `site` at the last position of each window."""
    model, arch = unwrap(lm)
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(windows), batch):
        with capture(model, site, arch=arch) as cap:
            cap.run(input_ids=windows[start:start + batch].to(device))
        out.append(cap[site][:, -1].float().cpu())
    x = torch.cat(out)
    bad = int((~torch.isfinite(x)).any(1).sum())
    if bad:
        raise SaelabError(f"{bad} of {len(x)} activations at {site} hold NaN/inf; the model "
                          "overflows in its dtype: load it in float32.")
    return x


def check_sae(lm: Any, sae: Any, site: str, sae_name: str = "the SAE") -> str:
    """The canonical site, after checking that the SAE reads activations of its width."""
    _, arch = unwrap(lm)
    site = one_site(arch, site, "the study's site")
    width = site_width(arch, site)
    if sae.cfg.d_in != width:
        raise ShapeMismatchError(
            f"{sae_name} expects d_in={sae.cfg.d_in} but site {site} of {getattr(lm, 'name', 'the model')} "
            f"has width {width}; pass an SAE trained at {site}, or the site the SAE was trained "
            f"at (--site {sae.cfg.site or '...'}).")
    if sae.cfg.site and sae.cfg.site != site:
        warnings.warn(f"{sae_name} was trained at {sae.cfg.site}; the study perturbs {site} "
                      "(same width, so it runs, but the latents may not fit).", stacklevel=2)
    return site


# ------------------------------------------------------------------ SAE-built targets


def unit_decoder(sae) -> Float[Tensor, "d_sae d_in"]:
    """Decoder rows scaled to unit norm (cosines are all the recipes use of them)."""
    w = sae.W_dec.detach().double()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def latent_stats(sae, x: Float[Tensor, "N d_in"], batch: int = 1024) -> LatentStats:
    """Firing frequencies, L0, top share and cosine-to-top distribution on activations `x`."""
    w = unit_decoder(sae)
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    l0, share, cos = [], [], []
    sq_err, sq_dev = 0.0, 0.0
    mean = x.double().mean(0)
    for start in range(0, len(x), batch):
        xb = x[start:start + batch]
        f = sae.encode(xb).double()  # (n, F)
        active = f > 0
        counts += active.sum(0)
        l0.append(active.sum(1))
        total = f.sum(1)
        top_val, top = f.max(1)
        share.append(torch.where(total > 0, top_val / total.clamp_min(1e-30), torch.nan))
        rows, cols = active.nonzero(as_tuple=True)
        keep = cols != top[rows]
        rows, cols = rows[keep], cols[keep]
        cos.append((w[cols] * w[top[rows]]).sum(1))
        sq_err += float(((sae.decode(f.to(sae.W_dec.dtype)).double() - xb.double()) ** 2).sum())
        sq_dev += float(((xb.double() - mean) ** 2).sum())
    cos_all = torch.cat(cos).numpy()
    return LatentStats(freq=counts / len(x), mean_cos=float(cos_all.mean()) if len(cos_all) else 0.0,
                       l0=torch.cat(l0).numpy(), top_share=torch.cat(share).numpy(),
                       cos_to_top=cos_all, fvu=sq_err / max(sq_dev, 1e-30))


def _active_desc(f: Tensor) -> Tensor:
    """Indices of the active latents of one code vector, largest activation first."""
    idx = (f > 0).nonzero(as_tuple=True)[0]
    return idx[f[idx].argsort(descending=True, stable=True)]


def _closest_in_freq(freq: Tensor, j: int, n: int, blocked: Tensor, g: torch.Generator) -> Tensor:
    """Up to `n` latents (never j, never blocked) whose frequency is closest to latent j's."""
    dist = (freq - freq[j]).abs() + _TIE_JITTER * torch.rand(len(freq), generator=g,
                                                             dtype=torch.float64)
    dist[blocked] = torch.inf
    dist[j] = torch.inf
    n = min(n, int(torch.isfinite(dist).sum()))
    return dist.topk(n, largest=False).indices


def synthetic_baseline(f: Float[Tensor, " d_sae"], freq: Tensor, g: torch.Generator,
                       n_close: int = 10) -> Float[Tensor, " d_sae"]:
    """Each active latent's activation moved to a random latent of similar frequency."""
    out = torch.zeros_like(f)
    used = torch.zeros(len(f), dtype=torch.bool)
    for j in _active_desc(f).tolist():
        cand = _closest_in_freq(freq, j, n_close, used, g)
        if len(cand) == 0:
            raise ValueError(f"synthetic_baseline: no unused latent left for latent {j} "
                             f"({int(used.sum())} of {len(f)} used)")
        new = int(cand[torch.randint(len(cand), (1,), generator=g)])
        out[new] = f[j]
        used[new] = True
    return out


def synthetic_structured(f: Float[Tensor, " d_sae"], freq: Tensor, mean_cos: float,
                         w_unit: Float[Tensor, "d_sae d_in"], g: torch.Generator,
                         n_top: int = 100) -> Float[Tensor, " d_sae"]:
    """The base's activations on latents whose cosines to the top latent mimic the base's."""
    order = _active_desc(f)
    out = torch.zeros_like(f)
    if len(order) == 0:
        return out
    top = int(order[0])
    used = torch.zeros(len(f), dtype=torch.bool)
    cand = _closest_in_freq(freq, top, n_top, used, g)
    new_top = int(cand[((w_unit[cand] @ w_unit[top]) - mean_cos).abs().argmin()])
    out[new_top] = f[top]
    used[new_top] = True
    cos_new = w_unit @ w_unit[new_top]  # (F,) every latent's cosine to the new top
    cos_old = w_unit[order] @ w_unit[top]  # (L0,) the base's profile
    for j, c in zip(order[1:].tolist(), cos_old[1:].tolist(), strict=True):
        score = (cos_new - c).abs()
        score[used] = torch.inf
        new = int(score.argmin())
        out[new] = f[j]
        used[new] = True
    return out


def cos_profile(f: Float[Tensor, " d_sae"], w_unit: Tensor) -> Tensor:
    """Cosines of the non-top active latents to the top one, in descending activation order."""
    order = _active_desc(f)
    if len(order) < 2:
        return torch.zeros(0, dtype=w_unit.dtype)
    return w_unit[order[1:]] @ w_unit[order[0]]


@torch.no_grad()
def make_targets(sae, bases: Float[Tensor, "B d"], stats: LatentStats, gauss: Gaussian,
                 kinds: tuple[str, ...] | list[str], cfg) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """(targets (B, K, d), {synthetic kind: codes (B, F)}, base codes (B, F)) for `kinds`.

    real: the next base's activation (bases are windows in random order);
    random: Gaussian samples (seed + 1); synthetic kinds: latent choices from seed + 2.
    """
    base_codes = sae.encode(bases).float()  # (B, F)
    w_unit = unit_decoder(sae)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    targets, codes = [], {}
    for kind in kinds:
        if kind == "real":
            targets.append(bases.roll(-1, dims=0))
        elif kind == "random":
            targets.append(gauss.sample(len(bases), torch.Generator().manual_seed(cfg.seed + 1)))
        elif kind in ("synthetic-baseline", "synthetic-structured"):
            if kind == "synthetic-baseline":
                rows = [synthetic_baseline(f, stats.freq, g, cfg.n_close) for f in base_codes]
            else:
                rows = [synthetic_structured(f, stats.freq, stats.mean_cos, w_unit, g, cfg.n_top)
                        for f in base_codes]
            codes[kind] = torch.stack(rows)
            targets.append(sae.decode(codes[kind]).float())
        else:
            raise ValueError(f"unknown target kind {kind!r}; expected real, random, "
                             "synthetic-baseline or synthetic-structured")
    out = torch.stack(targets, dim=1)  # (B, K, d)
    if not torch.isfinite(out).all():
        raise ValueError("make_targets: a target holds NaN/inf (check the SAE's weights)")
    return out, codes, base_codes


def profiles(sae, base_codes: Tensor, codes: dict[str, Tensor]) -> tuple[dict[str, np.ndarray],
                                                                          dict[str, float]]:
    """Cosine-to-top profiles ({"real": the bases', kind: the kind's}, all cosines pooled) and,
    per synthetic kind, the mean over bases of mean |profile − the base's profile|.

    Both recipes keep the base's activation values, so position i of a synthetic profile
    holds the latent that took the base's i-th largest activation: they align."""
    w = unit_decoder(sae)
    base = [cos_profile(f, w) for f in base_codes]
    pooled = {"real": torch.cat(base).numpy()}
    mismatch = {}
    for kind, rows in codes.items():
        prof = [cos_profile(f, w) for f in rows]
        pooled[kind] = torch.cat(prof).numpy()
        diffs = [float((p - q).abs().mean()) for p, q in zip(prof, base, strict=True) if len(q)]
        mismatch[kind] = float(np.mean(diffs)) if diffs else float("nan")
    return pooled, mismatch
