"""EleutherAI sparsify folders: `<run>/<hookpoint>/{cfg.json, sae.safetensors}`.

    cfg.json          SparseCoderConfig fields (activation, k, num_latents, expansion_factor,
                      normalize_decoder, multi_topk, skip_connection, transcode) + d_in
    sae.safetensors   encoder.weight [d_sae, d_in] (nn.Linear), encoder.bias [d_sae],
                      W_dec [d_sae, d_in], b_dec [d_in]

Encode is ``topk(relu(linear(x - b_dec)))``: saelab's topk with b_dec subtracted.
The hookpoint folder is a module path relative to the model's ``base_model``
(`layers.12`, `layers.12.mlp`, GPT-2's `h.12.attn`), and sparsify trains on that
module's output. A block's output is resid_post; any other module's output is the
raw site ``layers.12.mlp:out`` unless the run's model is known and saelab's site
there is that very module (on Gemma 2/3 ``mlp_out`` comes after a post-norm, so
``layers.12.mlp`` is never mlp_out there); see `names.module_site`.
sparsify drops unknown cfg.json fields, so saelab keeps its provenance there.
Transcoders (``transcode``: the hookpoint's input predicts its output, no b_dec
subtracted) and skip coders (``skip_connection``: W_skip [d_out, d_in]) load as
`Transcoder`s reading the module's input (mlp_in.L for ``layers.L.mlp``) and writing
its output.
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
    read_json,
    read_safetensors,
    topk_with_b_dec,
    write_json,
    write_safetensors,
)
from saelab.sae.formats.names import (
    family_hint,
    fill_site,
    looks_like_hookpoint,
    module_site,
    refuse_transcoder,
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
    transcoder = bool(raw.get("transcode") or raw.get("skip_connection") or "W_skip" in t)
    if transcoder and not raw.get("transcode"):
        # a skip connection on an SAE (x predicts x): a transcoder of one site, which
        # nothing here can splice as an SAE.
        refuse_transcoder(f"{folder} (a sparsify skip coder)", f"the input of {folder.name}",
                          f"the output of {folder.name}")  # fmt: skip
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
    parent_cfg = folder.parent / "config.json"  # sparsify's run config, when present
    if parent_cfg.exists():
        run = read_json(parent_cfg)
        if isinstance(run.get("model"), str):
            meta["model_name"] = run["model"]
    saelab_meta = raw.get("saelab_metadata") or {}
    family = family_hint(meta.get("model_name"))
    if not saelab_meta.get("site") and looks_like_hookpoint(folder.name):
        meta["site"] = module_site(folder.name, "in" if transcoder else "out", family)
        if transcoder:
            meta["site_out"] = module_site(folder.name, "out", family)
    meta.update(saelab_meta)
    if transcoder:
        return _transcoder(raw, tensors, meta, d_in, k, d_sae, dtype, source)
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


def _transcoder(raw: dict[str, Any], tensors: dict, meta: dict[str, Any], d_in: int, k: int,
                d_sae: int, dtype: str | None, source: str):
    from saelab.sae.transcoder import TranscoderConfig, transcoder_from_tensors

    w_dec = tensors.get("W_dec")
    d_out = int(w_dec.shape[-1]) if w_dec is not None and w_dec.ndim == 2 else d_in
    cfg = TranscoderConfig("topk", d_in=d_in, d_sae=int(d_sae), d_out=d_out, k=k,
                           skip="W_skip" in tensors, dtype=file_dtype(tensors, "W_enc", dtype),
                           metadata=fill_site(meta) if meta.get("site") else meta)
    return transcoder_from_tensors(cfg, tensors, source=source)


def write_transcoder(tc, folder: Path) -> None:
    """A top-k transcoder as sparsify writes one (transcode: true, skip_connection)."""
    c = tc.cfg
    if c.architecture != "topk":
        raise FormatError(f"sparsify stores top-k coders; a {c.architecture} transcoder is not "
                          "one. Save it as saelens, gemma-scope-2 or circuit-tracer.")
    t = tc.tensors()
    cfg = {"activation": "topk", "expansion_factor": max(1, c.d_sae // c.d_in),
           "normalize_decoder": True, "num_latents": c.d_sae, "k": c.k, "multi_topk": False,
           "skip_connection": c.skip, "transcode": True, "d_in": c.d_in,
           "saelab_metadata": c.metadata}
    out = {"encoder.weight": t["W_enc"].T, "encoder.bias": t["b_enc"], "W_dec": t["W_dec"],
           "b_dec": t["b_dec"]}
    if c.skip:
        out["W_skip"] = t["W_skip"]
    with atomic_files(folder) as tmp:
        write_safetensors(tmp(WEIGHTS), out)
        write_json(tmp(CFG), cfg)
