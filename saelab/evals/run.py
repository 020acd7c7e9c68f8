"""evaluate(): one streaming pass over held-out text, every SAE metric with bootstrap intervals.

    result = evaluate(lm, sae, tokens=10_000, out="runs/eval")   # writes eval.json, report.html
    result["metrics"]["fvu"]     # {"value": 0.12, "ci95": [0.11, 0.13]}

Per batch of contexts: a clean forward captures the site and the logits, then
the SAE-spliced and zero-ablated forwards (and a mean-ablated one when asked;
its mean comes from a cheap pre-pass that stops at the site). Only
per-context sums are kept (see bootstrap.py), so memory does not grow with the
token count beyond one row per context, and the intervals resample contexts.

Held-out text: by default (`skip_contexts=None`) an SAE trained by `saelab train`
on this very corpus is evaluated on the contexts after those its harvest read;
otherwise evaluation starts at the beginning of the corpus, and eval.json says so.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.checks import ABSURD, MAX_SEED, boolean, integer, number
from saelab.data.corpus import Corpus, load_corpus
from saelab.data.outliers import norm_outliers
from saelab.data.store import atomic_write_text
from saelab.data.tokens import context_bos_id, pack
from saelab.errors import BadValueError, SaelabError
from saelab.evals import downstream as ds
from saelab.evals import reconstruction as rc
from saelab.evals.bootstrap import ContextStats, bootstrap_ci
from saelab.interventions.splice import bind_saes
from saelab.models.limits import check_positions, lm_max_positions

SCHEMA = "saelab.eval/1"  # bump when a definition changes, so old and new numbers never mix
HARVEST_BATCH = 16  # contexts per batch of `saelab train`'s own harvest (HarvestConfig default)
BOOTSTRAP_TEXT = (
    "95% intervals: percentile bootstrap over contexts (whole contexts are resampled, "
    "with replacement, and every metric is recomputed from the resampled sums). Tokens of one "
    "context are correlated, so resampling single tokens would understate the uncertainty.")


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate on and how."""

    tokens: int = 10_000
    """Token positions to evaluate (rounded up to whole contexts; special tokens then excluded)."""
    corpus: Any = "builtin"
    """Corpus spec for `load_corpus`, or a `Corpus`."""
    context: int = 128
    """Tokens per context."""
    batch_size: int = 8
    """Contexts per forward pass (logits of 8 x 128 tokens x 49k vocab take 200 MB each)."""
    bootstrap: int = 1000
    """Bootstrap replicates for the intervals (0: none)."""
    seed: int = 0
    """Seed of the bootstrap."""
    mean_ablation: bool = False
    """Also report loss recovered against mean ablation (one extra forward per batch)."""
    downstream: bool = True
    """Run the spliced/ablated forwards (ΔCE, loss recovered, KL); False = reconstruction only."""
    keep_error: bool = False
    """Splice x̂ + error instead of x̂: a check of the machinery (ΔCE must be ~0)."""
    site: str | None = None
    """Site to evaluate at; default the SAE's recorded site."""
    outlier_factor: float = 10.0
    """Leave attention-sink tokens (norm > this x the batch median) out of reconstruction
    metrics, as training does (0: keep all)."""
    skip_contexts: int | None = None
    """Contexts to skip at the corpus start; None = after the SAE's training text when known."""
    sensitivity: int = 0
    """Bases of the synthetic-activation sensitivity (KS of blow-up steps, evals/sensitivity.py);
    0 = not measured."""

    def __post_init__(self) -> None:
        integer("tokens", self.tokens, low=1, high=ABSURD)
        integer("context", self.context, low=2, high=ABSURD)
        integer("batch_size", self.batch_size, low=1, high=ABSURD)
        # Past a million replicates the 95% interval's third digit no longer moves.
        integer("bootstrap", self.bootstrap, low=0, high=10**6)
        integer("seed", self.seed, low=0, high=MAX_SEED)
        integer("sensitivity", self.sensitivity, low=0, high=ABSURD)
        number("outlier_factor", self.outlier_factor, low=0)
        boolean("mean_ablation", self.mean_ablation)
        boolean("downstream", self.downstream)
        boolean("keep_error", self.keep_error)
        if self.sensitivity == 1:
            raise BadValueError("EvalConfig.sensitivity=1: the sensitivity compares blow-up "
                                "distributions; expected 0 (off) or at least 2 bases")
        if self.skip_contexts is not None:
            integer("skip_contexts", self.skip_contexts, low=0, high=ABSURD)
        if self.keep_error and not self.downstream:
            raise BadValueError("EvalConfig.keep_error=True checks the spliced forward; it "
                                "needs downstream=True")

    def to_json(self) -> dict:
        out = asdict(self)
        out["corpus"] = self.corpus.name if isinstance(self.corpus, Corpus) else str(self.corpus)
        return out


