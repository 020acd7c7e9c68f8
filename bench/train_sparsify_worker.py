"""Trains EleutherAI sparsify's `SparseCoder` step by step, on command; runs in bench/.venv-sparsify.

    SPARSIFY_DISABLE_TRITON=1 python train_sparsify_worker.py JOB.json

JOB.json: {"data": train.safetensors (key "x": [steps*batch, d_in]), "batch": n,
"steps": n, "width": F, "k": k, "autocast": bool, "optimizer": "adam" | "signum",
"warmup": n, "auxk_alpha": a, "threads": n, "out": path}.

The step is the one `sparsify.Trainer` runs for `loss_fn="fvu"` on one hookpoint
(trainer.py, with the model forward replaced by a batch of cached activations):
b_dec set to the batch mean on the first step, decoder rows renormalised before
every forward, loss = FVU (+ auxk_alpha * AuxK once latents die), backward,
radial decoder gradient removed, optimizer and LR-schedule step, dead-latent
counters. Optimizers as sparsify builds them: "adam" is torch Adam at
lr 2e-4 / sqrt(F / 2^14) with linear warm-up then linear decay to 0
(transformers' get_linear_schedule_with_warmup); "signum" (sparsify's default)
is schedule-free SignSGD, momentum 0.95, lr 5e-3 / sqrt(F / 2^14). sparsify
autocasts to bf16 only on CUDA; `autocast` wraps its forward in CPU bf16
autocast here.

Protocol on stdin/stdout, one JSON line each: prints {"ready": ...}; then for
each "step" line trains on the next batch and prints {"seconds", "loss"}; on
"finish" writes W_enc [d_in, F], b_enc, W_dec [F, d_in], b_dec to `out`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings

import torch
from safetensors.torch import load_file, save_file

warnings.filterwarnings("ignore")


def main() -> None:
    with open(sys.argv[1]) as fh:
        job = json.load(fh)
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    torch.set_num_threads(job["threads"])
    with contextlib.redirect_stdout(sys.stderr):  # sparsify prints its decoder choice
        from importlib.metadata import version

        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.utils import decoder_impl

    data = load_file(job["data"])["x"]
    batch, steps = job["batch"], job["steps"]
    torch.manual_seed(job.get("seed", 0))
    sae = SparseCoder(data.shape[1], SparseCoderConfig(num_latents=job["width"], k=job["k"]),
                      "cpu", dtype=torch.float32)
    width_scale = (sae.num_latents / 2**14) ** 0.5
    sched = None
    if job["optimizer"] == "adam":
        from transformers import get_linear_schedule_with_warmup

        lr = 2e-4 / width_scale
        opt = torch.optim.Adam([{"params": sae.parameters(), "lr": lr}])
        sched = get_linear_schedule_with_warmup(opt, job["warmup"], steps)
    else:
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        lr = 5e-3 / width_scale
        opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]),
                                  momentum=0.95)
        opt.train()
    auxk_alpha, dead_threshold = job["auxk_alpha"], 10_000_000  # sparsify's default threshold
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if job["autocast"]
                else contextlib.nullcontext())
    print(json.dumps({"ready": True, "version": version("eai-sparsify"),
                      "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "decoder": decoder_impl.__name__,
                      "recipe": {"optimizer": job["optimizer"], "lr": lr,
                                 "warmup_steps": job["warmup"] if sched else None,
                                 "schedule": "linear warm-up, linear decay to 0" if sched
                                 else "schedule-free", "b_dec_init": "mean of first batch",
                                 "init": "nn.Linear encoder, W_dec = W_enc unit rows",
                                 "auxk_alpha": auxk_alpha,
                                 "dead_feature_threshold_tokens": dead_threshold,
                                 "loss": "fvu"}}), flush=True)
    i = 0
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            x = data[i * batch:(i + 1) * batch]
            t0 = time.perf_counter()
            if i == 0:
                sae.b_dec.data = x.mean(0)
            sae.set_decoder_norm_to_unit_norm()
            dead_mask = since_fired > dead_threshold if auxk_alpha > 0 else None
            total_variance = (x - x.mean(0)).pow(2).sum()
            with autocast:
                out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
            did_fire[out.latent_indices.flatten()] = True
            fvu = float(out.fvu.detach())  # sparsify's trainer logs it every step
            loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
            loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            if sched is not None:
                sched.step()
            with torch.no_grad():
                since_fired += x.shape[0]
                since_fired[did_fire] = 0
                did_fire.zero_()
            seconds = time.perf_counter() - t0
            i += 1
            print(json.dumps({"seconds": seconds, "loss": fvu}), flush=True)
        elif cmd == "finish":
            if sched is None:
                opt.eval()  # schedule-free: evaluate at the averaged weights, as sparsify saves
            with torch.no_grad():
                save_file({"W_enc": sae.encoder.weight.T.contiguous(),
                           "b_enc": sae.encoder.bias.detach().contiguous(),
                           "W_dec": sae.W_dec.detach().contiguous(),
                           "b_dec": sae.b_dec.detach().contiguous()}, job["out"])
            print(json.dumps({"done": True}), flush=True)
            return


if __name__ == "__main__":
    main()
