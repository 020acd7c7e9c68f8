"""Feature dashboards for every feature of one SAE: saelab against SAEDashboard.

A random 576 -> 9216 TopK SAE (k = 32, unit-norm decoder rows, so SAEDashboard's
decoder-norm folding changes nothing) at resid_post.12 of the embedded model,
and the same packed contexts of the builtin corpus for both tools:

- saelab: `build_index` without token ablation and without dashboard.html - one
  forward pass, top-k and binned examples, histograms, densities, logit lens and
  decoder neighbours for all 9216 features, written as Parquet. Best of
  `--repeats`. Also timed once: the `saelab features` defaults (64 ablations, 128 cards).
- SAEDashboard (sae-dashboard 0.8, TransformerLens 2.17, in bench/.venv-saedash):
  `SaeVisRunner.run` over the features, its activation cache on (one model forward,
  then a re-encode per batch of 256 features), in a subprocess (saedash_worker.py).
  Two configurations: its default (`cache_dir=None`: the model runs again for every
  batch of 256 features) and with its activation cache (one forward, re-encoded per
  batch). Each is timed on the first N and 4N features (`--saedash-features`, default
  256 = one and four feature batches) and extrapolated linearly to all features - its
  cost is a fixed part plus one pass per feature batch; `--saedash-features 0` runs
  all features (about 20 minutes per configuration here).

    .venv/bin/python -m bench.features [--tokens 8192] [--threads auto]

Set up the SAEDashboard venv once (CPU torch first, or pip pulls a CUDA build):
    python3 -m venv bench/.venv-saedash
    bench/.venv-saedash/bin/pip install /opt/wheels/torch-2.13.0+cpu-*.whl   # or torch==2.13.0 from the CPU index
    bench/.venv-saedash/bin/pip install sae-dashboard "pyarrow<21"
(its dependency decode-clt drags in torchvision/torchaudio and a CUDA torch 2.14: reinstall the
CPU torch 2.13 wheel with --no-deps afterwards; numpy<2 needs pyarrow<21.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.common import table, write
from saelab.data.corpus import load_corpus
from saelab.data.tokens import pack
from saelab.features.build import IndexConfig, build_index
from saelab.models.catalog import get_entry
from saelab.models.load import load_model, model_cache_dir
from saelab.sae import save_sae
from saelab.sae.testing import random_sae

HERE = Path(__file__).parent
SAEDASH_PY = HERE / ".venv-saedash" / "bin" / "python"
MODEL = "smollm2-135m-instruct"


def saedash(job: dict, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"job-{job.get('features')}.json"
    path.write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(job["threads"])}
    done = subprocess.run([str(SAEDASH_PY), str(HERE / "saedash_worker.py"), str(path)],
                          capture_output=True, text=True, env=env, cwd=workdir)
    if done.returncode != 0:
        raise RuntimeError(f"SAEDashboard worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _saedash_all(job: dict, workdir: Path, args, mode: str) -> dict:
    """SAEDashboard over all features, or timed on the first N and 4N features and
    extrapolated linearly: its cost is a fixed part plus one pass per batch of 256 features."""
    def run(n: int | None) -> dict:  # a fresh activation cache per run: none is reused
        cache = job["cache_dir"] and f"{job['cache_dir']}-{n}"
        return saedash(job | {"features": n, "cache_dir": cache}, workdir / mode)

    n1 = args.saedash_features
    if not n1:
        return run(None) | {"extrapolated": False, "measured_features": [args.d_sae]}
    n2 = 4 * n1
    runs = [run(n1), run(n2)]
    per_feature = (runs[1]["seconds"] - runs[0]["seconds"]) / (n2 - n1)
    seconds = runs[0]["seconds"] + per_feature * (args.d_sae - n1)
    return {"seconds": seconds, "extrapolated": True, "measured_features": [n1, n2],
            "measured": runs, "per_feature_seconds": per_feature}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--d-sae", type=int, default=9216)
    parser.add_argument("--site", default="resid_post.12")
    parser.add_argument("--threads", default="auto", help="torch threads; auto = 1 when loaded")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--saedash-features", type=int, default=256,
                        help="0: all features; N: time N and 4N features, extrapolate")
    parser.add_argument("--skip-saedash", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    threads = (1 if load > 1.0 else os.cpu_count()) if args.threads == "auto" else int(args.threads)
    torch.set_num_threads(threads)

    workdir = Path(tempfile.mkdtemp(prefix="bench-features-"))
    lm = load_model(MODEL, dtype="float32")
    layer = int(args.site.split(".")[1])
    sae = random_sae("topk", lm.arch.d_model, args.d_sae, k=32, seed=0,
                     metadata={"site": args.site, "model_name": MODEL,
                               "hook_name": f"blocks.{layer}.hook_resid_post"})
    sae.normalize_decoder_(rescale_encoder=False)
    save_sae(sae, workdir / "sae")
    corpus = load_corpus("builtin")
    ids = torch.cat([b.ids for b in pack(corpus, lm.tokenizer, args.context, batch_size=16,
                                         n_tokens=args.tokens)])
    save_file({"ids": ids.to(torch.int32).contiguous()}, str(workdir / "tokens.safetensors"))
    n_tokens = ids.numel()

    rows, results = [], {}
    config = IndexConfig(tokens=args.tokens, context=args.context, corpus=corpus, ablate=0,
                         dashboard=False)
    times = []
    for r in range(args.repeats):
        start = time.perf_counter()
        build_index(lm, {"sae": (sae, workdir / "sae")}, workdir / f"saelab-{r}", config)
        times.append(time.perf_counter() - start)
    run = json.loads((workdir / "saelab-0" / "run.json").read_text())
    best = min(times)
    results["saelab"] = {"seconds": best, "all_seconds": times, "tokens_per_s": n_tokens / best,
                         "collect_seconds": run["seconds"]["collect"]}
    rows.append({"tool": "saelab (index, all features)", "seconds": best, "tokens/s": n_tokens / best})
    full = IndexConfig(tokens=args.tokens, context=args.context, corpus=corpus)
    start = time.perf_counter()
    build_index(lm, {"sae": (sae, workdir / "sae")}, workdir / "saelab-full", full)
    full_s = time.perf_counter() - start
    results["saelab_full_defaults"] = {"seconds": full_s, "tokens_per_s": n_tokens / full_s,
                                       "ablated_features": full.ablate, "cards": full.cards}
    rows.append({"tool": "saelab (+64 ablations, 128 cards)", "seconds": full_s,
                 "tokens/s": n_tokens / full_s})

    if not args.skip_saedash:
        if not SAEDASH_PY.exists():
            raise SystemExit(f"{SAEDASH_PY} is missing: set up the SAEDashboard venv (see the docstring)")
        model_dir = model_cache_dir(MODEL, get_entry(MODEL).sha256)
        job = {"model_dir": str(model_dir), "sae_dir": str(workdir / "sae"),
               "hook": f"blocks.{layer}.hook_resid_post", "tokens": str(workdir / "tokens.safetensors"),
               "threads": threads}
        for mode, cache in (("default", None), ("activation_cache", str(workdir / "saedash-cache"))):
            result = _saedash_all(job | {"cache_dir": cache}, workdir, args, mode)
            results[f"saedashboard_{mode}"] = result | {"tokens_per_s": n_tokens / result["seconds"]}
            label = "extrapolated from {} and {} features".format(*result["measured_features"]) \
                if result["extrapolated"] else "all features"
            rows.append({"tool": f"SAEDashboard {mode} ({label})", "seconds": result["seconds"],
                         "tokens/s": n_tokens / result["seconds"]})
            results[f"speedup_vs_{mode}"] = result["seconds"] / best
    print(table(rows, ["tool", "seconds", "tokens/s"]))
    for key in ("speedup_vs_default", "speedup_vs_activation_cache"):
        if key in results:
            print(f"saelab {key.replace('_', ' ')}: {results[key]:.1f}x")
    path = write("features", {"tokens": n_tokens, "context": args.context, "d_sae": args.d_sae,
                              "site": args.site, "threads": threads, "load_average": load,
                              "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
