"""Sparse probing: do a few SAE latents carry a concept as well as the model's residual stream?

    result = probe_saes(lm, {"topk": sae_a, "relu": sae_b})             # default datasets
    result["saes"][0]["mean"]["k1"]        # {"value": 0.71, "ci95": [0.69, 0.73], ...}
    result["sites"]["resid_post.12"]["model"]["mean"]["all"]     # the residual-stream baseline

For each labelled binary set (probe_data.py) and each site:

1. The model runs once over the texts (stopping after the site); the activations of every
   text token (BOS and other special tokens left out, texts cut to `max_tokens`) are kept,
   in memory and, with `cache_dir`, on disk, keyed by model, site, set and settings.
2. Each SAE encodes those token activations; its latents are mean-pooled per text. The
   model baseline mean-pools the residual dimensions themselves.
3. For each of `seeds` random stratified train/test splits: the k features (latents, or
   residual dimensions for the baseline) with the largest |mean(class 1) - mean(class 0)|
   on the training texts are kept, and a logistic regression (scikit-learn, L2, C=1, on
   standardized features) is fitted on them; accuracy on the test texts, for each k in
   `ks` and for all features.

This follows SAEBench's sparse probing (mean pooling over non-special tokens, top-k by
difference of class means, logistic regression), on smaller sets that fit a CPU.

Intervals: the value is the mean test accuracy over seeds; its 95% interval is a
percentile bootstrap over test texts (each seed's test texts resampled, the replicate
averaged over seeds). The mean over datasets uses the same replicates, averaged. Each
seed's accuracy is reported too: their spread is the split-to-split variation.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelab.checks import ABSURD, MAX_SEED, integer, number
from saelab.errors import BadValueError
from saelab.evals.probe_data import ProbeDataset, load_probe_dataset, require

SCHEMA = "saelab.probing/1"

# Chosen by measurement (README, "Sparse probing and absorption"): sets on which a logistic
# regression on SmolLM2-135M's mean-pooled residual stream (resid_post.12, 400 training
# texts) is clearly above chance, with short texts so that the model pass stays cheap.
DEFAULT_DATASETS: tuple[str, ...] = (
    "hist_fig_ismale", "hist_fig_isamerican", "headline_istrump", "glue_sst2", "spam_is",
    "click_bait", "world_country_United_States", "code_Python",
)

DEFINITIONS = {
    "pooling": "mean over each text's tokens of the SAE latents (or residual dimensions); "
               "special tokens (BOS) excluded; texts cut to max_tokens tokens",
    "k": "the k features with the largest |mean over class-1 training texts - mean over "
         "class-0 training texts|, then a logistic regression on them (standardized, L2, C=1)",
    "all": "the same logistic regression on every feature",
    "value": "mean test accuracy over the seeds (random stratified train/test splits)",
    "ci95": "percentile bootstrap over test texts (resampled within each seed, averaged "
            "over seeds)",
    "model": "the same probes on the model's own residual dimensions at the SAE's site",
    "chance": "accuracy of always answering the larger class of the test texts",
}


@dataclass(frozen=True)
class ProbeConfig:
    """What to probe on and how."""

    datasets: tuple[str, ...] = DEFAULT_DATASETS
    """Names of binary sets of the sae-probes package (probe_data.available())."""
    n_texts: int = 600
    """Texts per set (balanced between the classes)."""
    test_fraction: float = 1 / 3
    """Fraction of the texts held out for testing in each split."""
    max_tokens: int = 64
    """Text tokens kept per text (the start of the text)."""
    ks: tuple[int, ...] = (1, 2, 5)
    """Numbers of features for the sparse probes (plus one on all features)."""
    seeds: int = 5
    """Train/test splits, each with its own probes."""
    seed: int = 0
    """Seed of the text subset, the splits and the bootstrap."""
    batch_size: int = 32
    """Texts per model forward."""
    bootstrap: int = 1000
    """Bootstrap replicates for the intervals (0: none)."""
    C: float = 1.0
    """Inverse L2 strength of the logistic regressions."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", tuple(self.datasets))
        object.__setattr__(self, "ks", tuple(sorted(set(self.ks))))
        if not self.datasets:
            raise BadValueError("probing needs at least one dataset")
        if not self.ks:
            raise BadValueError("probing needs at least one k (ks), e.g. (1, 2, 5)")
        integer("n_texts", self.n_texts, low=8, high=ABSURD)
        number("test_fraction", self.test_fraction, low=0.05, high=0.95)
        integer("max_tokens", self.max_tokens, low=1, high=ABSURD)
        integer("seeds", self.seeds, low=1, high=1000)
        integer("seed", self.seed, low=0, high=MAX_SEED)
        integer("batch_size", self.batch_size, low=1, high=ABSURD)
        integer("bootstrap", self.bootstrap, low=0, high=10**6)
        number("C", self.C, low=1e-9)
        for k in self.ks:
            integer("ks", k, low=1, high=ABSURD)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TextActs:
    """Token activations of one labelled set at one site.

    acts: (T, d) float32, the text tokens of every text, text after text; offsets: (n+1,)
    int64, text i is acts[offsets[i]:offsets[i+1]]; labels: (n,) int64 in {0, 1}.
    """

    dataset: str
    acts: Tensor
    offsets: Tensor
    labels: np.ndarray
    seconds: float = 0.0
    from_cache: bool = False

    @property
    def counts(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def text_index(self) -> Tensor:
        """(T,) the text each token row belongs to."""
        return torch.repeat_interleave(torch.arange(len(self.labels)), self.counts)


def _cache_key(lm, site: str, data: ProbeDataset, cfg: ProbeConfig) -> str:
    spec = {"model": getattr(lm, "source_hash", getattr(lm, "name", "?")), "site": site,
            "dataset": data.name, "n": cfg.n_texts, "seed": cfg.seed, "max_tokens": cfg.max_tokens,
            "dtype": str(lm.dtype), "schema": SCHEMA,
            "texts": hashlib.sha256("\x00".join(data.texts).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


@torch.no_grad()
def model_activations(lm, site: str, data: ProbeDataset, cfg: ProbeConfig, *,
                      cache_dir: str | os.PathLike | None = None,
                      on_progress: Callable[[int], None] | None = None) -> TextActs:
    """Token activations of `data`'s texts at `site` (one model pass, or the disk cache).

    on_progress(n) is called with the number of texts done after each batch.
    """
    from saelab.data.tokens import context_bos_id, special_token_mask
    from saelab.models.hooks import capture

    path = Path(cache_dir) / f"{data.name}-{_cache_key(lm, site, data, cfg)}.safetensors" \
        if cache_dir is not None else None
    if path is not None and path.is_file():
        loaded = _read_cache(path, len(data.labels))
        if loaded is not None:
            return TextActs(data.name, loaded[0], loaded[1], data.labels, 0.0, True)
    started = time.perf_counter()
    tok = lm.tokenizer
    bos = context_bos_id(tok)
    rows = [([bos] if bos is not None else []) + ids[: cfg.max_tokens]
            for ids in tok(list(data.texts), add_special_tokens=False)["input_ids"]]
    order = np.argsort([len(r) for r in rows], kind="stable")  # similar lengths: little padding
    parts: list[Tensor | None] = [None] * len(rows)
    with capture(lm.model, site, arch=lm.arch) as acts:
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            width = max(len(rows[i]) for i in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.int64)
            mask = torch.zeros(len(batch), width, dtype=torch.int64)
            for j, i in enumerate(batch):
                ids[j, : len(rows[i])] = torch.tensor(rows[i])
                mask[j, : len(rows[i])] = 1
            keep = mask.bool() & ~special_token_mask(ids, tok)
            x = acts.run(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device))[site]
            x = x.float().cpu()
            for j, i in enumerate(batch):
                parts[i] = x[j][keep[j]]
            if on_progress is not None:
                on_progress(min(start + cfg.batch_size, len(order)))
    counts = torch.tensor([len(p) for p in parts], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    out = TextActs(data.name, torch.cat(parts).contiguous(), offsets, data.labels,
                   time.perf_counter() - started)
    if path is not None:
        _write_cache(path, out)
    return out


def _read_cache(path: Path, n: int) -> tuple[Tensor, Tensor] | None:
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
        acts, offsets = t["acts"], t["offsets"]
    except Exception:  # a truncated or foreign file: recomputed and rewritten
        return None
    if offsets.shape != (n + 1,) or int(offsets[-1]) != acts.shape[0]:
        return None
    return acts, offsets


def _write_cache(path: Path, ta: TextActs) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({"acts": ta.acts, "offsets": ta.offsets}, str(tmp))
        os.replace(tmp, path)
    except OSError:  # a cache that cannot be written only costs time next run
        tmp.unlink(missing_ok=True)


def pool_model(ta: TextActs) -> np.ndarray:
    """(n, d) mean of each text's token activations."""
    sums = torch.zeros(len(ta.labels), ta.acts.shape[1], dtype=torch.float64)
    sums.index_add_(0, ta.text_index(), ta.acts.double())
    return (sums / ta.counts.clamp_min(1)[:, None]).numpy()


@torch.no_grad()
def pool_sae(sae, ta: TextActs, chunk: int = 4096) -> np.ndarray:
    """(n, d_sae) mean over each text's tokens of the SAE's latents (encoded in eval mode)."""
    was_training = sae.training
    sae.eval()  # BatchTopK: the threshold, not a batch-level top-k
    try:
        device, dtype = sae.W_enc.device, sae.W_enc.dtype
        index = ta.text_index()
        sums = torch.zeros(len(ta.labels), sae.cfg.d_sae, dtype=torch.float64)
        for start in range(0, ta.acts.shape[0], chunk):
            feats = sae.encode(ta.acts[start:start + chunk].to(device, dtype)).double().cpu()
            sums.index_add_(0, index[start:start + chunk], feats)
    finally:
        sae.train(was_training)
    return (sums / ta.counts.clamp_min(1)[:, None]).numpy()


def splits(labels: np.ndarray, test_fraction: float, seeds: int, seed: int
           ) -> list[tuple[np.ndarray, np.ndarray]]:
    """`seeds` stratified random (train, test) index splits of `labels`."""
    out = []
    for s in range(seeds):
        rng = np.random.default_rng([seed, s])
        train, test = [], []
        for c in (0, 1):
            idx = rng.permutation(np.flatnonzero(labels == c))
            n_test = min(max(1, round(len(idx) * test_fraction)), len(idx) - 1)
            test.append(idx[:n_test])
            train.append(idx[n_test:])
        out.append((np.sort(np.concatenate(train)), np.sort(np.concatenate(test))))
    return out


def top_k_mean_diff(X: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k columns of X with the largest |mean over y==1 - mean over y==0|."""
    diff = np.abs(X[y == 1].mean(0) - X[y == 0].mean(0))
    return np.argsort(-diff, kind="stable")[: min(k, X.shape[1])]


def fit_predict(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, C: float = 1.0
                ) -> np.ndarray:
    """Predicted labels of X_test by a logistic regression fitted on standardized X_train."""
    require("sklearn", "scikit-learn")
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mean, std = X_train.mean(0), X_train.std(0)
    std = np.where(std > 1e-12, std, 1.0)  # constant columns (dead latents) stay 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(C=C, max_iter=1000).fit((X_train - mean) / std, y_train)
    return clf.predict((X_test - mean) / std)


def probe_correct(X: np.ndarray, y: np.ndarray, ks: Sequence[int],
                  split_list: Sequence[tuple[np.ndarray, np.ndarray]], C: float = 1.0
                  ) -> dict[str, np.ndarray]:
    """{"k1": ..., "all": ...}: (seeds, n_test) bool, whether each test text is classified right."""
    out: dict[str, list[np.ndarray]] = {}
    for train, test in split_list:
        for k in ks:
            cols = top_k_mean_diff(X[train], y[train], k)
            pred = fit_predict(X[train][:, cols], y[train], X[test][:, cols], C)
            out.setdefault(f"k{k}", []).append(pred == y[test])
        out.setdefault("all", []).append(fit_predict(X[train], y[train], X[test], C) == y[test])
    return {key: np.stack(v) for key, v in out.items()}


def _replicates(correct: np.ndarray, draws: np.ndarray | None) -> np.ndarray | None:
    """(R,) bootstrap accuracies: draws (R, seeds, n_test) indices into each seed's test texts."""
    if draws is None:
        return None
    picked = np.take_along_axis(correct[None].astype(np.float64), draws, axis=2)
    return picked.mean(axis=(1, 2))


def _summary(correct_or_value: np.ndarray | float, reps: np.ndarray | None,
             per_seed: np.ndarray | None = None) -> dict:
    value = float(np.mean(correct_or_value))
    ci = None if reps is None else [float(q) for q in np.quantile(reps, [0.025, 0.975])]
    out: dict[str, Any] = {"value": value, "ci95": ci}
    if per_seed is not None:
        out["per_seed"] = [float(v) for v in per_seed]
    return out


class _Scorer:
    """Accuracies with intervals; one set of bootstrap draws per dataset, shared by every
    probe on it (so the model and each SAE are compared on the same resamples)."""

    def __init__(self, cfg: ProbeConfig):
        self.cfg = cfg
        self.draws: dict[str, np.ndarray | None] = {}
        self.reps: dict[tuple[str, str, str], np.ndarray | None] = {}  # (owner, dataset, key)

    def score(self, owner: str, dataset: str, correct: Mapping[str, np.ndarray]) -> dict:
        first = next(iter(correct.values()))
        if dataset not in self.draws:
            n_boot = self.cfg.bootstrap
            rng = np.random.default_rng([self.cfg.seed, 7])
            self.draws[dataset] = (rng.integers(0, first.shape[1], size=(n_boot, *first.shape))
                                   if n_boot > 0 and first.shape[1] > 1 else None)
        out = {}
        for key, corr in correct.items():
            reps = _replicates(corr, self.draws[dataset])
            self.reps[owner, dataset, key] = reps
            out[key] = _summary(corr, reps, corr.mean(axis=1))
        return out

    def mean(self, owner: str, per_dataset: Mapping[str, Mapping[str, dict]]) -> dict:
        """Mean over datasets of each key, with the replicates averaged the same way."""
        keys = next(iter(per_dataset.values())).keys()
        out = {}
        for key in keys:
            values = [per_dataset[d][key]["value"] for d in per_dataset]
            reps = [self.reps[owner, d, key] for d in per_dataset]
            stacked = None if any(r is None for r in reps) else np.mean(reps, axis=0)
            out[key] = _summary(np.mean(values), stacked)
        return out


def _bind(lm, saes: Any) -> list[tuple[str, str, Any]]:
    """[(label, site, sae)] with each SAE's site checked against the model."""
    from saelab.interventions.splice import bind_saes

    if isinstance(saes, Mapping):
        items = list(saes.items())
    elif isinstance(saes, torch.nn.Module):
        items = [("sae", saes)]
    else:
        items = [(f"sae{i}", s) for i, s in enumerate(saes)]
    return [(str(label), next(iter(bind_saes(lm.arch, [sae]))), sae) for label, sae in items]


def probe_saes(lm, saes: Any, datasets: Sequence[str] | None = None, *,
               config: ProbeConfig | None = None, cache_dir: str | os.PathLike | None = None,
               on_progress: Callable[[str, int, int], None] | None = None,
               **settings: Any) -> dict:
    """Sparse probing of every SAE in `saes` against its site's residual baseline; a JSON dict.

    lm: a loaded `LM`. saes: an SAE, a list of SAEs or {label: SAE}; each is probed at its
    recorded site (cfg.site), which must exist in the model (SiteError otherwise).
    datasets: names of binary sets (default DEFAULT_DATASETS); settings: other ProbeConfig
    fields. The model runs once per (site, dataset), whatever the number of SAEs there;
    with `cache_dir` its token activations are also kept on disk for later calls.
    on_progress(stage, done, total): stage is "model <site> <dataset>" (texts) or "saes"
    (SAE encodings). Raises BadValueError for an unknown / single-class / multi-class set,
    ProbeDataMissingError when sae-probes is not installed.
    """
    if config is not None and settings:
        raise TypeError("pass either a ProbeConfig or keyword settings, not both")
    cfg = config if config is not None else ProbeConfig(**settings)
    if datasets is not None:
        cfg = ProbeConfig(**{**asdict(cfg), "datasets": tuple(datasets)})
    bound = _bind(lm, saes)
    data = {name: load_probe_dataset(name, n=cfg.n_texts, seed=cfg.seed) for name in cfg.datasets}
    scorer = _Scorer(cfg)
    sites: dict[str, dict] = {}
    per_sae: dict[str, dict] = {label: {} for label, _, _ in bound}
    encode_s = dict.fromkeys(per_sae, 0.0)
    n_encodings, done_encodings = len(bound) * len(data), 0
    for site in dict.fromkeys(site for _, site, _ in bound):
        model_rows: dict[str, dict] = {}
        seconds, cached, width = 0.0, [], 0
        for name, ds in data.items():
            split_list = splits(ds.labels, cfg.test_fraction, cfg.seeds, cfg.seed)
            stage, total = f"model {site} {name}", len(ds.labels)
            progress = (None if on_progress is None else
                        lambda n, stage=stage, total=total: on_progress(stage, n, total))
            ta = model_activations(lm, site, ds, cfg, cache_dir=cache_dir, on_progress=progress)
            seconds, width = seconds + ta.seconds, int(ta.acts.shape[1])
            if ta.from_cache:
                cached.append(name)
            model_rows[name] = scorer.score(f"model:{site}", name,
                                            probe_correct(pool_model(ta), ds.labels, cfg.ks,
                                                          split_list, cfg.C))
            for label, sae_site, sae in bound:
                if sae_site != site:
                    continue
                started = time.perf_counter()
                pooled = pool_sae(sae, ta)
                rows = scorer.score(label, name,
                                    probe_correct(pooled, ds.labels, cfg.ks, split_list, cfg.C))
                per_sae[label][name] = rows
                encode_s[label] += time.perf_counter() - started
                done_encodings += 1
                if on_progress is not None:
                    on_progress("saes", done_encodings, n_encodings)
            del ta
        sites[site] = {"model": {"datasets": model_rows,
                                 "mean": scorer.mean(f"model:{site}", model_rows)},
                       "width": width, "activations_s": round(seconds, 2),
                       "activations_from_cache": cached}
    test_n = {name: len(splits(ds.labels, cfg.test_fraction, 1, cfg.seed)[0][1])
              for name, ds in data.items()}
    result = {
        "schema": SCHEMA,
        "model": lm.provenance() if hasattr(lm, "provenance") else {"model": str(lm)},
        "settings": cfg.to_json(),
        "datasets": {name: {"chance": _chance(ds.labels, cfg), "n_texts": len(ds.labels),
                            "n_test": test_n[name], "n_train": len(ds.labels) - test_n[name],
                            "classes": list(ds.classes), "n_available": ds.n_available}
                     for name, ds in data.items()},
        "sites": sites,
        "saes": [{"label": label, "site": site, "architecture": sae.cfg.architecture,
                  "d_sae": int(sae.cfg.d_sae), "datasets": per_sae[label],
                  "mean": scorer.mean(label, per_sae[label]),
                  "probe_s": round(encode_s[label], 2)}
                 for label, site, sae in bound],
        "definitions": DEFINITIONS,
        "notes": [f"probing dataset {name!r} holds only {ds.n_available} texts, fewer than "
                  f"n_texts={cfg.n_texts}: its intervals are wider."
                  for name, ds in data.items() if ds.n_available < cfg.n_texts],
    }
    return result


def _chance(labels: np.ndarray, cfg: ProbeConfig) -> float:
    """Mean over the splits' test texts of the larger class's share."""
    shares = [max(labels[test].mean(), 1 - labels[test].mean())
              for _, test in splits(labels, cfg.test_fraction, cfg.seeds, cfg.seed)]
    return float(np.mean(shares))
