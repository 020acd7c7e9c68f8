"""When does a list end? The list study (after a published SAE study of list endings), end to end.

    result = run_lists(ListsConfig.preset_config("quick"), "runs/lists", stage)

Stages, each saved as it finishes so an interrupted run resumes where it stopped:

1. dataset      sample lists (23 topics x 3 templates x n; the long template gets more
                tokens to end) -> dataset.jsonl
2. SAEs         the user's, or BatchTopK SAEs trained here on the builtin corpus -> saes/
3. attribution  metric at the last item's last token, act x grad per SAE -> attribution/
4. ablation     zero the top-N attributed (position, feature) pairs on the prefix,
                regenerate; controls: unablated, N random active pairs -> ablation.jsonl
                (lists_ablation.py)
4b. graphs      with --graph: attribution graphs over a transcoder set for some ablated
                lists; graph-chosen vs attribution-chosen transcoder features ablated
                -> graphs/ (lists_graph.py, lists_graph_results.py)
5. features     dashboards of the top features on the corpus (features/) and on the
                study's own lists (features_lists/); `saelab serve OUT` browses them
6. results      statistics, maps, report.html, run.json (stage times kept across
                reruns in timings.json, see timings.py)

Module order (no circle): lists_data <- lists_config <- lists_maps, lists_ablation,
lists_results, lists_report, lists_graph, lists_graph_results <- lists <- lists_commands.

Every condition of one example samples with the same seed, so the ablated and
control continuations differ only by the ablation.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.data.store import atomic_write_text
from saelab.studies.lists_ablation import ablate_dataset
from saelab.studies.lists_config import (
    ListsConfig,
    Stage,
    StudyModel,
    attributed,
    default_sites,
    example_seed,
)
from saelab.studies.lists_data import (
    TEMPLATES,
    ListPrompt,
    StudyInputError,
    list_prompts,
    metric_tokens,
    parse_list,
)
from saelab.studies.lists_graph import load_graph_transcoders, run_graph_stage
from saelab.studies.lists_graph_results import graph_summary
from saelab.studies.lists_maps import feature_density, top_features
from saelab.studies.lists_report import write_report
from saelab.studies.lists_results import summarize
from saelab.studies.records import RecordLog
from saelab.studies.saes import SAEPlan, ensure_saes
from saelab.studies.timings import StageClock

__all__ = ["ListsConfig", "StudyModel", "attributed", "default_sites", "run_lists"]

# ---------------------------------------------------------------- stages


def run_lists(cfg: ListsConfig, out: str | Path, stage: Stage, lm: Any = None,
              graph: Any = None) -> dict:
    """Run (or finish) the study into `out`; returns the results written to results.json.

    graph: a `GraphStudyConfig` adds the graph stage (lists_graph.py); it can be added to
    a finished run, whose other stages then resume as they are."""
    from saelab.models.load import load_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(cfg, out)
    clock = StageClock(out / "timings.json", previous=_previous_seconds(out))
    with clock.stage("load model"):
        lm = lm if lm is not None else load_model(cfg.model, dtype="float32")
        if not getattr(lm.tokenizer, "chat_template", None):
            raise StudyInputError(f"{lm.name} has no chat template: the list study prompts an "
                                  "instruct model in its chat format. Use an instruct model (the "
                                  "default smollm2-135m-instruct, or e.g. google/gemma-2-2b-it).")
        sm = StudyModel(lm, metric_tokens(lm.tokenizer).end_of_turn, metric_tokens(lm.tokenizer))
        tset = load_graph_transcoders(lm, graph) if graph is not None else None  # fail early
    with clock.stage("dataset", out / "dataset.jsonl"):
        prompts = list_prompts(lm.tokenizer, cfg.topics, {t: TEMPLATES[t] for t in cfg.templates},
                               cfg.samples)
        dataset = sample_dataset(sm, cfg, prompts, out / "dataset.jsonl", stage)
    with clock.stage("SAEs", out / "saes"):
        saes = load_study_saes(lm, cfg, out, stage)
    with clock.stage("attribution", out / "attribution"):
        metric_name, reason = choose_metric(cfg.metric, sm.tokens, dataset)
        attrs = attribute_dataset(sm, cfg, dataset, saes, out / "attribution", stage,
                                  only=None if cfg.both_metrics else metric_name)
    dense = dense_features(cfg, attrs[metric_name], saes)
    with clock.stage("ablation", out / "ablation.jsonl"):
        ablation = ablate_dataset(sm, cfg, dataset, saes, attrs[metric_name], out / "ablation.jsonl",
                                  stage, exclude=dense)
    if graph is not None:
        with clock.stage("graphs", out / "graphs"):
            choices, graph_log = run_graph_stage(sm, cfg, graph, tset, dataset,
                                                 _metrics(sm.tokens)[metric_name], out / "graphs", stage)
    with clock.stage("features", out / "features", out / "features_lists"):
        dashboards = feature_dashboards(lm, cfg, saes, attrs[metric_name], dataset, out, stage,
                                        exclude=dense)
    with clock.stage("results"):
        results = summarize(cfg, out, sm, dataset, saes, attrs, metric_name, reason, ablation,
                            dashboards)
        if graph is not None:
            results["graph"] = graph_summary(cfg, graph, choices, graph_log)
    results["seconds"] = clock.seconds
    run = {"command": "study lists", "config": asdict(cfg), "model": lm.provenance(),
           "seconds": clock.seconds, "this_run_seconds": clock.this_run,
           "threads": torch.get_num_threads(),
           "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    if graph is not None:
        run["graph"] = asdict(graph)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=_json) + "\n")
    atomic_write_text(out / "run.json", json.dumps(run, indent=1, default=_json) + "\n")
    write_report(results, out)
    return results


def _previous_seconds(out: Path) -> dict[str, float] | None:
    """The stage times of a run finished before timings.json existed (its run.json)."""
    try:
        return {k: float(v) for k, v in json.loads((out / "run.json").read_text())["seconds"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def dense_features(cfg: ListsConfig, attr: Any, saes: dict) -> dict[str, set[int]]:
    """{site: features firing on more than cfg.max_density of the lists' tokens} (empty sets
    when max_density is None)."""
    if cfg.max_density is None:
        return {site: set() for site in saes}
    return {site: set(np.flatnonzero(feature_density(attr, site, cfg.skip_first) > cfg.max_density).tolist())
            for site in saes}


def _json(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _check_config(cfg: ListsConfig, out: Path) -> None:
    """Resume only the same study: a changed setting would mix two experiments in one folder."""
    path = out / "config.json"
    current = json.loads(json.dumps(asdict(cfg)))
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if diff:
            lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise StudyInputError(f"{out} holds a list study with other settings ({lines}). Use "
                                  "another --out, or rerun with the same settings to resume.")
    else:
        atomic_write_text(path, json.dumps(current, indent=1) + "\n")


def sample_dataset(sm: StudyModel, cfg: ListsConfig, prompts: list[ListPrompt], path: Path,
                   stage: Stage) -> list[dict]:
    """Sample one list per prompt (resuming from `path`), parsed."""
    from saelab.interventions.generate import generate

    log = RecordLog(path, key="index")
    todo = [p for p in prompts if p.index not in log]
    update = stage("sample lists", len(prompts))
    update(len(prompts) - len(todo))
    done = len(prompts) - len(todo)
    # one generate call per token limit (the long template gets more room to end)
    for limit in sorted({cfg.token_limit(p.template) for p in todo}):
        group = [p for p in todo if cfg.token_limit(p.template) == limit]
        for start in range(0, len(group), cfg.batch_size):
            chunk = group[start:start + cfg.batch_size]
            gen = generate(sm.lm, [p.ids for p in chunk], max_new_tokens=limit,
                           temperature=cfg.temperature, top_p=cfg.top_p,
                           seeds=[example_seed(cfg, p.index, "dataset") for p in chunk],
                           batch_size=cfg.batch_size, eos_token_ids=[sm.eot])
            log.append(_list_record(sm, p, s.tokens, s.stop == "eos") | {"seed": s.seed}
                       for p, s in zip(chunk, gen.samples, strict=True))
            done += len(chunk)
            update(done)
    return [log.get(p.index) for p in prompts]


def _list_record(sm: StudyModel, prompt: ListPrompt, generated: list[int], stopped: bool) -> dict:
    tok = sm.lm.tokenizer
    parsed = parse_list(prompt.ids, generated, tok, [sm.eot], stopped=stopped)
    return {"index": prompt.index, "topic": prompt.topic, "template": prompt.template,
            "sample": prompt.sample, "prompt_ids": prompt.ids, "generated": generated,
            "text": tok.decode(prompt.ids[-1:] + generated, skip_special_tokens=True),
            "items": parsed.items, "n_items": parsed.n_items, "ending": parsed.ending,
            "last_position": parsed.last_position}


def load_study_saes(lm: Any, cfg: ListsConfig, out: Path, stage: Stage) -> dict[str, tuple[Any, Path]]:
    """{name: (SAE, folder)}: the user's SAEs, or SAEs trained (once) at the study's sites."""
    from saelab.interventions.splice import bind_saes
    from saelab.sae import load_sae

    if cfg.saes:
        folders = [Path(p) for p in cfg.saes]
    else:
        sites = cfg.sites or default_sites(lm.arch.n_layers)
        plan = SAEPlan(sites=tuple(sites), width=cfg.sae_width, k=cfg.sae_k, tokens=cfg.sae_tokens)
        folders = list(ensure_saes(lm, plan, out / "saes", stage).values())
    saes = {}
    for folder in folders:
        sae = load_sae(folder).eval()
        bind_saes(lm.arch, [sae])  # checks the site exists and the widths match, with a clear error
        saes[sae.cfg.site] = (sae, folder)
    return saes


def choose_metric(requested: str, tokens: Any, dataset: list[dict]) -> tuple[str, str]:
    """The metric to attribute and ablate with, and why (computed from how the lists ended)."""
    endings = {e: sum(r["ending"] == e for r in dataset) for e in ("whitespace", "end_of_turn")}
    if requested == "whitespace" and tokens.whitespace is None:
        raise StudyInputError("the tokenizer has no single-token ' ', so the whitespace metric is "
                              "undefined; use --metric end_of_turn (or auto)")
    if requested != "auto":
        return requested, f"chosen by the user; lists ended {endings}"
    if tokens.whitespace is None:
        return "end_of_turn", "the tokenizer has no single-token ' ', so the whitespace metric is undefined"
    if endings["whitespace"] >= endings["end_of_turn"]:
        return "whitespace", (f"{endings['whitespace']} lists ended with a blank token before the end, "
                              f"{endings['end_of_turn']} with the end-of-turn token right after the last item")
    return "end_of_turn", (f"{endings['end_of_turn']} lists ended with the end-of-turn token right after "
                           f"the last item, only {endings['whitespace']} with a blank token")


def _metrics(tokens: Any) -> dict[str, Any]:
    from saelab.attribution.metrics import LogitDiff

    out = {"end_of_turn": LogitDiff([tokens.end_of_turn], [tokens.line_break], -1)}
    if tokens.whitespace is not None:
        out["whitespace"] = LogitDiff([tokens.whitespace], [tokens.line_break], -1)
    return out


def _through_last_item(record: dict) -> list[int]:
    return (record["prompt_ids"] + record["generated"])[:record["last_position"] + 1]


def attribute_dataset(sm: StudyModel, cfg: ListsConfig, dataset: list[dict],
                      saes: dict[str, tuple[Any, Path]], folder: Path, stage: Stage,
                      only: str | None = None) -> dict[str, Any]:
    """{metric name: Attribution over the lists with a last item}, every SAE at once
    (every metric, or `only` that one).

    The attribution reads the gradient in the real model at each site (see
    `saelab.attribution.attribute`), so it is what one SAE spliced at a time with
    its error term detached gives, for all SAEs in one backward pass.
    """
    from saelab.attribution import Attribution, attribute

    rows = attributed(cfg, dataset)
    if not rows:
        raise StudyInputError("no sampled list has an item and an end, so there is nothing to "
                              "attribute; is the model following the list prompt? (see dataset.jsonl; "
                              "more --samples, or a larger max_new_tokens, may help)")
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {k: v for k, v in _metrics(sm.tokens).items() if only in (None, k)}
    update = stage("attribute", len(metrics) * len(rows))
    results = {}
    for i, (name, metric) in enumerate(metrics.items()):
        path = folder / f"{name}.safetensors"
        if path.is_file():
            results[name] = Attribution.load(path)
        else:
            parts = []
            for start in range(0, len(rows), cfg.batch_size):
                chunk = rows[start:start + cfg.batch_size]
                parts.append(attribute(sm.lm, {s: sae for s, (sae, _) in saes.items()},
                                       [_through_last_item(r) for r in chunk], metric,
                                       batch_size=8))
                update(i * len(rows) + start + len(chunk))
            results[name] = _concat(parts)
            results[name].save(path)
        update((i + 1) * len(rows))
    return results


def _concat(parts: list[Any]) -> Any:
    """One Attribution from per-batch ones (example indices shifted)."""
    from saelab.attribution.result import Attribution, SiteAttribution

    first, offset, sites = parts[0], 0, {}
    pieces: dict[str, list] = {s: [] for s in first.sites}
    for part in parts:
        for s, sa in part.sites.items():
            index = sa.index.clone()
            index[:, 0] += offset
            pieces[s].append((index, sa.act, sa.value, sa.error))
        offset += part.n_examples
    for s, items in pieces.items():
        width = max(e.shape[1] for *_, e in items)
        error = torch.cat([torch.nn.functional.pad(e, (0, width - e.shape[1])) for *_, e in items])
        sites[s] = SiteAttribution(s, first.sites[s].d_sae, torch.cat([i for i, *_ in items]),
                                   torch.cat([a for _, a, _, _ in items]),
                                   torch.cat([v for _, _, v, _ in items]), error)
    return Attribution(sites, [t for p in parts for t in p.tokens],
                       torch.cat([p.metric for p in parts]), first.method, first.settings)


# ---------------------------------------------------------------- dashboards


def feature_dashboards(lm: Any, cfg: ListsConfig, saes: dict[str, tuple[Any, Path]], attr: Any,
                       dataset: list[dict], out: Path, stage: Stage,
                       exclude: dict[str, set[int]] | None = None) -> dict[str, dict]:
    """Feature indexes of the study's SAEs with cards for their top features, built twice:
    on `dashboard_tokens` of the builtin corpus (features/) and, with `dashboard_lists`, on
    the study's own sampled lists (features_lists/).

    Returns {site: {"dashboard", "lists_dashboard" (or None), "features", "corpus_density"}},
    corpus_density being {feature: firing fraction on the corpus tokens} of the top features.
    """
    if cfg.dashboard_tokens <= 0:
        return {}
    from saelab.data.corpus import Corpus

    exclude = exclude or {}
    tops = {site: [f for f, _, _ in top_features(attr, site, cfg.top_pairs, skip_first=cfg.skip_first,
                                                 limit=40, exclude=exclude.get(site))]
            for site in saes}
    _index(lm, saes, tops, out / "features", "builtin", cfg.dashboard_tokens,
           "feature dashboards (corpus)", stage)
    if cfg.dashboard_lists:
        tok = lm.tokenizer
        # every sampled list with its chat prompt, as the model read it (special tokens kept,
        # so the packer marks them and the collection skips them)
        texts = [tok.decode(r["prompt_ids"] + r["generated"], skip_special_tokens=False) for r in dataset]
        n_tokens = sum(len(r["prompt_ids"]) + len(r["generated"]) + 1 for r in dataset)
        _index(lm, saes, tops, out / "features_lists", Corpus.from_texts("list study texts", texts),
               n_tokens, "feature dashboards (lists)", stage)
    return {site: {"dashboard": f"features/{site}/dashboard.html",
                   "lists_dashboard": (f"features_lists/{site}/dashboard.html" if cfg.dashboard_lists
                                       else None),
                   "features": tops[site],
                   "corpus_density": _index_density(out / "features" / site, tops[site])}
            for site in saes}


def _index(lm: Any, saes: dict, tops: dict[str, list[int]], folder: Path, corpus: Any, tokens: int,
           name: str, stage: Stage) -> None:
    """Build (once) the feature indexes of `saes` over `tokens` tokens of `corpus` into folder/SITE,
    each with a dashboard carrying cards for its top features."""
    from saelab.features.build import IndexConfig, build_index
    from saelab.report.dashboard import write_dashboard

    todo = {s: v for s, v in saes.items() if not (folder / s / "dashboard.html").is_file()}
    if not todo:
        return
    update = stage(name, tokens)
    build_index(lm, todo, folder, IndexConfig(tokens=tokens, corpus=corpus, ablate=8, cards=0,
                                              dashboard=False),
                on_stage=lambda what, done, total: update(done) if what == "collect" else None)
    update(tokens)
    for site in todo:
        write_dashboard(folder / site, cards=0, features=tops[site])


def _index_density(folder: Path, features: list[int]) -> dict[int, float]:
    """{feature: density} read from the feature index at `folder` ({} when it cannot be read)."""
    from saelab.features.index import FeatureIndex, NotAnIndexError

    try:
        table = FeatureIndex.open(folder).features
        ids, density = table.column("feature").to_pylist(), table.column("density").to_pylist()
    except (OSError, NotAnIndexError, KeyError):
        return {}
    wanted = set(features)
    return {f: float(d) for f, d in zip(ids, density, strict=True) if f in wanted}
