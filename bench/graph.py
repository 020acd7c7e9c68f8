"""Attribution graph cost on the embedded model with 30 per-layer transcoders.

The transcoders are random TopK ones of the right shape (576 -> 4608, k=32, with a
skip), or a trained set with `--transcoders DIR` (as `saelab scope --kind transcoder`
writes). A prompt of `--tokens` tokens (BOS first), targets the top next tokens,
`--max-features` feature rows (7500 as circuit-tracer's default), nodes 0.8 / edges 0.98.

Reported: wall time and CPU time of the graph (CPU time as well, since a shared
machine stretches wall time) (pruning and the JSON included),
peak resident memory of the process, and the multiple of one forward+backward
of the model alone on the same prompt (the gradient down to the input
embeddings, weights frozen). Targets on 2 CPU cores: 20 tokens in <= 5 min and
<= 4 GB; 1000 tokens under 8 GB. Run one configuration per process (the peak
is the process's):

    .venv/bin/python -m bench.graph [--tokens 20] [--max-features 7500] [--threads 2]
                                    [--transcoders runs/tscope]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import torch

from bench.common import best_time, write
from saelab.graphs.commands import run_graph
from saelab.models.load import load_model
from saelab.sae.testing import random_transcoder

TEXT = ("The river flows past the old mill and into the valley, where the farmers grow wheat, "
        "barley and oats. In spring the water rises and the children watch the boats go by. ")


def prompt_of(lm, n: int) -> str:
    """A text whose tokenization (BOS first) has exactly n tokens."""
    text = TEXT * (n // 20 + 2)
    ids = lm.tokenizer.encode(text, add_special_tokens=False)[: n - 1]
    return lm.tokenizer.decode(ids)


def forward_backward(lm, ids: torch.Tensor) -> None:
    emb = lm.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = lm.model(inputs_embeds=emb, use_cache=False).logits
    logits[0, -1].max().backward()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--max-features", type=int, default=7500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--transcoders", default=None,
                    help="a trained transcoder set (every layer) instead of random ones")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m-instruct", dtype="float32")
    if args.transcoders:
        from saelab.sae.transcoder import load_transcoders

        tcs = load_transcoders(args.transcoders)
        kind = f"trained: {args.transcoders}"
    else:
        tcs = {layer: random_transcoder("topk", d_in=576, d_sae=args.d_sae, k=args.k, skip=True,
                                        layer=layer, seed=layer) for layer in range(lm.arch.n_layers)}
        kind = f"random topk 576->{args.d_sae} k={args.k} skip"
    prompt = prompt_of(lm, args.tokens)
    from saelab.data.tokens import tokenize

    ids = tokenize(lm, prompt).input_ids
    ref = best_time(lambda: forward_backward(lm, ids), repeats=3)
    c0 = time.process_time()
    for _ in range(3):
        forward_backward(lm, ids)
    ref_cpu = (time.process_time() - c0) / 3  # CPU seconds: the machine may be shared
    with tempfile.TemporaryDirectory() as out:
        cpu0, t0 = time.process_time(), time.perf_counter()
        result = run_graph(lm, tcs, prompt, out, max_features=args.max_features)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    s = result["stats"]
    payload = {"tokens": int(ids.shape[1]), "max_features": args.max_features,
               "threads": args.threads, "transcoders": kind,
               "active_features": s["active_features"], "selected_features": s["selected_features"],
               "backward_passes": s["backward_passes"], "rows_per_pass": s["rows_per_pass"],
               "rows_exact": s["rows_exact"], "wall_s": wall, "cpu_s": cpu, "peak_gb": peak_gb,
               "forward_backward_s": ref, "multiple": wall / ref,
               "forward_backward_cpu_s": ref_cpu, "multiple_cpu": cpu / ref_cpu,
               "pruned": result["pruned"]}
    path = write(f"graph_{ids.shape[1]}", payload)
    print(f"{ids.shape[1]} tokens, {s['selected_features']} of {s['active_features']} features, "
          f"{s['backward_passes']} passes of {s['rows_per_pass']} rows: {wall:.1f} s wall "
          f"({cpu:.1f} s CPU), peak {peak_gb:.2f} GB; forward+backward {ref:.3f} s -> "
          f"{wall / ref:.0f}x; in CPU time {cpu:.1f} / {ref_cpu:.2f} s -> {cpu / ref_cpu:.0f}x  ({path})")


if __name__ == "__main__":
    main()
