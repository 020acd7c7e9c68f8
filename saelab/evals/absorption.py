"""Feature absorption on the first-letter task (Chanin et al. 2024; SAEBench's definition).

    result = absorption(lm, sae)               # the SAE at its recorded site
    result["model_knows_letters"]              # False: the metric means nothing here
    result["metrics"]["mean_absorption_fraction"]   # {"value": .., "ci95": [..]}

Words are single tokens of the model's vocabulary made of letters (optionally after a
space), drawn evenly over first letters (so that rare letters have words to test on). Each is shown as SAEBench shows it: in-context examples "{w} has the first
letter: W", one per line, then "{word} has the first letter:"; the activation is read at
the word's token (the model is causal: the text after the word cannot change it, so the
prompt is cut after the word).

1. Does the model know first letters? A one-vs-rest logistic regression per letter on
   the residual activation (the ground-truth probe, trained on 75% of the words); its F1
   on the other 25%. A letter passes with F1 > 0.6; with fewer than 20 passing letters
   the model is too weak and no absorption is reported (SAEBench's `min_GT_probe_f1`
   and `min_feats_for_eval`).
2. The SAE's main latents for each passing letter: k-sparse probes for k = 1..10 on the
   latents, the k latents with the largest mean activation difference (letter vs rest)
   on the training words; k grows while the test F1 rises by more than 0.03 (SAEBench's
   feature-splitting rule). SAEBench picks the latents by an L1 probe's weights; we use
   the difference of means, as its sparse probing does.
3. For each test word of the letter that the probe gets right, with x its activation,
   d the unit probe direction, a_i the SAE latents and c_i = cos(W_dec[i], d):
   the probe projection P = x.d, each latent's projection p_i = a_i |W_dec[i]| c_i (what
   it adds to the reconstruction along d; SAEBench writes a_i c_i, the same for the unit
   decoder rows SAELens uses, but saelab's files may fold a scale into the decoder), the
   main latents' total M = sum of p_i over them.
   absorption fraction: absorbers are the up to 3 non-main latents with c_i >= 0.1 and
   p_i > 0, largest p_i first, their total A. If M >= P or A / P < 0.4, 0; else if
   M <= 0, 1; else min(A, P - M) / (min(A, P - M) + M), clipped to [0, 1].
   full absorption: no main latent fires, the latent with the largest p_i has
   c_i >= 0.025, P > 0, and its p_i / P >= 0.4.
   Per letter, the mean over its probe true positives; the result is the mean over
   passing letters, with a 95% percentile bootstrap over words (resampled within each
   letter).
"""

from __future__ import annotations

import hashlib
import json
import os
import string
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.checks import ABSURD, MAX_SEED, integer, number
from saelab.errors import SaelabError
from saelab.evals.probe_data import require

SCHEMA = "saelab.absorption/1"
LETTERS = string.ascii_lowercase
EPS = 1e-8

DEFINITIONS = {
    "probe_f1": "F1 on held-out words of a one-vs-rest logistic regression for the letter on "
                "the residual activation at the word token (the ground-truth probe)",
    "main_latents": "the k latents with the largest mean activation difference (letter vs "
                    "rest) on training words; k grows from 1 while a logistic regression on "
                    "them gains more than f1_jump test F1",
    "absorption_fraction": "per probe true positive: the share of the probe projection carried "
                           "by up to 3 probe-aligned non-main latents (cos >= 0.1) when the main "
                           "latents fall short (SAEBench's definition); mean over the letter's "
                           "words, then over passing letters",
    "full_absorption_rate": "share of the letter's probe true positives on which no main latent "
                            "fires and one probe-aligned latent (cos >= 0.025) carries >= 40% of "
                            "the probe projection; mean over passing letters",
}


class ModelTooWeakError(SaelabError):
    """Raised only when asked to (strict=True): the model does not know first letters."""


