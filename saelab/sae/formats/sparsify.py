"""EleutherAI sparsify folders: `<run>/<hookpoint>/{cfg.json, sae.safetensors}`.

    cfg.json          SparseCoderConfig fields (activation, k, num_latents, expansion_factor,
                      normalize_decoder, multi_topk, skip_connection, transcode) + d_in
    sae.safetensors   encoder.weight [d_sae, d_in] (nn.Linear), encoder.bias [d_sae],
                      W_dec [d_sae, d_in], b_dec [d_in]

Encode is ``topk(relu(linear(x - b_dec)))``: saelab's topk with b_dec subtracted.
The hookpoint folder is a Hugging Face module path (`layers.12`, `layers.12.mlp`).
sparsify drops unknown cfg.json fields, so saelab keeps its provenance there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saelab.errors import CorruptFileError
from saelab.sae.base import SAE, SAEConfig
from saelab.sae.formats._common import (
    FormatError,
    atomic_files,
    file_dtype,
    fill_site,
    hf_hook_to_site,
    read_json,
    read_safetensors,
    topk_with_b_dec,
    write_json,
    write_safetensors,
)

CFG, WEIGHTS = "cfg.json", "sae.safetensors"


def read(folder: Path, *, dtype: str | None = None) -> SAE:
    raw = read_json(folder / CFG)
    source = str(folder / WEIGHTS)
    t = read_safetensors(folder / WEIGHTS)
    if raw.get("activation", "topk") != "topk":
        raise FormatError(
            f"{folder / CFG}: activation {raw['activation']!r} is not supported; saelab reads "
            "sparsify's topk coders"
        )
    if raw.get("transcode") or raw.get("skip_connection") or "W_skip" in t:
        raise FormatError(f"{folder}: a sparsify transcoder / skip coder; saelab loads SAEs only")
    d_in, k = raw.get("d_in"), raw.get("k")
    if not isinstance(d_in, int) or not isinstance(k, int):
        raise CorruptFileError(f"{folder / CFG}: d_in and k must be integers, got {d_in!r}, {k!r}")
    d_sae = raw.get("num_latents") or d_in * int(raw.get("expansion_factor", 32))
    tensors = dict(t)
    if "encoder.weight" in tensors:  # nn.Linear stores [d_sae, d_in]
        tensors["W_enc"] = tensors.pop("encoder.weight").T.contiguous()
    if "encoder.bias" in tensors:
        tensors["b_enc"] = tensors.pop("encoder.bias")
    meta: dict[str, Any] = {"hf_hook_name": folder.name}
    site = hf_hook_to_site(folder.name)
    if site:
        meta["site"] = site
    parent_cfg = folder.parent / "config.json"  # sparsify's run config, when present
    if parent_cfg.exists():
        run = read_json(parent_cfg)
        if isinstance(run.get("model"), str):
            meta["model_name"] = run["model"]
    meta.update(raw.get("saelab_metadata") or {})
    cfg = SAEConfig(
        "topk",
        d_in=d_in,
        d_sae=int(d_sae),
        k=k,
        apply_b_dec_to_input=True,
        dtype=file_dtype(tensors, "W_enc", dtype),
        metadata=fill_site(meta),
    )
    return SAE.from_tensors(cfg, tensors, source=source)


def write(sae: SAE, folder: Path) -> None:
    sae = topk_with_b_dec(sae, "sparsify")
    c = sae.cfg
    t = sae.tensors()
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, c.d_sae // c.d_in),
        "normalize_decoder": True,
        "num_latents": c.d_sae,
        "k": c.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": c.d_in,
        "saelab_metadata": c.metadata,
    }
    with atomic_files(folder) as tmp:
        write_safetensors(
            tmp(WEIGHTS),
            {
                "encoder.weight": t["W_enc"].T,
                "encoder.bias": t["b_enc"],
                "W_dec": t["W_dec"],
                "b_dec": t["b_dec"],
            },
        )
        write_json(tmp(CFG), cfg)
