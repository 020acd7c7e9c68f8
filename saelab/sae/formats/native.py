"""The native format: a SAELens v6 folder.

    <dir>/cfg.json                  d_in, d_sae, architecture, dtype, apply_b_dec_to_input,
                                    normalize_activations, reshape_activations, k (topk),
                                    metadata {model_name, hook_name, ... saelab provenance}
    <dir>/sae_weights.safetensors   W_enc [d_in,d_sae], W_dec [d_sae,d_in], b_enc, b_dec,
                                    threshold (jumprelu)
    <dir>/sparsity.safetensors      optional {"sparsity": log10(firing frequency + 1e-10)}

saelab's `relu` is SAELens's `standard`; a BatchTopK SAE is written as `jumprelu`
with its threshold on every feature, as SAELens writes its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import saelab
from saelab.checks import boolean, integer, mapping
from saelab.errors import CorruptFileError, ShapeMismatchError
from saelab.sae.base import SAE, SAEConfig, UnknownArchitectureError
from saelab.sae.formats._common import (
    atomic_files,
    file_dtype,
    read_json,
    read_safetensors,
    write_json,
    write_safetensors,
)
from saelab.sae.formats.names import fill_site

CFG, WEIGHTS, SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
_FROM_SAELENS = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}
_TO_SAELENS = {v: k for k, v in _FROM_SAELENS.items()}
# SAELens treats a cfg.json whose metadata has no sae_lens_version as pre-6.0 and
# rebuilds it from top-level keys, dropping our metadata; so we always write one:
# the version of the file layout we follow, not a claim that SAELens wrote it.
SAELENS_FORMAT_VERSION = "6.0.0"


def _architecture(raw: dict[str, Any], where: Path) -> tuple[str, int | None]:
    """saelab architecture and k from a v6 or pre-6.0 SAELens cfg.json."""
    arch = raw.get("architecture")
    k = raw.get("k")
    fn = raw.get("activation_fn", raw.get("activation_fn_str"))
    if arch is None or (arch == "standard" and fn == "topk"):
        # pre-6.0: an activation function instead of an architecture
        kwargs = mapping(f"{where}: activation_fn_kwargs", raw.get("activation_fn_kwargs") or {},
                         error=CorruptFileError)
        arch, k = ("topk", kwargs.get("k")) if fn == "topk" else ("standard", None)
    if not isinstance(arch, str) or arch not in _FROM_SAELENS:
        raise UnknownArchitectureError(
            f"{where}: SAELens architecture {arch!r} is not supported; saelab reads "
            f"{', '.join(_FROM_SAELENS)} (as saelab's {', '.join(_FROM_SAELENS.values())})."
        )
    arch = _FROM_SAELENS[arch]
    if arch == "topk" and k is None:
        raise CorruptFileError(f"{where}: k is missing; a topk SAE needs k (active features "
                               "per token). Add it to the file.")
    if k is not None:
        k = integer(f"{where}: k", k, low=1, high=raw.get("d_sae"), error=CorruptFileError)
    return arch, k


def _check_cfg(raw: dict[str, Any], where: Path) -> None:
    """Types and ranges of every field read, naming the file and the field (exit 3)."""
    for key in ("d_in", "d_sae"):
        integer(f"{where}: {key}", raw.get(key), low=1, error=CorruptFileError)
    if "apply_b_dec_to_input" in raw:  # "no" is not true: only a JSON boolean is read
        boolean(f"{where}: apply_b_dec_to_input", raw["apply_b_dec_to_input"],
                error=CorruptFileError)
    if raw.get("metadata") is not None:
        mapping(f"{where}: metadata", raw["metadata"], error=CorruptFileError)
    norm = raw.get("normalize_activations") or "none"
    if norm is True:
        norm = "expected_average_only_in"
    # expected_average_only_in is folded into the weights at the end of training;
    # SAELens applies nothing at inference for it, so neither do we.
    if norm not in ("none", "expected_average_only_in"):
        raise CorruptFileError(
            f"{where}: normalize_activations={norm!r} is applied at run time by SAELens and "
            "saelab does not support it yet; fold the normalization into the weights first."
        )


def read(folder: Path, *, dtype: str | None = None) -> SAE:
    raw = read_json(folder / CFG)
    from saelab.sae.formats import transcoders

    if transcoders.is_saelens_transcoder(raw):  # a Transcoder (an SAE subclass) by its cfg.json
        return transcoders.read_saelens(folder, raw, dtype=dtype)
    _check_cfg(raw, folder / CFG)
    arch, k = _architecture(raw, folder / CFG)
    tensors = read_safetensors(folder / WEIGHTS)
    source = str(folder / WEIGHTS)

    if "log_threshold" in tensors and "threshold" not in tensors:  # SAELens training checkpoints
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if "scaling_factor" in tensors:
        sf = tensors.pop("scaling_factor")
        if not torch.all(sf == 1):
            raise CorruptFileError(
                f"{source}: a finetuning scaling_factor other than 1 is not supported; "
                "multiply it into W_dec's rows (decoder side) and re-save."
            )

    meta = dict(raw.get("metadata") or {})
    for key in ("model_name", "hook_name", "hook_head_index", "model_class_name",
                "model_from_pretrained_kwargs"):  # pre-6.0 kept these on top
        if key not in meta and raw.get(key) is not None:
            meta[key] = raw[key]
    if "hook_point" in raw and "hook_name" not in meta:
        meta["hook_name"] = raw["hook_point"]
    if raw.get("hook_point_head_index") is not None and meta.get("hook_head_index") is None:
        meta["hook_head_index"] = raw["hook_point_head_index"]
    dt = dtype or _dtype_name(raw.get("dtype")) or file_dtype(tensors, "W_enc", None)
    cfg = SAEConfig(
        architecture=arch,
        d_in=raw["d_in"],
        d_sae=raw["d_sae"],
        k=k,
        apply_b_dec_to_input=raw.get("apply_b_dec_to_input", True),
        dtype=dt,
        metadata=fill_site(meta, str(folder / CFG)),
    )
    if arch == "topk" and raw.get("rescale_acts_by_decoder_norm"):
        # SAELens picks the top k of pre·|W_dec| and decodes f/|W_dec|: the same SAE
        # as one with unit-norm decoder rows and the norms folded into the encoder.
        tensors = _fold_decoder_norms(tensors, source)
    return SAE.from_tensors(cfg, tensors, source=source)


def _dtype_name(name: Any) -> str | None:
    if not isinstance(name, str):
        return None
    name = name.removeprefix("torch.")
    return name if name in ("float32", "float64", "bfloat16", "float16") else None


def _fold_decoder_norms(t: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    if "W_dec" not in t or "W_enc" not in t or "b_enc" not in t:
        return t  # from_tensors names what is missing
    n = t["W_dec"].norm(dim=1)
    if n.shape[0] != t["W_enc"].shape[-1]:
        raise ShapeMismatchError(f"{source}: W_dec and W_enc disagree on d_sae")
    return {**t, "W_dec": t["W_dec"] / n[:, None], "W_enc": t["W_enc"] * n, "b_enc": t["b_enc"] * n}


def cfg_dict(sae: SAE) -> dict[str, Any]:
    """cfg.json as SAELens v6 writes it."""
    cfg = sae.cfg
    meta = fill_site({"sae_lens_version": SAELENS_FORMAT_VERSION, **cfg.metadata})
    meta.setdefault("saelab_version", saelab.__version__)
    hook = meta.get("hook_name") or ""
    out: dict[str, Any] = {
        "architecture": _TO_SAELENS[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        # TransformerLens's hook_z is [.., n_heads, d_head]; SAELens flattens it itself.
        "reshape_activations": "hook_z" if hook.endswith("hook_z") else "none",
    }
    if cfg.architecture == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    out["metadata"] = meta
    return out


def write(sae: SAE, folder: Path, *, log_sparsity: Tensor | None = None) -> None:
    from saelab.sae.formats import transcoders
    from saelab.sae.transcoder import Transcoder

    if isinstance(sae, Transcoder):
        transcoders.write_saelens(sae, folder)
        return
    sae = sae.for_export()
    if sae.cfg.architecture not in _TO_SAELENS:
        raise UnknownArchitectureError(
            f"SAELens has no architecture for saelab's {sae.cfg.architecture!r}; "
            f"it stores {', '.join(_TO_SAELENS)}"
        )
    if log_sparsity is not None and tuple(log_sparsity.shape) != (sae.cfg.d_sae,):
        raise ShapeMismatchError(
            f"log_sparsity has shape {list(log_sparsity.shape)}, expected [{sae.cfg.d_sae}]"
        )
    tensors = {k: v.to(sae.cfg.torch_dtype) for k, v in sae.tensors().items()}
    with atomic_files(folder) as tmp:
        write_safetensors(tmp(WEIGHTS), tensors)
        if log_sparsity is not None:
            write_safetensors(tmp(SPARSITY), {"sparsity": log_sparsity.float()})
        write_json(tmp(CFG), cfg_dict(sae))


def read_log_sparsity(folder: Path) -> Tensor | None:
    path = folder / SPARSITY
    return read_safetensors(path).get("sparsity") if path.exists() else None
