"""The main job on the embedded model: harvest, train one SAE, evaluate, report.

Until the list study lands, `saelab demo` (what `make demo` runs) shows the
whole path end to end on real weights: activations at `resid_post.12` of
SmolLM2-135M-Instruct, a BatchTopK SAE trained on them, and its evaluation
(reconstruction, ΔCE, loss recovered, with bootstrap intervals) written as
eval.json and report.html. Every stage is resumable and a second run reuses
what the first one finished.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from saelab.data.store import atomic_write_text


@dataclass(frozen=True)
class DemoConfig:
    model: str = "smollm2-135m-instruct"
    """Model to study."""
    site: str = "resid_post.12"
    """Site of the SAE."""
    tokens: int = 200_000
    """Training tokens (harvested once into the run folder)."""
    width: int = 4608
    """SAE latents."""
    k: int = 32
    """Active latents per token."""
    eval_tokens: int = 16_384
    """Held-out tokens for the evaluation."""
    context: int = 128
    """Tokens per context."""


Stage = Callable[[str, int], Callable[[int], None]]  # (name, total) -> update(done)


def run_demo(cfg: DemoConfig, out: str | Path, stage: Stage) -> dict:
    """Run (or finish) the demo into `out`; returns the summary written to run.json."""
    from saelab.data.harvest import HarvestConfig, harvest
    from saelab.evals.run import evaluate
    from saelab.models.load import load_model
    from saelab.train.config import SAESpec, TrainConfig
    from saelab.train.trainer import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    started = time.perf_counter()
    lm = load_model(cfg.model, dtype="float32")
    times["load model"] = time.perf_counter() - started

    started = time.perf_counter()
    update = stage("harvest", cfg.tokens)
    harvest(lm, HarvestConfig(sites=cfg.site, tokens=cfg.tokens, context=cfg.context,
                              store_dtype="bfloat16"), out / "cache",
            on_progress=lambda done, total: update(done))
    times["harvest"] = time.perf_counter() - started

    started = time.perf_counter()
    spec = SAESpec(cfg.site, arch="batchtopk", width=cfg.width, k=cfg.k)
    # batches of 1024: a few hundred optimizer steps even on a short CPU run
    train_cfg = TrainConfig(saes=(spec,), tokens=cfg.tokens, batch_size=1024,
                            checkpoint_every=100_000)
    sae_dir = out / "train" / spec.label
    if not (sae_dir / "cfg.json").is_file():  # finish an interrupted run, or start one
        update = stage("train", train_cfg.steps * train_cfg.batch_size)
        result = train(train_cfg, out / "cache", out / "train",
                       resume=(out / "train" / "run.json").is_file(),
                       on_progress=lambda done, total, stats: update(done))
        sae_dir = result.sae_dirs[spec.label]
    times["train"] = time.perf_counter() - started

    started = time.perf_counter()
    update = stage("evaluate", cfg.eval_tokens)
    report = evaluate(lm, sae_dir, tokens=cfg.eval_tokens, context=cfg.context,
                      out=out / "eval", on_progress=lambda done, total: update(done))
    times["evaluate"] = time.perf_counter() - started

    summary = {"config": asdict(cfg), "sae": str(sae_dir), "eval": str(out / "eval"),
               "report": str(out / "eval" / "report.html"), "seconds": times,
               "metrics": _headline(report)}
    atomic_write_text(out / "run.json", json.dumps(summary, indent=1))
    return summary


def _headline(report: dict) -> dict:
    """The few numbers the demo prints: {name: {"value", "ci95"}}."""
    metrics = report["metrics"]
    keys = ("l0", "fvu", "explained_variance", "cosine", "delta_ce", "loss_recovered",
            "kl_score")
    out = {k: metrics[k] for k in keys if k in metrics}
    for k in ("dead_fraction", "dense_fraction"):
        out[k] = {"value": report["features"][k], "ci95": None}
    return out
