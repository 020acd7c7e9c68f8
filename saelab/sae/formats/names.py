"""Peers' names for activations, and the saelab site that holds exactly that tensor.

Each peer names the activation an SAE was trained on in its own terms:

    TransformerLens hooks   blocks.3.hook_resid_post        (SAELens, Gemma Scope 1 via SAELens)
    HF module paths         model.layers.3.mlp               (SAELens on HF models: the output)
    Gemma Scope hook points model.layers.3.self_attn.o_proj.input   (Gemma Scope 2 config.json)
    sparsify hookpoints     layers.3.mlp                     (the output, relative to base_model)
    dictionary_learning     mlp_out_layer3 + lm_name         (a label for the hooked submodule)

A name maps to a canonical site (``resid_post.3``) only where the two tensors are
the same on every model the name can apply to; otherwise to a raw module site
(``layers.3.mlp:out``, resolved against the model when the SAE is attached),
which is exact by construction. On Gemma 2/3 the output of ``mlp`` is *not*
``mlp_out`` (that is read after ``post_feedforward_layernorm``), so an MLP
module's output is never mapped to ``mlp_out`` unless the family is known and
its tap *is* that module (see `saelab.models.sites.FAMILIES`).

Names with no exact site are refused (`UnmappableNameError`) with a sentence
saying what the tensor is. tests/test_foreign_sites.py checks every mapping
against each family's tensors.
"""

from __future__ import annotations

import re
from typing import Any

from saelab.models.sites import FAMILIES, LAYERNORM_FAMILIES, Tap
from saelab.sae.formats._common import FormatError

_TAPS = {f.name: f.taps for f in FAMILIES}
# Taps that are the same module in every family: what a module name means when the family is unknown.
_UNIVERSAL = {k: t for k, t in _TAPS["llama"].items() if all(f.get(k) == t for f in _TAPS.values())}
# The module names a few peers' labels stand for, per family (block list, attention, embedding).
_BLOCKS = {"gpt2": "h"}
_ATTN = {"gpt2": "attn", "gpt_neox": "attention"}
_EMBED = {"gpt2": "wte", "gpt_neox": "embed_in"}
_BLOCK_RE = re.compile(r"(?:.*\.)?(?:layers|h)\.(?P<layer>\d+)(?:\.(?P<rest>.+))?")


class UnmappableNameError(FormatError):
    """A peer's activation name that no saelab site holds exactly (or that names a transcoder)."""


def family_hint(model_name: str | None) -> str | None:
    """The saelab family a peer's model name belongs to, as publishers spell them (None if unknown).

    Only used to choose between sites that differ by family. An unknown name makes
    those names raw module sites (exact on any family) or refused, never canonical.
    """
    n = (model_name or "").lower()
    for family, pattern in (
        ("gemma3", r"gemma-?3"), ("gemma2", r"gemma-?2"), ("gpt_neox", r"pythia|gpt-?neox"),
        ("gpt2", r"gpt-?2"), ("qwen2", r"qwen-?2"), ("llama", r"llama|smollm"),
    ):  # fmt: skip
        if re.search(pattern, n):
            return family
    return None


# ------------------------------------------------------------------ HF modules
def module_site(path: str, direction: str = "out", family: str | None = None) -> str:
    """The site of a module's output (or input) named by its path, full or base-relative.

    A block's output/input is resid_post/resid_pre in every family. Another
    module maps to a canonical site only when `family` is known and that
    family's tap for the kind is that very module; otherwise to the raw site
    ``path:direction``, which `resolve_sites` finds from the model or its base model.
    """
    m = _BLOCK_RE.fullmatch(path)
    if m:
        layer, rest = int(m["layer"]), m["rest"] or ""
        taps = _TAPS[family] if family in _TAPS else _UNIVERSAL
        for kind, tap in taps.items():
            if tap == Tap(rest, direction):
                return f"{kind}.{layer}"
    return f"{path}:{direction}"


