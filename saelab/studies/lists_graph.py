"""The list study's graph stage (`saelab study lists --graph`): graph-chosen against
attribution-chosen transcoder features, ablated as the study ablates.

For `GraphStudyConfig.examples` of the ablated lists (spread evenly over them):

1. the attribution graph of the list through the last item's last token, its target
   the study's metric there (logit(end) - logit("\\n"), the logit-diff grammar of
   `saelab attribute`), over a transcoder set of the model (one per MLP), pruned;
2. three sets of `--ablate` (layer, position, feature) transcoder features, all from
   the features active on that list (positions >= skip_first):
   - graph: the feature nodes of largest influence on the target (those the pruned
     graph keeps first, then the rest of the graph's features, by influence);
   - attribution: the largest positive act x gradient of the same metric in the real
     model (gradient at each MLP's output dotted with the decoder row), the study's
     attribution method applied to the transcoder features;
   - random: active features drawn uniformly (seeded), the two sets above left out;
3. regenerate from just before the last item's last token with each set zeroed on
   the prefix (and with ablate_every_step at every generated token), and once
   unablated, all with the study's regeneration seed. Zeroing a transcoder feature
   subtracts act x decoder row from the real MLP output (`TranscoderEdit`), as the
   study's SAE ablation keeps the error term.

Files under OUT/graphs/ (each saved as it is made, so the stage resumes):
config.json, choices.jsonl (per list: the three sets, the graph's scores),
ablation.jsonl (per condition and list: the regenerated items), and one folder
per graph (list_<index>/: neuronpedia.json + record.json/.safetensors, which
`saelab serve OUT` shows). The statistics are in lists_graph_results.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelab.atomic import atomic_write_text
from saelab.checks import MAX_SAMPLES, integer, number
from saelab.studies.lists_config import (
    ListsConfig,
    Stage,
    StudyModel,
    ablation_examples,
    example_seed,
)
from saelab.studies.lists_data import StudyInputError, parse_list
from saelab.studies.records import RecordLog

CONDITIONS = ("control", "graph", "attribution", "random")
ARMS = ("graph", "attribution", "random")
MAKE_TRANSCODERS = ("make one with `saelab scope --kind transcoder ...` or `saelab train --kind "
                    "transcoder --sites 'mlp.*'` (one transcoder per MLP of the model)")


@dataclass(frozen=True)
class GraphStudyConfig:
    """The graph stage's settings (saved in OUT/graphs/config.json; the study's own
    settings, --ablate among them, stay in ListsConfig)."""

    transcoders: str
    """A transcoder set of the study's model, one per MLP (`load_transcoders` reads it)."""
    examples: int = 8
    """Ablated lists that get a graph (spread evenly over them); graphs cost minutes each on a CPU."""
    max_features: int = 500
    """Feature nodes with rows per graph (chosen by influence, as `saelab graph --max-features`)."""
    node_threshold: float = 0.8
    edge_threshold: float = 0.98

    def __post_init__(self) -> None:
        if not self.transcoders:
            raise StudyInputError(f"--graph needs --transcoders DIR: {MAKE_TRANSCODERS}.")
        integer("graph_examples", self.examples, low=1, high=MAX_SAMPLES)
        integer("graph_features", self.max_features, low=1, high=10**7)
        number("node_threshold", self.node_threshold, low=0.0, high=1.0)
        number("edge_threshold", self.edge_threshold, low=0.0, high=1.0)


@dataclass(frozen=True)
class Pool:
    """The transcoder features active on one list, with their attribution: (N,) tensors."""

    layer: Tensor
    pos: Tensor
    index: Tensor
    act: Tensor
    attribution: Tensor  # act x (d metric / d mlp_out . decoder row), in the real model
    metric: float


def load_graph_transcoders(lm: Any, gcfg: GraphStudyConfig) -> Any:
    """The transcoder set, checked against the model (clear errors for another model or width)."""
    from saelab.sae.transcoder import load_transcoders

    path = Path(gcfg.transcoders)
    if not path.exists():
        raise StudyInputError(f"--transcoders {path}: no such folder; {MAKE_TRANSCODERS}.")
    tset = load_transcoders(path)
    tset.check_model(n_layers=lm.arch.n_layers, d_model=lm.arch.d_model,
                     model_name=getattr(lm, "name", None))
    param = next(lm.model.parameters())
    return tset.to(device=param.device, dtype=param.dtype).eval()


