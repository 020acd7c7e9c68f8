"""Gemma Scope files: v1 (Gemma 2, `params.npz`) and v2 (Gemma 3, `params.safetensors`).

v1   <release>/layer_L/width_16k/average_l0_N/params.npz
     W_enc [d_model, d_sae], W_dec [d_sae, d_model], b_enc, b_dec, threshold; float32
v2   <release>/resid_post/layer_L_width_16k_l0_medium/{params.safetensors, config.json}
     lowercase w_enc, w_dec, b_enc, b_dec, threshold; config.json {architecture:
     "jump_relu", model_name, hf_hook_point_in, ...}

Both are JumpReLU SAEs on raw activations (no b_dec subtraction):
``pre = x @ W_enc + b_enc; f = ReLU(pre)·1[pre > threshold]; x_hat = f @ W_dec + b_dec``.
Site, layer, model and L0 are read from the path where it follows the layout.
saelab adds an optional `saelab.json` beside v1's params.npz (other readers ignore
it) so that its provenance survives a round trip; v2 keeps it in config.json.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.errors import CorruptFileError, UnsafeFileError
from saelab.sae.base import SAE, SAEConfig
from saelab.sae.formats._common import (
    FormatError,
    atomic_files,
    file_dtype,
    fill_site,
    hf_hook_to_site,
    infer_from_path,
    raw_input_jumprelu,
    read_json,
    read_safetensors,
    site_to_hf_gemma,
    write_json,
    write_safetensors,
)

NPZ, SIDECAR = "params.npz", "saelab.json"
V2_WEIGHTS, V2_CONFIG = "params.safetensors", "config.json"
_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def _canonical(name: str) -> str:
    return "W_" + name[2:] if name.startswith("w_") else name  # v2 and some v1 copies: w_enc


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    if path.is_file() and not zipfile.is_zipfile(path):
        with path.open("rb") as fh:
            pickled = fh.read(1) == b"\x80"  # a pickle's PROTO opcode
        if pickled:
            raise UnsafeFileError(
                f"{path} is a pickle, not an .npz archive; unpickling can run arbitrary code, "
                "so saelab refuses it. Gemma Scope files are .npz archives of float arrays."
            )
        raise CorruptFileError(
            f"{path} is not an .npz (zip) archive; it may be truncated. Re-download it."
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise FormatError(f"{path} does not exist") from None
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise UnsafeFileError(
                f"{path} holds pickled Python objects; unpickling can run arbitrary code, so "
                "saelab refuses it. Gemma Scope files hold plain float arrays: re-download them."
            ) from None
        raise CorruptFileError(f"{path} is not a readable .npz file ({e})") from None
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CorruptFileError(
            f"{path} is not a readable .npz file ({type(e).__name__}: {e}); it may be "
            "truncated. Re-download it."
        ) from None
    return {_canonical(k): torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def _cfg(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], dtype: str | None, source: str
) -> SAEConfig:
    w = tensors.get("W_enc")
    if w is None or w.ndim != 2:
        raise CorruptFileError(
            f"{source}: W_enc is missing or not a matrix; found {', '.join(sorted(tensors))}. "
            f"A Gemma Scope SAE holds {', '.join(_NAMES)}."
        )
    return SAEConfig(
        "jumprelu",
        d_in=int(w.shape[0]),
        d_sae=int(w.shape[1]),
        apply_b_dec_to_input=False,
        dtype=file_dtype(tensors, "W_enc", dtype),
        metadata=fill_site(meta),
    )


def _sidecar(folder: Path) -> dict[str, Any]:
    p = folder / SIDECAR
    return dict(read_json(p).get("metadata") or {}) if p.exists() else {}


# ------------------------------------------------------------------ v1
def read_v1(folder: Path, *, dtype: str | None = None) -> SAE:
    tensors = _read_npz(folder / NPZ)
    meta = {**infer_from_path(folder), **_sidecar(folder)}
    source = str(folder / NPZ)
    return SAE.from_tensors(_cfg(tensors, meta, dtype, source), tensors, source=source)


def write_v1(sae: SAE, folder: Path) -> None:
    sae = raw_input_jumprelu(sae, "gemma-scope")
    arrays = {k: v.float().numpy() for k, v in sae.tensors().items()}  # published files are float32
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with atomic_files(folder) as tmp:
        tmp(NPZ).write_bytes(buf.getvalue())
        write_json(tmp(SIDECAR), {"format": "gemma-scope", "metadata": sae.cfg.metadata})


def scope_folder(layer: int, d_sae: int, l0: float) -> str:
    """The v1 layout's relative folder, e.g. ``layer_12/width_16k/average_l0_82``."""
    width = f"{d_sae // 1024}k" if d_sae % 1024 == 0 else str(d_sae)
    if d_sae >= 1 << 20 and d_sae % (1 << 20) == 0:
        width = f"{d_sae >> 20}m"
    return f"layer_{layer}/width_{width}/average_l0_{round(l0)}"


# ------------------------------------------------------------------ v2
def read_v2(folder: Path, *, dtype: str | None = None) -> SAE:
    source = str(folder / V2_WEIGHTS)
    raw = {_canonical(k): v for k, v in read_safetensors(folder / V2_WEIGHTS).items()}
    if "affine_skip_connection" in raw or (raw.get("W_dec") is not None and raw["W_dec"].ndim != 2):
        raise FormatError(
            f"{source} is a transcoder or cross-layer transcoder (it has a skip connection "
            "or a per-layer decoder); saelab loads SAEs only."
        )
    conf = read_json(folder / V2_CONFIG) if (folder / V2_CONFIG).exists() else {}
    arch = conf.get("architecture", "jump_relu")
    if arch != "jump_relu":
        raise FormatError(
            f"{folder / V2_CONFIG}: architecture {arch!r}; Gemma Scope 2 SAEs are 'jump_relu'"
        )
    meta = infer_from_path(folder)
    if conf.get("model_name"):
        name = conf["model_name"]
        meta["model_name"] = name if "/" in name else f"google/{name}"
    if conf.get("hf_hook_point_in"):
        meta["hf_hook_name"] = conf["hf_hook_point_in"]
        site = hf_hook_to_site(conf["hf_hook_point_in"])
        if site:
            meta["site"] = site
            meta.pop("hook_name", None)
    meta.update(conf.get("saelab_metadata") or {})
    return SAE.from_tensors(_cfg(raw, meta, dtype, source), raw, source=source)


def write_v2(sae: SAE, folder: Path) -> None:
    sae = raw_input_jumprelu(sae, "gemma-scope-2")
    meta = sae.cfg.metadata
    conf: dict[str, Any] = {"architecture": "jump_relu", "width": sae.cfg.d_sae}
    if meta.get("model_name"):
        conf["model_name"] = meta["model_name"]
    hook = meta.get("hf_hook_name") or site_to_hf_gemma(meta.get("site"))
    if hook:
        conf["hf_hook_point_in"] = hook
    if meta.get("l0") is not None:
        conf["l0"] = meta["l0"]
    conf["saelab_metadata"] = meta
    tensors = {k.lower(): v for k, v in sae.tensors().items()}
    with atomic_files(folder) as tmp:
        write_safetensors(tmp(V2_WEIGHTS), tensors)
        write_json(tmp(V2_CONFIG), conf)
