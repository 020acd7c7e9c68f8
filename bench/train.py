"""TopK SAE training throughput and quality: saelab vs SAELens vs sparsify, side by side.

    .venv/bin/python bench/train.py [--steps 30] [--threads 0] [--bf16 speed]

Every method trains the same SAE (d_in 576 -> width 9216, TopK k = 32, batch 4096)
on the same activations in the same order for the same number of steps, each
with its own default recipe (learning rate, init, schedule; see the `recipe`
entries in the output). The activations are real: `resid_post.12` of the
embedded model, from a harvested cache (`--cache`, default
bench/results/acts_resid12; make it with
`saelab harvest --sites resid_post.12 --tokens 200000 --out bench/results/acts_resid12`),
special tokens and attention-sink outliers left out, shuffled with a fixed seed;
one batch is held out for evaluation. Without a cache the script falls back to
Gaussian data of the same shape and says so.

saelab runs in this process (`SAEObjective.train_step`, the trainer's per-step
call); SAELens and sparsify run in their bench-only venvs (bench/.venv-saelens,
bench/.venv-sparsify) as workers that train one step per command, so the
methods take turns step by step (A, B, C, A, B, C, ...) and load from other
processes on this shared machine falls on all of them alike. tokens/s is the
batch over the best step time after two warm-up steps (the median is reported
too). FVU is computed here, by one function, from each method's exported
weights on the held-out batch.

FLOP/s are useful FLOPs: a TopK training step needs the dense encoder product
(2·N·d_in·F) and four sparse products of k rows per token (decoder forward,
the decoder-weight gradient, the gradient of the k codes, the encoder-weight
gradient: 4 · 2·N·k·d_in); they are set against this machine's measured fp32
and bf16 matmul rates (bench.common.matmul_rate) at the same thread count.

`--bf16 speed` (default) times the bf16 variants for `--bf16-steps` steps only
(bf16 matmuls are emulated, hence slow, on CPUs without AMX/AVX512-BF16);
`--bf16 full` trains them for the whole budget too; `--bf16 off` skips them.
Writes bench/results/train.json (or NAME.json with --name).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import matmul_rate, table, write  # noqa: E402
from saelab.data.outliers import norm_outliers  # noqa: E402
from saelab.data.store import ActivationStore  # noqa: E402
from saelab.precision import resolve_dtype  # noqa: E402
from saelab.train.config import SAESpec, TrainConfig  # noqa: E402
from saelab.train.objective import SAEObjective  # noqa: E402

BENCH = ROOT / "bench"
VENVS = {"saelens": BENCH / ".venv-saelens", "sparsify": BENCH / ".venv-sparsify"}
LOSS_KIND = {"saelab": "FVU of the training batch", "sparsify": "FVU of the training batch",
             "saelens": "loss: MSE summed over d_in, batch mean (+ aux)"}
WARMUP_STEPS = 2  # steps left out of the timing (first-batch init, allocator warm-up)


# ---------------------------------------------------------------------- data
def load_activations(cache: Path, site: str, n_needed: int, seed: int) -> tuple[torch.Tensor, str]:
    """Rows of `site` from the cache (special tokens and sinks left out), shuffled."""
    store = ActivationStore(cache)
    rows = []
    for i in range(len(store.manifest.shards)):
        shard = store.load_shard(i)
        x = shard[site].reshape(-1, store.sites[site])[~shard["special"].reshape(-1)].float()
        rows.append(x[~norm_outliers(x, factor=10.0)])  # the trainer's default outlier_factor
    x = torch.cat(rows)
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))]
    note = f"{site} of {store.manifest.identity['model']}, {len(x):,} tokens"
    if len(x) < n_needed:
        note += f" (fewer than the {n_needed:,} needed: training batches repeat)"
    return x, note


def split(x: torch.Tensor, steps: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train [steps*batch, d], eval [batch, d]): the last batch is held out."""
    held, pool = x[-batch:], x[:-batch]
    reps = -(-steps * batch // len(pool))
    return pool.repeat(reps, 1)[:steps * batch].contiguous(), held.contiguous()


# ---------------------------------------------------------------------- quality
@torch.no_grad()
def evaluate(w: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> dict[str, float]:
    """FVU (total variance over the batch), L0 and unused latents of a TopK SAE given
    as W_enc [d, F], b_enc, W_dec [F, d], b_dec taking raw activations."""
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    vals, idx = pre.topk(k, dim=-1)
    vals = vals.relu()
    acts = torch.zeros_like(pre).scatter_(-1, idx, vals)
    x_hat = acts @ w["W_dec"] + w["b_dec"]
    fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    used = torch.zeros(pre.shape[1], dtype=torch.bool)
    used[idx[vals > 0]] = True
    return {"fvu": fvu.item(), "l0": (vals > 0).sum(-1).float().mean().item(),
            "unused_on_eval": 1 - used.float().mean().item()}


def step_flops(batch: int, d_in: int, width: int, k: int) -> float:
    return 2 * batch * d_in * width + 4 * 2 * batch * k * d_in


# ---------------------------------------------------------------------- methods
@dataclass
class Method:
    name: str
    peer: str
    precision: str
    steps: int
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # the method's own training loss per step
    info: dict = field(default_factory=dict)

    def step(self, i: int) -> float:
        raise NotImplementedError

    def weights(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SaelabMethod(Method):
    def __init__(self, name, precision, steps, train, batch, width, k, total_steps):
        super().__init__(name, "saelab", precision, steps)
        self.train, self.batch, self.total_steps = train, batch, total_steps
        spec = SAESpec(site="resid_post.12", arch="topk", width=width, k=k)
        self.cfg = TrainConfig(saes=(spec,), tokens=total_steps * batch, batch_size=batch,
                               dtype="bfloat16" if precision == "bf16" else "float32")
        self.obj = SAEObjective(spec, train.shape[1], self.cfg, resolve_dtype(self.cfg.dtype), {})
        warmup = min(self.cfg.warmup_steps, max(1, total_steps // 10))
        import saelab

        self.info = {"version": saelab.__version__, "torch": torch.__version__,
                     "threads": torch.get_num_threads(),
                     "recipe": {"lr": self.obj.lr, "betas": [0.9, self.cfg.beta2],
                                "warmup_steps": warmup, "decay_start": self.cfg.decay_start,
                                "schedule": "linear warm-up, constant, linear decay to 0",
                                "b_dec_init": self.cfg.b_dec_init,
                                "init": "unit-norm random W_dec, W_enc = W_dec^T",
                                "input_scaling": "unit mean squared norm (folded at export)",
                                "auxk_alpha": self.cfg.auxk_alpha,
                                "dead_tokens": self.cfg.dead_tokens,
                                "compute_dtype": self.cfg.dtype}}

    def step(self, i):
        x = self.train[i * self.batch:(i + 1) * self.batch]
        t0 = time.perf_counter()
        self.obj.train_step(x, self.total_steps)
        seconds = time.perf_counter() - t0  # a CPU step is done when it returns
        self.losses.append(self.obj.read_stats()["fvu"])  # this step's (read after timing)
        return seconds

    def weights(self):
        sae = self.obj.export({})
        return {n: getattr(sae, n).detach().float() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}


class WorkerMethod(Method):
    """A peer in its own venv, driven one step per command (see train_*_worker.py)."""

    def __init__(self, name, peer, precision, steps, job: dict, tmp: Path):
        super().__init__(name, peer, precision, steps)
        self.out = tmp / f"{name}.safetensors"
        job_path = tmp / f"{name}.json"
        job_path.write_text(json.dumps({**job, "out": str(self.out)}))
        python = VENVS[peer] / "bin" / "python"
        if not python.exists():
            raise FileNotFoundError(f"{python} is missing: create the bench-only venv "
                                    f"(see the module docstring of bench/train.py)")
        self.stderr = open(tmp / f"{name}.stderr", "w+")  # noqa: SIM115 (closed in close())
        env = {**os.environ, "SPARSIFY_DISABLE_TRITON": "1", "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen(
            [str(python), str(BENCH / f"train_{peer}_worker.py"), str(job_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            env=env)

    def _reply(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.stderr.seek(0)
                raise RuntimeError(f"{self.name} worker died:\n{self.stderr.read()[-3000:]}")
            if line.startswith("{"):
                return json.loads(line)

    def ready(self) -> None:
        self.info = self._reply()

    def _send(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def step(self, i):
        reply = self._send("step")
        self.losses.append(reply["loss"])
        return reply["seconds"]

    def weights(self):
        self._send("finish")
        return {n: t.float() for n, t in load_file(self.out).items()}

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()


# ---------------------------------------------------------------------- profile
def profile_saelab(train: torch.Tensor, batch: int, width: int, k: int, steps: int) -> dict:
    """Where one saelab fp32 step spends its time: torch.profiler, top-level ops grouped."""
    from torch.profiler import ProfilerActivity, profile

    method = SaelabMethod("profile", "fp32", steps, train, batch, width, k, steps)
    for i in range(3):
        method.step(i)
    reps = 3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for i in range(3, 3 + reps):
            method.step(i)
        wall = (time.perf_counter() - t0) / reps
    groups: dict[str, float] = {}
    for ev in prof.events():
        if ev.cpu_parent is not None:
            continue
        name = ev.name
        if name == "aten::addmm":
            g = "encoder matmul (dense, x @ W_enc)"
        elif name == "aten::topk":
            g = "top-k"
        elif "SparseEncodeGradBackward" in name:
            g = "backward: sparse W_enc/b_enc/b_dec grads"
        elif "SparseDecodeBackward" in name:
            g = "backward: sparse W_dec grad + code grads"
        elif "backward" in name.lower() or name.startswith("autograd::"):
            g = "backward: other (loss, bias)"
        elif name.startswith("Optimizer.step"):
            g = "Adam step"
        elif name.startswith("Optimizer.zero_grad"):
            g = "other"
        elif name in ("SparseEncodeGrad", "SparseDecode") or "sparse" in name \
                or name == "aten::index":  # the Functions' forwards are recorded by class name
            g = "forward: sparse decode + gather"
        else:
            g = "other (loss, stats, renorm, radial grad, bookkeeping)"
        groups[g] = groups.get(g, 0.0) + ev.cpu_time_total / 1e6 / reps
    return {"step_seconds": wall, "seconds": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "top_ops": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)}


# ---------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=BENCH / "results" / "acts_resid12")
    ap.add_argument("--site", default="resid_post.12")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--width", type=int, default=9216)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0,
                    help="threads per method; 0: 1 if the 1-minute load is above 2, else 2")
    ap.add_argument("--bf16", choices=("speed", "full", "off"), default="speed")
    ap.add_argument("--bf16-steps", type=int, default=2,
                    help="steps of each bf16 variant with --bf16 speed (SAELens' autocast "
                         "takes minutes per step on a CPU without bf16 units)")
    ap.add_argument("--methods", default="",
                    help="comma-separated subset of method names (default: all)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="print every step's time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="train", help="results file: bench/results/NAME.json")
    args = ap.parse_args()

    load_before = os.getloadavg()
    threads = args.threads or (1 if load_before[0] > 2 else 2)
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    n_needed = (args.steps + 1) * args.batch
    if (args.cache / "manifest.json").exists():
        x, data_note = load_activations(args.cache, args.site, n_needed, args.seed)
        data_kind = "real"
    else:
        print(f"NOTE: no activation cache at {args.cache}; using Gaussian data "
              "(harvest one for real activations, see the docstring)")
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(n_needed, 576, generator=g) * 3 + torch.randn(576, generator=g)
        data_kind, data_note = "gaussian", "random Gaussian, not model activations"
    train, held = split(x, args.steps, args.batch)
    d_in = train.shape[1]
    print(f"data: {data_note}; {args.steps} steps x {args.batch} = "
          f"{args.steps * args.batch:,} training tokens; {threads} thread(s) per method; "
          f"load {load_before[0]:.2f}")

    flops = step_flops(args.batch, d_in, args.width, args.k)
    rates = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}

    bf16_steps = {"speed": min(args.bf16_steps, args.steps), "full": args.steps}.get(args.bf16)
    specs = [("saelab", "saelab", "fp32"), ("saelab-bf16", "saelab", "bf16"),
             ("saelens", "saelens", "fp32"), ("saelens-autocast", "saelens", "bf16"),
             ("sparsify", "sparsify", "fp32"), ("sparsify-autocast", "sparsify", "bf16"),
             ("sparsify-signum", "sparsify", "fp32")]
    chosen = set(args.methods.split(",")) if args.methods else None
    specs = [s for s in specs if (chosen is None or s[0] in chosen)
             and not (s[2] == "bf16" and bf16_steps is None)]

    methods: list[Method] = []
    load_samples = [load_before[0]]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        save_file({"x": train}, str(tmp / "train.safetensors"))
        base_job = {"data": str(tmp / "train.safetensors"), "batch": args.batch,
                    "steps": args.steps, "width": args.width, "k": args.k,
                    "threads": threads, "seed": args.seed}
        try:
            for name, peer, prec in specs:
                steps = args.steps if prec == "fp32" else bf16_steps
                job = {**base_job, "autocast": prec == "bf16"}
                if peer == "saelab":
                    methods.append(SaelabMethod(name, prec, steps, train, args.batch,
                                                args.width, args.k, args.steps))
                    continue
                if peer == "sparsify":
                    # sparsify's 1000 warm-up steps would leave a 30-step run at ~3% of its
                    # LR: its warm-up is cut to a tenth of the run, as saelab's is.
                    job |= {"optimizer": "signum" if "signum" in name else "adam",
                            "warmup": min(1000, max(1, args.steps // 10)),
                            "auxk_alpha": 1 / 32}
                methods.append(WorkerMethod(name, peer, prec, steps, job, tmp))
            for m in methods:
                if isinstance(m, WorkerMethod):
                    m.ready()
            # take turns, one step each, rotating who goes first
            t_start = time.perf_counter()
            for i in range(args.steps):
                order = methods[i % len(methods):] + methods[:i % len(methods)]
                for m in order:
                    if i < m.steps:
                        m.times.append(m.step(i))
                        if args.verbose:
                            print(f"  {m.name} step {i}: {m.times[-1]:.3f} s", file=sys.stderr)
                load_samples.append(os.getloadavg()[0])
                print(f"\rstep {i + 1}/{args.steps}  load {load_samples[-1]:.2f}  "
                      f"{time.perf_counter() - t_start:.0f}s", end="", file=sys.stderr)
            print(file=sys.stderr)
            weights = {m.name: m.weights() for m in methods if m.steps == args.steps}
        finally:
            for m in methods:
                m.close()
    # best matmul rate over a measurement before and one after the race
    rates = {"fp32": max(rates["fp32"], matmul_rate(torch.float32)),
             "bf16": max(rates["bf16"], matmul_rate(torch.bfloat16))}

    rows = []
    for m in methods:
        timed = m.times[min(WARMUP_STEPS, len(m.times) - 1):]  # short bf16 runs: skip one
        best, med = min(timed), statistics.median(timed)
        quality = evaluate(weights[m.name], held, args.k) if m.name in weights else {}
        rows.append({"method": m.name, "precision": m.precision,
                     "tokens_per_s": args.batch / best, "tokens_per_s_median": args.batch / med,
                     "step_s_best": best, "step_s_median": med, "steps": m.steps,
                     "gflops": flops / best / 1e9, "pct_fp32_peak": 100 * flops / best / rates["fp32"],
                     "pct_bf16_peak": 100 * flops / best / rates["bf16"], **quality,
                     "train_loss": m.losses, "train_loss_kind": LOSS_KIND[m.peer],
                     "info": m.info})
    ref = next((r["tokens_per_s"] for r in rows if r["method"] == "saelab"), None)
    for r in rows:
        r["ratio_vs_saelab"] = r["tokens_per_s"] / ref if ref else None
    shown = [{"method": r["method"], "tok/s": r["tokens_per_s"],
              "tok/s med": r["tokens_per_s_median"],
              "vs saelab": f"{r['ratio_vs_saelab']:.2f}x" if ref else "",
              "FVU": r.get("fvu", "n/a (speed only)"), "L0": r.get("l0"),
              "GFLOP/s": r["gflops"], "% fp32 peak": r["pct_fp32_peak"],
              "% bf16 peak": r["pct_bf16_peak"]} for r in rows]
    print(table(shown, list(shown[0])))
    ceiling = rates["fp32"] / (2 * d_in * args.width)
    print(f"matmul rate ({threads} thread(s)): fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {rates['bf16'] / 1e9:.0f} GFLOP/s; useful FLOPs/step {flops / 1e9:.1f} G; "
          f"encoder-bound ceiling at the fp32 rate: {ceiling:,.0f} tokens/s")
    print(f"load (1-min) during the run: min {min(load_samples):.2f}, "
          f"max {max(load_samples):.2f}, mean {statistics.mean(load_samples):.2f}")
    for r in rows:
        print(f"  {r['method']}: {json.dumps(r['info'].get('recipe', {}))}")

    prof = None
    if not args.no_profile:
        prof = profile_saelab(train, args.batch, args.width, args.k, args.steps)
        print(f"saelab fp32 step, profiled ({prof['step_seconds']:.3f} s wall):")
        for g, s in prof["seconds"].items():
            print(f"  {g:<55} {s:6.3f} s  {100 * s / prof['step_seconds']:5.1f}%")

    path = write(args.name, {
        "shape": {"batch": args.batch, "d_in": d_in, "width": args.width, "k": args.k},
        "steps": args.steps, "tokens": args.steps * args.batch, "data": data_kind,
        "data_note": data_note, "threads": threads, "load_1min": load_samples,
        "matmul_gflops": {k: v / 1e9 for k, v in rates.items()},
        "useful_gflop_per_step": flops / 1e9, "encoder_bound_tokens_per_s_fp32": ceiling,
        "timing": f"best (and median) step after {WARMUP_STEPS} warm-up steps, methods "
                  "interleaved step by step",
        "rows": rows,
        "profile_saelab_fp32": {k: v for k, v in (prof or {}).items() if k != "top_ops"} or None,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
