"""Shared by the format modules: safe reads, atomic writes, conversions."""

from __future__ import annotations

import contextlib
import json
import os
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


# Site names (peers' names -> saelab sites) live in names.py.


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
