"""Explain features without an API, score the explanations, write them into the index.

    summary = explain_index("runs/feats/l12", ExplainConfig(source="tokens"))

A feature's examples in the index (top activating and binned over its range) are
split: the top half of its top examples explain it; the rest (the lower top
ranks and every binned example, deduplicated) are held out as the texts where it
fires. Explanations:

- `tokens`: the tokens it fires on most often in its top examples;
- `lens`: the tokens its decoder direction promotes (logit lens);
- `tokens+lens`: both;
- an LM explainer (`LMExplainer`, any local Hugging Face causal LM): prompted with the
  top examples, the activating token marked.

Each explanation is scored by the embedding scorer (saelab/evals/autointerp.py)
against random texts: the centre windows of other features' examples (a sample of
the corpus; a feature of density d fires at one with probability about d). A
control scores each feature with another feature's explanation (expected ~0.5).

The index folder gains explanations.parquet (feature, explanation, source, auroc,
control_auroc, n_pos, n_neg) and explanations.json (settings, AUROC distribution),
and features.parquet's `label` column holds the explanations, so the browser and
the dashboard show them. A rebuild of the index drops them (they described the
old build).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from saelab.checks import ABSURD, MAX_SEED, choice, integer
from saelab.errors import SaelabError
from saelab.features import index as ix

SOURCES = ("tokens", "lens", "tokens+lens")
EXPLANATIONS, EXPLANATIONS_JSON = "explanations.parquet", "explanations.json"


@dataclass(frozen=True)
class ExplainConfig:
    """How features are explained and scored."""

    source: str = "tokens"
    """tokens, lens or tokens+lens (ignored when an LM explainer is given)."""
    features: int = 200
    """Features explained: the alive ones with enough examples, lowest ids first."""
    n_tokens: int = 5
    """Tokens named in a tokens / lens explanation."""
    negatives: int = 50
    """Random texts scored against each feature's held-out texts."""
    min_positives: int = 2
    """A feature needs this many held-out texts to be scored."""
    bootstrap: int = 1000
    """Bootstrap replicates (over features) of the mean AUROC's interval."""
    seed: int = 0
    """Seed of the negatives and of the control's pairing."""

    def __post_init__(self) -> None:
        choice("source", self.source, SOURCES)
        integer("features", self.features, low=1, high=ABSURD)
        integer("n_tokens", self.n_tokens, low=1, high=100)
        integer("negatives", self.negatives, low=1, high=ABSURD)
        integer("min_positives", self.min_positives, low=1, high=ABSURD)
        integer("bootstrap", self.bootstrap, low=0, high=10**6)
        integer("seed", self.seed, low=0, high=MAX_SEED)


@dataclass
class FeatureRecord:
    """One feature's material: examples that explain it and held-out texts where it fires."""

    feature: int
    top: list[tuple[str, str, str]]  # (left, token, right) of its top examples: the explaining half
    held_out: list[str]  # window texts where it fires, not shown to the explainer
    lens: list[str]  # logit-lens top tokens
    fires_at: set[tuple[int, int]] = field(default_factory=set)  # its examples' (context, position)


def _window(tokens: list[str], centre: int) -> tuple[str, str, str]:
    return "".join(tokens[:centre]), tokens[centre], "".join(tokens[centre + 1:])


