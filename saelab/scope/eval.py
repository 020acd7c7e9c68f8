"""Evaluate every SAE of a scope in one pass over held-out text.

Per batch of contexts:
- one clean forward records every site of the scope, the input of every block an
  SAE sits in, and the logits (their log-probabilities are shared by all SAEs);
- per site, one zero-ablated forward (shared by the SAEs at that site);
- per SAE, one spliced forward (x̂ in place of x, no error term).
The ablated and spliced forwards start at the site's block (see tail.py), so the
cost of an SAE's downstream metrics is the part of the model after its site.

The sums kept per context, the metric definitions and the bootstrap are those of
`saelab eval` (evals/run.py, downstream.py, reconstruction.py): same tokens, same
held-out start, same seed give the same numbers as separate `saelab eval` runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from saelab.data.corpus import Corpus, load_corpus
from saelab.data.outliers import norm_outliers
from saelab.data.tokens import pack
from saelab.errors import SaelabError
from saelab.evals import downstream as ds
from saelab.evals import reconstruction as rc
from saelab.evals.bootstrap import ContextStats
from saelab.evals.run import EvalConfig, _assemble, _precision_notes, held_out_skip
from saelab.models.hooks import capture
from saelab.models.sites import Site
from saelab.scope.tail import block_list, tail_logits


def _held_out(saes: Mapping[str, Any], corpus: Corpus, lm: Any, cfg: EvalConfig
              ) -> tuple[int, dict]:
    """One held-out start for all SAEs: past the training text of every one of them."""
    if cfg.skip_contexts is not None:
        return cfg.skip_contexts, {"held_out": "given", "note": "skip_contexts given"}
    seen: dict[str, tuple[int, dict]] = {}
    for sae in saes.values():  # SAEs of one training run share their provenance: once each
        meta = sae.cfg.metadata
        key = repr((meta.get("corpus_hash"), meta.get("corpus_contexts"),
                    (meta.get("train_config") or {}).get("tokens"), meta.get("context_size")))
        if key not in seen:
            seen[key] = held_out_skip(sae.cfg, corpus, lm.tokenizer, cfg.context)
    return max(seen.values(), key=lambda s: s[0])


@dataclass
class _Clean:
    """One batch's clean forward: ids (B, P), acts {site: (B, P, d)} (block inputs
    included), next-token log-probs (B, P-1, V), prediction mask (B, P-1), positions to
    replace (B, P, 1), and whether a block returns a tuple."""

    ids: torch.Tensor
    acts: dict[str, torch.Tensor]
    logp: torch.Tensor
    pred: torch.Tensor
    keep: torch.Tensor
    tuple_output: bool


def _spliced(lm: Any, clean: _Clean, site: str, value: torch.Tensor, name: str) -> dict:
    """Per-context sums ce_<name>, kl_<name> of the forward with `value` at `site` (only at
    non-special positions), run from the site's block on; as downstream.forward_batch."""
    x = clean.acts[site]
    layer = Site.parse(site).layer
    r = torch.where(clean.keep, value, x)
    logits = tail_logits(lm, clean.ids, layer, clean.acts[f"resid_pre.{layer}"],
                         {site: lambda _a, _c: r}, clean.tuple_output)
    logp = ds.next_token_logp(logits)
    del logits
    ce = ds.next_token_ce(logp, clean.ids)
    kl = F.kl_div(logp, clean.logp, log_target=True, reduction="none").sum(-1)
    return {f"ce_{name}": (ce.double() * clean.pred).sum(1),
            f"kl_{name}": (kl.double() * clean.pred).sum(1)}