def looks_like_hookpoint(name: str) -> bool:
    """Whether a sparsify folder name reads as a module path (not a renamed folder)."""
    top = ("embed_tokens", "wte", "wpe", "embed_in", "norm", "ln_f", "final_layer_norm")
    return bool(_BLOCK_RE.fullmatch(name)) or name in top


def hook_point_site(point: str, family: str | None = None) -> str:
    """Gemma Scope's ``<module path>.output`` / ``.input`` as a site."""
    path, _, end = point.rpartition(".")
    direction = {"output": "out", "input": "in"}.get(end)
    if not path or direction is None:
        raise UnmappableNameError(
            f"hook point {point!r} is not '<module path>.output' or '<module path>.input'"
        )
    return module_site(path, direction, family)


# ------------------------------------------------------------------ TransformerLens
# blocks.L.<suffix> whose tensor is a canonical site in every family (TransformerLens's
# Gemma 2 hook_attn_out / hook_mlp_out come after its post-norms, as saelab's do).
_TL_EXACT = {
    "hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out", "attn.hook_z": "attn_z",
}  # fmt: skip
# What the other hooks hold, for the refusal.
_TL_WHAT = {
    "hook_attn_in": "the residual stream copied per head for attention",
    "hook_q_input": "the residual stream copied per head for the queries",
    "hook_k_input": "the residual stream copied per head for the keys",
    "hook_v_input": "the residual stream copied per head for the values",
    "attn.hook_q": "the attention queries, per head",
    "attn.hook_k": "the attention keys, per head",
    "attn.hook_v": "the attention values, per head",
    "attn.hook_result": "each head's output after W_O, per head",
    "attn.hook_pattern": "the attention pattern",
    "attn.hook_attn_scores": "the attention scores",
    "mlp.hook_pre": "the MLP's hidden pre-activations (width d_mlp)",
    "mlp.hook_post": "the MLP's hidden activations (width d_mlp)",
    "ln1.hook_normalized": "the normalized attention input",
    "ln1.hook_scale": "the attention norm's scale",
    "ln2.hook_scale": "the MLP norm's scale",
}
_TL_TOP_WHAT = {
    "hook_embed": "the token embeddings (before position embeddings or scaling)",
    "hook_pos_embed": "the position embeddings",
    "ln_final.hook_normalized": "the normalized final residual stream",
}
_TL_RE = re.compile(r"blocks\.(\d+)\.(.+)")


def tl_site(hook: str, model_name: str | None = None, processing: dict[str, Any] | None = None) -> str:
    """A TransformerLens hook name as a site, by TransformerLens's own definitions.

    `model_name` decides the two family-dependent hooks: ``ln2.hook_normalized``
    (the MLP's input on LayerNorm models; before the RMSNorm weight elsewhere)
    and ``hook_mlp_in`` (resid_mid, or resid_pre under GPT-NeoX's parallel
    residual). `processing` is SAELens's model_from_pretrained_kwargs.
    """
    m = _TL_RE.fullmatch(hook)
    if not m:
        what = _TL_TOP_WHAT.get(hook)
        raise UnmappableNameError(
            f"TransformerLens hook {hook!r} holds {what}; no saelab site holds exactly that "
            "tensor." if what else f"{hook!r} is not a TransformerLens block hook saelab knows."
        )
    layer, suffix = int(m.group(1)), m.group(2)
    family = family_hint(model_name)
    if suffix in _TL_EXACT:
        _check_processing(hook, _TL_EXACT[suffix], family, processing or {})
        return f"{_TL_EXACT[suffix]}.{layer}"
    if suffix == "ln2.hook_normalized":
        folded = bool((processing or {}).get("fold_ln"))
        if family in LAYERNORM_FAMILIES and not folded:
            return f"mlp_in.{layer}"
        why = (
            "a TransformerLens model with fold_ln, whose LayerNorm lost its weight and bias"
            if folded else
            f"{model_name or 'an unnamed model'}, where TransformerLens reads its RMSNorm before "
            "the weight (LayerNorm models GPT-2 and Pythia read the MLP's input exactly)"
        )  # fmt: skip
        raise UnmappableNameError(
            f"{hook} is the normalized MLP input of {why}; no saelab site holds that tensor."
        )
    if suffix == "hook_mlp_in":  # the residual stream entering the MLP's norm
        if family is None:
            raise UnmappableNameError(
                f"{hook} is the residual stream entering the MLP's norm: resid_mid.{layer}, or "
                f"resid_pre.{layer} under a parallel residual (Pythia); the file names no model "
                "family to tell which."
            )
        # Every published GPT-NeoX model (Pythia, NeoX-20B) uses the parallel residual.
        kind = "resid_pre" if family == "gpt_neox" else "resid_mid"
        _check_processing(hook, kind, family, processing or {})
        return f"{kind}.{layer}"
    what = _TL_WHAT.get(suffix)
    raise UnmappableNameError(
        f"TransformerLens hook {hook} holds {what}; no saelab site holds exactly that tensor."
        if what else f"{hook!r} is not a TransformerLens hook saelab knows."
    )


