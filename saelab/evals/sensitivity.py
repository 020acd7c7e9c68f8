"""How realistic an SAE's synthetic activations look to the model, as a few numbers per SAE.

    s = sensitivity(lm, sae, "resid_pre.1", n=200)
    s["ks"]["synthetic-structured"]["l2"]     # 0 = blow-ups like real targets', 1 = disjoint

The synthetic-activation study (saelab/studies/synthetic.py, seeds/001) reduced:
real activations are perturbed towards real targets and towards the SAE's
synthetic-baseline and synthetic-structured activations, and the blow-up steps
of the model's reaction are compared with the two-sample Kolmogorov–Smirnov
statistic against the real targets'. A good SAE's structured synthetic
activations give a small KS; the baseline's ("a bag of latents") a larger one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

KINDS = ("real", "synthetic-baseline", "synthetic-structured")
DEFINITION = (
    "sensitivity: n real activations (last position of 10-token windows of held-out text) are "
    "moved in `steps` relative steps towards a real activation of another window, and towards "
    "the SAE's synthetic-baseline (each latent's activation moved to a random latent of similar "
    "firing frequency) and synthetic-structured (latents chosen to keep the cosines to the top "
    "latent) activations. The blow-up step of each curve is where the last-layer residual L2 "
    "(or the next-token KL) rises fastest; ks = two-sample Kolmogorov-Smirnov statistic of a "
    "kind's blow-up steps against the real targets' (0 = same distribution, 1 = disjoint).")


def sensitivity(lm: Any, sae: Any, site: str, *, n: int = 200, steps: int = 100,
                corpus: Any = "builtin", seed: int = 0, skip_text_tokens: int = 0,
                on_progress: Callable[[int, int], None] | None = None) -> dict:
    """KS distances of the synthetic kinds' blow-up steps from the real targets' (L2 and KL).

    skip_text_tokens: corpus text tokens to skip first (held-out text after the SAE's
    training data). on_progress(done, total) counts bases.
    """
    from saelab.data.corpus import Corpus, load_corpus
    from saelab.data.tokens import context_bos_id
    from saelab.studies.synthetic import SyntheticConfig, measure
    from saelab.studies.synthetic_report import summarize
    from saelab.studies.synthetic_targets import check_sae

    corpus = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    cfg = SyntheticConfig(model=lm.name, site=site, n=n, steps=steps, mode="relative",
                          plateau_n=0, seed=seed, corpus=corpus.name)
    site = check_sae(lm, sae, site)
    text_per_window = cfg.prompt_len - int(context_bos_id(lm.tokenizer) is not None)
    skip = math.ceil(skip_text_tokens / text_per_window)

    def stage(name: str, total: int) -> Callable[[int], None]:
        return (lambda done: on_progress(done, total)) if on_progress else (lambda done: None)

    m = measure(lm, sae, site, cfg, kinds=KINDS, corpus=corpus, skip_windows=skip, stage=stage)
    summary = {metric: summarize({k: m.steps[metric][:, i] for i, k in enumerate(KINDS)})
               for metric in ("l2", "kl")}
    return {
        "n": n, "steps": steps, "mode": "relative", "seed": seed, "skip_windows": skip,
        "blowup_threshold": cfg.blowup_threshold,
        "ks": {k: {metric: summary[metric][k]["ks"] for metric in summary} for k in KINDS[1:]},
        "ks_p": {k: {metric: summary[metric][k]["ks_p"] for metric in summary} for k in KINDS[1:]},
        "median_blowup": {k: {metric: summary[metric][k]["median"] for metric in summary}
                          for k in KINDS},
        "mean_cos": m.stats.mean_cos,
        "seconds": round(sum(m.seconds.values()), 3),
    }