def feature_records(folder: Path, config: ExplainConfig
                    ) -> tuple[list[FeatureRecord], list[tuple[str, int, tuple[int, int]]]]:
    """The records of the features to explain, and a pool of random window texts (with the
    feature each came from and its (context, position), to leave a feature's own out)."""
    index = ix.FeatureIndex.open(folder)
    path = folder / ix.EXAMPLES
    if not path.is_file():
        raise SaelabError(f"{folder} has no {ix.EXAMPLES}; rebuild it with `saelab features`.")
    table = pq.read_table(path, columns=["feature", "kind", "rank", "context", "position",
                                         "start", "tokens"])
    feats = table["feature"].to_numpy()
    counts = np.bincount(feats, minlength=index.d_sae)
    chosen = np.flatnonzero(counts >= 2 + config.min_positives)[: config.features]
    if len(chosen) == 0:
        raise SaelabError(f"no feature in {folder} has {2 + config.min_positives} examples; "
                          "collect over more tokens (`saelab features --tokens`).")
    rng = np.random.default_rng(config.seed)
    # the random pool: one example per row drawn over the whole table, a few per feature scored
    pool_rows = rng.choice(table.num_rows, size=min(table.num_rows, 4 * config.negatives + 200),
                           replace=False)
    keep = pc.is_in(table["feature"], pa.array(chosen.astype(np.int32)))
    sub = table.filter(keep)
    rows = sub.to_pydict()
    pool = table.take(pa.array(np.sort(pool_rows))).to_pydict()
    lens = index.features.select(["lens_top_tokens"]).take(pa.array(chosen)).to_pydict()["lens_top_tokens"]
    by_feature: dict[int, list[int]] = {}
    for i, f in enumerate(rows["feature"]):
        by_feature.setdefault(f, []).append(i)
    records = []
    for j, f in enumerate(chosen.tolist()):
        idx = by_feature[f]
        top = sorted((i for i in idx if rows["kind"][i] == "top"), key=lambda i: rows["rank"][i])
        explain = top[: max(1, len(top) // 2)]
        # held out: the other examples, each (context, position) and each window text once,
        # none the same text as an explaining example (repeated boilerplate would leak)
        text = lambda i: "".join(rows["tokens"][i])  # noqa: E731
        seen = {(rows["context"][i], rows["position"][i]) for i in explain} | {text(i) for i in explain}
        held_texts = []
        for i in idx:
            key = (rows["context"][i], rows["position"][i])
            if key not in seen and text(i) not in seen:
                seen |= {key, text(i)}
                held_texts.append(text(i))
        top_w = [_window(rows["tokens"][i], rows["position"][i] - rows["start"][i]) for i in explain]
        fires_at = {(rows["context"][i], rows["position"][i]) for i in idx}
        records.append(FeatureRecord(f, top_w, held_texts, list(lens[j] or []), fires_at))
    pool_texts = [("".join(t), f, (c, p)) for t, f, c, p in zip(
        pool["tokens"], pool["feature"], pool["context"], pool["position"], strict=True)]
    return records, pool_texts


def _clean(token: str) -> str:
    return token.strip() or repr(token)


def token_explanation(rec: FeatureRecord, n: int) -> str:
    common = Counter(_clean(t) for _, t, _ in rec.top).most_common(n)
    return ", ".join(t for t, _ in common)


def lens_explanation(rec: FeatureRecord, n: int) -> str:
    return ", ".join(dict.fromkeys(_clean(t) for t in rec.lens[:n]))


def rule_explanation(rec: FeatureRecord, source: str, n: int) -> str:
    """An explanation from the examples alone (source: tokens, lens, tokens+lens)."""
    if source == "tokens":
        return token_explanation(rec, n)
    if source == "lens":
        return lens_explanation(rec, n)
    return f"{token_explanation(rec, n)}; predicts {lens_explanation(rec, n)}"


def negatives_for(rec: FeatureRecord, pool: list[tuple[str, int, tuple]], n: int,
                  rng: np.random.Generator) -> list[str]:
    """n random pool texts from other features' examples, at none of `rec`'s own."""
    others = [t for t, f, key in pool if f != rec.feature and key not in rec.fires_at]
    pick = rng.choice(len(others), size=min(n, len(others)), replace=False)
    return [others[i] for i in pick]


def explain_index(folder: str | os.PathLike, config: ExplainConfig = ExplainConfig(), *,
                  explainer: Any = None, embedder: Any = None, write: bool = True,
                  on_progress: Any = None) -> dict:
    """Explain and score the features of one feature index; returns explanations.json's dict.

    explainer: an `LMExplainer` (else the rule `config.source`). embedder: a sentence
    embedder (default the packaged MiniLM). write: also write the files into `folder`.
    Raises SaelabError for a folder that is not a feature index or holds too few examples.
    """
    from saelab.evals.autointerp import (
        DEFINITION,
        auroc_summary,
        embedding_aurocs,
        sentence_embedder,
    )

    folder = Path(folder)
    if not ix.is_index(folder):
        raise SaelabError(f"{folder} is not a feature index (no {ix.INDEX}); build one with "
                          "`saelab features SAE --out DIR` and pass DIR/NAME.")
    records, pool = feature_records(folder, config)
    rng = np.random.default_rng(config.seed)
    if explainer is not None:
        texts, source = [], f"lm:{explainer.name}"
        for i, rec in enumerate(records):
            texts.append(explainer.explain(rec) or rule_explanation(rec, "tokens", config.n_tokens))
            if on_progress:
                on_progress(i + 1, len(records))
    else:
        source = config.source
        texts = [rule_explanation(r, config.source, config.n_tokens) for r in records]
    scored = [i for i, r in enumerate(records) if len(r.held_out) >= config.min_positives]
    negs = {i: negatives_for(records[i], pool, config.negatives, rng) for i in scored}
    embedder = embedder or sentence_embedder()
    aurocs = np.full(len(records), np.nan)
    control = np.full(len(records), np.nan)
    if scored:
        aurocs[scored] = embedding_aurocs(embedder, [texts[i] for i in scored],
                                          [records[i].held_out for i in scored],
                                          [negs[i] for i in scored])
        if len(scored) > 1:  # control: each feature scored with another feature's explanation
            shift = rng.permutation(len(scored))
            shift = np.where(shift == np.arange(len(scored)), (shift + 1) % len(scored), shift)
            control[scored] = embedding_aurocs(embedder, [texts[scored[j]] for j in shift],
                                               [records[i].held_out for i in scored],
                                               [negs[i] for i in scored])
    summary = {"schema": "saelab.explanations/1", "source": source, "config": asdict(config),
               "definition": DEFINITION, "features_explained": len(records),
               "features_scored": len(scored),
               "auroc": auroc_summary(aurocs, bootstrap=config.bootstrap, seed=config.seed),
               "control_auroc": auroc_summary(control, bootstrap=config.bootstrap, seed=config.seed)}
    table = {"feature": [r.feature for r in records], "explanation": texts,
             "source": [source] * len(records), "auroc": aurocs, "control_auroc": control,
             "n_pos": [len(r.held_out) for r in records],
             "n_neg": [len(negs.get(i, [])) for i in range(len(records))]}
    if write:
        write_explanations(folder, table, summary)
    return summary


def write_explanations(folder: Path, table: dict, summary: dict) -> None:
    """explanations.parquet/.json, and features.parquet with the labels, switched in together."""
    from saelab.atomic import atomic_write_text, disk_full, write_folder

    features = pq.read_table(folder / ix.FEATURES)
    labels = features["label"].to_pylist()
    for f, text in zip(table["feature"], table["explanation"], strict=True):
        labels[f] = text
    features = features.set_column(features.schema.get_field_index("label"), "label",
                                   pa.array(labels, type=pa.string()))
    expl = pa.table({"feature": pa.array(table["feature"], type=pa.int32()),
                     "explanation": pa.array(table["explanation"], type=pa.string()),
                     "source": pa.array(table["source"], type=pa.string()),
                     "auroc": pa.array(np.asarray(table["auroc"], dtype=np.float64), from_pandas=True),
                     "control_auroc": pa.array(np.asarray(table["control_auroc"], dtype=np.float64),
                                               from_pandas=True),
                     "n_pos": pa.array(table["n_pos"], type=pa.int32()),
                     "n_neg": pa.array(table["n_neg"], type=pa.int32())})

    def write(tmp: Path) -> None:
        pq.write_table(features, tmp / ix.FEATURES, compression="zstd")
        pq.write_table(expl, tmp / EXPLANATIONS, compression="zstd")
        atomic_write_text(tmp / EXPLANATIONS_JSON, json.dumps(summary, indent=1) + "\n")

    with disk_full(folder, "the index there is unchanged"):
        write_folder(folder, (ix.FEATURES, EXPLANATIONS, EXPLANATIONS_JSON), write)
    if (folder / "dashboard.html").is_file():  # the static page shows the labels too
        from saelab.report.dashboard import write_dashboard

        write_dashboard(folder)
