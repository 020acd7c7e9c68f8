"""Shared by the format modules: safe reads, atomic writes, site names, conversions."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.errors import CorruptFileError, SaelabError
from saelab.sae.base import DTYPES, SAE

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


class FormatError(SaelabError):
    """No SAE found at a path, or an SAE that a format cannot express."""


# ------------------------------------------------------------------ reading
def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FormatError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(
            f"{path} is not valid JSON ({e}); the file may be truncated. Re-save or re-download it."
        ) from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.exists():
        raise FormatError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad headers/sizes
        raise CorruptFileError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it may be "
            "truncated or corrupt. Re-save or re-download it."
        ) from None


def file_dtype(tensors: dict[str, Tensor], key: str, override: str | None) -> str:
    """The dtype name to build with: `override`, else that of `tensors[key]` (float32 if exotic)."""
    if override is not None:
        if override not in DTYPES:
            raise ValueError(f"dtype={override!r}: expected one of {sorted(DTYPES)}")
        return override
    t = tensors.get(key)
    names = {v: k for k, v in DTYPES.items()}
    return names.get(t.dtype, "float32") if t is not None else "float32"


# ------------------------------------------------------------------ writing
@contextlib.contextmanager
def atomic_files(folder: Path) -> Iterator[Callable[[str], Path]]:
    """Yield `tmp(name)`: a temporary path in `folder` for file `name`.

    When the block ends without error every temporary file replaces its target
    with os.replace (atomic per file), in the order they were requested, so
    config files requested last appear last. On error the temporaries go.
    """
    folder.mkdir(parents=True, exist_ok=True)
    pending: list[tuple[Path, Path]] = []

    def tmp(name: str) -> Path:
        fd, p = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        pending.append((Path(p), folder / name))
        return Path(p)

    try:
        yield tmp
        for t, final in pending:
            os.replace(t, final)
    finally:
        for t, _ in pending:
            t.unlink(missing_ok=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    try:
        text = json.dumps(data, indent=2, sort_keys=False)
    except TypeError as e:
        raise ValueError(f"SAE metadata must be JSON-serializable: {e}") from None
    path.write_text(text + "\n")


def write_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path))


# ------------------------------------------------------------------ site names
# saelab site kind -> TransformerLens hook (see ARCHITECTURE.md, "Sites").
# TODO(sites): use saelab.models.sites once it exists, so there is one table.
_TL_HOOKS = {
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "resid_post": "blocks.{L}.hook_resid_post",
    "attn_z": "blocks.{L}.attn.hook_z",
    "attn_out": "blocks.{L}.hook_attn_out",
    "mlp_in": "blocks.{L}.ln2.hook_normalized",
    "mlp_out": "blocks.{L}.hook_mlp_out",
}
SITE_KINDS = tuple(_TL_HOOKS)
_TL_TO_KIND = {v.split("{L}.")[1]: k for k, v in _TL_HOOKS.items()} | {"hook_mlp_in": "mlp_in"}

# Gemma (2/3) Hugging Face module paths as Gemma Scope 2's config.json names them.
_HF_GEMMA_HOOKS = {
    "resid_post": "model.layers.{L}.output",
    "attn_z": "model.layers.{L}.self_attn.o_proj.input",
    "attn_out": "model.layers.{L}.post_attention_layernorm.output",
    "mlp_in": "model.layers.{L}.pre_feedforward_layernorm.output",
    "mlp_out": "model.layers.{L}.post_feedforward_layernorm.output",
}
_HF_TO_KIND = {v.split("{L}.")[1]: k for k, v in _HF_GEMMA_HOOKS.items()}


def _split_site(site: str | None) -> tuple[str, int] | None:
    m = re.fullmatch(r"(\w+)\.(\d+)", site or "")
    return (m.group(1), int(m.group(2))) if m and m.group(1) in _TL_HOOKS else None


def site_to_hook_name(site: str | None) -> str | None:
    parts = _split_site(site)
    return _TL_HOOKS[parts[0]].format(L=parts[1]) if parts else None


def hook_name_to_site(hook_name: str | None) -> str | None:
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name or "")
    kind = _TL_TO_KIND.get(m.group(2)) if m else None
    return f"{kind}.{m.group(1)}" if kind else None


def site_to_hf_gemma(site: str | None) -> str | None:
    parts = _split_site(site)
    return (
        _HF_GEMMA_HOOKS[parts[0]].format(L=parts[1])
        if parts and parts[0] in _HF_GEMMA_HOOKS
        else None
    )


def hf_hook_to_site(hf_hook: str | None) -> str | None:
    """`model.layers.12.output` -> resid_post.12; sparsify folders `layers.12(.mlp)` too."""
    s = hf_hook or ""
    m = re.search(r"(?:^|\.)(?:layers|h)\.(\d+)\.(.+)$", s)
    if m and m.group(2) in _HF_TO_KIND:
        return f"{_HF_TO_KIND[m.group(2)]}.{m.group(1)}"
    m = re.search(r"(?:^|\.)(?:layers|h)\.(\d+)(\.mlp|\.self_attn|\.attn|\.attention)?$", s)
    if not m:
        return None
    kind = {None: "resid_post", ".mlp": "mlp_out"}.get(m.group(2), "attn_out")
    return f"{kind}.{m.group(1)}"


def infer_from_path(path: Path) -> dict[str, Any]:
    """Provenance readable from a Gemma-Scope-like path (layer, site kind, model, L0)."""
    s = path.resolve().as_posix()
    meta: dict[str, Any] = {}
    layer = re.search(r"layer_(\d+)", s)
    kind = next((p for p in reversed(path.resolve().parts) if p in SITE_KINDS), None)
    repo = re.search(r"gemma-scope-(\d+[bm])-(pt|it)-(res|mlp|att)\b", s)
    if repo:
        size, tune, what = repo.groups()
        kind = kind or {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}[what]
        meta["model_name"] = f"google/gemma-2-{size}" + ("-it" if tune == "it" else "")
    if layer and kind:
        meta["site"] = f"{kind}.{int(layer.group(1))}"
        meta["hook_name"] = site_to_hook_name(meta["site"])
    l0 = re.search(r"average_l0_(\d+)", s)
    if l0:
        meta["l0"] = int(l0.group(1))
    label = re.search(r"_l0_(small|medium|big)\b", s)
    if label:
        meta["l0_label"] = label.group(1)
    return meta


def fill_site(meta: dict[str, Any]) -> dict[str, Any]:
    """Complete whichever of site / hook_name is missing from the other."""
    if not meta.get("site") and meta.get("hook_name"):
        site = hook_name_to_site(meta["hook_name"])
        if site:
            meta["site"] = site
    if not meta.get("hook_name") and meta.get("site"):
        hook = site_to_hook_name(meta["site"])
        if hook:
            meta["hook_name"] = hook
    return meta


# ------------------------------------------------------------------ conversions
def raw_input_jumprelu(sae: SAE, fmt: str) -> SAE:
    """The SAE as Gemma Scope stores it: jumprelu, raw input (no b_dec subtraction).

    ReLU is JumpReLU with θ = 0. A b_dec subtraction folds into the encoder bias,
    ``b_enc' = b_enc - b_dec @ W_enc``: same maths, rounding differs by ~1 ulp.
    """
    from saelab.sae.jumprelu import JumpReLUSAE

    sae = sae.for_export()
    arch = sae.cfg.architecture
    if arch not in ("relu", "jumprelu"):
        raise FormatError(
            f"{fmt} stores JumpReLU SAEs only; a {arch} SAE picks the top k features per "
            "token, which no per-feature threshold can reproduce. Save it as saelens or sparsify."
        )
    t = {k: v.detach().clone() for k, v in sae.tensors().items()}
    if arch == "relu":
        t["threshold"] = torch.zeros_like(t["b_enc"])
    if sae.cfg.apply_b_dec_to_input:
        t["b_enc"] = t["b_enc"] - t["b_dec"] @ t["W_enc"]
    cfg = sae.cfg.replace(architecture="jumprelu", apply_b_dec_to_input=False, k=None)
    return JumpReLUSAE.from_tensors(cfg, t, source=f"{fmt} conversion")


def topk_with_b_dec(sae: SAE, fmt: str) -> SAE:
    """The SAE as sparsify stores it: topk with b_dec subtracted from the input."""
    from saelab.sae.topk import TopKSAE

    arch = sae.cfg.architecture
    if arch != "topk":
        raise FormatError(
            f"{fmt} stores TopK SAEs only; a {arch} SAE's activations are not a per-token "
            "top-k. Save it as saelens, gemma-scope or gemma-scope-2."
        )
    if sae.cfg.apply_b_dec_to_input:
        return sae
    t = {k: v.detach().clone() for k, v in sae.tensors().items()}
    t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]  # (x - b_dec) W + b' = x W + b_enc
    return TopKSAE.from_tensors(sae.cfg.replace(apply_b_dec_to_input=True), t, source=fmt)
