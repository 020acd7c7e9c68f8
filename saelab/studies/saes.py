"""The SAEs a study needs: the user's, or ones trained here once and reused.

    dirs = ensure_saes(lm, SAEPlan(sites=("resid_post.12", "attn_z.16")), "runs/lists/saes", stage)
    # {"resid_post.12": Path(".../train/resid_post.12-w4608-k32"), ...}

One streaming training run trains every SAE: each model forward feeds every
site, and no activation cache is written (the training engine's `Stream`). It
resumes from its last checkpoint: an interrupted study picks up where it
stopped, and a finished one costs nothing the second time, because each SAE
folder is only trusted once its `cfg.json` exists (`save_sae` writes it last,
atomically).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Stage = Callable[[str, int], Callable[[int], None]]  # (name, total) -> update(done)


@dataclass(frozen=True)
class SAEPlan:
    """What to train when the user gives no SAE."""

    sites: tuple[str, ...]
    arch: str = "batchtopk"
    width: int = 4608
    k: int = 32
    tokens: int = 200_000
    """Training tokens, streamed once from `corpus` for all sites."""
    corpus: str = "builtin"
    context: int = 128
    batch_size: int = 1024
    """Tokens per optimizer step: small, so a short CPU run still takes a few hundred steps."""


def _no_stage(name: str, total: int) -> Callable[[int], None]:
    return lambda done: None


def ensure_saes(lm: Any, plan: SAEPlan, out: str | Path, stage: Stage = _no_stage) -> dict[str, Path]:
    """Train (or finish, or reuse) one SAE per site of `plan` under `out`; {site: SAE folder}."""
    from saelab.train.config import SAESpec, TrainConfig
    from saelab.train.trainer import Stream, train

    out = Path(out)
    specs = tuple(SAESpec(site, arch=plan.arch, width=plan.width, k=plan.k) for site in plan.sites)
    dirs = {s.site: out / "train" / s.label for s in specs}
    if all((d / "cfg.json").is_file() for d in dirs.values()):
        return dirs
    cfg = TrainConfig(saes=specs, tokens=plan.tokens, batch_size=plan.batch_size,
                      checkpoint_every=max(plan.tokens // 4, plan.batch_size))
    update = stage("train SAEs", cfg.steps * cfg.batch_size)
    result = train(cfg, Stream(lm, corpus=plan.corpus, context=plan.context), out / "train",
                   resume=(out / "train" / "run.json").is_file(), device=lm.device,
                   on_progress=lambda done, total, stats: update(done))
    return {s.site: Path(result.sae_dirs[s.label]) for s in specs}