def check_graph_config(gcfg: GraphStudyConfig, folder: Path) -> None:
    """Resume only the same graph stage (a changed setting would mix two experiments)."""
    current = {**asdict(gcfg), "transcoders": str(Path(gcfg.transcoders).resolve())}
    path = folder / "config.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = "; ".join(f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in current.items()
                         if saved.get(k) != v)
        if diff:
            raise StudyInputError(f"{folder} holds a graph stage with other settings ({diff}). Use "
                                  "another --out, or rerun with the same settings to resume.")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(current, indent=1) + "\n")


def graph_examples(cfg: ListsConfig, dataset: list[dict], n: int) -> list[dict]:
    """n of the ablated lists, evenly spaced over them (so over the topics), in order."""
    rows = ablation_examples(cfg, dataset)
    if len(rows) <= n:
        return rows
    return [rows[i] for i in np.unique(np.linspace(0, len(rows) - 1, n).round().astype(int))]


def metric_spec(tokenizer: Any, metric: Any) -> str:
    """The metric in `saelab attribute`'s grammar, e.g. 'logit_diff:"<|im_end|>":"\\n"@-1'."""
    def text(ids: Any) -> str:
        return ",".join(json.dumps(tokenizer.decode([int(i)])) for i in np.atleast_1d(ids))
    return f"logit_diff:{text(metric.a)}:{text(metric.b)}@{metric.position}"


# ---------------------------------------------------------------- choosing the features


def transcoder_attribution(lm: Any, tset: Any, ids: Tensor, metric: Any, skip_first: int) -> Pool:
    """Every transcoder feature active on `ids` (1, T) at positions >= max(skip_first, 1),
    with act x gradient of `metric`: the gradient read at each MLP's output in the real
    model, dotted with the feature's decoder row."""
    from saelab.attribution.metrics import MetricBatch
    from saelab.graphs.features import FIRST_POSITION
    from saelab.models.hooks import patch

    inputs: dict[int, Tensor] = {}
    leaves: dict[int, Tensor] = {}

    def keep(layer: int):
        return lambda x, ctx: inputs.__setitem__(layer, x.detach())

    def leaf(layer: int):
        def fn(y: Tensor, ctx: Any) -> Tensor:
            leaves[layer] = torch.zeros_like(y, requires_grad=True)
            return y + leaves[layer]  # the same value; its gradient is d metric / d mlp_out
        return fn

    layers = list(tset)
    fns: dict[str, Any] = {}
    for layer in layers:
        fns[tset[layer].site or f"mlp_in.{layer}"] = keep(layer)
        fns[f"mlp_out.{layer}"] = leaf(layer)
    with torch.enable_grad(), patch(lm.model, fns, arch=lm.arch):
        logits = lm.model(input_ids=ids, use_cache=False).logits
        value = metric(logits, MetricBatch(ids, torch.tensor([ids.shape[1]]), lm.tokenizer))
        grads = torch.autograd.grad(value.sum(), [leaves[layer] for layer in layers], allow_unused=True)
    first = max(skip_first, FIRST_POSITION)
    parts = []
    with torch.no_grad():
        for layer, g in zip(layers, grads, strict=True):
            tc = tset[layer]
            acts = tc.encode(inputs[layer][0].to(tc.W_enc.dtype))  # (T, F)
            acts[:first] = 0
            pos, idx = acts.nonzero(as_tuple=True)
            a = acts[pos, idx]
            g = torch.zeros_like(leaves[layer][0]) if g is None else g[0]
            attr = a * (g[pos].to(tc.W_dec.dtype) * tc.W_dec[idx]).sum(-1)
            parts.append((torch.full_like(pos, layer), pos, idx, a.double(), attr.double()))
    cat = [torch.cat([p[i] for p in parts]) for i in range(5)]
    return Pool(*cat, metric=float(value.detach()))


