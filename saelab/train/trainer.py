"""The training loop: many SAEs from one activation stream, resumable.

A run folder holds `run.json` (config, data provenance, versions),
`metrics.jsonl`, `ckpt/` while training, and one SAE folder per trained SAE
(native SAELens v6 layout). Data comes from an activation cache; when the
user names a model and corpus instead, the cache is harvested first into
the run folder (resumable too), so one model forward feeds every SAE.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from saelab.data.store import ActivationStore, atomic_write_text
from saelab.errors import SaelabError, ShapeMismatchError
from saelab.precision import dtype_name, resolve_dtype
from saelab.train.checkpoint import load_checkpoint, read_run_record, save_checkpoint
from saelab.train.config import TrainConfig
from saelab.train.distributed import SINGLE, Dist
from saelab.train.objective import SAEObjective


@dataclass
class TrainResult:
    out: Path
    sae_dirs: dict[str, Path]  # label -> folder
    final: dict[str, dict]  # label -> last metrics
    tokens_per_second: float


def versions() -> dict:
    import saelab

    return {"saelab": saelab.__version__, "torch": torch.__version__}


def train(cfg: TrainConfig, cache: str | Path, out: str | Path, *, resume: bool = False,
          on_progress: Callable[[int, int, dict], None] | None = None,
          dist: Dist = SINGLE, shard_sites: bool = False, cache_per_rank: bool = False
          ) -> TrainResult:
    """Train every SAE of `cfg` on the activation cache `cache`, writing to `out`.

    Under torch.distributed (`dist`), data-parallel by default: each rank reads
    its share of every global batch from the shared cache (or all of its own
    cache with `cache_per_rank`); with `shard_sites` each rank trains its own
    subset of the SAEs on full batches instead. See distributed.py.
    """
    out = Path(out)
    store = ActivationStore(cache)
    for spec in cfg.saes:
        if spec.site not in store.sites:
            raise ShapeMismatchError(f"the cache {cache} holds sites {list(store.sites)}; "
                                     f"SAE {spec.label} needs {spec.site}. Harvest that site.")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    cdt = resolve_dtype(cfg.dtype)
    provenance = {k: store.manifest.identity.get(k) for k in
                  ("model", "model_hash", "corpus", "corpus_hash", "context")}
    # through JSON once, so tuples become lists and compare equal to a re-read record
    run_record = {"config": json.loads(json.dumps(cfg.to_dict())), "cache": str(cache),
                  "data": provenance,
                  "compute_dtype": dtype_name(cdt), "versions": versions(),
                  "world_size": dist.world_size, "shard_sites": shard_sites}
    _check_resume(out, run_record, resume)
    dist.barrier()  # every rank checked run.json before rank 0 rewrites it
    mine = [s for i, s in enumerate(cfg.saes) if not shard_sites or i % dist.world_size == dist.rank]
    sync = SINGLE if shard_sites else dist
    objectives = [SAEObjective(s, store.sites[s.site], cfg, cdt,
                               _metadata(s, store, provenance, cfg), sync=sync) for s in mine]
    writes = dist.is_main or shard_sites  # who saves checkpoints, SAEs and metrics
    ckpt_dir = out / "ckpt" / (f"rank_{dist.rank}" if shard_sites else "")
    start_step = 0
    ckpt = load_checkpoint(ckpt_dir) if resume else None
    if ckpt is not None:
        tensors, info = ckpt
        for i, obj in enumerate(objectives):
            obj.load_state_tensors({k.split("/", 1)[1]: v for k, v in tensors.items()
                                    if k.startswith(f"{i}/")})
        start_step = info["step"]
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        atomic_write_text(out / "run.json", json.dumps(run_record, indent=1))

    steps = cfg.steps
    split = sync.active and not cache_per_rank  # ranks share the cache: read disjoint slices
    local_batch = cfg.batch_size // sync.world_size
    streams = {site: store.batches(site, local_batch, seed=cfg.seed, epochs=10**6,
                                   outlier_factor=cfg.outlier_factor,
                                   rank=dist.rank if split else 0,
                                   world_size=dist.world_size if split else 1)
               for site in dict.fromkeys(s.site for s in mine)}
    for _ in range(start_step):  # the same data order as an uninterrupted run
        for stream in streams.values():
            next(stream)
    ckpt_every = max(1, cfg.checkpoint_every // cfg.batch_size) if cfg.checkpoint_every else 0
    metrics_path = out / "metrics.jsonl"
    nan_batches, started, last = 0, time.perf_counter(), {}
    for step in range(start_step, steps):
        batch = {site: next(stream) for site, stream in streams.items()}
        bad = [site for site, x in batch.items() if not torch.isfinite(x).all()]
        if bad:
            nan_batches += 1
            if nan_batches > cfg.nan_limit:
                raise SaelabError(f"{nan_batches} batches with NaN/inf activations at {bad}: "
                                  "the cache or the model is broken; check the harvest dtype.")
            continue
        for obj in objectives:
            stats = obj.train_step(batch[obj.spec.site], steps)
            last[obj.spec.label] = stats
        done = (step + 1) * cfg.batch_size
        rate = (step + 1 - start_step) * cfg.batch_size / (time.perf_counter() - started)
        if writes and (step % 10 == 0 or step == steps - 1):
            with open(metrics_path, "a") as fh:
                for label, stats in last.items():
                    fh.write(json.dumps({"step": step, "tokens": done, "sae": label,
                                         "tokens_per_s": rate, **stats}) + "\n")
        if on_progress:
            on_progress(done, steps * cfg.batch_size, {"tokens/s": rate, **_summary(last)})
        if writes and ckpt_every and (step + 1) % ckpt_every == 0 and step + 1 < steps:
            _checkpoint(ckpt_dir, objectives, step + 1)
    sae_dirs = {}
    if writes:
        from saelab.sae.formats import save_sae

        for obj in objectives:
            final = last.get(obj.spec.label, {})
            sae = obj.export({"tokens_trained": steps * cfg.batch_size, "final": final,
                              "l0": final.get("l0")})
            sae_dirs[obj.spec.label] = save_sae(sae, out / obj.spec.label,
                                                log_sparsity=obj.log_sparsity())
        _checkpoint(ckpt_dir, objectives, steps)
    dist.barrier()
    rate = (steps - start_step) * cfg.batch_size / max(time.perf_counter() - started, 1e-9)
    return TrainResult(out, sae_dirs, last, rate)


def _metadata(spec, store: ActivationStore, provenance: dict, cfg: TrainConfig) -> dict:
    from saelab.models.sites import Site

    return {"model_name": provenance["model"], "model_hash": provenance["model_hash"],
            "site": spec.site, "hook_name": Site.parse(spec.site).tl_name,
            "corpus": provenance["corpus"], "corpus_hash": provenance["corpus_hash"],
            "context_size": provenance["context"], "seed": cfg.seed, "trained_by": "saelab",
            "train_config": {k: v for k, v in cfg.to_dict().items() if k != "saes"} | {
                "spec": spec.__dict__}, "versions": versions()}


def _summary(last: dict[str, dict]) -> dict:
    """One line for the progress bar: the first SAE's numbers (or the mean over SAEs)."""
    if not last:
        return {}
    keys = ("l0", "fvu", "dead")
    return {k: sum(s.get(k, 0) for s in last.values()) / len(last) for k in keys}