# TransformerLens's weight processing (SAELens passes model_from_pretrained_kwargs to
# from_pretrained_no_processing) and the kinds whose tensors it changes, by family:
# centring the writing weights removes each token's mean over d_model from everything
# written to the residual stream (LayerNorm models only: TL skips it on RMSNorm ones);
# folding value biases or refactoring W_QK/W_OV changes z where there are value biases.
_WRITTEN = frozenset({"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"})
_NO_VALUE_BIAS = ("llama", "gemma2", "gemma3")
_PROCESSING = {
    "center_writing_weights": (
        lambda family: _WRITTEN if family not in _TAPS or family in LAYERNORM_FAMILIES else set(),
        "its inputs were the residual stream minus each token's mean over d_model"),
    "fold_value_biases": (
        lambda family: {"attn_z"} if family not in _NO_VALUE_BIAS else set(),
        "its z lacks the value biases (moved into b_O)"),
    "refactor_factored_attn_matrices": (
        lambda family: {"attn_z"}, "its z comes from refactored W_V and W_O"),
}


def _check_processing(hook: str, kind: str, family: str | None, processing: dict[str, Any]) -> None:
    for flag, (kinds, what) in _PROCESSING.items():
        if processing.get(flag) and kind in kinds(family):
            raise UnmappableNameError(
                f"{hook} was read from a TransformerLens model loaded with {flag}=True, so {what}; "
                "no site of the Hugging Face model holds that tensor."
            )


def site_to_tl(site: str | None, model_name: str | None = None) -> str | None:
    """The TransformerLens name of a canonical site (None for raw sites, or none exact).

    mlp_in is TransformerLens's ``ln2.hook_normalized`` only on LayerNorm models.
    """
    m = re.fullmatch(r"(\w+)\.(\d+)", site or "")
    if not m:
        return None
    kinds = {v: k for k, v in _TL_EXACT.items()}
    if family_hint(model_name) in LAYERNORM_FAMILIES:
        kinds["mlp_in"] = "ln2.hook_normalized"
    suffix = kinds.get(m.group(1))
    return f"blocks.{m.group(2)}.{suffix}" if suffix else None


# ------------------------------------------------------------------ dictionary_learning
DL_LABEL = re.compile(
    r"(?P<kind>resid_post|resid_out|resid|mlp_out|mlp|attn_out|attn|embed)(?:_?layer_?(?P<layer>\d+))?"
)


