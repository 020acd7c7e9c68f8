"""What `saelab generate` computes, as a plain function the CLI wraps.

    result = run_generate("smollm2-135m-instruct", "Name three rivers.", chat=True,
                          sae="runs/sae", feature=123, mode="add", strength=0.25, n=4)
    result.rows()      # [{"sample": 0, "seed": 0, "unedited": ..., "edited": ...}, ...]
    result.to_json()   # everything, for --json

Both columns use the same seeds, so each edited sample differs from its
unedited neighbour only by the edit. `add` and `clamp` strengths are in site
norms by default (see saelab/interventions/strength.py): add 0.25 pushes a
quarter of the site's typical activation norm along the feature's direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from saelab.checks import ABSURD, MAX_SAMPLES, MAX_SEED, choice, integer, number
from saelab.console import JsonFlag, ModelOpt, console, emit_json, escape, user_errors
from saelab.errors import BadValueError, SaelabError
from saelab.interventions.edits import FeatureEdit, Positions
from saelab.interventions.generate import Generation, check_sampling, generate
from saelab.interventions.strength import DEFAULT_STRENGTH, UNITS, activation_value, site_norm

# |strength| past this is a typo: residual streams have norms below 1e4.
MAX_STRENGTH = 1e6
CLI_MODES = {"add": "add", "clamp": "set", "set": "set", "zero": "zero", "scale": "scale"}
DEFAULT_SCALE = 2.0
"""Default factor of `scale` (unitless)."""


@dataclass
class GenerateResult:
    """Unedited and (when an edit was asked for) edited generations of the same prompts and seeds."""

    prompts: list[str]
    seeds: list[int]
    unedited: Generation
    edited: Generation | None
    settings: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """One row per sample, for a side-by-side table."""
        rows = []
        for i, (seed, plain) in enumerate(zip(self.seeds, self.unedited.samples, strict=True)):
            row = {"sample": i, "seed": seed, "unedited": plain.text, "unedited_stop": plain.stop}
            if self.edited is not None:
                edited = self.edited.samples[i]
                row |= {"edited": edited.text, "edited_stop": edited.stop}
            rows.append(row)
        return rows

    def to_json(self) -> dict[str, Any]:
        def samples(gen: Generation | None) -> list[dict] | None:
            if gen is None:
                return None
            return [{"text": s.text, "tokens": s.tokens, "seed": s.seed, "stop": s.stop}
                    for s in gen.samples]
        return {"settings": self.settings, "prompts": self.prompts,
                "unedited": samples(self.unedited), "edited": samples(self.edited)}


def run_generate(model: Any, prompt: str, *, chat: bool = False, sae: Any = None,
                 feature: int | None = None, mode: str = "add", strength: float | None = None,
                 unit: str = "norm", positions: Positions = "all", site: str | None = None,
                 seed: int = 0, n: int = 1, max_new_tokens: int = 64, temperature: float = 0.8,
                 top_p: float = 0.9, dtype: str = "float32") -> GenerateResult:
    """Generate `n` samples of `prompt` (seeds seed..seed+n-1), with and without a feature edit.

    model: a loaded LM or a name for `load_model`. sae: a folder / file `load_sae` reads
    or an SAE; with it, `feature` is edited by `mode` (add | clamp | zero | scale) with
    `strength` at `positions`. For add and clamp, strength is in site norms with
    unit="norm" (default 0.25; see saelab.interventions.strength) or in the SAE's raw
    activation units with unit="raw"; for scale it is the factor (default 2). `site`
    overrides the SAE's recorded site. Raises ValueError for bad settings.
    """
    choice("mode", mode, tuple(CLI_MODES))
    choice("unit", unit, tuple(UNITS))
    if strength is None:
        strength = DEFAULT_SCALE if mode == "scale" else DEFAULT_STRENGTH
    number("strength", strength, low=-MAX_STRENGTH, high=MAX_STRENGTH)
    integer("n", n, low=1, high=MAX_SAMPLES)
    integer("seed", seed, low=0, high=MAX_SEED - n)
    check_sampling(max_new_tokens, temperature, top_p)
    if not prompt.strip():
        raise BadValueError("the prompt is empty; give some text (--prompt TEXT)")
    if feature is not None:
        integer("feature", feature, low=0, high=ABSURD)
    sae_obj = _sae(sae)  # before the model: a bad SAE or feature fails in milliseconds
    if sae_obj is not None and feature is None:
        raise BadValueError("an SAE was given but no feature to edit; pass feature=F (--feature F)")
    if sae_obj is None and feature is not None:
        raise BadValueError(f"feature={feature} needs an SAE to edit it in; pass sae=PATH (--sae DIR)")
    if sae_obj is not None and feature >= sae_obj.cfg.d_sae:
        raise BadValueError(f"feature={feature}: the SAE has features 0..{sae_obj.cfg.d_sae - 1}")
    lm = model
    if isinstance(model, str | Path):
        from saelab.models.load import load_model

        lm = load_model(str(model), dtype=dtype)
    at = site or (sae_obj.cfg.site if sae_obj is not None else None)
    if sae_obj is not None:  # before generating: a bad edit fails at once
        value, norm = _edit_value(lm, sae_obj, at, feature, mode, strength, unit)
        edit = FeatureEdit(feature, CLI_MODES[mode], value, positions)
    prompts, seeds = [prompt] * n, [seed + i for i in range(n)]
    common = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seeds=seeds,
                  chat=chat)
    unedited = generate(lm, prompts, past_positions="error", **common)
    edited = None
    settings: dict[str, Any] = {"model": getattr(lm, "name", str(model)), "chat": chat, **common}
    if sae_obj is not None:
        saes = {site: sae_obj} if site is not None else sae_obj  # the SAE object is not modified
        edited = generate(lm, prompts, saes=saes, edits=[edit], **common)
        settings |= {"sae": str(sae) if isinstance(sae, str | Path) else None, "site": at,
                     "feature": feature, "mode": mode, "strength": strength,
                     "unit": unit if mode in ("add", "clamp", "set") else None, "value": value,
                     "site_norm": norm, "positions": positions}
    return GenerateResult(prompts, seeds, unedited, edited, settings)


def _edit_value(lm: Any, sae: Any, site: str | None, feature: int, mode: str, strength: float,
                unit: str) -> tuple[float, float | None]:
    """(the FeatureEdit's value in raw activation units, the site norm used or None)."""
    if mode == "zero":
        return 0.0, None
    if mode == "scale" or unit == "raw":
        return strength, None
    if site is None:
        raise ValueError("the SAE records no site, so its site norm is unknown; pass site=... "
                         "(--site) or unit='raw'")
    norm = site_norm(lm, site)
    return activation_value(sae, feature, strength, norm), norm


def _sae(sae: Any) -> Any:
    if isinstance(sae, str | Path):
        from saelab.sae import load_sae

        return load_sae(sae)
    return sae


@user_errors
def generate_cmd(
    prompt: Annotated[str, typer.Option(help="The prompt (the user turn with --chat).")],
    model: ModelOpt = "smollm2-135m-instruct",
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
    sae: Annotated[Path | None, typer.Option(help="SAE folder whose feature is edited.")] = None,
    feature: Annotated[int | None, typer.Option(help="Feature to edit.")] = None,
    mode: Annotated[str, typer.Option(help="add (push along the feature's decoder direction), clamp (hold the feature at a value), zero, scale.")] = "add",
    strength: Annotated[float | None, typer.Option(help="add/clamp: in site norms (N = the site's mean activation norm on plain prose): add s adds a vector of norm s*N along the feature's direction, clamp s sets the feature so that its decoded part has norm s*N. Default 0.25 (visible, still fluent; 1 and more give gibberish). scale: the factor (default 2).")] = None,
    unit: Annotated[str, typer.Option(help="norm (site norms, above) or raw (the SAE's own activation units).")] = "norm",
    positions: Annotated[str, typer.Option(help="all, prompt, generated, or P: (from P on).")] = "all",
    seed: Annotated[int, typer.Option(help="Seed of the first sample (samples use seed..seed+n-1).")] = 0,
    n: Annotated[int, typer.Option(help="Samples.")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per sample.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 for greedy.")] = 0.8,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.9,
    json: JsonFlag = False,
) -> None:
    """Generate with and without a feature edit, same seeds, side by side."""
    try:
        result = run_generate(model, prompt, chat=chat, sae=sae, feature=feature, mode=mode,
                              strength=strength, unit=unit, positions=positions, seed=seed, n=n,
                              max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p)
    except ValueError as err:
        raise SaelabError(str(err)) from None
    if json:
        return emit_json(result.to_json())
    edited = result.edited is not None
    table = Table("seed", "unedited", *(["edited"] if edited else []), show_lines=True,
                  title=_title(result.settings) if edited else None)
    for row in result.rows():
        table.add_row(str(row["seed"]), escape(row["unedited"]),
                      *([escape(row["edited"])] if edited else []))
    console.print(table)


def _title(settings: dict[str, Any]) -> str:
    """e.g. "feature 12, add 0.25 site norms (N = 145; activation 0.254)"."""
    title = f"feature {settings['feature']}, {settings['mode']} {settings['strength']:g}"
    if settings.get("site_norm") is not None:
        title += (f" site norms (N = {settings['site_norm']:.4g} at {settings['site']}; "
                  f"activation {settings['value']:.4g})")
    elif settings.get("unit") == "raw":
        title += " (raw activation)"
    return title


def register(app: typer.Typer) -> None:
    """Mount `generate` on the root app."""
    app.command("generate")(generate_cmd)
