"""The synthetic-activation study's sweep: cached and batched, against re-running every step.

The full default sweep is 1000 bases x 4 target kinds x 100 steps at resid_pre.1 of
the embedded model (fp32). Timed on a subset of bases and extrapolated:

- saelab ``sweep``: the 9-token prefix once per base, its KV cache expanded to all
  400 (kind, step) rows, one batch of single-token forwards with the patched site;
- batched, no cache: the same rows as full 10-token sequences in one batch (what
  batching alone buys);
- naive: one forward of the full 10-token sequence per step (the target: saelab
  >= 5x faster than this).

Curves of the cached sweep are checked against the naive ones on the naive subset.

    .venv/bin/python -m bench.synthetic [--bases 20] [--naive-bases 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import table, write
from saelab.data.corpus import load_corpus
from saelab.models.hooks import capture, patch
from saelab.models.load import load_model
from saelab.sae import SAEConfig, build_sae
from saelab.studies.synthetic import KINDS, SyntheticConfig, schedule, sweep, sweep_naive
from saelab.studies.synthetic_targets import (
    Gaussian,
    latent_stats,
    make_targets,
    sample_windows,
    site_acts,
)

FULL_BASES = 1000


@torch.inference_mode()
def batched_no_cache(lm, site: str, windows, targets, coefs, max_rows: int) -> None:
    """All rows of a base as full sequences in one batch, the site patched at the last position."""
    final = f"resid_post.{lm.arch.n_layers - 1}"
    for b in range(len(windows)):
        k, s = torch.isfinite(coefs[b]).nonzero(as_tuple=True)
        for lo in range(0, len(k), max_rows):
            rk, rs = k[lo:lo + max_rows], s[lo:lo + max_rows]
            c, t = coefs[b, rk, rs].float(), targets[b, rk]

            def write_last(x, ctx, c=c, t=t):
                new = x.clone()
                new[:, -1] = x[:, -1] + c[:, None] * (t - x[:, -1])
                return new

            with patch(lm.model, {site: write_last}, arch=lm.arch), \
                    capture(lm.model, final, arch=lm.arch, stop_early=False) as cap:
                cap.run(input_ids=windows[b:b + 1].expand(len(rk), -1), logits_to_keep=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bases", type=int, default=FULL_BASES, help="bases timed (cached sweep)")
    parser.add_argument("--naive-bases", type=int, default=2, help="bases timed the naive way")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--site", default="resid_pre.1")
    parser.add_argument("--batch-rows", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model("smollm2-135m-instruct", dtype="float32")
    cfg = SyntheticConfig(n=max(args.bases, 2), steps=args.steps, stats_prompts=2048)
    windows = sample_windows(load_corpus("builtin"), lm.tokenizer, cfg.n + cfg.stats_prompts,
                             cfg.prompt_len, cfg.seed)
    acts = site_acts(lm, args.site, windows)
    bases, pool = acts[:cfg.n], acts[cfg.n:]
    # A random SAE: the targets' values do not change the cost of the sweep.
    sae = build_sae(SAEConfig("topk", lm.arch.d_model, 4608, k=32)).eval()
    stats = latent_stats(sae, pool)
    targets, _, _ = make_targets(sae, bases, stats, Gaussian.fit(pool), KINDS, cfg)
    coefs = schedule("relative", args.steps, (targets - bases[:, None]).norm(dim=-1))
    windows = windows[:cfg.n]
    rows_per_base = len(KINDS) * args.steps

    def timed(fn, n: int) -> tuple[float, object]:
        start = time.perf_counter()
        out = fn(n)
        return (time.perf_counter() - start) / n, out

    cached_s, _ = timed(lambda n: sweep(lm, args.site, windows[:n], targets[:n], coefs[:n],
                                        max_rows=args.batch_rows), args.bases)
    nb = min(args.naive_bases, args.bases)
    nocache_s, _ = timed(lambda n: batched_no_cache(lm, args.site, windows[:n], targets[:n],
                                                    coefs[:n], args.batch_rows), nb)
    naive_s, naive = timed(lambda n: sweep_naive(lm, args.site, windows[:n], targets[:n],
                                                 coefs[:n]), nb)
    check = sweep(lm, args.site, windows[:nb], targets[:nb], coefs[:nb], max_rows=args.batch_rows)
    diff = {m: float(np.nanmax(np.abs(getattr(check, m) - getattr(naive, m)))) for m in ("l2", "kl")}
    scale = float(np.nanmax(check.l2))

    rows = [{"method": name, "bases timed": n, "s per base": s, "rows/s": rows_per_base / s,
             "full sweep (min)": s * FULL_BASES / 60, "cached vs this": s / cached_s}
            for name, n, s in (("saelab sweep (prefix KV cache, batched)", args.bases, cached_s),
                               ("batched full sequences, no cache", nb, nocache_s),
                               ("naive: full sequence per step", nb, naive_s))]
    print(f"{FULL_BASES} bases x {len(KINDS)} kinds x {args.steps} steps at {args.site} of "
          f"smollm2-135m-instruct, fp32, {args.threads} thread(s); extrapolated from the bases "
          f"timed. cached vs naive max |diff|: L2 {diff['l2']:.2e} (curves up to {scale:.0f}), "
          f"KL {diff['kl']:.2e}")
    print(table(rows, ["method", "bases timed", "s per base", "rows/s", "full sweep (min)",
                       "cached vs this"]))
    print("wrote", write("synthetic", {
        "bases": args.bases, "naive_bases": nb, "full_bases": FULL_BASES, "steps": args.steps,
        "kinds": len(KINDS), "site": args.site, "batch_rows": args.batch_rows,
        "threads": args.threads, "max_abs_diff": diff, "l2_scale": scale,
        "speedup_vs_naive": naive_s / cached_s, "rows": rows}))


if __name__ == "__main__":
    main()