def evaluate(lm, sae, config: EvalConfig | None = None, *, out: str | os.PathLike | None = None,
             on_progress: Callable[[int, int], None] | None = None, sae_path: str | None = None,
             on_sensitivity: Callable[[int, int], None] | None = None, notes: Sequence[str] = (),
             **settings: Any) -> dict:
    """Evaluate `sae` on `lm`; return the eval.json dict and, with `out`, write the files.

    notes: the caller's notes (e.g. a site other than the SAE's), put first in "notes".

    lm: a loaded LM or a model name / path (loaded in float32). sae: an SAE or a path
    `load_sae` reads (loaded in float32, recorded as `sae_path`). settings: EvalConfig fields (tokens, corpus, context, batch_size, bootstrap,
    mean_ablation, ...) when no config is given. on_progress(done, total) counts
    token positions after each batch; on_sensitivity(done, total) the sensitivity's bases.
    """
    cfg = config if config is not None else EvalConfig(**settings)
    if config is not None and settings:
        raise TypeError("pass either an EvalConfig or keyword settings, not both")
    started = time.perf_counter()
    if isinstance(lm, str | os.PathLike):
        from saelab.models.load import load_model

        lm = load_model(str(lm), dtype="float32")
    if isinstance(sae, str | os.PathLike):
        from saelab.sae import load_sae

        sae_path, sae = str(sae), load_sae(sae, dtype="float32").to(lm.device)
    check_positions("context", cfg.context, lm_max_positions(lm), getattr(lm, "name", "the model"))
    site = next(iter(bind_saes(lm.arch, {cfg.site: sae} if cfg.site else sae)))
    corpus = cfg.corpus if isinstance(cfg.corpus, Corpus) else load_corpus(cfg.corpus)
    notes = [*notes, *_precision_notes(lm, sae)]
    skip, held_out = ((cfg.skip_contexts, {"held_out": "given", "note": "skip_contexts given"})
                      if cfg.skip_contexts is not None
                      else held_out_skip(sae.cfg, corpus, lm.tokenizer, cfg.context))
    if held_out["held_out"] in ("no", "unknown"):
        notes.append(held_out["note"])
    n_ctx = math.ceil(cfg.tokens / cfg.context)

    def batches():
        return pack(corpus, lm.tokenizer, cfg.context, batch_size=cfg.batch_size,
                    n_tokens=(skip + n_ctx) * cfg.context, skip=skip)

    was_training = sae.training
    sae.eval()  # BatchTopK picks its batch-level top-k in training mode, a threshold in eval
    try:
        mean = ds.site_mean(lm, site, batches()) if cfg.mean_ablation and cfg.downstream else None
        stats, acc = ContextStats(), rc.ReconAccumulator(sae.cfg.d_sae)
        n_sinks = 0
        for ids, special in batches():
            res = ds.forward_batch(lm, sae, site, ids, special, downstream=cfg.downstream,
                                   mean=mean, keep_error=cfg.keep_error)
            keep = ~special.to(res.x.device)
            sinks = norm_outliers(res.x, keep, cfg.outlier_factor) & keep
            n_sinks += int(sinks.sum())
            stats.add(acc.update(res.x, res.x_hat, res.feats, keep & ~sinks)
                      | res.columns)
            if on_progress:
                on_progress(stats.n_contexts * cfg.context, n_ctx * cfg.context)
    finally:
        sae.train(was_training)
    if stats.n_contexts == 0 or acc.n_tokens == 0:
        raise SaelabError(f"corpus {corpus.name!r} holds no evaluation text after skipping "
                          f"{skip} contexts; pass a smaller skip_contexts (--skip-contexts) or "
                          "a larger corpus.")
    if stats.n_contexts < n_ctx:
        notes.append(f"the corpus ran out: {stats.n_contexts} contexts evaluated of {n_ctx} asked.")
    if stats.n_contexts < 20:
        notes.append(f"only {stats.n_contexts} contexts: the bootstrap intervals are rough.")

    if n_sinks:
        notes.append(f"{n_sinks} attention-sink token(s) (norm > {cfg.outlier_factor:g}x the "
                     "batch median) left out of the reconstruction metrics; see "
                     "saelab/data/outliers.py.")
    features = acc.features()
    result = _assemble(cfg, lm, sae, site, corpus, skip, held_out, stats, features, notes)
    if cfg.sensitivity:
        from saelab.evals.sensitivity import DEFINITION, sensitivity

        # Windows of held-out text too: past the contexts skipped above (each holds
        # context - 1 text tokens after its BOS, or context without one).
        text = skip * (cfg.context - int(context_bos_id(lm.tokenizer) is not None))
        result["sensitivity"] = _json_safe(sensitivity(
            lm, sae, site, n=cfg.sensitivity, corpus=corpus, seed=cfg.seed, skip_text_tokens=text,
            on_progress=on_sensitivity))
        result["definitions"]["sensitivity"] = DEFINITION
    result["sae"]["path"] = sae_path
    result["wall_time_s"] = round(time.perf_counter() - started, 3)
    if out is not None:
        write_outputs(result, features, out)
    return result


