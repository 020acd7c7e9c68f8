"""Trains SAELens' TopK SAE step by step, on command; runs in bench/.venv-saelens.

    python train_saelens_worker.py JOB.json

JOB.json: {"data": train.safetensors (key "x": [steps*batch, d_in]), "batch": n,
"steps": n, "width": F, "k": k, "autocast": bool, "threads": n, "out": path}.

The SAE is `TopKTrainingSAE` with SAELens' defaults (decoder rows initialised to
norm 0.1, W_enc = W_dec^T, b_dec = 0, activations rescaled by the decoder norm,
aux-loss coefficient 1, no input normalisation), trained by SAELens' own
`SAETrainer.step` (training_forward_pass, grad-norm clip 1.0, Adam lr 3e-4
constant, dead-latent bookkeeping) - what `SAETrainer.fit` does per step, minus
logging, evals and checkpoints. `autocast` is SAELens' own bf16 autocast switch.

Protocol on stdin/stdout, one JSON line each: prints {"ready": ...}; then for
each "step" line trains on the next batch and prints {"seconds", "loss"}; on
"finish" writes the SAE in the standard TopK form (W_enc [d_in, F], b_enc,
W_dec [F, d_in], b_dec; decoder norms folded in as SAELens does when it saves)
to `out` and prints {"done": true}.
"""

from __future__ import annotations

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
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job.get("seed", 0))
    import sae_lens
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    data = load_file(job["data"])["x"]
    batch, steps = job["batch"], job["steps"]
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=data.shape[1], d_sae=job["width"],
                                                k=job["k"], dtype="float32", device="cpu"))
    cfg = SAETrainerConfig(total_training_samples=steps * batch,
                           train_batch_size_samples=batch, device="cpu",
                           autocast=bool(job["autocast"]),
                           lr_end=3e-4 / 10)  # the runner config's post-init default (lr / 10)
    trainer = SAETrainer(cfg, sae, data_provider=iter(()))
    print(json.dumps({"ready": True, "version": sae_lens.__version__,
                      "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "recipe": {"lr": cfg.lr, "lr_scheduler": cfg.lr_scheduler_name,
                                 "warmup_steps": cfg.lr_warm_up_steps,
                                 "betas": [cfg.adam_beta1, cfg.adam_beta2],
                                 "grad_clip": 1.0, "b_dec_init": "zeros",
                                 "decoder_init_norm": sae.cfg.decoder_init_norm,
                                 "rescale_acts_by_decoder_norm":
                                     sae.cfg.rescale_acts_by_decoder_norm,
                                 "aux_loss_coefficient": sae.cfg.aux_loss_coefficient,
                                 "dead_feature_window_steps": cfg.dead_feature_window,
                                 "normalize_activations": sae.cfg.normalize_activations}}),
          flush=True)
    i = 0
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            x = data[i * batch:(i + 1) * batch]
            t0 = time.perf_counter()
            out = trainer.step(x)
            loss = out.loss.item()
            trainer.n_training_steps += 1
            seconds = time.perf_counter() - t0
            i += 1
            print(json.dumps({"seconds": seconds, "loss": loss}), flush=True)
        elif cmd == "finish":
            with torch.no_grad():
                norm = sae.get_W_dec_norm()  # fold the decoder norms, as SAELens' save does
                save_file({"W_enc": (sae.W_enc * norm).contiguous(),
                           "b_enc": (sae.b_enc * norm).contiguous(),
                           "W_dec": (sae.W_dec / norm[:, None]).contiguous(),
                           "b_dec": sae.b_dec.detach().contiguous()}, job["out"])
            print(json.dumps({"done": True}), flush=True)
            return


if __name__ == "__main__":
    main()