def graph_top(graph: Any, pruned: Any, n: int, skip_first: int) -> list[dict]:
    """The n feature nodes of largest influence on the target: those the pruned graph keeps
    first, then the graph's other features; positions < skip_first and zero influence left out."""
    f = graph.features
    nf = len(f)
    infl = pruned.influence[:nf].tolist()
    kept = pruned.node_mask[:nf].tolist()
    ok = [k for k in range(nf) if int(f.pos[k]) >= skip_first and infl[k] > 0]
    ok.sort(key=lambda k: (not kept[k], -infl[k]))
    return [{"layer": int(f.layer[k]), "pos": int(f.pos[k]), "feature": int(f.index[k]),
             "influence": float(infl[k]), "in_pruned": bool(kept[k])} for k in ok[:n]]


def attribution_top(pool: Pool, n: int) -> list[dict]:
    """The n pairs with the largest positive attribution (the study's `top_pairs` rule)."""
    positive = (pool.attribution > 0).nonzero()[:, 0]
    best = positive[pool.attribution[positive].topk(min(n, positive.numel())).indices]
    return [{"layer": int(pool.layer[k]), "pos": int(pool.pos[k]), "feature": int(pool.index[k])}
            for k in best.tolist()]


def random_active(pool: Pool, n: int, taken: set[tuple[int, int, int]], seed: int) -> list[dict]:
    """n active features drawn uniformly (seeded), `taken` left out."""
    keys = [(int(a), int(b), int(c)) for a, b, c in zip(pool.layer, pool.pos, pool.index, strict=True)]
    free = [k for k in keys if k not in taken]
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(free), size=min(n, len(free)), replace=False).tolist())
    return [{"layer": free[i][0], "pos": free[i][1], "feature": free[i][2]} for i in chosen]


def _key(p: dict) -> tuple[int, int, int]:
    return p["layer"], p["pos"], p["feature"]


def choose_features(sm: StudyModel, cfg: ListsConfig, gcfg: GraphStudyConfig, tset: Any,
                    metric: Any, spec: str, record: dict, folder: Path) -> dict:
    """Build, prune and save the graph of one list; return its three feature sets."""
    from saelab.graphs.build import build_graph
    from saelab.graphs.graph_json import neuronpedia_json

    lm, tok = sm.lm, sm.lm.tokenizer
    tokens = (record["prompt_ids"] + record["generated"])[:record["last_position"] + 1]
    ids = torch.tensor([tokens], device=next(lm.model.parameters()).device)
    graph = build_graph(lm.model, tok, ids, tset, metric=metric, metric_spec=spec,
                        max_features=gcfg.max_features)
    graph.prompt = tok.decode(tokens, skip_special_tokens=False)
    graph.settings.update({"model": lm.name, "transcoders": gcfg.transcoders, "list": record["index"],
                           "node_threshold": gcfg.node_threshold, "edge_threshold": gcfg.edge_threshold})
    pruned = graph.prune(gcfg.node_threshold, gcfg.edge_threshold)
    graph.save(folder)
    doc = neuronpedia_json(graph, pruned, slug=folder.name, scan=lm.name,
                           node_threshold=gcfg.node_threshold, edge_threshold=gcfg.edge_threshold,
                           transcoder_list=[gcfg.transcoders])
    atomic_write_text(folder / "neuronpedia.json", json.dumps(doc))
    pool = transcoder_attribution(lm, tset, ids, metric, cfg.skip_first)
    attr_of = {k: float(v) for k, v in zip(zip(pool.layer.tolist(), pool.pos.tolist(), pool.index.tolist()),
                                           pool.attribution.tolist(), strict=True)}
    by_graph = graph_top(graph, pruned, cfg.ablate, cfg.skip_first)
    by_attr = attribution_top(pool, cfg.ablate)
    taken = {_key(p) for p in by_graph + by_attr}
    rand = random_active(pool, cfg.ablate, taken, example_seed(cfg, record["index"], "regenerate"))
    for p in by_graph + by_attr + rand:
        p["attribution"] = attr_of.get(_key(p), 0.0)
    s = graph.stats
    return {"index": record["index"], "topic": record["topic"], "metric": pool.metric,
            "graph_target": float(graph.targets[0]["value"]),
            "graph": by_graph, "attribution": by_attr, "random": rand,
            "overlap": len({_key(p) for p in by_graph} & {_key(p) for p in by_attr}),
            "active_features": int(pool.layer.numel()),
            "stats": {k: s[k] for k in ("active_features", "selected_features", "backward_passes",
                                        "replacement_score", "completeness_score", "seconds")},
            "pruned_features": int(pruned.node_mask[:len(graph.features)].sum()),
            "folder": f"graphs/{folder.name}"}