@dataclass(frozen=True)
class AbsorptionConfig:
    """Settings; the thresholds are SAEBench's defaults."""

    n_words: int = 1600
    """Vocabulary words to use: letter-only single tokens, drawn evenly over first letters."""
    test_fraction: float = 0.25
    icl_examples: int = 10
    """In-context examples before each word (SAEBench: 10)."""
    template: str = "{word} has the first letter:"
    batch_size: int = 32
    seed: int = 0
    min_probe_f1: float = 0.6
    min_letters: int = 20
    max_k: int = 10
    f1_jump: float = 0.03
    full_absorption_cos: float = 0.025
    absorption_fraction_cos: float = 0.1
    projection_proportion: float = 0.4
    max_absorbing_latents: int = 3
    bootstrap: int = 1000

    def __post_init__(self) -> None:
        integer("n_words", self.n_words, low=8, high=ABSURD)
        number("test_fraction", self.test_fraction, low=0.05, high=0.95)
        integer("icl_examples", self.icl_examples, low=0, high=1000)
        integer("batch_size", self.batch_size, low=1, high=ABSURD)
        integer("seed", self.seed, low=0, high=MAX_SEED)
        number("min_probe_f1", self.min_probe_f1, low=0, high=1)
        integer("min_letters", self.min_letters, low=1, high=26)
        integer("max_k", self.max_k, low=1, high=ABSURD)
        number("f1_jump", self.f1_jump, low=0)
        integer("bootstrap", self.bootstrap, low=0, high=10**6)
        integer("max_absorbing_latents", self.max_absorbing_latents, low=1, high=ABSURD)
        if "{word}" not in self.template:
            raise SaelabError(f"absorption template {self.template!r} has no {{word}} slot")


@dataclass
class WordActs:
    """Residual activations at the word token. X: (n, d) float32; letters: (n,) int64 0..25."""

    words: list[str]
    X: np.ndarray
    letters: np.ndarray
    train: np.ndarray  # indices
    test: np.ndarray
    seconds: float = 0.0


def letter_words(tokenizer, n: int, seed: int) -> list[tuple[int, str]]:
    """Up to `n` (token id, word) of single tokens made of ASCII letters, with or without a
    leading space (SAEBench's `get_alpha_tokens`), drawn at random, as evenly over first
    letters as the vocabulary allows: SAEBench uses the whole vocabulary, where even q and x
    have many words; a sample drawn in proportion would leave them a word or two to test on.
    Ids are sorted first so that the draw does not depend on the vocabulary's dict order."""
    by_letter: dict[int, list[tuple[int, str]]] = {}
    for tok_id in sorted(set(tokenizer.get_vocab().values())):
        word = tokenizer.decode([tok_id])
        core = word[1:] if word.startswith(" ") else word
        if core and core.isascii() and core.isalpha():
            by_letter.setdefault(LETTERS.index(core[0].lower()), []).append((tok_id, word))
    rng = np.random.default_rng(seed)
    pools = {li: [words[i] for i in rng.permutation(len(words))] for li, words in by_letter.items()}
    picked: list[tuple[int, str]] = []
    while len(picked) < n and any(pools.values()):  # round-robin over letters, 1 word each
        for li in sorted(pools):
            if pools[li] and len(picked) < n:
                picked.append(pools[li].pop())
    return sorted(picked)


def _prefix(words: list[str], cfg: AbsorptionConfig, rng: np.random.Generator, exclude: str) -> str:
    pool = [w for w in words if w != exclude]
    examples = [pool[i] for i in rng.choice(len(pool), size=min(cfg.icl_examples, len(pool)),
                                            replace=False)]
    lines = [cfg.template.format(word=w) + " " + w.strip()[0].upper() for w in examples]
    return "\n" + "\n".join(lines) + "\n" if lines else "\n"


