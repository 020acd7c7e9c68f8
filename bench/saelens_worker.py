"""Runs inside the bench-only SAELens venv (bench/.venv-saelens); never imports saelab.

    python saelens_worker.py JOB.json

JOB.json is {"mode": "interop" | "bench", ...}; the result is printed as one JSON line.

interop  "load":  [{"dir", "x", "out"}]   SAE.load_from_disk(dir); save encode/decode of x to out
         "write": [{"arch", "dir", "x", "out", "seed"}]   build a random SAELens SAE of arch
                  (standard, jumprelu, topk, topk_rescaled, batchtopk), save it as SAELens does,
                  and save its encode/decode of x to out
bench    "dirs": {name: dir}, "x": path, "reps": n   time decode(encode(x)) per SAE
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import torch
from safetensors.torch import load_file, save_file

warnings.filterwarnings("ignore")


def _run(sae, x):
    with torch.no_grad():
        feats = sae.encode(x)
        return feats, sae.decode(feats)


def _randomize(sae, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        sae.b_enc.sub_(0.4)
        if hasattr(sae, "threshold") and isinstance(sae.threshold, torch.nn.Parameter):
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=g) * 0.4 + 0.05)


def _write(job: dict, d_in: int, d_sae: int) -> None:
    from sae_lens import SAE
    from sae_lens.saes import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(model_name="tiny-model", hook_name="blocks.2.hook_resid_post")
    arch, seed = job["arch"], job.get("seed", 0)
    if arch == "batchtopk":
        sae = BatchTopKTrainingSAE(
            BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=4, metadata=meta)
        )
        _randomize(sae, seed)
        sae.topk_threshold = torch.tensor(0.3, dtype=torch.double)
        sae.save_inference_model(job["dir"])
    else:
        cls, cfg_cls, kw = {
            "standard": (StandardSAE, StandardSAEConfig, {}),
            "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {"apply_b_dec_to_input": False}),
            "topk": (TopKSAE, TopKSAEConfig, {"k": 4}),
            "topk_rescaled": (
                TopKSAE,
                TopKSAEConfig,
                {"k": 4, "rescale_acts_by_decoder_norm": True},
            ),
        }[arch]
        sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, metadata=meta, **kw))
        _randomize(sae, seed)
        sae.save_model(job["dir"])
    sae = SAE.load_from_disk(job["dir"])  # what a SAELens user gets from that folder
    x = load_file(job["x"])["x"]
    feats, x_hat = _run(sae, x)
    save_file({"feats": feats.contiguous(), "x_hat": x_hat.contiguous()}, job["out"])


def interop(spec: dict) -> dict:
    from sae_lens import SAE

    for job in spec.get("load", []):
        sae = SAE.load_from_disk(job["dir"])
        feats, x_hat = _run(sae, load_file(job["x"])["x"])
        save_file({"feats": feats.contiguous(), "x_hat": x_hat.contiguous()}, job["out"])
    for job in spec.get("write", []):
        _write(job, spec["d_in"], spec["d_sae"])
    import sae_lens

    return {"ok": True, "sae_lens_version": sae_lens.__version__}


def bench(spec: dict) -> dict:
    import sae_lens
    from sae_lens import SAE

    x = load_file(spec["x"])["x"]
    results = {}
    for name, folder in spec["dirs"].items():
        sae = SAE.load_from_disk(folder)
        _run(sae, x)  # warm-up
        times = []
        for _ in range(spec["reps"]):
            t0 = time.perf_counter()
            _run(sae, x)
            times.append(time.perf_counter() - t0)
        results[name] = {"seconds": min(times), "tokens_per_s": x.shape[0] / min(times)}
    return {
        "sae_lens_version": sae_lens.__version__,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": results,
    }


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        spec = json.load(fh)
    out = {"interop": interop, "bench": bench}[spec["mode"]](spec)
    print(json.dumps(out))
