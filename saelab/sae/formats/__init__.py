"""Read and write SAEs in the common file formats; `load_sae` finds out which.

Detection, for a folder (a file path means its folder; first rule that matches):

    params.npz                          gemma-scope     (Gemma Scope 1)
    params.safetensors                  gemma-scope-2   (Gemma Scope 2; config.json optional)
    cfg.json + sae_weights.safetensors  saelens         (native, SAELens v6)
    cfg.json + sae.safetensors          sparsify
    ae.pt                               dictionary-learning  (torch.load(weights_only=True))

A folder holding only pickle-based weights (.pt/.pth/.pkl/.bin/.ckpt) is refused
(UnsafeFileError); a folder holding several SAEs lists them. The activation a
file names is mapped to the site holding exactly that tensor, or the file is
refused (UnmappableNameError: one-head SAEs, names no site holds; see `names`).
Transcoder folders (SAELens Transcoder / SkipTranscoder, Gemma Scope 2 and sparsify
transcoders) load as `saelab.sae.transcoder.Transcoder`; sets of them (and circuit-tracer
sets) with `saelab.sae.transcoder.load_transcoders`.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from saelab.checks import choice
from saelab.errors import CorruptFileError, SaelabError, UnsafeFileError
from saelab.sae.base import DTYPES, SAE
from saelab.sae.formats import dictionary_learning, gemma_scope, native, sparsify
from saelab.sae.formats._common import PICKLE_SUFFIXES, FormatError
from saelab.sae.formats.names import UnmappableNameError

FORMATS = ("saelens", "gemma-scope", "gemma-scope-2", "sparsify", "dictionary-learning")
WRITABLE = ("saelens", "gemma-scope", "gemma-scope-2", "sparsify")
TRANSCODER_WRITABLE = ("saelens", "gemma-scope-2", "sparsify")
_ALIASES = {
    "native": "saelens",
    "sae-lens": "saelens",
    "gemma-scope-1": "gemma-scope",
    "dictionary_learning": "dictionary-learning",
}

# Every file a writer below may put in an SAE folder: a new SAE replaces all of them at once.
SAE_FILES = (native.CFG, native.WEIGHTS, native.SPARSITY, gemma_scope.NPZ, gemma_scope.SIDECAR,
             gemma_scope.V2_WEIGHTS, gemma_scope.V2_CONFIG, sparsify.WEIGHTS)

_READERS = {
    "saelens": native.read,
    "gemma-scope": gemma_scope.read_v1,
    "gemma-scope-2": gemma_scope.read_v2,
    "sparsify": sparsify.read,
    "dictionary-learning": dictionary_learning.read,
}


def canonical_format(name: str) -> str:
    fmt = _ALIASES.get(name, name)
    if fmt not in FORMATS:
        raise FormatError(f"unknown SAE format {name!r}; known formats are {', '.join(FORMATS)}")
    return fmt


def _match(folder: Path) -> str | None:
    has = lambda name: (folder / name).is_file()  # noqa: E731
    if has(gemma_scope.NPZ):
        return "gemma-scope"
    if has(gemma_scope.V2_WEIGHTS):
        return "gemma-scope-2"
    if has(native.CFG) and has(native.WEIGHTS):
        return "saelens"
    if has(sparsify.CFG) and has(sparsify.WEIGHTS):
        return "sparsify"
    if has(dictionary_learning.WEIGHTS):
        return "dictionary-learning"
    return None


def detect_format(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """(format, folder) of the SAE at `path` (a folder, or any file inside it)."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p} does not exist")
    folder = p if p.is_dir() else p.parent
    fmt = _match(folder)
    if fmt:
        return fmt, folder
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeFileError(
            f"{folder} holds only pickle-based weights ({', '.join(pickles)}); unpickling can "
            "run arbitrary code, so saelab refuses them. Re-save the SAE as safetensors "
            "(e.g. SAELens's save_model, or safetensors.torch.save_file on its state dict)."
        )
    inside = sorted(
        str(d.relative_to(folder)) for d in folder.glob("**/") if d != folder and _match(d)
    )
    if inside:
        shown = ", ".join(inside[:12]) + (
            f", ... ({len(inside)} in all)" if len(inside) > 12 else ""
        )
        raise FormatError(f"{folder} holds several SAEs; pass one of its folders: {shown}")
    raise FormatError(
        f"no SAE found at {p}: expected params.npz (Gemma Scope), params.safetensors "
        "(Gemma Scope 2), cfg.json + sae_weights.safetensors (SAELens), cfg.json + "
        "sae.safetensors (sparsify) or ae.pt (dictionary_learning)"
    )


