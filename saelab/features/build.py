"""Build feature indexes: collect, summarize, logit lens, neighbours, token ablation, write.

    paths = build_index(lm, {"l12": (sae, "runs/x/sae")}, "runs/feats", IndexConfig(tokens=50_000))

Writes, under `out`, one feature index folder per SAE (see index.py) with a
static dashboard.html, and out/run.json. Under torchrun every rank collects its
share of the corpus and writes out/parts/rank_R.safetensors; rank 0 merges the
parts (exactly, see collect.py) and does the rest.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.atomic import atomic_write_text, disk_full, fault_point
from saelab.checks import ABSURD, PER_FEATURE, boolean, integer, number
from saelab.errors import SaelabError
from saelab.features import index as ix
from saelab.features.ablated_text import ablate_examples, chosen, window_rows
from saelab.features.collect import (
    CollectConfig,
    Collection,
    collect,
    collect_cache,
    load_parts,
    save_part,
)
from saelab.features.logit_lens import logit_lens
from saelab.features.neighbours import neighbours
from saelab.features.summary import KIND_TOP, FeatureTable, summarize
from saelab.models.limits import check_positions, lm_max_positions

Stage = Callable[[str, int, int], None]  # (stage, done, total)
LENS_SHOWN = 500  # left-out tokens listed per reason in index.json (SmolLM2: 35 in all)


@dataclass(frozen=True)
class IndexConfig:
    """What `saelab features` computes."""

    tokens: int = 50_000
    """Tokens to collect over (rounded up to whole contexts)."""
    corpus: Any = "builtin"
    """Corpus spec for `load_corpus`, or a Corpus."""
    context: int = 128
    """Tokens per context."""
    batch_size: int = 16
    """Contexts per forward pass."""
    collect: CollectConfig = field(default_factory=CollectConfig)
    """Examples, bins, histogram and window settings."""
    lens_k: int = 10
    """Top and bottom logit-lens tokens per feature."""
    neighbours_k: int = 10
    """Nearest features by decoder cosine."""
    ablate: int = 64
    """Features (alive, lowest ids first) whose examples get ablated text (token ablation)."""
    ablate_per_bin: int = 1
    """Uniform examples per bin (the first drawn) ablated besides the top one; 0: top only."""
    max_back: int = 16
    """Earlier tokens deleted in turn by the token ablation."""
    cards: int = 128
    """Features (alive, lowest ids first) with a card in dashboard.html (the list has all)."""
    dashboard: bool = True
    """Write the static dashboard.html next to the tables."""
    z_max: float = 5.0
    """Logit lens: unembedding rows with |norm z-score| above this are left out."""

    def __post_init__(self) -> None:
        for name, low, high in (("tokens", 1, ABSURD), ("context", 2, ABSURD),
                                ("batch_size", 1, ABSURD), ("lens_k", 1, PER_FEATURE),
                                ("neighbours_k", 1, PER_FEATURE), ("ablate", 0, ABSURD),
                                ("ablate_per_bin", 0, PER_FEATURE),
                                ("max_back", 1, ABSURD), ("cards", 0, ABSURD)):
            integer(name, getattr(self, name), low=low, high=high)
        boolean("dashboard", self.dashboard)
        number("z_max", self.z_max, low=0, low_open=True)


def build_index(lm: Any, saes: Mapping[str, tuple[Any, str | os.PathLike | None]],
                out: str | os.PathLike, config: IndexConfig = IndexConfig(), *,
                cache: Any = None, compare: Any = None, dist: Any = None,
                on_stage: Stage | None = None) -> dict[str, Path]:
    """Build one feature index per SAE under `out`; returns {name: folder} (empty on ranks > 0).

    saes: {name: (SAE, its folder or None)}. cache: an ActivationStore to read
    instead of running the model over the corpus (the model is still used for the
    logit lens and the ablation). compare: another SAE for cross-SAE neighbours.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    stage = on_stage or (lambda *_: None)
    started = time.perf_counter()
    models = {name: sae for name, (sae, _) in saes.items()}

    def tokens_done(done: int, total: int) -> None:
        stage("collect", done, total)

    if cache is not None:
        coll = collect_cache(cache, models, config=config.collect, tokens=config.tokens,
                             rank=rank, world_size=world, on_progress=tokens_done)
    else:
        check_positions("context", config.context, lm_max_positions(lm),
                        getattr(lm, "name", "the model"))
        coll = collect(lm, models, corpus=config.corpus, tokens=config.tokens,
                       context=config.context, batch_size=config.batch_size,
                       config=config.collect, rank=rank, world_size=world,
                       on_progress=tokens_done)
    if world > 1:
        with disk_full(out / "parts", "nothing else was written"):
            save_part(coll, out / "parts" / f"rank_{rank}.safetensors")
        dist.barrier()
        if rank != 0:
            return {}
        coll = load_parts(sorted((out / "parts").glob("rank_*.safetensors")))
    collect_seconds = time.perf_counter() - started
    folders = {}
    for name, (sae, path) in saes.items():
        folders[name] = _index_one(lm, name, sae, path, coll, out / name, config, compare, stage)
    run = {"command": "features", "config": _jsonable(asdict(config)), "saes": list(saes),
           "tokens": coll.n_tokens, "world_size": world, "collection": coll.meta,
           "seconds": {"collect": collect_seconds, "total": time.perf_counter() - started},
           "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    with disk_full(out / "run.json", "the indexes are complete"):
        atomic_write_text(out / "run.json", json.dumps(run, indent=1, default=str) + "\n")
    return folders


def _index_one(lm, name: str, sae, path, coll: Collection, folder: Path, config: IndexConfig,
               compare, stage: Stage) -> Path:
    t0 = time.perf_counter()
    table = summarize(coll, name)
    stage(f"{name}: logit lens", 0, 1)
    lens = logit_lens(lm, sae.W_dec, k=config.lens_k, z_max=config.z_max)
    nb_idx, nb_cos = neighbours(sae.W_dec, k=config.neighbours_k)
    other = (None, None)
    if compare is not None:
        other = neighbours(sae.W_dec, compare.W_dec, k=config.neighbours_k)
    t_lens = time.perf_counter()
    ablation = _ablation(lm, sae, table, coll, config, lambda d, t: stage(f"{name}: ablation", d, t))
    t_abl = time.perf_counter()
    cols = {"count": table.count, "density": table.density, "mean_act": table.mean_act,
            "max_act": table.max_act, "hist": table.hist, "bin_counts": table.bin_counts,
            "lens_top_ids": lens.top_ids.numpy(), "lens_top_values": lens.top_values.numpy(),
            "lens_bottom_ids": lens.bottom_ids.numpy(),
            "lens_bottom_values": lens.bottom_values.numpy(),
            "neighbours": nb_idx.numpy(), "neighbour_cos": nb_cos.numpy(),
            "other_neighbours": None if other[0] is None else other[0].numpy(),
            "other_neighbour_cos": None if other[1] is None else other[1].numpy(),
            "top_context": _top_contexts(table, coll)}
    used = [table.examples["token_ids"], cols["lens_top_ids"], cols["lens_bottom_ids"]]
    if ablation is not None:
        used.append(ablation["token_ids"])
    vocab = decode_vocab(lm.tokenizer, np.unique(np.concatenate([u.reshape(-1) for u in used])))
    stage(f"{name}: write", 0, 1)

    def write(tmp: Path) -> None:  # the whole set, beside the old one (see write_index)
        ix.write_features(tmp, cols, vocab)
        fault_point("features-file")
        ix.write_examples(tmp, table.examples, vocab)
        fault_point("features-file")
        if ablation is not None:
            ix.write_ablation(tmp, ablation, vocab)
        ix.write_meta(tmp, _meta(lm, name, sae, path, coll, table, lens, config, compare, folder,
                                 {"lens_neighbours": t_lens - t0, "ablation": t_abl - t_lens,
                                  "write": time.perf_counter() - t_abl}))
        if config.dashboard:
            from saelab.report.dashboard import write_dashboard

            write_dashboard(tmp, cards=config.cards)

    return ix.write_index(folder, write)


def _top_contexts(table: FeatureTable, coll: Collection) -> list[list[int] | None]:
    """The whole context of each feature's top example (for live token ablation), or None."""
    ex = table.examples
    top0 = np.flatnonzero((ex["kind"] == KIND_TOP) & (ex["rank"] == 0))
    ids = coll.contexts.ids[coll.contexts.rows(torch.from_numpy(ex["context"][top0]))].tolist()
    out: list[list[int] | None] = [None] * table.d_sae
    for f, row in zip(ex["feature"][top0].tolist(), ids, strict=True):
        out[f] = row
    return out


def decode_vocab(tokenizer, ids: np.ndarray) -> dict[int, str]:
    """Text of each token id alone (byte-level pieces of a character show as U+FFFD)."""
    ids = [int(i) for i in ids]
    return dict(zip(ids, tokenizer.batch_decode([[i] for i in ids]), strict=True))


def _ablation(lm, sae, table: FeatureTable, coll: Collection, config: IndexConfig,
              progress: Callable[[int, int], None]) -> dict[str, np.ndarray] | None:
    """Ablated text of the first `config.ablate` alive features: their top example and the
    first `config.ablate_per_bin` examples of every uniform bin (see ablated_text.py)."""
    ex = table.examples
    alive = np.unique(ex["feature"][(ex["kind"] == KIND_TOP) & (ex["rank"] == 0)])[: config.ablate]
    pick = np.flatnonzero(chosen(ex["kind"], ex["bin"], ex["rank"], per_bin=config.ablate_per_bin)
                          & np.isin(ex["feature"], alive))
    if len(pick) == 0:
        return None
    sub = {k: v[pick] for k, v in ex.items()}  # sorted by feature, kind, bin, rank
    rows = coll.contexts.rows(torch.from_numpy(sub["context"]))
    results = ablate_examples(lm, sae, sub, coll.contexts.ids[rows], coll.contexts.special[rows],
                              max_back=config.max_back, progress=progress)
    return window_rows(sub, results)


def _meta(lm, name, sae, path, coll: Collection, table: FeatureTable, lens, config: IndexConfig,
          compare, folder: Path, seconds: dict) -> dict:
    alive = table.count > 0
    sae_path = None if path is None else Path(path).resolve()
    return {
        "name": name,
        "sae": {"path": str(sae_path) if sae_path else None,
                "relpath": os.path.relpath(sae_path, folder.resolve()) if sae_path else None,
                "architecture": sae.cfg.architecture, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
                "k": sae.cfg.k, "site": sae.cfg.site, "model_name": sae.cfg.model_name,
                "hook_name": sae.cfg.hook_name},
        "model": {"name": lm.name, "hash": lm.source_hash},
        "collection": {**coll.meta, "config": asdict(config.collect)},
        "tokens": table.n_tokens,
        "summary": {"d_sae": table.d_sae, "alive": int(alive.sum()), "dead": int((~alive).sum()),
                    "dense": int((table.density > 0.1).sum()),
                    "l0": float(table.count.sum() / max(table.n_tokens, 1)),
                    "median_density_alive": float(np.median(table.density[alive])) if alive.any() else 0.0,
                    "examples": len(table.examples["feature"])},
        "logit_lens": {"k": config.lens_k, "filter": {
            "rule": ix.lens_rule(config.z_max), **lens.filter.report(lm.tokenizer, show=LENS_SHOWN)}},
        "neighbours": {"k": config.neighbours_k, "other": None if compare is None else {
            "site": compare.cfg.site, "d_sae": compare.cfg.d_sae}},
        "ablation": {"features": config.ablate, "max_back": config.max_back,
                     "per_bin": min(config.ablate_per_bin, config.collect.per_bin)},
        "seconds": seconds,
    }


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: getattr(o, "name", str(o))))


def sae_entries(path: str | os.PathLike) -> dict[str, tuple[Any, Path]]:
    """{name: (SAE, folder)} for an SAE folder, or for each SAE folder just below `path`."""
    from saelab.sae import load_sae
    from saelab.sae.formats import _match

    root = Path(path)
    if not root.exists():
        raise SaelabError(f"{root} does not exist; give an SAE folder or a folder of SAE folders.")
    if root.is_file() or _match(root):
        folder = root if root.is_dir() else root.parent
        return {folder.name: (load_sae(folder, dtype="float32").eval(), folder)}
    subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and p.name not in ("ckpt", "cache", "parts") and _match(p))
    if not subs:
        raise SaelabError(f"{root} holds no SAE (cfg.json + weights, params.npz, ...) and no "
                          "folder of one; give an SAE folder or a training run folder.")
    return {p.name: (load_sae(p, dtype="float32").eval(), p) for p in subs}