def _metric_fn(s):
    return rc.recon_metrics(s) | ds.downstream_metrics(s)


def _assemble(cfg: EvalConfig, lm, sae, site: str, corpus: Corpus, skip: int, held_out: dict,
              stats: ContextStats, features: rc.FeatureSummary, notes: list[str]) -> dict:
    point = _metric_fn(stats.sums())
    ci = bootstrap_ci(stats, _metric_fn, n_boot=cfg.bootstrap, seed=cfg.seed)
    metrics = {k: {"value": _float(v), "ci95": list(ci[k]) if ci.get(k) else None}
               for k, v in point.items()}
    sums = stats.sums()
    data = {"corpus": corpus.name, "corpus_hash": corpus.sha256, "context": cfg.context,
            "skip_contexts": skip, "n_contexts": stats.n_contexts,
            "tokens_evaluated": int(sums["n"]),
            "prediction_positions": int(sums["n_pred"]) if "n_pred" in sums else None,
            **{f"held_out{'' if k == 'held_out' else '_' + k}": v for k, v in held_out.items()}}
    result = {
        "schema": SCHEMA,
        "sae": {"architecture": sae.cfg.architecture, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
                "k": sae.cfg.k, "dtype": sae.cfg.dtype, "site": site,
                "trained_site": sae.cfg.site, "model_name": sae.cfg.model_name},
        "model": lm.provenance(),
        "data": data,
        "settings": cfg.to_json(),
        "metrics": metrics,
        "features": features.to_json(),
        "bootstrap": {"unit": "context", "n": cfg.bootstrap if stats.n_contexts > 1 else 0,
                      "seed": cfg.seed, "level": 0.95, "method": "percentile",
                      "n_contexts": stats.n_contexts, "method_text": BOOTSTRAP_TEXT},
        "definitions": {**rc.DEFINITIONS, **(ds.DEFINITIONS if cfg.downstream else {})},
        "notes": notes,
        "versions": _versions(),
    }
    return _json_safe(result)


