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

Sites. v1: the repository says it (``-res`` resid_post, ``-mlp`` mlp_out after the
post-MLP norm, ``-att`` attn_z: TransformerLens's hooks, as SAELens maps them).
v2: config.json's ``hf_hook_point_in`` (see `names.hook_point_site`); without it the
folder, as Gemma Scope 2 lays it out (``attn_out`` SAEs read ``o_proj``'s input: attn_z).
Transcoders (v2 ``"type": "transcoder"``, an ``hf_hook_point_out`` that differs from
the input, an affine skip, ``transcoder`` folders) load as `Transcoder`s reading
mlp_in.L and writing mlp_out.L: w_dec [d_sae, d_out], b_dec [d_out], and the skip
``affine_skip_connection`` stored [d_in, d_out] (x @ A), transposed into W_skip
[d_out, d_in]. v1 ``-transcoders`` repositories (no skip) load likewise. Cross-layer
transcoders (``clt`` folders, a 3-d w_dec) are refused.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.errors import CorruptFileError, UnsafeFileError
from saelab.models.sites import KINDS
from saelab.sae.base import SAE, SAEConfig
from saelab.sae.formats._common import (
    FormatError,
    atomic_files,
    file_dtype,
    raw_input_jumprelu,
    read_json,
    read_safetensors,
    write_json,
    write_safetensors,
)
from saelab.sae.formats.names import (
    family_hint,
    fill_site,
    hook_point_site,
    refuse_transcoder,
    site_to_tl,
)

NPZ, SIDECAR = "params.npz", "saelab.json"
V2_WEIGHTS, V2_CONFIG = "params.safetensors", "config.json"
_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def infer_from_path(path: Path) -> dict[str, Any]:
    """Provenance readable from a Gemma-Scope-like path (layer, site kind, model, L0)."""
    s = path.resolve().as_posix()
    meta: dict[str, Any] = {}
    layer = re.search(r"layer_(\d+)", s)
    kind = next((p for p in reversed(path.resolve().parts) if p in KINDS), None)
    repo = re.search(r"gemma-scope-(\d+[bm])-(pt|it)-(res|mlp|att)\b", s)
    if repo:
        size, tune, what = repo.groups()
        kind = kind or {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}[what]
        meta["model_name"] = f"google/gemma-2-{size}" + ("-it" if tune == "it" else "")
    if layer and kind:
        meta["site"] = f"{kind}.{int(layer.group(1))}"
        meta["hook_name"] = site_to_tl(meta["site"], meta.get("model_name"))
    l0 = re.search(r"average_l0_(\d+)", s)
    if l0:
        meta["l0"] = int(l0.group(1))
    label = re.search(r"_l0_(small|medium|big)\b", s)
    if label:
        meta["l0_label"] = label.group(1)
    return meta


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
    source = str(folder / NPZ)
    sidecar = _sidecar(folder)
    where = folder.resolve().as_posix()
    # google/gemma-scope-2b-pt-transcoders/layer_3/... (also as the HF cache names the repository)
    if not sidecar and re.search(r"(?:^|[-_/])transcoders?/", where):
        layer = re.search(r"layer_(\d+)", where)
        L = layer.group(1) if layer else "L"
        if not layer:
            refuse_transcoder(
                f"{source} (a Gemma Scope transcoder, by its folder, with no layer_L in its path)",
                f"blocks.{L}.ln2.hook_normalized (the MLP's input)",
                f"blocks.{L}.hook_mlp_out (the MLP's output)",
            )
        tensors = _read_npz(folder / NPZ)
        meta = {k: v for k, v in infer_from_path(folder).items() if k not in ("site", "hook_name")}
        return _transcoder(tensors, meta | {"site": f"mlp_in.{L}", "site_out": f"mlp_out.{L}"},
                           dtype, source)
    tensors = _read_npz(folder / NPZ)
    meta = {**infer_from_path(folder), **sidecar}
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
# Gemma Scope 2 folders (``resid_post_all/layer_3_...``) and the hook point each reads.
_V2_FOLDERS = {
    "resid_post": "model.layers.{L}.output",
    "attn_out": "model.layers.{L}.self_attn.o_proj.input",
    "mlp_out": "model.layers.{L}.post_feedforward_layernorm.output",
}


def _v2_transcoder(folder: Path, conf: dict[str, Any], raw: dict[str, torch.Tensor]) -> bool:
    """Whether the file is a (per-layer) transcoder; a cross-layer one is refused."""
    source = str(folder / V2_WEIGHTS)
    hook_in, hook_out = conf.get("hf_hook_point_in"), conf.get("hf_hook_point_out")
    kind = conf.get("type")
    skip = "affine_skip_connection" in raw or bool(conf.get("affine_connection"))
    w_dec = raw.get("W_dec")
    cross = w_dec is not None and w_dec.ndim != 2
    folder_says = re.search(r"(?:^|/)(transcoder|clt)[^/]*/[^/]*$", folder.resolve().as_posix())
    if not (kind not in (None, "sae") or (hook_out and hook_in and hook_out != hook_in)
            or skip or cross or (folder_says and not conf)):
        return False
    if not (cross or (folder_says and folder_says[1] == "clt")):
        return True
    layer = re.search(r"layer_(\d+)", folder.name)
    L = layer.group(1) if layer else "L"
    hook_in = hook_in or f"model.layers.{L}.pre_feedforward_layernorm.output"
    hook_out = hook_out or f"model.layers.{L}.post_feedforward_layernorm.output"
    what = "cross-layer transcoder" if cross or (folder_says and folder_says[1] == "clt") else (
        "skip transcoder" if skip else "transcoder")
    refuse_transcoder(f"{source} (a Gemma Scope 2 {what})", hook_in, hook_out)


def read_v2(folder: Path, *, dtype: str | None = None) -> SAE:
    source = str(folder / V2_WEIGHTS)
    raw = {_canonical(k): v for k, v in read_safetensors(folder / V2_WEIGHTS).items()}
    conf = read_json(folder / V2_CONFIG) if (folder / V2_CONFIG).exists() else {}
    if _v2_transcoder(folder, conf, raw):
        return _read_v2_transcoder(folder, conf, raw, dtype)
    arch = conf.get("architecture", "jump_relu")
    if arch != "jump_relu":
        raise FormatError(
            f"{folder / V2_CONFIG}: architecture {arch!r}; Gemma Scope 2 SAEs are 'jump_relu'"
        )
    meta = infer_from_path(folder)
    meta.pop("hook_name", None)
    if conf.get("model_name"):
        name = conf["model_name"]
        meta["model_name"] = name if "/" in name else f"google/{name}"
    hook, family = conf.get("hf_hook_point_in"), family_hint(meta.get("model_name"))
    if not hook:  # Gemma Scope 2's own layout: the folder says which hook point
        kind = next((k for k in _V2_FOLDERS if folder.parent.name.startswith(k)), None)
        layer = re.search(r"layer_(\d+)", folder.name)
        meta.pop("site", None)  # a folder named like a site kind is not exact by itself
        if kind and layer:
            hook, family = _V2_FOLDERS[kind].format(L=int(layer.group(1))), family or "gemma3"
    if hook:
        meta["hf_hook_name"] = hook
        try:
            meta["site"] = hook_point_site(hook, family)
        except FormatError as e:
            raise FormatError(f"{folder / V2_CONFIG}: {e}") from None
    meta.update(conf.get("saelab_metadata") or {})
    return SAE.from_tensors(_cfg(raw, meta, dtype, source), raw, source=source)


def write_v2(sae: SAE, folder: Path) -> None:
    sae = raw_input_jumprelu(sae, "gemma-scope-2")
    meta = sae.cfg.metadata
    conf: dict[str, Any] = {"architecture": "jump_relu", "width": sae.cfg.d_sae}
    if meta.get("model_name"):
        conf["model_name"] = meta["model_name"]
    hook = meta.get("hf_hook_name") or _gemma_hook_point(meta.get("site"), meta.get("model_name"))
    if hook:
        conf["hf_hook_point_in"] = hook
    if meta.get("l0") is not None:
        conf["l0"] = meta["l0"]
    conf["saelab_metadata"] = meta
    tensors = {k.lower(): v for k, v in sae.tensors().items()}
    with atomic_files(folder) as tmp:
        write_safetensors(tmp(V2_WEIGHTS), tensors)
        write_json(tmp(V2_CONFIG), conf)


# Gemma 2/3 hook points of the canonical sites (on other families these paths mean other tensors).
_GEMMA_POINTS = {
    "resid_post": "model.layers.{L}.output",
    "attn_z": "model.layers.{L}.self_attn.o_proj.input",
    "attn_out": "model.layers.{L}.post_attention_layernorm.output",
    "mlp_in": "model.layers.{L}.mlp.input",
    "mlp_out": "model.layers.{L}.post_feedforward_layernorm.output",
}


def _gemma_hook_point(site: str | None, model_name: str | None) -> str | None:
    """The hook point to write for `site`: only for Gemma models, where it is exact."""
    m = re.fullmatch(r"(\w+)\.(\d+)", site or "")
    if not m or family_hint(model_name) not in ("gemma2", "gemma3"):
        return None
    point = _GEMMA_POINTS.get(m.group(1))
    return point.format(L=m.group(2)) if point else None


# ------------------------------------------------------------------ transcoders
# On Gemma the pre-MLP norm's output is the MLP's input (mlp_in), the post-MLP norm's
# output what the MLP adds to the residual stream (mlp_out).
_TC_POINTS = {"pre_feedforward_layernorm.output": "mlp_in", "mlp.input": "mlp_in",
              "post_feedforward_layernorm.output": "mlp_out"}


def _tc_site(point: str | None, layer: int | None, default: str, family: str | None,
             where: str) -> str:
    if point:
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", point)
        if m and m.group(2) in _TC_POINTS:
            return f"{_TC_POINTS[m.group(2)]}.{m.group(1)}"
        try:
            return hook_point_site(point, family)
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None
    if layer is None:
        raise FormatError(f"{where}: a transcoder whose hook points and layer are unknown; "
                          "add hf_hook_point_in / hf_hook_point_out to its config.json")
    return f"{default}.{layer}"


def _transcoder(tensors: dict[str, torch.Tensor], meta: dict[str, Any], dtype: str | None,
                source: str):
    """A Gemma Scope transcoder (JumpReLU on raw input) from canonical tensor names."""
    from saelab.sae.transcoder import TranscoderConfig, transcoder_from_tensors

    t = dict(tensors)
    w, w_dec = t.get("W_enc"), t.get("W_dec")
    if w is None or w.ndim != 2 or w_dec is None or w_dec.ndim != 2:
        raise CorruptFileError(f"{source}: W_enc / W_dec missing or not matrices; found "
                               f"{', '.join(sorted(t))}")
    if "affine_skip_connection" in t:  # stored (d_in, d_out): out += x @ A, so W_skip = A.T
        t["W_skip"] = t.pop("affine_skip_connection").T.contiguous()
    cfg = TranscoderConfig("jumprelu", d_in=int(w.shape[0]), d_sae=int(w.shape[1]),
                           d_out=int(w_dec.shape[1]), skip="W_skip" in t,
                           dtype=file_dtype(t, "W_enc", dtype), metadata=meta)
    return transcoder_from_tensors(cfg, t, source=source)


def _read_v2_transcoder(folder: Path, conf: dict[str, Any], raw: dict[str, torch.Tensor],
                        dtype: str | None):
    where = str(folder / V2_CONFIG)
    meta = {k: v for k, v in infer_from_path(folder).items() if k not in ("site", "hook_name")}
    if conf.get("model_name"):
        name = conf["model_name"]
        meta["model_name"] = name if "/" in name else f"google/{name}"
    family = family_hint(meta.get("model_name")) or "gemma3"
    layer = re.search(r"layer_(\d+)", folder.name)
    L = int(layer.group(1)) if layer else None
    hook_in, hook_out = conf.get("hf_hook_point_in"), conf.get("hf_hook_point_out")
    meta["site"] = _tc_site(hook_in, L, "mlp_in", family, where)
    meta["site_out"] = _tc_site(hook_out, L, "mlp_out", family, where)
    for key, value in (("hf_hook_name", hook_in), ("hf_hook_name_out", hook_out)):
        if value:
            meta[key] = value
    meta.update(conf.get("saelab_metadata") or {})
    return _transcoder(raw, meta, dtype, str(folder / V2_WEIGHTS))


def write_v2_transcoder(tc, folder: Path) -> None:
    """A relu / jumprelu / batchtopk transcoder as Gemma Scope 2 writes them (raw-input JumpReLU,
    the skip as affine_skip_connection [d_in, d_out])."""
    tc = tc.for_export()
    if tc.cfg.architecture not in ("relu", "jumprelu"):
        raise FormatError(f"gemma-scope-2 stores JumpReLU transcoders; a {tc.cfg.architecture} "
                          "one picks its top k per token. Save it as saelens or circuit-tracer.")
    t = {k: v.detach().float() for k, v in tc.tensors().items()}
    if "threshold" not in t:
        t["threshold"] = torch.zeros_like(t["b_enc"])  # ReLU is JumpReLU with θ = 0
    out = {"w_enc": t["W_enc"], "w_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"],
           "threshold": t["threshold"]}
    if "W_skip" in t:
        out["affine_skip_connection"] = t["W_skip"].T.contiguous()
    meta = tc.cfg.metadata
    conf: dict[str, Any] = {"architecture": "jump_relu", "type": "transcoder",
                            "width": tc.cfg.d_sae, "affine_connection": "W_skip" in t}
    if meta.get("model_name"):
        conf["model_name"] = meta["model_name"]
    for key, site in (("hf_hook_point_in", tc.site), ("hf_hook_point_out", tc.site_out)):
        point = _gemma_tc_point(site, meta.get("model_name"))
        if point:
            conf[key] = point
    conf["saelab_metadata"] = meta
    with atomic_files(folder) as tmp:
        write_safetensors(tmp(V2_WEIGHTS), out)
        write_json(tmp(V2_CONFIG), conf)


def _gemma_tc_point(site: str | None, model_name: str | None) -> str | None:
    m = re.fullmatch(r"(mlp_in|mlp_out)\.(\d+)", site or "")
    if not m or family_hint(model_name) not in ("gemma2", "gemma3"):
        return None
    part = {"mlp_in": "pre_feedforward_layernorm", "mlp_out": "post_feedforward_layernorm"}
    return f"model.layers.{m.group(2)}.{part[m.group(1)]}.output"
