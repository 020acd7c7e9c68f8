"""TopK SAE training on a device: saelab against sparsify on the same batches; and end to end.

    python -m bench.gpu_train --device cuda                  # the three shapes below
    python -m bench.gpu_train --device cpu --shapes tiny     # the smoke test (tests/)
    python -m bench.gpu_train --stream --device cuda         # 30 resid_post SAEs, streaming
    python -m bench.gpu_train --stream --compare-harvest --sites resid_post.6,resid_post.12 \\
        --tokens 100000 --device cpu                         # streaming vs harvest-then-train

Kernel rows (`--shapes default`): 576->9216 k32 batch 4096, 2304->16384 k64 batch 8192,
2304->65536 k64 batch 8192. Each method trains the same TopK SAE on the same
synthetic batches (a sparse random dictionary: each row mixes k/2 of 8·d_in unit
directions, so an SAE can learn it; written once to a file both read), for
`--steps` steps after `--warmup` untimed ones; tokens/s is the batch over the
median (and best) step time, each step timed between two device
synchronisations (the sync is the benchmark's, not the trainer's). Held-out FVU
is computed here, by one function, from each method's exported weights on a
held-out batch.

saelab: `SAEObjective.train_step` on the device, compute dtype `--dtype` (bf16
by default on CUDA), fp32 master weights, its own recipe (Adam, lr 8·2e-4/sqrt(F/2^14)),
sparse kernels `--kernel` (auto: on CUDA both paths are timed on the shape and the
faster kept, as `saelab train` does; the row records both times).
sparsify: its `SparseCoder` with its Triton decoder on CUDA, bf16 autocast on
CUDA, Adam at its 2e-4/sqrt(F/2^14) with linear warm-up/decay (or its default
signum with `--sparsify-optimizer signum`), run by bench/gpu_train_sparsify_worker.py
in bench/.venv-sparsify (skipped, and said so, when that venv is absent).

`--stream`: `saelab.train.trainer.train` streaming `--model` over `--corpus`
with one TopK/BatchTopK SAE per site of `--sites` (default every resid_post of
the embedded model: 30 SAEs of width 4608, k 32), reporting end-to-end tokens/s
and the site groups; `--compare-harvest` also times harvest-then-train of the
same SAEs on the same tokens. Results: bench/results/NAME.json (`--name`) or `--out`.
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
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine, table  # noqa: E402
from saelab.train.config import SAESpec, TrainConfig  # noqa: E402
from saelab.train.kernels import choose_kernel  # noqa: E402
from saelab.train.objective import SAEObjective  # noqa: E402

SPARSIFY_PYTHON = ROOT / "bench" / ".venv-sparsify" / "bin" / "python"
SHAPES = {  # (d_in, width, k, batch)
    "default": [(576, 9216, 32, 4096), (2304, 16384, 64, 8192), (2304, 65536, 64, 8192)],
    "tiny": [(32, 256, 8, 512), (48, 384, 8, 256)],
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def make_data(n: int, d: int, k: int, seed: int, device: torch.device) -> torch.Tensor:
    """[n, d] rows, each a positive mix of k/2 of 8·d random unit directions."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dictionary = torch.randn(8 * d, d, generator=gen, device=device)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    active = max(1, k // 2)
    out = torch.empty(n, d, device=device)
    for start in range(0, n, 4096):  # chunks bound the [m, active, d] gather
        m = min(4096, n - start)
        idx = torch.randint(len(dictionary), (m, active), generator=gen, device=device)
        vals = torch.rand(m, active, 1, generator=gen, device=device) * 2 + 0.5
        out[start:start + m] = (dictionary[idx] * vals).sum(1)
    return out