# ---------------------------------------------------------------- ablating them


def transcoder_edits(pairs: list[dict], row: int, every_step: bool) -> list[Any]:
    """TranscoderEdits zeroing each (layer, position, feature) at its absolute position (and,
    with every_step, the same features of each layer at every generated token)."""
    from saelab.interventions.transcoder_edits import TranscoderEdit

    groups: dict[tuple[int, int], list[int]] = {}
    for p in pairs:
        groups.setdefault((p["layer"], p["pos"]), []).append(p["feature"])
    edits = [TranscoderEdit(layer, feats, "zero", positions=[pos], rows=[row])
             for (layer, pos), feats in sorted(groups.items())]
    if every_step:
        layers: dict[int, set[int]] = {}
        for p in pairs:
            layers.setdefault(p["layer"], set()).add(p["feature"])
        edits += [TranscoderEdit(layer, sorted(feats), "zero", positions="generated", rows=[row])
                  for layer, feats in sorted(layers.items())]
    return edits


def _regenerate(sm: StudyModel, cfg: ListsConfig, tset: Any, chunk: list[dict],
                chosen: list[list[dict]], condition: str) -> list[dict]:
    from saelab.interventions.generate import generate

    prefixes = [(r["prompt_ids"] + r["generated"])[:r["last_position"]] for r in chunk]
    edits = [e for row, pairs in enumerate(chosen)
             for e in transcoder_edits(pairs, row, cfg.ablate_every_step)]
    gen = generate(sm.lm, prefixes, max_new_tokens=cfg.regen_max_new_tokens,
                   temperature=cfg.regen_temperature, top_p=cfg.regen_top_p,
                   seeds=[example_seed(cfg, r["index"], "regenerate") for r in chunk],
                   transcoders=tset, edits=edits, batch_size=cfg.batch_size, eos_token_ids=[sm.eot])
    out = []
    for r, prefix, sample, pairs in zip(chunk, prefixes, gen.samples, chosen, strict=True):
        parsed = parse_list(r["prompt_ids"], prefix[len(r["prompt_ids"]):] + sample.tokens,
                            sm.lm.tokenizer, [sm.eot], stopped=sample.stop == "eos")
        out.append({"condition": condition, "index": r["index"], "seed": sample.seed,
                    "pairs": pairs, "new_tokens": sample.tokens, "items": parsed.items,
                    "n_items": parsed.n_items, "ending": parsed.ending})
    return out


def run_graph_stage(sm: StudyModel, cfg: ListsConfig, gcfg: GraphStudyConfig, tset: Any,
                    dataset: list[dict], metric: Any, folder: Path, stage: Stage
                    ) -> tuple[list[dict], RecordLog]:
    """Graphs, feature choices and regenerations (resuming from `folder`); returns the
    choices (one per graphed list, in order) and the regenerations' log."""
    check_graph_config(gcfg, folder)
    examples = graph_examples(cfg, dataset, gcfg.examples)
    if not examples:
        raise StudyInputError("no list to graph: no list of the ablated templates has a last item "
                              "(see dataset.jsonl; more --samples may help).")
    spec = metric_spec(sm.lm.tokenizer, metric)
    choices = RecordLog(folder / "choices.jsonl", key="index")
    update = stage("attribution graphs", len(examples))
    for i, r in enumerate(examples):
        if r["index"] not in choices:
            choices.append([choose_features(sm, cfg, gcfg, tset, metric, spec, r,
                                            folder / f"list_{r['index']}")])
        update(i + 1)
    chosen = {r["index"]: choices.get(r["index"]) for r in examples}
    log = RecordLog(folder / "ablation.jsonl", key=("condition", "index"))
    update = stage("graph ablation", len(CONDITIONS) * len(examples))
    done = 0
    for condition in CONDITIONS:
        todo = [r for r in examples if (condition, r["index"]) not in log]
        done += len(examples) - len(todo)
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start:start + cfg.batch_size]
            pairs = [[] if condition == "control" else chosen[r["index"]][condition] for r in chunk]
            log.append(_regenerate(sm, cfg, tset, chunk, pairs, condition))
            done += len(chunk)
            update(done)
    update(done)
    return [chosen[r["index"]] for r in examples], log
