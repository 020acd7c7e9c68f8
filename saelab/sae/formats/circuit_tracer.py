"""circuit-tracer transcoder sets: ``config.yaml`` + ``layer_i.safetensors``.

    config.yaml        model_name, model_kind: transcoder_set, feature_input_hook
                       (ln2.hook_normalized | mlp.hook_in: the MLP's input; hook_resid_mid),
                       feature_output_hook (hook_mlp_out | mlp.hook_out), transcoders: the
                       list of layer files, layer i = entry i (hf:// URIs are looked up by
                       file name beside config.yaml: saelab never downloads them); without
                       the list, the folder's layer_*.safetensors. saelab adds
                       activation/k for top-k sets (as circuit-tracer forks do).
    layer_i.safetensors
                       W_enc [d_sae, d_model]   (nn.Linear's orientation: transposed here)
                       W_dec [d_sae, d_model], b_enc [d_sae], b_dec [d_model]
                       W_skip [d_model, d_model]              optional (skip transcoders)
                       activation_function.threshold [d_sae]  optional (JumpReLU)

    f = act(x @ W_enc.T + b_enc);  out = f @ W_dec + b_dec (+ x @ W_skip.T)

saelab writes its provenance into each layer file's safetensors header
(``saelab_metadata``), which circuit-tracer ignores.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saelab.errors import CorruptFileError
from saelab.sae.formats._common import FormatError, atomic_files, file_dtype, read_safetensors
from saelab.sae.transcoder import (
    Transcoder,
    TranscoderConfig,
    TranscoderSet,
    TranscoderSetError,
    require_transcoder,
    transcoder_from_tensors,
)

CONFIG = "config.yaml"
THRESHOLD = "activation_function.threshold"
INPUT_HOOKS = {"ln2.hook_normalized": "mlp_in", "mlp.hook_in": "mlp_in",
               "hook_resid_mid": "resid_mid"}
OUTPUT_HOOKS = {"hook_mlp_out": "mlp_out", "mlp.hook_out": "mlp_out"}


def _read_config(folder: Path) -> dict[str, Any]:
    import yaml

    path = folder / CONFIG
    try:
        conf = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid YAML ({e}); re-download it.") from None
    if not isinstance(conf, dict):
        raise CorruptFileError(f"{path} holds no mapping; a circuit-tracer config.yaml has "
                               "model_kind, feature_input_hook, feature_output_hook, transcoders")
    kind = conf.get("model_kind")
    if kind == "cross_layer_transcoder":
        raise FormatError(f"{path}: a cross-layer transcoder (model_kind cross_layer_transcoder); "
                          "saelab reads per-layer transcoder sets only, for now")
    if kind != "transcoder_set":
        raise CorruptFileError(f"{path}: model_kind {kind!r}; a circuit-tracer transcoder set "
                               "says transcoder_set")
    for key, table in (("feature_input_hook", INPUT_HOOKS), ("feature_output_hook", OUTPUT_HOOKS)):
        if conf.get(key) not in table:
            raise FormatError(f"{path}: {key} {conf.get(key)!r} is not one saelab maps to a "
                              f"site; it reads {', '.join(table)}")
    return conf


def _layer_files(folder: Path, conf: dict[str, Any]) -> dict[int, Path]:
    entries = conf.get("transcoders")
    if entries is None:
        found = {int(m.group(1)): p for p in folder.glob("layer_*.safetensors")
                 if (m := re.fullmatch(r"layer_(\d+)\.safetensors", p.name))}
        if not found:
            raise FormatError(f"{folder}: config.yaml lists no transcoders and the folder holds "
                              "no layer_*.safetensors")
        return dict(sorted(found.items()))
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise CorruptFileError(f"{folder / CONFIG}: transcoders must be a list of file paths")
    files = {}
    for i, entry in enumerate(entries):
        name = entry.split("?", 1)[0]
        local = Path(name) if not name.startswith("hf://") else Path(name.rsplit("/", 1)[-1])
        path = local if local.is_absolute() else folder / local
        if not path.is_file() and (folder / local.name).is_file():
            path = folder / local.name
        if not path.is_file():
            raise FormatError(f"{folder / CONFIG}: layer {i}'s file {entry} is not at {path}; "
                              "saelab does not download: put the layer files beside config.yaml")
        files[i] = path
    return files


def read_layer(path: Path, layer: int, conf: dict[str, Any], *, dtype: str | None = None,
               model_name: str | None = None) -> Transcoder:
    """One layer file as a Transcoder reading `feature_input_hook`'s site of `layer`."""
    from safetensors import safe_open

    t = read_safetensors(path)
    source = str(path)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        if name not in t:
            raise CorruptFileError(f"{source}: {name} is missing; a circuit-tracer transcoder "
                                   "holds W_enc, W_dec, b_enc, b_dec (W_skip, threshold optional)")
    if t["W_enc"].ndim != 2 or t["W_dec"].ndim != 2:
        raise CorruptFileError(f"{source}: W_enc / W_dec are not matrices (a cross-layer "
                               "transcoder's decoder?); saelab reads per-layer transcoders")
    d_sae, d_in = t["W_enc"].shape
    d_out = t["W_dec"].shape[1]
    tensors = {"W_enc": t["W_enc"].T.contiguous(), "W_dec": t["W_dec"], "b_enc": t["b_enc"],
               "b_dec": t["b_dec"]}
    if "W_skip" in t:
        tensors["W_skip"] = t["W_skip"]
    activation = conf.get("activation") or ("jumprelu" if THRESHOLD in t else "relu")
    if activation == "jumprelu":
        if THRESHOLD not in t:
            raise CorruptFileError(f"{source}: a JumpReLU transcoder without {THRESHOLD}")
        tensors["threshold"] = t[THRESHOLD]
    elif activation not in ("relu", "topk"):
        raise FormatError(f"{source}: activation {activation!r}; saelab reads relu, jumprelu, topk")
    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata() or {}
    meta: dict[str, Any] = {}
    if header.get("saelab_metadata"):
        try:
            meta = dict(json.loads(header["saelab_metadata"]))
        except (ValueError, TypeError):
            meta = {}
    meta.setdefault("model_name", model_name or conf.get("model_name"))
    meta.setdefault("site", f"{INPUT_HOOKS[conf['feature_input_hook']]}.{layer}")
    meta.setdefault("site_out", f"{OUTPUT_HOOKS[conf['feature_output_hook']]}.{layer}")
    meta.setdefault("circuit_tracer_scan", conf.get("scan"))
    k = conf.get("k") if activation == "topk" else None
    cfg = TranscoderConfig(activation, d_in=int(d_in), d_sae=int(d_sae), d_out=int(d_out), k=k,
                           skip="W_skip" in t, dtype=file_dtype(t, "W_enc", dtype),
                           metadata={k2: v for k2, v in meta.items() if v is not None})
    return transcoder_from_tensors(cfg, tensors, source=source)