def dl_site(label: str, layer: Any, lm_name: str | None) -> str:
    """A dictionary_learning submodule label (``mlp_out_layer3``) as a site.

    dictionary_learning stores the hooked submodule's output; the label names it
    by convention: ``resid_*`` the block, ``mlp_out`` the block's mlp,
    ``attn_out`` its attention module, ``embed`` the input embedding.
    """
    m = DL_LABEL.fullmatch(label)
    if not m:
        raise UnmappableNameError(
            f"dictionary_learning submodule {label!r} is not a label saelab can read "
            "(resid_post_layerL, resid_out_layerL, mlp_out_layerL, attn_out_layerL, embed)."
        )
    kind = m["kind"]
    L = m["layer"] if m["layer"] is not None else layer
    family = family_hint(lm_name)
    if kind == "embed":
        if family is None:
            raise UnmappableNameError(
                f"dictionary_learning {label!r} is the input embedding's output of "
                f"{lm_name or 'an unnamed model'}; saelab cannot tell that model's embedding module."
            )
        return module_site(_EMBED.get(family, "embed_tokens"), "out", family)
    if not isinstance(L, int) and not (isinstance(L, str) and L.isdigit()):
        raise UnmappableNameError(f"dictionary_learning {label!r} has no layer")
    blocks = _BLOCKS.get(family or "", "layers")
    if kind.startswith("resid"):
        return f"resid_post.{int(L)}"
    if family is None:
        raise UnmappableNameError(
            f"dictionary_learning {label!r} is the output of layer {L}'s {kind[:4]} module of "
            f"{lm_name or 'an unnamed model'}; saelab cannot tell that model's module names."
        )
    module = "mlp" if kind.startswith("mlp") else _ATTN.get(family, "self_attn")
    return module_site(f"{blocks}.{int(L)}.{module}", "out", family)


# ------------------------------------------------------------------ transcoders and heads
def refuse_transcoder(source: str, reads: str, writes: str) -> None:
    raise UnmappableNameError(
        f"{source} is a transcoder reading {reads} and writing {writes}, not an SAE: its decoder "
        "predicts another activation than the one it encodes. saelab reads per-layer "
        "transcoders of known layout (saelab.sae.transcoder) and refuses this one."
    )


def refuse_head(source: str, hook: str | None, head: Any) -> None:
    m = _TL_RE.fullmatch(hook or "")
    where = f"head {head} of layer {m.group(1)}" if m else f"head {head} at {hook}"
    raise UnmappableNameError(
        f"{source} is an SAE on one attention head's output ({where}, {hook}, hook_head_index "
        f"{head}); saelab's sites hold all heads together (attn_z), so it refuses it."
    )


def fill_site(meta: dict[str, Any], source: str = "the SAE file") -> dict[str, Any]:
    """Complete whichever of site / hook_name is missing from the other (in place).

    A saelab `site` wins. Otherwise a SAELens `hook_name` is read as
    TransformerLens's, or as an HF module path (its output) when it is not a
    TransformerLens name, as SAELens does on HF models. A one-head SAE or a name
    with no exact site raises UnmappableNameError naming `source`.
    """
    if meta.get("hook_head_index") is not None and not meta.get("site"):
        refuse_head(source, meta.get("hook_name"), meta["hook_head_index"])
    hook = meta.get("hook_name")
    if meta.get("site") and hook and hook.startswith("blocks."):
        # saelab's own: keep the TransformerLens name only if it is that site's tensor
        # (mlp_in is ln2.hook_normalized on LayerNorm models only), so peers read the right one.
        if site_to_tl(meta["site"], meta.get("model_name")) != hook:
            meta.pop("hook_name")  # refilled below with the exact name, if there is one
    if not meta.get("site") and hook:
        name = meta.get("model_name")
        try:
            if hook.startswith(("blocks.", "hook_", "ln_final.")):
                meta["site"] = tl_site(hook, name, meta.get("model_from_pretrained_kwargs"))
            else:  # SAELens on an HF model hooks the module's output
                meta["site"] = module_site(hook, "out", family_hint(name))
        except UnmappableNameError as e:
            raise UnmappableNameError(f"{source}: {e}") from None
    if not meta.get("hook_name") and meta.get("site"):
        tl = site_to_tl(meta["site"], meta.get("model_name"))
        if tl:
            meta["hook_name"] = tl
    return meta
