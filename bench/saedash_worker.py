"""Runs inside the bench-only SAEDashboard venv (bench/.venv-saedash); never imports saelab.

    python saedash_worker.py JOB.json      ->  one JSON line on stdout

JOB.json: {"model_dir": saelab's cached HF folder of SmolLM2, "sae_dir": SAELens-format SAE,
"hook": "blocks.12.hook_resid_post", "tokens": path of a safetensors file with "ids"
[n, context], "features": n (the first n features) or null (all), "threads": t,
"cache_dir": folder for SAEDashboard's activation cache}.

TransformerLens 2.x has no SmolLM2 entry and transformers 4.x cannot read the
transformers-5 folder saelab caches, so the model is assembled here: the config
gets `rope_theta` and `architectures` back, the tied embedding is filled from
lm_head, TransformerLens's Llama weight conversion is applied without any
weight processing (its logits match saelab's to 4e-5), all offline.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def load_model(path: str):
    from sae_lens import HookedSAETransformer
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        PreTrainedTokenizerFast,
    )

    tmp = tempfile.mkdtemp()
    cfg = json.load(open(f"{path}/config.json"))
    cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
    cfg["architectures"] = ["LlamaForCausalLM"]
    json.dump(cfg, open(f"{tmp}/config.json", "w"))
    tc = json.load(open(f"{path}/tokenizer_config.json"))
    PreTrainedTokenizerFast(tokenizer_file=f"{path}/tokenizer.json", bos_token=tc.get("bos_token"),
                            eos_token=tc.get("eos_token"), unk_token=tc.get("unk_token"),
                            pad_token=tc.get("pad_token")).save_pretrained(tmp)
    tok = AutoTokenizer.from_pretrained(tmp)
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp), dtype=torch.float32)
    sd = load_file(f"{path}/model.safetensors")
    sd["model.embed_tokens.weight"] = sd["lm_head.weight"]
    hf.load_state_dict(sd)
    d = convert_hf_model_config(tmp)
    d["n_ctx"], d["rotary_base"] = 2048, cfg["rope_theta"]
    tcfg = HookedTransformerConfig(**d, dtype=torch.float32, device="cpu", tokenizer_prepends_bos=False)
    model = HookedSAETransformer(tcfg, tokenizer=tok)
    model.load_and_process_state_dict(convert_llama_weights(hf, tcfg), fold_ln=False,
                                      center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    return model.eval()


def main() -> None:
    job = json.load(open(sys.argv[1]))
    torch.set_num_threads(job.get("threads", torch.get_num_threads()))
    from pathlib import Path

    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import SAE
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    model = load_model(job["model_dir"])
    sae = SAE.load_from_disk(job["sae_dir"], device="cpu")
    # SaeVisRunner folds decoder norms first, which SAELens refuses for TopK SAEs; the
    # bench SAE has unit-norm decoder rows, so folding would change nothing anyway.
    sae.fold_W_dec_norm = lambda: None
    tokens = load_file(job["tokens"])["ids"].long()
    n_feat = job.get("features") or sae.cfg.d_sae
    t_load = time.perf_counter() - t0
    cfg = SaeVisConfig(hook_point=job["hook"], features=list(range(n_feat)), device="cpu",
                       dtype="float32", minibatch_size_features=job.get("minibatch_features", 256),
                       minibatch_size_tokens=job.get("minibatch_tokens", 64),
                       cache_dir=Path(job["cache_dir"]) if job.get("cache_dir") else None,
                       verbose=False)
    start = time.perf_counter()
    data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
    seconds = time.perf_counter() - start
    f0 = data.feature_data_dict[0]
    top = f0.sequence_data.seq_group_data[0].seq_data if f0.sequence_data else []
    print(json.dumps({"seconds": seconds, "load_seconds": t_load, "features": n_feat,
                      "tokens": int(tokens.numel()), "threads": torch.get_num_threads(),
                      "feature0_top_acts": [max(s.feat_acts) for s in top[:5]]}))


if __name__ == "__main__":
    main()