@torch.no_grad()
def word_activations(lm, site: str, cfg: AbsorptionConfig, *,
                     cache_dir: str | os.PathLike | None = None,
                     on_progress: Callable[[int, int], None] | None = None) -> WordActs:
    """The residual activation at each word's token inside its in-context prompt (one pass)."""
    from saelab.data.tokens import context_bos_id
    from saelab.models.hooks import capture

    tok = lm.tokenizer
    pairs = letter_words(tok, cfg.n_words, cfg.seed)
    if len(pairs) < len(LETTERS):
        raise SaelabError(f"the tokenizer has only {len(pairs)} letter-only tokens: too few "
                          "words for the first-letter task")
    words = [w for _, w in pairs]
    letters = np.array([LETTERS.index(w.strip()[0].lower()) for w in words], dtype=np.int64)
    rng = np.random.default_rng([cfg.seed, 1])
    perm = rng.permutation(len(words))
    n_test = max(1, round(len(words) * cfg.test_fraction))
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    # The words themselves are in the key: a change in how they are drawn must miss the cache.
    key = hashlib.sha256(json.dumps({"model": getattr(lm, "source_hash", lm.name), "site": site,
                                     "cfg": asdict(cfg), "schema": SCHEMA, "dtype": str(lm.dtype),
                                     "words": pairs}, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"first-letter-{key}.npy" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            X = np.load(path, allow_pickle=False)
            if X.shape[0] == len(words):
                return WordActs(words, X, letters, train, test)
        except (OSError, ValueError):
            pass  # a broken cache file is recomputed
    started = time.perf_counter()
    bos = context_bos_id(tok)
    rows = []
    for (tok_id, word) in pairs:
        prefix = tok(_prefix(words, cfg, rng, word), add_special_tokens=False)["input_ids"]
        # the word's own token, then nothing: the suffix cannot change a causal model's state here
        head = cfg.template.split("{word}")[0]
        head_ids = tok(head, add_special_tokens=False)["input_ids"] if head else []
        rows.append(([bos] if bos is not None else []) + prefix + head_ids + [tok_id])
    order = np.argsort([len(r) for r in rows], kind="stable")
    X: np.ndarray | None = None  # (n, site width), allocated at the first batch
    with capture(lm.model, site, arch=lm.arch) as acts:
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            width = max(len(rows[i]) for i in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.int64)
            mask = torch.zeros(len(batch), width, dtype=torch.int64)
            last = torch.tensor([len(rows[i]) - 1 for i in batch])
            for j, i in enumerate(batch):
                ids[j, : len(rows[i])] = torch.tensor(rows[i])
                mask[j, : len(rows[i])] = 1
            x = acts.run(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device))[site]
            if X is None:
                X = np.zeros((len(rows), x.shape[-1]), dtype=np.float32)
            X[batch] = x[torch.arange(len(batch)), last.to(x.device)].float().cpu().numpy()
            if on_progress is not None:
                on_progress(min(start + cfg.batch_size, len(order)), len(order))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                np.save(fh, X, allow_pickle=False)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
    return WordActs(words, X, letters, train, test, time.perf_counter() - started)


def _logistic(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """(w, b) in X's own units of a class-balanced logistic regression.

    Fitted on X centred and divided by one scalar (its overall standard deviation): that
    helps the solver without changing which direction w points in. Per-dimension scaling
    would: the direction would lean on low-variance dimensions, and its cosines with the
    SAE's decoder rows, which absorption thresholds, would mean something else.
    """
    require("sklearn", "scikit-learn")
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mean = X.mean(0)
    scale = float(X.std()) or 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(max_iter=1000, class_weight="balanced").fit((X - mean) / scale, y)
    w = clf.coef_[0] / scale
    return w, float(clf.intercept_[0] - w @ mean)


def _f1(pred: np.ndarray, truth: np.ndarray) -> float:
    tp = float((pred & truth).sum())
    denom = float(pred.sum() + truth.sum())
    return 2 * tp / denom if denom else 0.0


@dataclass
class LetterProbe:
    """Ground-truth probes: weights (26, d) and bias (26,) in activation units; f1 (26,) on
    test words (NaN for a letter without test words)."""

    weights: np.ndarray
    bias: np.ndarray
    f1: np.ndarray
    n_test: np.ndarray


def letter_probe(wa: WordActs) -> LetterProbe:
    """One-vs-rest probes per letter on the training words; F1 on the test words."""
    d = wa.X.shape[1]
    W, b = np.zeros((26, d)), np.zeros(26)
    f1, n_test = np.full(26, np.nan), np.zeros(26, dtype=np.int64)
    Xtr, ytr, Xte, yte = wa.X[wa.train], wa.letters[wa.train], wa.X[wa.test], wa.letters[wa.test]
    for li in range(26):
        pos = ytr == li
        n_test[li] = int((yte == li).sum())
        if pos.sum() < 2 or (~pos).sum() < 2:
            continue
        W[li], b[li] = _logistic(Xtr, pos.astype(np.int64))
        if n_test[li]:
            f1[li] = _f1(Xte @ W[li] + b[li] > 0, yte == li)
    return LetterProbe(W, b, f1, n_test)


@torch.no_grad()
def _encode(sae, X: np.ndarray, chunk: int = 4096) -> np.ndarray:
    was_training = sae.training
    sae.eval()
    try:
        dev, dt = sae.W_enc.device, sae.W_enc.dtype
        out = [sae.encode(torch.from_numpy(X[s:s + chunk]).to(dev, dt)).float().cpu().numpy()
               for s in range(0, len(X), chunk)]
    finally:
        sae.train(was_training)
    return np.concatenate(out)


def main_latents(Z_train: np.ndarray, y_train: np.ndarray, Z_test: np.ndarray,
                 y_test: np.ndarray, cfg: AbsorptionConfig) -> tuple[list[int], list[float]]:
    """The letter's main latents by the feature-splitting rule, and F1 for each k tried.

    Candidates: latents by decreasing mean(letter) - mean(rest) on training words (only
    latents that fire more on the letter). k grows while a k-latent probe's test F1 beats the
    best so far by more than f1_jump.
    """
    diff = Z_train[y_train].mean(0) - Z_train[~y_train].mean(0)
    ranked = [int(i) for i in np.argsort(-diff, kind="stable")[: cfg.max_k] if diff[i] > 0]
    chosen, best, f1s = [], -1.0, []
    for k in range(1, len(ranked) + 1):
        cols = ranked[:k]
        if Z_train[:, cols].std(0).max() <= 1e-12:
            break
        w, b = _logistic(Z_train[:, cols], y_train.astype(np.int64))
        f1 = _f1(Z_test[:, cols] @ w + b > 0, y_test)
        f1s.append(f1)
        if f1 > best + cfg.f1_jump:
            best, chosen = f1, cols
        else:
            break
    return chosen, f1s


def word_absorption(x: np.ndarray, z: np.ndarray, direction: np.ndarray, cos: np.ndarray,
                    main: list[int], cfg: AbsorptionConfig,
                    dec_norms: np.ndarray | None = None) -> dict:
    """SAEBench's absorption fraction and full absorption for one word (module docstring).

    x: (d,) activation; z: (d_sae,) latents; direction: (d,) unit probe direction;
    cos: (d_sae,) cosine of each decoder row with it; main: the letter's main latents;
    dec_norms: (d_sae,) decoder row norms (None: unit rows, as SAEBench assumes).
    """
    P = float(x @ direction)
    # what latent i adds to the reconstruction along the probe: z_i |W_dec[i]| cos_i
    proj = z * cos * (dec_norms if dec_norms is not None else 1.0)
    M = float(proj[main].sum()) if main else 0.0
    candidates = np.ones(len(z), dtype=bool)
    candidates[main] = False
    candidates &= (cos >= cfg.absorption_fraction_cos) & (proj > 0)
    idx = np.flatnonzero(candidates)
    top = idx[np.argsort(-proj[idx], kind="stable")[: cfg.max_absorbing_latents]]
    A = float(proj[top].sum())
    share = A / P if P != 0 else 0.0
    if M >= P or share < cfg.projection_proportion:
        fraction = 0.0
    elif M <= 0:
        fraction = 1.0
    else:
        absorbed = min(A, P - M)
        fraction = float(np.clip(absorbed / (absorbed + M), 0.0, 1.0))
    best = int(np.argmax(proj))
    full = (all(z[i] < EPS for i in main) and cos[best] >= cfg.full_absorption_cos and P > 0
            and proj[best] / P >= cfg.projection_proportion)
    return {"absorption_fraction": fraction, "full_absorption": bool(full),
            "top_latent": best, "absorbing_latents": [int(i) for i in top],
            "probe_projection": P}


def absorption_from_acts(sae, wa: WordActs, cfg: AbsorptionConfig | None = None, *,
                         probe: LetterProbe | None = None) -> dict:
    """Absorption of `sae` given the word activations (the model-free part; see module doc).

    Returns the JSON dict of `absorption` without model provenance.
    """
    cfg = cfg or AbsorptionConfig()
    probe = probe or letter_probe(wa)
    passing = [li for li in range(26)
               if np.isfinite(probe.f1[li]) and probe.f1[li] > cfg.min_probe_f1]
    letters_json = {LETTERS[li]: {"probe_f1": None if not np.isfinite(probe.f1[li])
                                  else float(probe.f1[li]), "n_test_words": int(probe.n_test[li]),
                                  "passes": li in passing} for li in range(26)}
    knows = len(passing) >= cfg.min_letters
    out: dict[str, Any] = {
        "schema": SCHEMA, "settings": asdict(cfg), "n_words": len(wa.words),
        "n_train": len(wa.train), "n_test": len(wa.test), "letters": letters_json,
        "passing_letters": [LETTERS[li] for li in passing], "model_knows_letters": knows,
        "metrics": None, "definitions": DEFINITIONS, "notes": []}
    if not knows:
        out["notes"].append(
            f"the model does not know first letters well enough at this site: only "
            f"{len(passing)} of 26 letters have a probe F1 above {cfg.min_probe_f1} (at least "
            f"{cfg.min_letters} are needed, as in SAEBench), so absorption means nothing here "
            "and is not reported; use a larger model, another layer, or more words "
            f"(n_words={cfg.n_words} now).")
        return out
    Z = _encode(sae, wa.X)
    Ztr, Zte = Z[wa.train], Z[wa.test]
    Xte, yte = wa.X[wa.test], wa.letters[wa.test]
    W_dec = sae.W_dec.detach().float().cpu().numpy()
    dec_norms = np.linalg.norm(W_dec, axis=1)
    dec_unit = W_dec / np.maximum(dec_norms[:, None], 1e-12)
    per_letter, word_rows = {}, []
    for li in passing:
        direction = probe.weights[li] / max(np.linalg.norm(probe.weights[li]), 1e-12)
        cos = dec_unit @ direction
        main, f1s = main_latents(Ztr, wa.letters[wa.train] == li, Zte, yte == li, cfg)
        tp = np.flatnonzero((yte == li) & (Xte @ probe.weights[li] + probe.bias[li] > 0))
        rows = [word_absorption(Xte[i], Zte[i], direction, cos, main, cfg, dec_norms)
                for i in tp]
        for i, row in zip(tp, rows):
            word_rows.append({"letter": LETTERS[li], "word": wa.words[wa.test[i]], **row})
        per_letter[LETTERS[li]] = {
            "main_latents": main, "sparse_probe_f1": f1s, "n_probe_true_positives": len(tp),
            "absorption_fraction": float(np.mean([r["absorption_fraction"] for r in rows]))
            if rows else None,
            "full_absorption_rate": float(np.mean([r["full_absorption"] for r in rows]))
            if rows else None,
            "_fractions": np.array([r["absorption_fraction"] for r in rows]),
            "_full": np.array([r["full_absorption"] for r in rows], dtype=np.float64)}
    scored = {k: v for k, v in per_letter.items() if v["n_probe_true_positives"]}
    out["metrics"] = {
        "mean_absorption_fraction": _mean_ci([v["_fractions"] for v in scored.values()], cfg),
        "mean_full_absorption_rate": _mean_ci([v["_full"] for v in scored.values()], cfg),
        "mean_num_main_latents": float(np.mean([len(v["main_latents"]) for v in scored.values()])),
        "n_letters": len(scored)}
    for v in per_letter.values():
        del v["_fractions"], v["_full"]
    out["per_letter"] = per_letter
    out["words"] = [r for r in word_rows if r["absorption_fraction"] > 0 or r["full_absorption"]]
    out["sae"] = {"architecture": sae.cfg.architecture, "d_sae": int(sae.cfg.d_sae),
                  "site": sae.cfg.site}
    return out


def _mean_ci(groups: list[np.ndarray], cfg: AbsorptionConfig) -> dict:
    """Mean over letters of the mean over words; percentile bootstrap over words per letter."""
    value = float(np.mean([g.mean() for g in groups]))
    ci = None
    if cfg.bootstrap > 0:
        rng = np.random.default_rng([cfg.seed, 3])
        reps = np.zeros(cfg.bootstrap)
        for g in groups:
            reps += g[rng.integers(0, len(g), size=(cfg.bootstrap, len(g)))].mean(1)
        reps /= len(groups)
        ci = [float(q) for q in np.quantile(reps, [0.025, 0.975])]
    return {"value": value, "ci95": ci,
            "std_over_letters": float(np.std([g.mean() for g in groups], ddof=1))
            if len(groups) > 1 else None}


def absorption(lm, sae, config: AbsorptionConfig | None = None, *,
               word_acts: WordActs | None = None, cache_dir: str | os.PathLike | None = None,
               strict: bool = False, on_progress: Callable[[int, int], None] | None = None,
               **settings: Any) -> dict:
    """First-letter absorption of `sae` at its recorded site of `lm`; a JSON-able dict.

    word_acts: activations from `word_activations` for this model and site, to share one
    model pass between SAEs (else computed, and cached in `cache_dir` when given).
    strict: raise ModelTooWeakError instead of returning a result without metrics when the
    model does not know first letters. Raises SiteError for a site the model lacks.
    """
    from saelab.interventions.splice import bind_saes

    if config is not None and settings:
        raise TypeError("pass either an AbsorptionConfig or keyword settings, not both")
    cfg = config if config is not None else AbsorptionConfig(**settings)
    site = next(iter(bind_saes(lm.arch, [sae])))
    wa = word_acts or word_activations(lm, site, cfg, cache_dir=cache_dir, on_progress=on_progress)
    out = absorption_from_acts(sae, wa, cfg)
    out["site"] = site
    out["model"] = lm.provenance() if hasattr(lm, "provenance") else {"model": str(lm)}
    out["activations_s"] = round(wa.seconds, 2)
    if strict and not out["model_knows_letters"]:
        raise ModelTooWeakError(out["notes"][0])
    return out