@torch.inference_mode()
def evaluate_scope(lm: Any, saes: Mapping[str, Any], cfg: EvalConfig, *,
                   on_progress: Callable[[int, int], None] | None = None) -> dict[str, dict]:
    """{label: the eval.json dict `saelab eval` would write} for every SAE in `saes`.

    saes: {label: SAE} on lm's device, each with its site in cfg.metadata["site"].
    Raises SaelabError when the corpus has no text left after the held-out start.
    """
    started = time.perf_counter()
    corpus = cfg.corpus if isinstance(cfg.corpus, Corpus) else load_corpus(cfg.corpus)
    sites = {label: Site.parse(sae.cfg.site).name for label, sae in saes.items()}
    layers = sorted({Site.parse(s).layer for s in sites.values()})
    skip, held_out = _held_out(saes, corpus, lm, cfg)
    n_ctx = math.ceil(cfg.tokens / cfg.context)
    batches = pack(corpus, lm.tokenizer, cfg.context, batch_size=cfg.batch_size,
                   n_tokens=(skip + n_ctx) * cfg.context, skip=skip)
    stats = {label: ContextStats() for label in saes}
    accs = {label: rc.ReconAccumulator(sae.cfg.d_sae) for label, sae in saes.items()}
    sinks = dict.fromkeys(saes, 0)
    inputs = [f"resid_pre.{layer}" for layer in layers]
    for sae in saes.values():
        sae.eval()
    # Does a block return a tensor or a tuple? Seen once on the first clean forward.
    shape: dict[str, bool] = {}

    def seen(_m: Any, _a: Any, output: Any) -> None:  # returns None: the output is kept
        shape.setdefault("tuple", isinstance(output, tuple))

    hook = block_list(lm)[0].register_forward_hook(seen)
    n_done = 0
    try:
        for ids, special in batches:
            ids_d, special_d = ids.to(lm.device), special.to(lm.device)
            with capture(lm.model, sorted(set(sites.values()) | set(inputs)), arch=lm.arch,
                         stop_early=False) as cap:
                cap.run(input_ids=ids_d)
            acts = dict(cap.acts)
            clean_logp = ds.next_token_logp(cap.output.logits)
            cap.output = None
            pred = ds.prediction_mask(special_d).double()
            keep = ~special_d[..., None]
            shared = {"n_pred": pred.sum(1),
                      "ce_clean": (ds.next_token_ce(clean_logp, ids_d) * pred).sum(1)}
            clean = _Clean(ids_d, acts, clean_logp, pred, keep, shape.get("tuple", False))

            zero = {site: _spliced(lm, clean, site, torch.zeros_like(acts[site]), "zero")
                    for site in sorted(set(sites.values()))}
            for label, sae in saes.items():
                site = sites[label]
                x = acts[site]
                x_hat, feats = ds.reconstruct(sae, x)
                cols = {**shared, **zero[site], **_spliced(lm, clean, site, x_hat, "sae")}
                mask = ~special_d
                out = norm_outliers(x, mask, cfg.outlier_factor) & mask
                sinks[label] += int(out.sum())
                stats[label].add(accs[label].update(x, x_hat, feats, mask & ~out)
                                 | {k: v.cpu() for k, v in cols.items()})
            n_done += len(ids)
            if on_progress:
                on_progress(n_done * cfg.context, n_ctx * cfg.context)
    finally:
        hook.remove()
    results = {}
    for label, sae in saes.items():
        s = stats[label]
        if s.n_contexts == 0 or accs[label].n_tokens == 0:
            raise SaelabError(f"corpus {corpus.name!r} holds no evaluation text after skipping "
                              f"{skip} contexts; evaluate on fewer tokens or a larger corpus.")
        notes = list(_precision_notes(lm, sae))
        if held_out["held_out"] in ("no", "unknown"):
            notes.append(held_out["note"])
        if s.n_contexts < n_ctx:
            notes.append(f"the corpus ran out: {s.n_contexts} contexts evaluated of {n_ctx} asked.")
        if s.n_contexts < 20:
            notes.append(f"only {s.n_contexts} contexts: the bootstrap intervals are rough.")
        if sinks[label]:
            notes.append(f"{sinks[label]} attention-sink token(s) (norm > {cfg.outlier_factor:g}x "
                         "the batch median) left out of the reconstruction metrics.")
        result = _assemble(cfg, lm, sae, sites[label], corpus, skip, held_out, s,
                           accs[label].features(), notes)
        result["wall_time_s"] = round(time.perf_counter() - started, 3)
        results[label] = result
    return results