@torch.no_grad()
def heldout_fvu(w: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> dict[str, float]:
    """FVU and L0 of a TopK SAE (W_enc [d, F], b_enc, W_dec [F, d], b_dec, raw inputs)."""
    w = {n: t.to(x.device, torch.float32) for n, t in w.items()}
    sq, total, l0 = 0.0, (x - x.mean(0)).pow(2).sum().item(), 0.0
    for start in range(0, len(x), 1024):
        xb = x[start:start + 1024]
        vals, idx = ((xb - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).topk(k, dim=-1)
        vals = vals.relu()
        x_hat = torch.nn.functional.embedding_bag(idx, w["W_dec"], per_sample_weights=vals,
                                                  mode="sum") + w["b_dec"]
        sq += (xb - x_hat).pow(2).sum().item()
        l0 += (vals > 0).sum().item()
    return {"fvu": sq / total, "l0": l0 / len(x)}


def rates(times: list[float], batch: int) -> dict:
    return {"tokens_per_s_median": batch / statistics.median(times),
            "tokens_per_s_best": batch / min(times), "steps_timed": len(times)}


def run_saelab(data: torch.Tensor, held: torch.Tensor, shape, args, device) -> dict:
    d, width, k, batch = shape
    steps = args.warmup + args.steps
    spec = SAESpec("bench", "topk", width, k=k)
    cfg = TrainConfig(saes=(spec,), tokens=steps * batch, batch_size=batch, dtype=args.dtype,
                      checkpoint_every=0)
    kernel = choose_kernel(args.kernel, device, d, width, k, batch)
    obj = SAEObjective(spec, d, cfg, _dtype(args.dtype, device), {}, device=device,
                       kernel=kernel.name)
    times = []
    for i in range(steps):
        x = data[i * batch:(i + 1) * batch]
        sync(device)
        t0 = time.perf_counter()
        obj.train_step(x, steps)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    train_stats = obj.read_stats()
    sae = obj.export({})
    w = {n: getattr(sae, n).detach() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    return {"method": "saelab", "dtype": str(obj.cdt).removeprefix("torch."),
            "kernel": kernel.record(), **rates(times, batch),
            "heldout": heldout_fvu(w, held, k), "train_fvu_last_window": train_stats["fvu"]}


def _dtype(name: str, device: torch.device) -> torch.dtype:
    from saelab.precision import resolve_dtype

    return resolve_dtype(name, device)


def run_sparsify(data_file: Path, held: torch.Tensor, shape, args, device, tmp: Path) -> dict:
    d, width, k, batch = shape
    python = Path(args.sparsify_python) if args.sparsify_python else SPARSIFY_PYTHON
    if not python.exists():
        return {"method": "sparsify", "skipped": f"{python} is missing (make bench-peers)"}
    job = {"data": str(data_file), "batch": batch, "steps": args.warmup + args.steps,
           "warmup_untimed": args.warmup, "width": width, "k": k, "device": str(device),
           "optimizer": args.sparsify_optimizer, "out": str(tmp / "sparsify.safetensors")}
    (tmp / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if device.type != "cuda":
        env["SPARSIFY_DISABLE_TRITON"] = "1"
    done = subprocess.run([str(python), str(ROOT / "bench" / "gpu_train_sparsify_worker.py"),
                           str(tmp / "job.json")], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"method": "sparsify", "error": done.stderr[-2000:]}
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    w = load_file(job["out"])
    return {"method": "sparsify", **{k_: v for k_, v in reply.items() if k_ != "times"},
            **rates(reply["times"], batch), "heldout": heldout_fvu(w, held, k)}


def kernel_rows(args, device: torch.device) -> list[dict]:
    rows = []
    for shape in SHAPES[args.shapes]:
        d, width, k, batch = shape
        steps = args.warmup + args.steps
        data = make_data((steps + 1) * batch, d, k, args.seed, device)
        held, train_data = data[-batch:], data[:-batch]
        row = {"shape": f"{d}->{width} k{k} b{batch}", "results": []}
        methods = args.methods.split(",")
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            if "saelab" in methods:
                row["results"].append(run_saelab(train_data, held, shape, args, device))
            if "sparsify" in methods:
                save_file({"x": train_data.to(torch.bfloat16).cpu().contiguous()}, str(tmp / "x.safetensors"))
                row["results"].append(run_sparsify(tmp / "x.safetensors", held, shape, args, device, tmp))
        res = {r["method"]: r for r in row["results"]}
        if "tokens_per_s_median" in res.get("sparsify", {}) and "saelab" in res:
            row["speedup_median"] = (res["saelab"]["tokens_per_s_median"]
                                     / res["sparsify"]["tokens_per_s_median"])
        rows.append(row)
        del data, held, train_data
    return rows


def stream_run(args, device: torch.device) -> dict:
    from saelab.data.harvest import HarvestConfig, harvest
    from saelab.models.load import load_model
    from saelab.models.sites import resolve_sites
    from saelab.train.trainer import Stream, train

    lm = load_model(args.model, device=str(device))
    sites = [s.name for s in resolve_sites(lm.arch, args.sites)]
    specs = tuple(SAESpec(s, args.arch, args.width, k=args.k_stream) for s in sites)
    cfg = TrainConfig(saes=specs, tokens=args.tokens, batch_size=args.batch, dtype=args.dtype,
                      checkpoint_every=0, chunk_contexts=args.forward_batch,
                      buffer_tokens=args.buffer_tokens)
    out: dict = {"model": args.model, "sites": sites, "tokens": args.tokens, "saes": len(specs)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sync(device)
        t0 = time.perf_counter()
        result = train(cfg, Stream(lm, args.corpus, context=args.context), tmp / "stream",
                       device=device)
        sync(device)
        wall = time.perf_counter() - t0
        out["stream"] = {"wall_s": wall, "tokens_per_s_end_to_end": args.tokens / wall,
                         "site_groups": result.groups,
                         "fvu": {lb: s.get("fvu") for lb, s in result.final.items()}}
        if args.compare_harvest:
            t0 = time.perf_counter()
            harvest(lm, HarvestConfig(sites=",".join(sites), corpus=args.corpus,
                                      tokens=args.tokens + cfg.buffer_tokens, context=args.context,
                                      batch_size=args.forward_batch, store_dtype="bfloat16"),
                    tmp / "cache")
            t_harvest = time.perf_counter() - t0
            cached = train(cfg, tmp / "cache", tmp / "cached", device=device)
            wall = time.perf_counter() - t0
            out["harvest_then_train"] = {
                "wall_s": wall, "harvest_s": t_harvest, "tokens_per_s_end_to_end": args.tokens / wall,
                "fvu": {lb: s.get("fvu") for lb, s in cached.final.items()}}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="saelab compute dtype (auto: bf16 on CUDA)")
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="default")
    ap.add_argument("--steps", type=int, default=50, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--methods", default="saelab,sparsify")
    ap.add_argument("--kernel", choices=("auto", "torch", "triton"), default="auto",
                    help="saelab's sparse kernels (auto: on CUDA the faster of the two, timed)")
    ap.add_argument("--sparsify-python", default="",
                    help="a Python that imports sparsify (default bench/.venv-sparsify's)")
    ap.add_argument("--sparsify-optimizer", choices=("adam", "signum"), default="adam")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--stream", action="store_true", help="the end-to-end streaming run instead")
    ap.add_argument("--compare-harvest", action="store_true")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--corpus", default="builtin")
    ap.add_argument("--sites", default="resid_post.*")
    ap.add_argument("--arch", default="batchtopk")
    ap.add_argument("--width", type=int, default=4608)
    ap.add_argument("--k-stream", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--forward-batch", type=int, default=0,
                    help="contexts per model forward (0: 256 on CUDA, 16 on CPU)")
    ap.add_argument("--buffer-tokens", type=int, default=65_536)
    ap.add_argument("--name", default="gpu_train")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here")
    args.forward_batch = args.forward_batch or (256 if device.type == "cuda" else 16)
    payload = {"machine": machine() | {"device": torch.cuda.get_device_name(device)
                                       if device.type == "cuda" else "cpu",
                                       "load_before": os.getloadavg()},
               "args": {k: str(v) for k, v in vars(args).items()}}
    if args.stream:
        payload["stream"] = stream_run(args, device)
        print(json.dumps(payload["stream"], indent=1))
    else:
        payload["rows"] = kernel_rows(args, device)
        cells = [{"shape": row["shape"], "method": r["method"],
                  "kernel": (r.get("kernel") or {}).get("name", ""),
                  "tok/s median": r.get("tokens_per_s_median"),
                  "tok/s best": r.get("tokens_per_s_best"),
                  "held-out FVU": r["heldout"]["fvu"] if "heldout" in r
                  else (r.get("skipped") or r.get("error", ""))[:60]}
                 for row in payload["rows"] for r in row["results"]]
        print(table(cells, ["shape", "method", "kernel", "tok/s median", "tok/s best",
                            "held-out FVU"]))
    payload["machine"]["load_after"] = os.getloadavg()
    out = args.out or ROOT / "bench" / "results" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1, default=str))
    return payload


if __name__ == "__main__":
    main()
