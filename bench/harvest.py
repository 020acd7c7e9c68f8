"""Harvest throughput: `saelab.harvest` end to end vs a plain forward of the same depth.

saelab: the real `harvest()` into a fresh folder (packing in its thread, one
forward per batch stopped after the deepest site, copy to the host, shards
written and hashed). Plain: the model's base (embeddings + the blocks up to
the deepest site, nothing else) called by hand on random ids, batch after
batch, in the same dtype and the same tokens per forward, nothing kept: what
a GPU can do at that depth, the ceiling a harvest can approach. The ratio
saelab/plain is the figure issue 14 targets (>= 0.5 on CUDA).

    python -m bench.harvest --sites resid_post.6,resid_post.12 --tokens 30000 --threads 1
    python -m bench.harvest --device cuda --dtype bfloat16 --tokens 2000000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bench.common import write


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_rate(lm, depth: int, batch_contexts: int, context: int, n_batches: int) -> float:
    """Tokens/s of the base model truncated to its first `depth` blocks, random ids."""
    base = lm.model.get_submodule(lm.arch.base_path)
    parent_path, _, name = lm.arch.layers_path.rpartition(".")
    parent = lm.model.get_submodule(parent_path)
    layers = getattr(parent, name)
    gen = torch.Generator().manual_seed(0)
    vocab = lm.model.get_input_embeddings().num_embeddings
    ids = [torch.randint(0, vocab, (batch_contexts, context), generator=gen).to(lm.device)
           for _ in range(min(n_batches, 4))]
    setattr(parent, name, nn.ModuleList(list(layers)[:depth]))
    try:
        with torch.inference_mode():
            base(input_ids=ids[0], use_cache=False)  # warm-up
            _sync(lm.device)
            start = time.perf_counter()
            for i in range(n_batches):
                base(input_ids=ids[i % len(ids)], use_cache=False)
            _sync(lm.device)
            return n_batches * batch_contexts * context / (time.perf_counter() - start)
    finally:
        setattr(parent, name, layers)


def saelab_rate(lm, args, folder: Path) -> dict:
    """Tokens/s of `harvest()` from the call to its return (shards written)."""
    from saelab.data.corpus import load_corpus
    from saelab.data.harvest import HarvestConfig, harvest

    load_corpus(args.corpus)  # hashed and cached once, outside the timing
    cfg = HarvestConfig(sites=args.sites, corpus=args.corpus, tokens=args.tokens,
                        context=args.context, batch_tokens=args.batch_tokens,
                        store_dtype=args.store_dtype)
    _sync(lm.device)
    start = time.perf_counter()
    manifest = harvest(lm, cfg, folder)
    _sync(lm.device)
    wall = time.perf_counter() - start
    forwarded = manifest.n_contexts * args.context
    return {"wall_s": wall, "tokens_stored": manifest.n_tokens, "tokens_forwarded": forwarded,
            "tokens_per_s": forwarded / wall, "forward": manifest.forward,
            "shards": len(manifest.shards)}


def main(argv: list[str] | None = None) -> dict:
    from saelab.models.load import load_model
    from saelab.models.sites import resolve_sites

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--sites", default="resid_post.6,resid_post.12")
    ap.add_argument("--corpus", default="builtin")
    ap.add_argument("--tokens", type=int, default=30_000)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch-tokens", type=int, default=None,
                    help="tokens per forward (both sides); default: harvest's own choice")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--store-dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: leave as is")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/harvest.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    depth = 1 + max(s.layer for s in resolve_sites(lm.arch, args.sites))
    with tempfile.TemporaryDirectory(prefix="saelab-bench-harvest-") as tmp:
        ours = saelab_rate(lm, args, Path(tmp) / "cache")
    batch = ours["forward"]["batch_contexts"]
    n_batches = max(2, ours["tokens_forwarded"] // (batch * args.context))
    plain = plain_rate(lm, depth, batch, args.context, n_batches)
    result = {"model": lm.name, "sites": args.sites, "depth_blocks": depth,
              "device": str(lm.device), "dtype": str(next(lm.model.parameters()).dtype),
              "threads": torch.get_num_threads(), "batch_contexts": batch,
              "context": args.context, "saelab": ours, "plain_tokens_per_s": plain,
              "ratio": ours["tokens_per_s"] / plain}
    print(f"{lm.name} {args.sites} ({depth} blocks) on {result['device']}, {result['dtype']}, "
          f"{result['threads']} thread(s), {batch}x{args.context} tokens per forward")
    print(f"saelab harvest: {ours['tokens_per_s']:,.0f} tokens/s "
          f"({ours['tokens_forwarded']:,} tokens in {ours['wall_s']:.1f} s, shards written)")
    print(f"plain forward:  {plain:,.0f} tokens/s")
    print(f"saelab/plain:   {result['ratio']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    else:
        print("wrote", write("harvest", result))
    return result


if __name__ == "__main__":
    main()