def read_set(folder: Path, *, dtype: str | None = None, model_name: str | None = None,
             complete: bool = True) -> TranscoderSet:
    conf = _read_config(folder)
    files = _layer_files(folder, conf)
    tcs = {L: read_layer(p, L, conf, dtype=dtype, model_name=model_name) for L, p in files.items()}
    return TranscoderSet(tcs, model_name=model_name or conf.get("model_name"),
                         source=str(folder), complete=complete)


def write_set(tset: Mapping[int, Transcoder], folder: Path) -> Path:
    """config.yaml and layer_L.safetensors (float32) in `folder`; returns it.

    Every transcoder must read mlp_in.L (or resid_mid.L) and write mlp_out.L of its layer;
    relu, jumprelu, batchtopk (as jumprelu) and topk (activation: topk) are written.
    """
    import yaml
    from safetensors.torch import save_file

    tcs = {int(L): require_transcoder(tc, f"layer {L}").for_export() for L, tc in tset.items()}
    if not tcs:
        raise TranscoderSetError("no transcoders to write")
    kinds = {tc.cfg.architecture for tc in tcs.values()}
    if len(kinds) > 1:
        raise FormatError(f"a circuit-tracer set has one activation; these are {sorted(kinds)}")
    arch = kinds.pop()
    ins = {(tc.site or "").split(".")[0] for tc in tcs.values()}
    if len(ins) > 1 or not ins <= {"mlp_in", "resid_mid"}:
        raise FormatError(f"circuit-tracer sets read the MLP input (mlp_in.L) or resid_mid.L; "
                          f"these read {sorted(ins)}")
    for L, tc in tcs.items():
        if tc.site != f"{next(iter(ins))}.{L}" or tc.site_out != f"mlp_out.{L}":
            raise FormatError(f"layer {L}'s transcoder reads {tc.site} and writes {tc.site_out}; "
                              f"a circuit-tracer set needs {next(iter(ins))}.{L} -> mlp_out.{L}")
    names = {tc.cfg.model_name for tc in tcs.values()} - {None}
    conf: dict[str, Any] = {
        "model_name": getattr(tset, "model_name", None) or (names.pop() if len(names) == 1 else None),
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in" if "mlp_in" in ins else "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
        "transcoders": [f"layer_{L}.safetensors" for L in sorted(tcs)],
    }
    if arch == "topk":
        conf["activation"], conf["k"] = "topk", next(iter(tcs.values())).cfg.k
    with atomic_files(folder) as tmp:
        for L, tc in sorted(tcs.items()):
            t = {k: v.detach().float().contiguous() for k, v in tc.tensors().items()}
            out = {"W_enc": t["W_enc"].T.contiguous(), "W_dec": t["W_dec"], "b_enc": t["b_enc"],
                   "b_dec": t["b_dec"]}
            if "W_skip" in t:
                out["W_skip"] = t["W_skip"]
            if arch == "jumprelu":
                out[THRESHOLD] = t["threshold"]
            save_file({k: v.clone() for k, v in out.items()}, str(tmp(f"layer_{L}.safetensors")),
                      metadata={"saelab_metadata": json.dumps(tc.cfg.metadata)})
        tmp(CONFIG).write_text(yaml.safe_dump(conf, sort_keys=False))
    return folder

