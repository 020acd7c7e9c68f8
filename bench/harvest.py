"""Harvest throughput: saelab (early stop, chosen dtype) vs plain transformers.

The plain way is what a researcher writes first: a full forward pass with
`output_hidden_states=True` in fp32, keeping one layer. saelab stops after
the deepest site and computes in the dtype that is fastest on this hardware.

    .venv/bin/python bench/harvest.py [--site resid_post.15] [--batches 4]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import best_time, matmul_rate, table, write
from saelab.data.harvest import _forward
from saelab.models.load import load_model
from saelab.models.sites import resolve_sites


def forward_flops(lm, n_tokens: int, context: int, layers_run: int) -> float:
    """Matmul FLOPs of a forward through `layers_run` blocks (weights + attention scores)."""
    block = sum(p.numel() for p in lm.model.model.layers[0].parameters() if p.dim() == 2)
    attention = 2 * context * lm.arch.d_model  # QK^T and AV, causal: half of 2 x 2 x ctx x d
    return 2 * n_tokens * layers_run * (block + attention)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--site", default="resid_post.15")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    rows = []
    lm32 = load_model("smollm2-135m-instruct", dtype="float32")
    vocab = lm32.tokenizer.vocab_size
    batches = [torch.randint(0, vocab, (args.batch_size, args.context), generator=gen)
               for _ in range(args.batches)]
    n_tokens = args.batches * args.batch_size * args.context
    site = resolve_sites(lm32.arch, args.site)
    layer = site[0].layer

    @torch.inference_mode()
    def plain():
        for ids in batches:
            out = lm32.model(input_ids=ids, output_hidden_states=True, use_cache=False)
            out.hidden_states[layer + 1].clone()

    def ours(lm):
        return lambda: [_forward(lm, site, ids, torch.float32) for ids in batches]

    t_plain = best_time(plain, repeats=2)
    full_flops = forward_flops(lm32, n_tokens, args.context, lm32.arch.n_layers)
    rows.append({"method": "transformers, full forward, fp32", "tokens/s": n_tokens / t_plain,
                 "GFLOP/s": full_flops / t_plain / 1e9})
    early_flops = forward_flops(lm32, n_tokens, args.context, layer + 1)
    for dtype in ("float32", "bfloat16"):
        lm = lm32 if dtype == "float32" else load_model("smollm2-135m-instruct", dtype=dtype)
        t = best_time(ours(lm), repeats=2)
        rows.append({"method": f"saelab harvest, early stop, {dtype}", "tokens/s": n_tokens / t,
                     "GFLOP/s": early_flops / t / 1e9, "vs plain": t_plain / t})
    peak = {"fp32": matmul_rate(torch.float32) / 1e9, "bf16": matmul_rate(torch.bfloat16) / 1e9}
    for r in rows:
        r["% of fp32 peak"] = 100 * r["GFLOP/s"] / peak["fp32"]
    print(f"site {args.site}, {n_tokens} tokens; measured matmul peak GFLOP/s: "
          f"fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.0f}")
    print(table(rows, ["method", "tokens/s", "vs plain", "GFLOP/s", "% of fp32 peak"]))
    print("wrote", write("harvest", {"site": args.site, "tokens": n_tokens, "peak_gflops": peak,
                                     "rows": rows}))


if __name__ == "__main__":
    main()
