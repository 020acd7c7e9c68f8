"""Trains sparsify's `SparseCoder` for a whole run on a device; runs in bench/.venv-sparsify.

    python gpu_train_sparsify_worker.py JOB.json

JOB.json: {"data": x.safetensors (key "x": [steps*batch, d_in]), "batch", "steps",
"warmup_untimed", "width", "k", "device", "optimizer": "adam" | "signum", "out"}.
The step is sparsify.Trainer's for `loss_fn="fvu"` on one hookpoint, as in
train_sparsify_worker.py (the CPU bench's step-by-step worker), with what
sparsify does on CUDA: its Triton decoder (unless SPARSIFY_DISABLE_TRITON) and
bf16 autocast. Each step is timed between two device synchronisations. Prints
one JSON line {"times": [seconds of the timed steps], "version", "decoder",
"recipe"} and writes W_enc [d_in, F], b_enc, W_dec [F, d_in], b_dec to `out`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings

import torch
from safetensors.torch import load_file, save_file

warnings.filterwarnings("ignore")


def main() -> None:
    with open(sys.argv[1]) as fh:
        job = json.load(fh)
    device = torch.device(job["device"])
    with contextlib.redirect_stdout(sys.stderr):  # sparsify prints its decoder choice
        from importlib.metadata import version

        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.utils import decoder_impl

    data = load_file(job["data"])["x"].to(device, torch.float32)
    batch, steps, untimed = job["batch"], job["steps"], job["warmup_untimed"]
    torch.manual_seed(0)
    sae = SparseCoder(data.shape[1], SparseCoderConfig(num_latents=job["width"], k=job["k"]),
                      device, dtype=torch.float32)
    width_scale = (sae.num_latents / 2**14) ** 0.5
    sched = None
    if job["optimizer"] == "adam":
        from transformers import get_linear_schedule_with_warmup

        lr = 2e-4 / width_scale
        opt = torch.optim.Adam([{"params": sae.parameters(), "lr": lr}])
        sched = get_linear_schedule_with_warmup(opt, min(1000, steps // 10), steps)
    else:
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        lr = 5e-3 / width_scale
        opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
        opt.train()
    dead_threshold = 10_000_000
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long, device=device)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool, device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    times = []
    for i in range(steps):
        x = data[i * batch:(i + 1) * batch]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if i == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > dead_threshold
        total_variance = (x - x.mean(0)).pow(2).sum()
        with autocast:
            out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + (1 / 32) * out.auxk_loss + out.multi_topk_fvu / 8
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
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= untimed:
            times.append(time.perf_counter() - t0)
    if sched is None:
        opt.eval()
    with torch.no_grad():
        save_file({"W_enc": sae.encoder.weight.T.contiguous().cpu(),
                   "b_enc": sae.encoder.bias.detach().contiguous().cpu(),
                   "W_dec": sae.W_dec.detach().contiguous().cpu(),
                   "b_dec": sae.b_dec.detach().contiguous().cpu()}, job["out"])
    print(json.dumps({"times": times, "version": version("eai-sparsify"), "torch": torch.__version__,
                      "decoder": decoder_impl.__name__,
                      "recipe": {"optimizer": job["optimizer"], "lr": lr, "autocast":
                                 "bf16" if device.type == "cuda" else "none", "loss": "fvu"}}))


if __name__ == "__main__":
    main()