def load_sae(
    path: str | os.PathLike[str], *, format: str | None = None, dtype: str | None = None,
    expect: str | None = None,
) -> SAE:
    """Load the SAE (or transcoder) at `path` in whichever format it is (or `format`).

    `dtype` ("float32", "bfloat16", ...) overrides the file's dtype. Every tensor is
    checked (names, shapes, finite values) before anything is built. A transcoder
    folder gives a `saelab.sae.transcoder.Transcoder`; `expect="sae"` refuses one,
    `expect="transcoder"` refuses an SAE (WrongKindError, naming what the file is).
    """
    if expect is not None:
        from saelab.sae.transcoder import require_sae, require_transcoder

        choice("expect", expect, ("sae", "transcoder"))
        obj = load_sae(path, format=format, dtype=dtype)
        check = require_sae if expect == "sae" else require_transcoder
        return check(obj, str(path))
    if dtype is not None:
        choice("dtype", dtype, tuple(DTYPES))
    if format is None:
        fmt, folder = detect_format(path)
    else:
        fmt, p = canonical_format(format), Path(path)
        folder = p if p.is_dir() else p.parent
    try:
        return _READERS[fmt](folder, dtype=dtype)
    except SaelabError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        # A field no reader check foresaw (each reader checks what it reads): still the
        # file's fault, so name the folder and the format rather than show a traceback.
        raise CorruptFileError(f"{folder}: not a readable {fmt} SAE ({type(err).__name__}: "
                               f"{err}). Re-save or re-download it.") from err


def save_sae(
    sae: SAE,
    path: str | os.PathLike[str],
    format: str = "saelens",
    *,
    log_sparsity: Tensor | None = None,
) -> Path:
    """Write `sae` into folder `path` (created if needed); returns the folder.

    The files are written into a folder beside `path` that replaces it in one rename;
    files there that are not an SAE's are kept. Formats that
    cannot express the SAE raise FormatError before anything is written: Gemma
    Scope holds JumpReLU (and so ReLU, BatchTopK) SAEs, sparsify TopK SAEs.
    `log_sparsity` (log10 firing frequency per feature) is stored by saelens only.
    """
    from saelab.atomic import disk_full, write_folder

    fmt = canonical_format(format)
    folder = Path(path)
    if fmt not in WRITABLE:
        raise FormatError(
            f"saelab reads {fmt} files but does not write them; pick one of {', '.join(WRITABLE)}"
        )

    from saelab.sae.transcoder import Transcoder

    if isinstance(sae, Transcoder) and fmt not in TRANSCODER_WRITABLE:
        from saelab.sae.formats.transcoders import refuse_format

        raise refuse_format(fmt)

    def write(tmp: Path) -> None:
        if isinstance(sae, Transcoder) and fmt != "saelens":
            if fmt == "gemma-scope-2":
                gemma_scope.write_v2_transcoder(sae, tmp)
            else:
                sparsify.write_transcoder(sae, tmp)
        elif fmt == "saelens":
            native.write(sae, tmp, log_sparsity=log_sparsity)
        elif fmt == "gemma-scope":
            gemma_scope.write_v1(sae, tmp)
        elif fmt == "gemma-scope-2":
            gemma_scope.write_v2(sae, tmp)
        else:
            sparsify.write(sae, tmp)

    # The files of one SAE are written beside the old ones and switched in with one rename
    # (saelab/atomic.py): a reader never sees new weights with an old cfg.json.
    with disk_full(folder, "the SAE there before, if any, is unchanged"):
        write_folder(folder, SAE_FILES, write)
    return folder


__all__ = [
    "FORMATS",
    "WRITABLE",
    "FormatError",
    "UnmappableNameError",
    "detect_format",
    "load_sae",
    "save_sae",
    "canonical_format",
]
