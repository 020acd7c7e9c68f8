"""Transcoder files: SAELens Transcoder / SkipTranscoder folders (the native format).

    <dir>/cfg.json                  architecture transcoder | skip_transcoder |
                                    jumprelu_transcoder | jumprelu_skip_transcoder
                                    (saelab also writes topk_transcoder | topk_skip_transcoder,
                                    with k: SAELens has no top-k transcoder), d_in, d_sae,
                                    d_out, hook_name_out, metadata {hook_name, site, site_out, ...}
    <dir>/sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc [d_sae],
                                    b_dec [d_out], threshold [d_sae] (jumprelu),
                                    W_skip [d_out, d_in] (skip)

A BatchTopK transcoder is written as a JumpReLU one with θ on every feature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import saelab
from saelab.checks import integer, mapping
from saelab.errors import CorruptFileError
from saelab.sae.base import UnknownArchitectureError
from saelab.sae.formats._common import (
    FormatError,
    atomic_files,
    file_dtype,
    read_safetensors,
    write_json,
    write_safetensors,
)
from saelab.sae.formats.names import UnmappableNameError, module_site, site_to_tl, tl_site
from saelab.sae.transcoder import Transcoder, TranscoderConfig, transcoder_from_tensors

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
SAELENS_ARCHS = {
    "transcoder": ("relu", False),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
    "topk_transcoder": ("topk", False),
    "topk_skip_transcoder": ("topk", True),
}
_TO_SAELENS = {v: k for k, v in SAELENS_ARCHS.items()}


def is_saelens_transcoder(raw: dict[str, Any]) -> bool:
    return raw.get("architecture") in SAELENS_ARCHS


def hook_to_site(hook: str | None, model_name: str | None, source: str) -> str | None:
    """A peer's hook name (TransformerLens or HF module path) as a site; None if no hook."""
    if not hook:
        return None
    try:
        if hook.startswith(("blocks.", "hook_")):
            return tl_site(hook, model_name)
        return module_site(hook, "out")
    except UnmappableNameError as e:
        raise UnmappableNameError(f"{source}: {e}") from None


def read_saelens(folder: Path, raw: dict[str, Any], *, dtype: str | None = None) -> Transcoder:
    where = folder / CFG
    arch, skip = SAELENS_ARCHS[raw["architecture"]]
    for key in ("d_in", "d_sae"):
        integer(f"{where}: {key}", raw.get(key), low=1, error=CorruptFileError)
    tensors = read_safetensors(folder / WEIGHTS)
    source = str(folder / WEIGHTS)
    d_out = raw.get("d_out")
    if d_out is None and "W_dec" in tensors:
        d_out = int(tensors["W_dec"].shape[-1])
    integer(f"{where}: d_out", d_out, low=1, error=CorruptFileError)
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    k = raw.get("k") if arch == "topk" else None
    if arch == "topk":
        k = integer(f"{where}: k", k, low=1, high=raw["d_sae"], error=CorruptFileError)
    meta = dict(mapping(f"{where}: metadata", raw.get("metadata") or {}, error=CorruptFileError))
    for key in ("model_name", "hook_name", "hook_name_out"):
        if key not in meta and raw.get(key) is not None:
            meta[key] = raw[key]
    if not meta.get("site"):
        meta["site"] = hook_to_site(meta.get("hook_name"), meta.get("model_name"), str(where))
    if not meta.get("site_out"):
        meta["site_out"] = hook_to_site(meta.get("hook_name_out"), meta.get("model_name"), str(where))
    cfg = TranscoderConfig(
        arch, d_in=raw["d_in"], d_sae=raw["d_sae"], d_out=int(d_out), k=k, skip=skip,
        dtype=dtype or file_dtype(tensors, "W_enc", None),
        metadata={k2: v for k2, v in meta.items() if v is not None})
    if raw.get("apply_b_dec_to_input"):
        raise CorruptFileError(f"{where}: apply_b_dec_to_input is true, but a transcoder's b_dec "
                               "is an output bias; fix the file (SAELens transcoders set false).")
    return transcoder_from_tensors(cfg, tensors, source=source)


def cfg_dict(tc: Transcoder) -> dict[str, Any]:
    from saelab.sae.formats.native import SAELENS_FORMAT_VERSION

    c = tc.cfg
    meta = {"sae_lens_version": SAELENS_FORMAT_VERSION, **c.metadata}
    meta.setdefault("saelab_version", saelab.__version__)
    name = meta.get("model_name")
    # The TransformerLens name only where it holds exactly that tensor (mlp_in is
    # ln2.hook_normalized on LayerNorm models only); else saelab's site name.
    for key, site in (("hook_name", c.site), ("hook_name_out", c.site_out)):
        if site:
            meta[key] = site_to_tl(site, name) or site
    out: dict[str, Any] = {
        "architecture": _TO_SAELENS[(c.architecture, c.skip)],
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "d_out": c.d_out,
        "dtype": c.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "hook_name_out": meta.get("hook_name_out", ""),
        "hook_head_index_out": None,
    }
    if c.architecture == "topk":
        out["k"] = c.k
    out["metadata"] = meta
    return out


def write_saelens(tc: Transcoder, folder: Path) -> None:
    tc = tc.for_export()
    if (tc.cfg.architecture, tc.cfg.skip) not in _TO_SAELENS:
        raise UnknownArchitectureError(
            f"no transcoder file architecture for saelab's {tc.cfg.architecture!r}")
    tensors = {k: v.to(tc.cfg.torch_dtype) for k, v in tc.tensors().items()}
    with atomic_files(folder) as tmp:
        write_safetensors(tmp(WEIGHTS), tensors)
        write_json(tmp(CFG), cfg_dict(tc))


def refuse_format(fmt: str) -> FormatError:
    return FormatError(f"{fmt} stores SAEs, not transcoders; save a transcoder as saelens "
                       "(SAELens Transcoder folders), gemma-scope-2 or sparsify, or a set as "
                       "circuit-tracer")
