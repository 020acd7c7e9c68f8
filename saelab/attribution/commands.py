"""What `saelab attribute` computes, as a plain function the CLI wraps.

    result = run_attribute("smollm2-135m-instruct", ["runs/sae12", "runs/sae18"],
                           "Give me a short list of rivers.", 'logit_diff:" ":"\\n"@-1',
                           top=20, chat=True, verify=5)
    result.rows()         # [{"rank", "site", "position", "token", "feature", "act", "attribution"}]
    result.site_rows()    # per SAE: summed feature and error attributions
    result.to_json()      # everything, for --json
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from saelab.attribution.attribute import attribute
from saelab.attribution.metrics import as_metric
from saelab.attribution.result import Attribution
from saelab.attribution.verify import Verification, verify
from saelab.checks import PER_FEATURE, choice, integer
from saelab.console import JsonFlag, ModelOpt, console, emit_json, escape, user_errors
from saelab.data.tokens import special_ids
from saelab.errors import SaelabError

SHARES_CAPTION = (
    "through features: the summed attribution of the SAE's features (over all positions), the "
    "first-order change of the metric if every feature there were zeroed; through error: the "
    "same for the SAE's error term (what it fails to reconstruct). A large error share means "
    "this SAE's features leave much of the mechanism out.")

MAX_STEPS = 10**4


@dataclass
class AttributeResult:
    """The attribution of one prompt, its top pairs and (optionally) their verification."""

    attribution: Attribution
    token_texts: list[str]  # each token of the prompt, decoded
    top: int
    verification: Verification | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    skip_first: int = 1
    """Positions before this one are left out of the top pairs (position 0: an attention sink)."""
    skip_tokens: tuple[int, ...] = ()
    """Token ids whose positions are left out of the top pairs (the special tokens)."""

    @property
    def metric(self) -> float:
        return float(self.attribution.metric[0])

    def rows(self, largest: bool = True) -> list[dict[str, Any]]:
        """The `top` (position, feature) pairs with the largest (or most negative) attribution."""
        pairs = self.attribution.top(self.top, example=0, largest=largest,
                                     skip_first=self.skip_first, skip_tokens=self.skip_tokens)
        return [{"rank": i + 1, "site": p.site, "position": p.position,
                 "token": self.token_texts[p.position], "feature": p.feature, "act": p.act,
                 "attribution": p.value} for i, p in enumerate(pairs)]

    def site_rows(self) -> list[dict[str, Any]]:
        """Per SAE: the metric's first-order share through its features and through its error
        (`SHARES_CAPTION`); these sums run over every position, skipped ones included."""
        return [{"site": site, "features": float(t["features"][0]), "error": float(t["error"][0])}
                for site, t in self.attribution.totals().items()]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"settings": self.settings, "metric": self.metric,
                               "tokens": self.token_texts, "top": self.rows(),
                               "bottom": self.rows(largest=False), "sites": self.site_rows(),
                               "sites_caption": SHARES_CAPTION}
        if self.verification is not None:
            r = self.verification.correlation()
            out["verification"] = {"correlation": None if math.isnan(r) else r,
                                   "checks": self.verification.rows()}
        return out


def run_attribute(model: Any, sae_dirs: Any, prompt: str, metric_spec: str, *, top: int = 20,
                  chat: bool = False, method: str = "grad", ig_steps: int = 8, verify_top: int = 0,
                  verify_positions: str = "attributed", allow_multi: bool = False,
                  save: str | Path | None = None, dtype: str = "float32",
                  include_special: bool = False) -> AttributeResult:
    """Attribute `metric_spec` (e.g. ``'logit_diff:" ":"\\n"@-1'``) on `prompt` to the features
    of the SAEs in `sae_dirs` (folders / files `load_sae` reads, or SAEs), all spliced at once.

    model: a loaded LM or a name for `load_model`. verify_top: also ablate the top and
    bottom `verify_top` pairs one by one and together, and report predicted vs measured.
    save: write the full sparse attribution to this safetensors file. The top pairs (and
    the verified ones) leave out position 0 and special-token positions, whose attention-sink
    features otherwise fill a chat prompt's list; include_special=True keeps them.
    """
    integer("top", top, low=1, high=PER_FEATURE)
    choice("method", method, ("grad", "ig"))
    integer("ig_steps", ig_steps, low=1, high=MAX_STEPS)  # each is a forward and a backward
    integer("verify_top", verify_top, low=0, high=PER_FEATURE)
    lm = model
    if isinstance(model, str | Path):
        from saelab.models.load import load_model

        lm = load_model(str(model), dtype=dtype)
    saes = [_sae(s) for s in ([sae_dirs] if isinstance(sae_dirs, str | Path) else sae_dirs)]
    if not saes:
        raise ValueError("no SAE given; pass at least one SAE folder (--sae DIR)")
    metric = as_metric(metric_spec, allow_multi=allow_multi)
    attr = attribute(lm, saes, [prompt], metric, method=method, ig_steps=ig_steps, chat=chat)
    skip_first, skip_tokens = (0, ()) if include_special else (1, tuple(special_ids(lm.tokenizer)))
    check = None
    if verify_top > 0:
        check = verify(lm, saes, attr, metric, n_top=verify_top, n_bottom=verify_top,
                       together=verify_top, positions=verify_positions, skip_first=skip_first,
                       skip_tokens=skip_tokens)
    if save is not None:
        attr.save(save)
    texts = [lm.tokenizer.decode([t]) for t in attr.tokens[0]]
    settings = {"model": getattr(lm, "name", str(model)), "metric": metric_spec, "chat": chat,
                "method": method, "sites": list(attr.sites), "include_special": include_special,
                "saes": [str(s) if isinstance(s, str | Path) else None
                         for s in ([sae_dirs] if isinstance(sae_dirs, str | Path) else sae_dirs)],
                **({"ig_steps": ig_steps} if method == "ig" else {})}
    return AttributeResult(attr, texts, top, check, settings, skip_first, skip_tokens)


def _sae(sae: Any) -> Any:
    if isinstance(sae, str | Path):
        from saelab.sae import load_sae

        return load_sae(sae)
    return sae


@user_errors
def attribute_cmd(
    prompt: Annotated[str, typer.Option(help="The prompt (the user turn with --chat).")],
    sae: Annotated[list[Path], typer.Option(help="SAE folder; repeat to attribute through several at once.")],
    metric: Annotated[str, typer.Option(help='e.g. \'logit_diff:" ":"\\n"@-1\' (KIND:"A":"B"@POS) or \'logprob:"text"\'.')],
    model: ModelOpt = "smollm2-135m-instruct",
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
    top: Annotated[int, typer.Option(help="Pairs to show.")] = 20,
    method: Annotated[str, typer.Option(help="grad (act x grad) or ig (integrated gradients).")] = "grad",
    ig_steps: Annotated[int, typer.Option(help="Integrated-gradient steps.")] = 8,
    verify: Annotated[int, typer.Option(help="Ablate the top/bottom N features and compare.")] = 0,
    save: Annotated[Path | None, typer.Option(help="Save the full sparse attribution (safetensors).")] = None,
    include_special: Annotated[bool, typer.Option(help="Also rank pairs at position 0 and at special tokens (attention sinks; left out by default).")] = False,
    json: JsonFlag = False,
) -> None:
    """Which SAE features drive a metric: act x gradient for every (position, feature)."""
    try:
        result = run_attribute(model, [str(p) for p in sae], prompt, metric, top=top, chat=chat,
                               method=method, ig_steps=ig_steps, verify_top=verify, save=save,
                               include_special=include_special)
    except ValueError as err:
        raise SaelabError(str(err)) from None
    if json:
        return emit_json(result.to_json())
    skipped = "" if include_special else " (position 0 and special tokens left out)"
    table = Table("#", "site", "pos", "token", "feature", "act", "attribution",
                  title=f"metric {result.metric:.4g}: top pairs{skipped}")
    for r in result.rows():
        table.add_row(str(r["rank"]), r["site"], str(r["position"]), escape(repr(r["token"])),
                      str(r["feature"]), f"{r['act']:.3g}", f"{r['attribution']:+.4g}")
    console.print(table)
    sites = Table("site", "through features", "through error", title="first-order share per SAE",
                  caption=SHARES_CAPTION)
    for r in result.site_rows():
        sites.add_row(r["site"], f"{r['features']:+.4g}", f"{r['error']:+.4g}")
    console.print(sites)
    if result.verification is not None:
        console.print(f"verification: predicted vs measured ablation effect, Pearson r = "
                      f"{result.verification.correlation():.3f}")


def register(app: typer.Typer) -> None:
    """Mount `attribute` on the root app."""
    app.command("attribute")(attribute_cmd)
