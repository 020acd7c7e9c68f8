"""A scope's cost: N SAEs from one forward vs N separate training runs, and the quick
preset's time by stage, extrapolated to all 30 layers of the embedded model.

    .venv/bin/python bench/scope.py [--layers 0,10,20,29] [--tokens 16384] [--skip-separate]

1. Training throughput. The SAEs of the quick preset at the given layers (three site
   kinds each, batchtopk, width 2 x d_model, k 32) train on the same `--tokens`
   tokens (a) together, from one streaming forward per batch (what `saelab scope`
   does), and (b) one by one, each its own streaming run (what N separate
   `saelab train` runs do, less their model loading, which would only add to (b)).
   Printed: seconds and SAE-tokens/s of each, the ratio (b)/(a), and that ratio
   extrapolated to the quick preset's 90 SAEs from the measured cost of the forward
   alone (to the last layer) and of one SAE's steps (see `main`).
2. The quick preset at those layers with `--tokens` training tokens, by stage
   (`build_scope`, as `saelab scope --preset quick --layers ... --tokens ... --eval-tokens ...`).
3. Extrapolation to the quick preset itself (all 30 layers x 3 kinds = 90 SAEs,
   its token count): training = one full-depth forward per token (measured alone
   here) + 90 x the per-SAE step cost (from run 2); evaluation (also scaled to the
   preset's held-out tokens: its cost is linear in them), layout, dashboards
   and report scale with the number of SAEs (the layers are spread over the depth,
   so their spliced forwards are as long on average as the full set's).

Times are wall and CPU seconds of this process. On a shared machine the wall time
includes other jobs' load; the CPU seconds do not, so the extrapolated wall time on
an idle machine is given as CPU seconds / threads-speedup, with the speedup of two
threads over one assumed 1.7 (`--speedup`), not measured. The machine's matmul
rates (fp32, bf16) are printed beside. Writes bench/results/scope.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import matmul_rate, table, write  # noqa: E402
from saelab.scope.plan import PRESETS, ScopeConfig, plan_saes, preset_settings  # noqa: E402

MODEL = "smollm2-135m-instruct"


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def _train(lm, specs, tokens: int, folder: Path, batch: int):
    from saelab.train.config import TrainConfig
    from saelab.train.trainer import Stream, train

    cfg = TrainConfig(saes=tuple(specs), tokens=tokens, batch_size=batch, checkpoint_every=0,
                      buffer_tokens=max(2 * batch, min(PRESETS["quick"]["buffer_tokens"], tokens)))
    return train(cfg, Stream(lm), folder, device="cpu")


def forward_cost(lm, tokens: int) -> tuple[float, float]:
    """Wall and CPU seconds of the streaming forwards alone, to the last layer, over `tokens`."""
    from saelab.data.corpus import load_corpus
    from saelab.data.engine import forward_chunks, token_batches

    last = f"resid_post.{lm.arch.n_layers - 1}"
    corpus = load_corpus("builtin")

    def run():
        n = 0
        for chunk in forward_chunks(lm, [last], token_batches(corpus, lm.tokenizer, 128, 16),
                                    torch.bfloat16):
            n += chunk.ids.numel()
            if n >= tokens:
                return n
        return n

    n, wall, cpu = _timed(run)
    return wall * tokens / n, cpu * tokens / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="0,10,20,29")
    ap.add_argument("--tokens", type=int, default=16_384)
    ap.add_argument("--eval-tokens", type=int, default=1024,
                    help="held-out tokens of run 2's evaluation (scaled to the preset's)")
    ap.add_argument("--speedup", type=float, default=1.7,
                    help="assumed speed-up of 2 threads over 1 on an idle machine")
    ap.add_argument("--skip-separate", action="store_true")
    ap.add_argument("--skip-quick", action="store_true")
    args = ap.parse_args()
    from saelab.models.load import load_model
    from saelab.scope.run import build_scope

    layers = tuple(int(v) for v in args.layers.split(","))
    lm32 = load_model(MODEL, dtype="float32")
    lm = load_model(MODEL, dtype="auto")
    quick = {**preset_settings("quick", lm.arch.d_model), "layers": layers, "tokens": args.tokens,
             "eval_tokens": args.eval_tokens}
    cfg = ScopeConfig(model=MODEL, **quick)
    specs = [p.spec for p in plan_saes(cfg, lm.arch)]
    n = len(specs)
    rates = {"float32": matmul_rate(torch.float32) / 1e9, "bfloat16": matmul_rate(torch.bfloat16) / 1e9}
    print(f"matmul GFLOP/s ({torch.get_num_threads()} threads): "
          + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()))
    result: dict = {"layers": layers, "tokens": args.tokens, "n_saes": n, "matmul_gflops": rates}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        _, w, c = _timed(lambda: _train(lm, specs, args.tokens, tmp / "together", cfg.batch_size))
        rows.append({"mode": f"{n} SAEs, one forward", "wall_s": w, "cpu_s": c,
                     "sae_tok_per_cpu_s": n * args.tokens / c})
        result["together"] = {"wall_s": w, "cpu_s": c}
        if not args.skip_separate:
            ws = cs = 0.0
            for i, spec in enumerate(specs):
                _, w1, c1 = _timed(lambda s=spec, i=i: _train(lm, [s], args.tokens,
                                                             tmp / f"sep{i}", cfg.batch_size))
                ws, cs = ws + w1, cs + c1
            rows.append({"mode": f"{n} separate runs", "wall_s": ws, "cpu_s": cs,
                         "sae_tok_per_cpu_s": n * args.tokens / cs})
            result["separate"] = {"wall_s": ws, "cpu_s": cs}
            result["ratio_cpu"] = cs / result["together"]["cpu_s"]
            result["ratio_wall"] = ws / result["together"]["wall_s"]
        print(table(rows, ["mode", "wall_s", "cpu_s", "sae_tok_per_cpu_s"]))
        if "ratio_cpu" in result:
            print(f"one forward vs separate runs, {n} SAEs: {result['ratio_cpu']:.1f}x (CPU "
                  f"time), {result['ratio_wall']:.1f}x (wall)")
        fw, fc = forward_cost(lm, args.tokens)
        # Extrapolated to the quick preset's 90 SAEs: a separate run forwards to its own
        # site (depth (L+1)/n_layers of the full forward) and takes one SAE's steps; the
        # scope forwards once to the last layer and takes all 90 SAEs' steps.
        n_layers = lm.arch.n_layers
        step = max(result["together"]["cpu_s"] - fc, 0.0) / n  # one SAE's steps, CPU s
        sep90 = sum(3 * (fc * (layer + 1) / n_layers + step) for layer in range(n_layers))
        one90 = fc + 3 * n_layers * step
        result |= {"forward_cpu_s": fc, "forward_wall_s": fw, "sae_steps_cpu_s": step,
                   "ratio_90_estimate": sep90 / one90}
        print(f"forward alone to layer {n_layers - 1}: {fc:.1f} CPU s; one SAE's steps: "
              f"{step:.2f} CPU s; extrapolated to 90 SAEs: {sep90 / one90:.1f}x")
        if args.skip_quick:
            return print(f"wrote {write('scope', result)}")
        scope = build_scope(cfg, tmp / "scope", lm=lm32, fast_lm=lm)
        stages, cpu = scope.stages, _cpu_seconds(scope)
    full_n = 3 * lm.arch.n_layers
    q_tokens = PRESETS["quick"]["tokens"]
    per_sae_train = max(cpu["train"] - fc, 0.0) / n  # CPU s per SAE over args.tokens
    est = {"train": (fc + full_n * per_sae_train) * q_tokens / args.tokens}
    for stage in ("eval", "layout", "features", "report"):
        est[stage] = cpu[stage] * full_n / n
    est["eval"] *= PRESETS["quick"]["eval_tokens"] / args.eval_tokens  # linear in tokens
    rows = [{"stage": s, "wall_s": stages[s], "cpu_s": cpu[s], "quick_cpu_s": est[s],
             "quick_wall_2thr_s": est[s] / args.speedup} for s in stages]
    total = sum(est.values())
    rows.append({"stage": "total", "wall_s": sum(stages.values()), "cpu_s": sum(cpu.values()),
                 "quick_cpu_s": total, "quick_wall_2thr_s": total / args.speedup})
    print(f"\nquick preset at layers {list(layers)} ({n} SAEs, {args.tokens:,} training tokens), "
          f"and extrapolated to {full_n} SAEs x {q_tokens:,} tokens; forward alone "
          f"{fc:.1f} CPU s over {args.tokens:,} tokens:")
    print(table(rows, ["stage", "wall_s", "cpu_s", "quick_cpu_s", "quick_wall_2thr_s"]))
    fvu = {e.site: round(e.metrics["fvu"], 3) for e in scope.scope.entries}
    print(f"FVU at {args.tokens:,} tokens: {fvu}")
    result |= {"stages_wall_s": stages, "stages_cpu_s": cpu, "quick_estimate_cpu_s": est,
               "quick_estimate_wall_s": {k: v / args.speedup for k, v in est.items()},
               "speedup_assumed": args.speedup, "fvu": fvu}
    print(f"wrote {write('scope', result)}")


def _cpu_seconds(scope) -> dict[str, float]:
    import json

    return json.loads((scope.out / "run.json").read_text())["cpu_seconds"]


if __name__ == "__main__":
    main()
