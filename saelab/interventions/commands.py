"""What `saelab generate` computes, as a plain function the CLI wraps.

    result = run_generate("smollm2-135m-instruct", "Name three rivers.", chat=True,
                          sae="runs/sae", feature=123, mode="add", strength=8.0, n=4)
    result.rows()      # [{"sample": 0, "seed": 0, "unedited": ..., "edited": ...}, ...]
    result.to_json()   # everything, for --json

Both columns use the same seeds, so each edited sample differs from its
unedited neighbour only by the edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saelab.interventions.edits import FeatureEdit, Positions
from saelab.interventions.generate import Generation, generate

CLI_MODES = {"add": "add", "clamp": "set", "set": "set", "zero": "zero", "scale": "scale"}


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
                 feature: int | None = None, mode: str = "add", strength: float = 4.0,
                 positions: Positions = "all", site: str | None = None, seed: int = 0, n: int = 1,
                 max_new_tokens: int = 64, temperature: float = 0.8, top_p: float = 0.9,
                 dtype: str = "float32") -> GenerateResult:
    """Generate `n` samples of `prompt` (seeds seed..seed+n-1), with and without a feature edit.

    model: a loaded LM or a name for `load_model`. sae: a folder / file `load_sae` reads
    or an SAE; with it, `feature` is edited by `mode` (add | clamp | zero | scale) with
    `strength` (the added amount, clamp value or factor) at `positions`. `site` overrides
    the SAE's recorded site.
    """
    if mode not in CLI_MODES:
        raise ValueError(f"mode={mode!r}; expected one of {', '.join(CLI_MODES)}")
    if n < 1:
        raise ValueError(f"n={n}: need at least one sample")
    lm = model
    if isinstance(model, str | Path):
        from saelab.models.load import load_model

        lm = load_model(str(model), dtype=dtype)
    sae_obj = _sae(sae)
    if sae_obj is not None and feature is None:
        raise ValueError("an SAE was given but no feature to edit; pass feature=F (--feature F)")
    if sae_obj is None and feature is not None:
        raise ValueError(f"feature={feature} needs an SAE to edit it in; pass sae=PATH (--sae DIR)")
    prompts, seeds = [prompt] * n, [seed + i for i in range(n)]
    common = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seeds=seeds,
                  chat=chat)
    unedited = generate(lm, prompts, **common)
    edited = None
    settings: dict[str, Any] = {"model": getattr(lm, "name", str(model)), "chat": chat, **common}
    if sae_obj is not None:
        edit = FeatureEdit(feature, CLI_MODES[mode], 0.0 if mode == "zero" else strength, positions)
        saes = {site: sae_obj} if site is not None else sae_obj  # the SAE object is not modified
        edited = generate(lm, prompts, saes=saes, edits=[edit], **common)
        settings |= {"sae": str(sae) if isinstance(sae, str | Path) else None,
                     "site": site or sae_obj.cfg.site, "feature": feature, "mode": mode,
                     "strength": strength, "positions": positions}
    return GenerateResult(prompts, seeds, unedited, edited, settings)


def _sae(sae: Any) -> Any:
    if isinstance(sae, str | Path):
        from saelab.sae import load_sae

        return load_sae(sae)
    return sae
