"""Attribution cost: 100 chat-list prompts through 5 SAEs at once, against the model alone.

On the embedded model (fp32), random TopK SAEs 576 -> 4608 (k=32) at
resid_post.{0,6,12,18,24}, the list study's prompts (~45 tokens), metric
logit(" ") - logit("\\n") at the last token, batches of 10:

- the reference: one forward + backward of the model alone on the same
  batches (the gradient taken down to the input embeddings; the weights are
  frozen, as in `attribute`) - the target is attribute at <= 3x this;
- saelab `attribute`, act x grad for every (position, feature) of all 5 SAEs,
  sparse result included;
- the same through `splice(detach_error=True, record_grad=True)`: the SAEs in
  the autograd graph, dense feature gradients (the approach `attribute` avoids);
- integrated gradients with 4 joint steps (informational).

    .venv/bin/python -m bench.attribute [--prompts 100] [--batch 10] [--threads 1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from bench.common import table, write
from saelab.attribution import LogitDiff, attribute
from saelab.attribution.attribute import left_pad, prepare_prompts
from saelab.data.tokens import chat_prompt, pad_id, position_ids
from saelab.interventions.splice import splice
from saelab.models.load import load_model
from saelab.sae import SAEConfig, build_sae

TOPICS = ["City Names", "Countries", "Animals", "Types of Trees", "Types of Flowers", "Fruits",
          "Vegetables", "Car Brands", "Sports", "Rivers", "Mountains", "Ocean", "Inventions",
          "Languages", "Capital Cities", "Movies", "Books", "TV Shows", "Famous Scientists",
          "Famous Writers", "Video Games", "Companies", "Colors"]
TEMPLATE = "Provide me with a {} list of {}. Just provide the names, no need for any other information."


def _prompts(tokenizer, n: int) -> list[str]:
    kinds = ["short", "long", ""]
    return [chat_prompt(tokenizer, TEMPLATE.format(kinds[i % 3], TOPICS[i % len(TOPICS)]).replace("  ", " "),
                        assistant_prefix="-") for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--layers", default="0,6,12,18,24")
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    loaded = os.getloadavg()[0] > 1.0
    parser.add_argument("--threads", type=int, default=1 if loaded else torch.get_num_threads(),
                        help="default 1 when the machine is busy (load average > 1)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds, best of each")
    parser.add_argument("--skip-ig", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model("smollm2-135m-instruct", dtype="float32")
    texts = _prompts(lm.tokenizer, args.prompts)
    tokens = prepare_prompts(texts, lm.tokenizer, chat=False)
    saes = []
    for i, layer in enumerate(int(x) for x in args.layers.split(",")):
        sae = build_sae(SAEConfig("topk", lm.arch.d_model, args.d_sae, k=args.k,
                                  metadata={"site": f"resid_post.{layer}"}))
        sae.reset_parameters_(torch.Generator().manual_seed(i))
        saes.append(sae.requires_grad_(False))
    metric = LogitDiff(" ", "\n")
    (space,), (newline,) = metric._ids(lm.tokenizer)
    pad = pad_id(lm.tokenizer)
    batches = [left_pad(tokens[s:s + args.batch], pad) for s in range(0, len(tokens), args.batch)]
    embed = lm.model.get_input_embeddings()

    def masks(ids, lengths):
        mask = (torch.arange(ids.shape[1])[None] >= (ids.shape[1] - lengths)[:, None]).long()
        return mask, position_ids(mask)

    def model_alone():
        for ids, lengths in batches:
            mask, pos = masks(ids, lengths)
            emb = embed(ids).detach().requires_grad_(True)
            logits = lm.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=False).logits
            torch.autograd.grad((logits[:, -1, space] - logits[:, -1, newline]).sum(), emb)

    def ours():
        return attribute(lm, saes, tokens, metric, batch_size=args.batch)

    def spliced():
        for ids, lengths in batches:
            mask, pos = masks(ids, lengths)
            with splice(lm, saes, detach_error=True, record_grad=True) as sp:
                logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
                feats = [sp.feats[s.cfg.site] for s in saes]
                grads = torch.autograd.grad((logits[:, -1, space] - logits[:, -1, newline]).sum(), feats)
            for f, g in zip(feats, grads, strict=True):
                (f.detach() * g).nonzero()

    def ig():
        return attribute(lm, saes, tokens, metric, batch_size=args.batch, method="ig", ig_steps=4,
                         ig_joint=True)

    methods = [("model alone: forward + backward", model_alone, args.rounds),
               (f"saelab attribute, {len(saes)} SAEs", ours, args.rounds),
               ("splice(detach_error) + dense grads", spliced, args.rounds)]
    if not args.skip_ig:
        methods.append(("attribute, IG 4 joint steps (1 round)", ig, 1))
    best = {name: float("inf") for name, _, _ in methods}
    ours()  # warm-up
    for round_ in range(args.rounds):  # interleaved: a busy minute hits every method alike
        for name, fn, repeats in methods:
            if round_ >= repeats:
                continue
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    base = best[methods[0][0]]
    n_tokens = sum(len(t) for t in tokens)
    rows = [{"method": name, "seconds": best[name], "x model alone": best[name] / base,
             "tokens/s": n_tokens / best[name]} for name, _, _ in methods]
    print(f"{args.prompts} prompts ({n_tokens / len(tokens):.0f} tokens on average), batches of "
          f"{args.batch}, {len(saes)} TopK SAEs {lm.arch.d_model}->{args.d_sae} k={args.k} at "
          f"resid_post.{{{args.layers}}}, fp32, {args.threads} threads")
    print(table(rows, ["method", "seconds", "x model alone", "tokens/s"]))
    print("wrote", write("attribute", {
        "prompts": args.prompts, "batch": args.batch, "layers": args.layers, "d_sae": args.d_sae,
        "k": args.k, "threads": args.threads, "mean_tokens": n_tokens / len(tokens), "rows": rows}))


if __name__ == "__main__":
    main()
