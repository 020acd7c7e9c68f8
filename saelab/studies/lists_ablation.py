"""The list study's causal ablation (stage 4 of saelab.studies.lists).

Per SAE and example: cut just before the last item's last token, zero the top-N
attributed (position, feature) pairs on the prefix, regenerate. Controls with the
same seed and prefix: the unablated regeneration (once per example) and N random
active pairs zeroed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.studies.lists_config import (
    ListsConfig,
    Stage,
    StudyModel,
    ablation_examples,
    attributed,
    example_seed,
)
from saelab.studies.lists_data import parse_list
from saelab.studies.records import RecordLog


@dataclass(frozen=True)
class Pairs:
    """(position, feature) pairs of one example at one site."""

    positions: tuple[int, ...]
    features: tuple[int, ...]


def top_pairs(attr: Any, site: str, example: int, n: int, skip_first: int,
              exclude: set[int] | None = None) -> Pairs:
    """The n pairs with the largest positive attribution, leading positions and the
    features in `exclude` left out."""
    s = attr.sites[site]
    rows = s.rows_of(example)
    index, value = s.index[rows], s.value[rows]
    keep = (index[:, 1] >= skip_first) & (value > 0)
    if exclude:
        keep &= ~torch.isin(index[:, 2], torch.tensor(sorted(exclude), dtype=index.dtype))
    index, value = index[keep], value[keep]
    best = value.topk(min(n, value.numel())).indices
    return Pairs(tuple(index[best, 1].tolist()), tuple(index[best, 2].tolist()))


def random_pairs(attr: Any, site: str, example: int, n: int, skip_first: int, exclude: Pairs,
                 seed: int, features: set[int] | None = None) -> Pairs:
    """n active pairs drawn uniformly (seeded), the top pairs, leading positions and the
    features in `features` left out (the same pool rules as the top pairs)."""
    s = attr.sites[site]
    index = s.index[s.rows_of(example)]
    taken = set(zip(exclude.positions, exclude.features, strict=True))
    banned = features or set()
    pool = [(p, f) for _, p, f in index.tolist()
            if p >= skip_first and (p, f) not in taken and f not in banned]
    rng = np.random.default_rng(seed)
    chosen = [pool[i] for i in sorted(rng.choice(len(pool), size=min(n, len(pool)), replace=False))]
    return Pairs(tuple(p for p, _ in chosen), tuple(f for _, f in chosen))


def pair_edits(pairs: Pairs, site: str, row: int, every_step: bool) -> list[Any]:
    """FeatureEdits zeroing each pair at its absolute position (and, with every_step, the
    same features at every generated token)."""
    from saelab.interventions.edits import FeatureEdit

    by_position: dict[int, list[int]] = {}
    for p, f in zip(pairs.positions, pairs.features, strict=True):
        by_position.setdefault(p, []).append(f)
    edits = [FeatureEdit(feats, "zero", positions=[p], site=site, rows=[row])
             for p, feats in sorted(by_position.items())]
    if every_step and pairs.features:
        edits.append(FeatureEdit(sorted(set(pairs.features)), "zero", positions="generated",
                                 site=site, rows=[row]))
    return edits


def ablate_dataset(sm: StudyModel, cfg: ListsConfig, dataset: list[dict], saes: dict[str, tuple[Any, Path]],
                   attr: Any, path: Path, stage: Stage,
                   exclude: dict[str, set[int]] | None = None) -> RecordLog:
    """Regenerate each chosen list from just before its last item's last token: unablated
    (once), and per SAE with its top-N pairs and with N random active pairs zeroed
    (features in exclude[site], the dense ones, never chosen)."""
    exclude = exclude or {}
    examples = ablation_examples(cfg, dataset)
    row_of = {r["index"]: i for i, r in enumerate(attributed(cfg, dataset))}  # row in the Attribution
    log = RecordLog(path, key=("sae", "condition", "index"))
    jobs: list[tuple[str | None, str]] = [(None, "control")]
    jobs += [(site, cond) for site in saes for cond in ("top", "random")]
    update = stage("ablate and regenerate", len(jobs) * len(examples))
    done = 0
    for site, condition in jobs:
        name = site or "-"
        todo = [r for r in examples if (name, condition, r["index"]) not in log]
        done += len(examples) - len(todo)
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start:start + cfg.batch_size]
            prefixes, edits, chosen = [], [], []
            for row, r in enumerate(chunk):
                prefixes.append((r["prompt_ids"] + r["generated"])[:r["last_position"]])
                pairs = Pairs((), ())
                if site is not None:
                    banned = exclude.get(site)
                    top = top_pairs(attr, site, row_of[r["index"]], cfg.ablate, cfg.skip_first, banned)
                    pairs = top if condition == "top" else random_pairs(
                        attr, site, row_of[r["index"]], cfg.ablate, cfg.skip_first, top,
                        example_seed(cfg, r["index"], "regenerate"), banned)
                    edits += pair_edits(pairs, site, row, cfg.ablate_every_step)
                chosen.append(pairs)
            log.append(_regenerate(sm, cfg, chunk, prefixes, edits, site, saes, name, condition, chosen))
            done += len(chunk)
            update(done)
    update(done)  # a resumed run with nothing left still closes the stage
    return log


def _regenerate(sm: StudyModel, cfg: ListsConfig, chunk: list[dict], prefixes: list[list[int]],
                edits: list[Any], site: str | None, saes: dict, name: str, condition: str,
                chosen: list[Pairs]) -> list[dict]:
    from saelab.interventions.generate import generate

    gen = generate(sm.lm, prefixes, max_new_tokens=cfg.regen_max_new_tokens,
                   temperature=cfg.regen_temperature, top_p=cfg.regen_top_p,
                   seeds=[example_seed(cfg, r["index"], "regenerate") for r in chunk],
                   saes={site: saes[site][0]} if site else None, edits=edits,
                   batch_size=cfg.batch_size, eos_token_ids=[sm.eot])
    records = []
    for r, prefix, sample, pairs in zip(chunk, prefixes, gen.samples, chosen, strict=True):
        generated = prefix[len(r["prompt_ids"]):] + sample.tokens
        parsed = parse_list(r["prompt_ids"], generated, sm.lm.tokenizer, [sm.eot],
                            stopped=sample.stop == "eos")
        records.append({"sae": name, "condition": condition, "index": r["index"], "seed": sample.seed,
                        "pairs": dataclasses.asdict(pairs), "new_tokens": sample.tokens,
                        "items": parsed.items, "n_items": parsed.n_items, "ending": parsed.ending})
    return records


