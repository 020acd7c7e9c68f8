"""Held-out FVU of a top-k-family SAE after a CPU-scale run, at several learning rates.

    .venv/bin/python -m bench.lr_sweep --cache runs/issue4/cache --arch batchtopk \
        --width 4608 --steps 450 --mult 1,8,16,32

The evidence behind saelab's default learning rate for TopK/BatchTopK (8 x Gao et
al.'s 2e-4/sqrt(width/2^14), see saelab.train.objective.default_lr): each multiple
of that law trains the same SAE on the same shuffled activations of a harvested
cache (`saelab harvest` or the cache `saelab train --model` leaves in OUT/cache) for
--steps batches of 4096, then FVU, L0 and unused latents are measured on the
last 8192 tokens, which training never sees. Writes bench/results/lr_sweep.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write  # noqa: E402
from bench.train import evaluate, load_activations  # noqa: E402
from saelab.precision import resolve_dtype  # noqa: E402
from saelab.train.config import SAESpec, TrainConfig  # noqa: E402
from saelab.train.objective import SAEObjective, default_lr  # noqa: E402

BATCH, HELD_OUT = 4096, 8192


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--site", default="resid_post.12")
    ap.add_argument("--arch", choices=("topk", "batchtopk"), default="batchtopk")
    ap.add_argument("--width", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--mult", default="1,8,16,32", help="multiples of Gao et al.'s learning rate")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    x, note = load_activations(args.cache, args.site, args.steps * BATCH + HELD_OUT, args.seed)
    held, train = x[-HELD_OUT:], x[:-HELD_OUT]
    if len(train) < args.steps * BATCH:
        raise SystemExit(f"{note}: fewer than the {args.steps * BATCH + HELD_OUT:,} tokens needed")
    spec = SAESpec(site=args.site, arch=args.arch, width=args.width, k=args.k)
    gao = default_lr(spec) / 8  # the law itself; saelab's default is 8x it
    rows = []
    for mult in (float(m) for m in args.mult.split(",")):
        cfg = TrainConfig(saes=(spec,), tokens=args.steps * BATCH, batch_size=BATCH,
                          dtype=args.dtype, lr=mult * gao, seed=args.seed)
        obj = SAEObjective(spec, train.shape[1], cfg, resolve_dtype(cfg.dtype), {})
        t0 = time.perf_counter()
        for i in range(args.steps):
            obj.train_step(train[i * BATCH:(i + 1) * BATCH], args.steps)
        sae = obj.export({})
        weights = {n: getattr(sae, n).detach().float() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        row = {"mult": mult, "lr": obj.lr, **evaluate(weights, held, args.k),
               "dead": obj.dead_fraction(), "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"x{mult:g}  lr {row['lr']:.2e}  held-out FVU {row['fvu']:.3f}  L0 {row['l0']:.1f}  "
              f"dead {row['dead']:.2%}  unused on held-out {row['unused_on_eval']:.1%}  "
              f"{row['seconds']:.0f}s", flush=True)
    path = write("lr_sweep", {"data": note, "arch": args.arch, "width": args.width, "k": args.k,
                              "steps": args.steps, "tokens": args.steps * BATCH, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
