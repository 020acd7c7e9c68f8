"""Generation throughput with a feature edit at every step, against plain HF generate.

Batched greedy generation on the embedded model (8 chat prompts x 64 new
tokens by default), a random 4608-wide TopK SAE spliced at resid_post.12
clamping one feature at every position:

- plain HF ``model.generate`` without edits (the target: saelab with the edit
  at >= 0.8 of its tokens/s);
- saelab ``generate`` without edits (the loop's own overhead);
- saelab ``generate`` with the edit (KV cache kept; only the new position is edited);
- HF ``model.generate`` inside ``splice`` with the same edit (HF's loop, our hooks);
- naive: the same edit, recomputing the whole sequence at every step.

    .venv/bin/python -m bench.generate [--prompts 8] [--new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import best_time, table, write
from saelab.data.tokens import chat_prompt
from saelab.interventions.edits import FeatureEdit
from saelab.interventions.generate import generate
from saelab.interventions.splice import splice
from saelab.models.load import load_model
from saelab.sae import SAEConfig, build_sae

TOPICS = ["rivers", "fruits", "car brands", "famous scientists", "board games", "colors",
          "programming languages", "mountains", "capital cities", "musical instruments"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--site", default="resid_post.12")
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model("smollm2-135m-instruct", dtype="float32")
    texts = [chat_prompt(lm.tokenizer, f"Give me a {'short ' * (i % 2)}list of {TOPICS[i % len(TOPICS)]}.")
             for i in range(args.prompts)]
    sae = build_sae(SAEConfig("topk", lm.arch.d_model, args.d_sae, k=32,
                              metadata={"site": args.site}))
    sae.requires_grad_(False)
    edit = FeatureEdit(123, "set", 20.0)  # every position, prompt and generated
    n_tokens = args.prompts * args.new_tokens
    common = dict(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eos=False,
                  batch_size=args.prompts)

    enc = lm.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")

    @torch.inference_mode()
    def hf_generate():
        return lm.model.generate(**enc, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False)

    def hf_generate_spliced():
        with splice(lm, sae, edits=[edit]):
            return hf_generate()

    results: dict[str, object] = {}

    def ours(**kw):
        def run():
            results[kw.get("name", "")] = generate(lm, texts, **common, **{
                k: v for k, v in kw.items() if k != "name"})
        return run

    methods = [
        ("HF model.generate, no edit", hf_generate, args.repeats),  # rows[0]: the reference
        ("saelab generate, no edit", ours(name="plain"), args.repeats),
        ("saelab generate, feature edit (KV cache)",
         ours(name="edit", saes=sae, edits=[edit]), args.repeats),
        ("HF model.generate in splice, feature edit", hf_generate_spliced, args.repeats),
    ]
    if not args.skip_naive:
        methods.append(("naive: recompute prefix each step, feature edit",
                        ours(name="naive", saes=sae, edits=[edit], use_cache=False), 1))
    # Interleaved rounds, best of each: the machine is shared, and a busy minute would
    # otherwise land on whichever method happened to run then.
    best = {name: float("inf") for name, _, _ in methods}
    for _, fn, repeats in methods:
        if repeats > 1:
            fn()  # warm-up (the naive loop is slow enough to time once, cold)
    for round_ in range(args.repeats):
        for name, fn, repeats in methods:
            if round_ < repeats:
                best[name] = min(best[name], best_time(fn, repeats=1, warmup=0))
    rows = [{"method": name, "seconds": best[name], "tokens/s": n_tokens / best[name]}
            for name, _, _ in methods]
    plain = rows[0]["tokens/s"]
    for r in rows:
        r["vs HF plain"] = r["tokens/s"] / plain
    edited = rows[2]["tokens/s"]
    for r in rows:
        r["saelab edit vs this"] = edited / r["tokens/s"]
    same = "naive" in results and results["naive"].tokens == results["edit"].tokens
    print(f"{args.prompts} prompts x {args.new_tokens} new tokens, greedy, fp32, "
          f"{args.threads} threads; SAE topk {lm.arch.d_model}->{args.d_sae} at {args.site}; "
          f"cached == naive tokens: {same if 'naive' in results else 'not run'}")
    print(table(rows, ["method", "seconds", "tokens/s", "vs HF plain", "saelab edit vs this"]))
    print("wrote", write("generate", {
        "prompts": args.prompts, "new_tokens": args.new_tokens, "site": args.site,
        "d_sae": args.d_sae, "threads": args.threads, "cached_equals_naive": same, "rows": rows}))


if __name__ == "__main__":
    main()