def _checkpoint(folder: Path, objectives, step: int) -> None:
    tensors = {f"{i}/{k}": v for i, obj in enumerate(objectives)
               for k, v in obj.state_tensors().items()}
    save_checkpoint(folder, step, tensors, {})


def _check_resume(out: Path, record: dict, resume: bool) -> None:
    path = out / "run.json"
    if not path.is_file():
        if resume:
            raise SaelabError(f"nothing to resume in {out}: it has no run.json.")
        return
    old = read_run_record(path)
    if not resume:
        raise SaelabError(f"{out} already holds a training run. Resume it with --resume, "
                          "or choose another --out.")
    diff = [f"{k}: was {old['config'].get(k)!r}, now {record['config'].get(k)!r}"
            for k in record["config"] if old["config"].get(k) != record["config"].get(k)]
    if old.get("cache") != record["cache"]:
        diff.append(f"cache: was {old.get('cache')}, now {record['cache']}")
    if diff:
        raise SaelabError("cannot resume with a changed config:\n  " + "\n  ".join(diff)
                          + "\nResume with the original settings, or train into a new folder.")


def fmt_stats(stats: dict) -> str:
    parts = []
    for k, v in stats.items():
        if isinstance(v, float) and math.isfinite(v):
            parts.append(f"{k} {v:,.0f}" if abs(v) >= 100 else f"{k} {v:.3g}")
    return "  ".join(parts)