def held_out_skip(sae_cfg, corpus: Corpus, tokenizer, context: int) -> tuple[int, dict]:
    """Contexts (of length `context`) to skip so that evaluation starts after the SAE's training text.

    Known only for SAEs that `saelab train` trained on this corpus. Its SAEs record
    `corpus_contexts`, the contexts their run read from the corpus (streaming reads
    ahead into its shuffling buffer); older ones are replayed: their harvest stopped
    after the batch of HARVEST_BATCH contexts in which its non-special tokens reached
    the training token count, plus a margin of four batches. The span is converted to
    contexts of the evaluation's length (tokenizing, no model).
    """
    meta = sae_cfg.metadata
    trained = (meta.get("train_config") or {}).get("tokens")
    if not meta.get("corpus_hash") or not trained:
        return 0, {"held_out": "unknown", "note": "the SAE records no training corpus and token "
                   "count; evaluated from the start of the corpus (set skip_contexts for held-out text)."}
    if meta["corpus_hash"] != corpus.sha256:
        return 0, {"held_out": "yes", "note": "the SAE was trained on another corpus."}
    train_ctx = int(meta.get("context_size") or context)
    # Recorded by the trainer: the contexts its stream (or its cache's harvest) read, the
    # shuffling buffer's read-ahead included. Older SAEs: replay the harvest's count.
    read = meta.get("corpus_contexts")
    read = read if isinstance(read, int) and not isinstance(read, bool) and read > 0 else None
    n_train, seen = 0, 0
    for ids, special in pack(corpus, tokenizer, train_ctx, batch_size=HARVEST_BATCH):
        n_train += len(ids)
        seen += int((~special).sum())
        if (n_train >= read) if read else (seen >= trained):
            break
    else:
        return 0, {"held_out": "no", "note": f"the SAE was trained on all of corpus {corpus.name!r}"
                   " (no held-out text is left): these numbers are on training text."}
    bos = int(context_bos_id(tokenizer) is not None)
    margin = 0 if read else 4 * HARVEST_BATCH
    span = (n_train + margin) * (train_ctx - bos)  # stream tokens read by the training run
    skip = math.ceil(span / (context - bos))
    return skip, {"held_out": "yes", "note": f"skipped the first {skip} contexts, past the "
                  f"{trained:,} tokens the SAE was trained on."}


def write_outputs(result: dict, features: rc.FeatureSummary, out: str | os.PathLike) -> dict:
    """eval.json, feature_density.npy and report.html in `out`, switched in together."""
    from saelab.atomic import disk_full, write_folder
    from saelab.report.evals import render_eval  # report/ renders JSON; imported only when writing
    from saelab.report.html import write_page

    def write(tmp: Path) -> None:  # the three files are one result: switched in together
        with open(tmp / "feature_density.npy", "wb") as fh:
            np.save(fh, features.density.astype(np.float32), allow_pickle=False)
        atomic_write_text(tmp / "eval.json", json.dumps(result, indent=1) + "\n")
        write_page(tmp / "report.html", render_eval(result))

    out = Path(out)
    with disk_full(out, "the previous results there, if any, are unchanged"):
        write_folder(out, ("eval.json", "report.html", "feature_density.npy"), write)
    return {"eval": out / "eval.json", "report": out / "report.html",
            "density": out / "feature_density.npy"}


def _precision_notes(lm, sae) -> list[str]:
    notes = []
    if lm.dtype != torch.float32:
        notes.append(f"the model runs in {lm.dtype}: ΔCE compares differences near 1e-3 nats, "
                     "which bf16/fp16 rounding alone can reach; load it with dtype='float32'.")
    if sae.cfg.dtype != "float32":
        notes.append(f"the SAE computes in {sae.cfg.dtype}; load it with dtype='float32' for "
                     "exact reconstruction metrics.")
    if sae.cfg.model_name and sae.cfg.model_name != lm.name:
        notes.append(f"the SAE was trained on model {sae.cfg.model_name!r}, evaluated on {lm.name!r}.")
    return notes


def _float(value) -> float | None:
    value = float(np.asarray(value))
    return value if math.isfinite(value) else None


def _json_safe(obj):
    """NaN/inf become null (JSON has no NaN), numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _versions() -> dict:
    import transformers

    import saelab

    return {"saelab": saelab.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "metrics": SCHEMA}
