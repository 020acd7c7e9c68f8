"""saprmarks/dictionary_learning: `ae.pt` (a state dict) + `config.json`. Read only.

`ae.pt` is a torch pickle; it is read with ``torch.load(weights_only=True)``,
which refuses anything but tensors and plain containers. The dictionary class
comes from config.json's ``trainer.dict_class`` or, failing that, from the keys:

    AutoEncoder           encoder.weight [F,D], encoder.bias, decoder.weight [D,F], bias (= b_dec)
                          f = ReLU(enc(x - bias))                        -> relu
    AutoEncoderNew        ... decoder.bias, no b_dec subtraction         -> relu, raw input
    AutoEncoderTopK       encoder.*, decoder.weight, b_dec, k, threshold -> topk
    BatchTopKSAE          same keys; inference f = ReLU(pre)·1[ReLU(pre) > θ] -> jumprelu, θ broadcast
    MatryoshkaBatchTopKSAE W_enc, b_enc, W_dec, b_dec, k, threshold, group_sizes -> jumprelu
    JumpReluAutoEncoder   W_enc, b_enc, W_dec, b_dec, threshold [F]; raw input; its features are
                          scaled by |W_dec| rows, so those norms are folded in -> jumprelu

Without config.json, AutoEncoderTopK and BatchTopKSAE have the same keys (both keep a
threshold): the file loads as AutoEncoderTopK, whose encode is a per-token top-k, with
a warning, since a BatchTopKSAE's encode keeps the features above its threshold instead
(a different L0 per token) and nothing in the file says which it is.

Site: dictionary_learning stores the hooked submodule's output and names it by a
label, ``trainer.submodule_name`` or the published folder (``mlp_out_layer1/10_32768``),
read with the model's family (``trainer.lm_name``) by `names.dl_site`. A file with
no label gets no site (``trainer.layer`` alone does not say which submodule).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.errors import CorruptFileError, UnsafeFileError
from saelab.sae.base import SAE, SAEConfig
from saelab.sae.formats._common import FormatError, file_dtype, read_json
from saelab.sae.formats.names import DL_LABEL, dl_site, fill_site

WEIGHTS, CONFIG = "ae.pt", "config.json"


def _load(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise FormatError(f"{path} does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e).lower() or "weights only" in str(e).lower():
            raise UnsafeFileError(
                f"{path} holds Python objects besides tensors (a pickled module or class); "
                "unpickling those can run arbitrary code, so saelab only reads plain state "
                "dicts. Re-save it with torch.save(ae.state_dict(), 'ae.pt')."
            ) from None
        raise CorruptFileError(
            f"{path} is not a readable torch file ({e}); it may be truncated"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CorruptFileError(
            f"{path} is not a readable torch file ({type(e).__name__}: {e}); it may be truncated"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CorruptFileError(f"{path} is not a state dict of tensors")
    return sd


def _dict_class(sd: dict[str, Tensor], trainer: dict[str, Any]) -> str:
    name = trainer.get("dict_class")
    if isinstance(name, str):
        return name
    if "group_sizes" in sd:
        return "MatryoshkaBatchTopKSAE"
    if "W_enc" in sd:
        return "JumpReluAutoEncoder"
    if "k" in sd:
        return "AutoEncoderTopK"  # BatchTopKSAE has the same keys; config.json tells them apart
    return "AutoEncoderNew" if "decoder.bias" in sd else "AutoEncoder"


def _site(trainer: dict[str, Any], folder: Path) -> str | None:
    labels = [trainer.get("submodule_name"), folder.name, folder.parent.name]
    label = next((x for x in labels if isinstance(x, str) and DL_LABEL.fullmatch(x)), None)
    if label is None:
        return None
    try:
        return dl_site(label, trainer.get("layer"), trainer.get("lm_name"))
    except FormatError as e:
        raise type(e)(f"{folder / WEIGHTS}: {e}") from None


def read(folder: Path, *, dtype: str | None = None) -> SAE:
    sd = _load(folder / WEIGHTS)
    source = str(folder / WEIGHTS)
    conf = read_json(folder / CONFIG) if (folder / CONFIG).exists() else {}
    trainer = conf.get("trainer") or {}
    cls = _dict_class(sd, trainer)
    if cls == "AutoEncoderTopK" and "threshold" in sd and "dict_class" not in trainer:
        warnings.warn(
            f"{source} has no config.json naming its class; its keys (k, threshold) fit "
            f"AutoEncoderTopK and BatchTopKSAE alike. Loaded as AutoEncoderTopK: the top "
            f"k={int(sd['k'])} features of each token. A BatchTopKSAE keeps every feature above "
            f"its threshold {float(sd['threshold']):.4g} instead (L0 varies per token); if it is "
            "one, put its config.json (trainer.dict_class) beside ae.pt.",
            stacklevel=3,
        )
    get = sd.get
    k: int | None = None
    apply_b_dec = True
    if cls in ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE"):
        t = {
            "W_enc": _T(get("encoder.weight")),
            "b_enc": get("encoder.bias"),
            "W_dec": _T(get("decoder.weight")),
        }
        t["b_dec"] = get("bias") if cls == "AutoEncoder" else get("b_dec")
        if cls == "AutoEncoderNew":
            t["b_dec"], apply_b_dec = get("decoder.bias"), False
    elif cls in ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"):
        t = {n: get(n) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        apply_b_dec = cls != "JumpReluAutoEncoder"
    else:
        raise FormatError(
            f"{folder}: dictionary_learning class {cls!r} is not supported; saelab reads "
            "AutoEncoder, AutoEncoderNew, AutoEncoderTopK, BatchTopKSAE, "
            "MatryoshkaBatchTopKSAE and JumpReluAutoEncoder."
        )
    missing = [n for n, v in t.items() if v is None]
    if missing:
        raise CorruptFileError(
            f"{source}: a {cls} state dict needs tensors for {', '.join(missing)}; found "
            f"{', '.join(sorted(sd))}"
        )
    if cls == "AutoEncoderTopK":
        arch, k = "topk", int(get("k") if get("k") is not None else trainer["k"])
    elif cls == "AutoEncoderNew" or cls == "AutoEncoder":
        arch = "relu"
    else:
        arch = "jumprelu"
        th = get("threshold")
        if th is None:
            raise CorruptFileError(f"{source}: a {cls} state dict needs a threshold")
        t["threshold"] = th.expand(t["b_enc"].shape).to(t["b_enc"].dtype) if th.ndim == 0 else th
        if cls == "JumpReluAutoEncoder":
            n = t["W_dec"].norm(dim=1)  # its encode multiplies f by these, decode divides
            t = {
                **t,
                "W_enc": t["W_enc"] * n,
                "b_enc": t["b_enc"] * n,
                "threshold": t["threshold"] * n,
                "W_dec": t["W_dec"] / n[:, None],
            }
    meta: dict[str, Any] = {"dictionary_learning_class": cls}
    if trainer.get("lm_name"):
        meta["model_name"] = trainer["lm_name"]
    site = _site(trainer, folder)
    if site:
        meta["site"] = site
    if cls in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        meta["trained_architecture"], meta["batchtopk_k"] = "batchtopk", int(get("k"))
    w = t["W_enc"]
    cfg = SAEConfig(
        arch,
        d_in=int(w.shape[0]),
        d_sae=int(w.shape[1]),
        k=k,
        apply_b_dec_to_input=apply_b_dec,
        dtype=file_dtype(t, "W_enc", dtype),
        metadata=fill_site(meta),
    )
    return SAE.from_tensors(cfg, {n: v.contiguous() for n, v in t.items()}, source=source)


def _T(w: Tensor | None) -> Tensor | None:
    return None if w is None else w.T  # nn.Linear orientation -> x @ W
