"""What `saelab sae info` and `saelab sae convert` do, as functions returning data.

The command line (commands.py) only formats what these return; errors are
SaelabErrors whose messages say what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from saelab.sae.base import n_params
from saelab.sae.formats import canonical_format, detect_format, load_sae, save_sae
from saelab.sae.formats._common import FormatError
from saelab.sae.formats.native import read_log_sparsity

CONVERT_TARGETS = ("saelens", "gemma-scope", "gemma-scope-2", "sparsify")


def sae_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Format, architecture, widths, site, model and L0 (if recorded) of the SAE at `path`.

    L0 comes from the metadata (saelab's, or Gemma Scope's ``average_l0_N`` folder)
    or else from SAELens's sparsity.safetensors (the sum of firing frequencies).
    """
    fmt, folder = detect_format(path)
    sae = load_sae(folder, format=fmt)
    c = sae.cfg
    meta = c.metadata
    l0, l0_source = meta.get("l0"), "metadata" if meta.get("l0") is not None else None
    if l0 is None and fmt == "saelens":
        log_sp = read_log_sparsity(folder)
        if log_sp is not None:
            l0, l0_source = round(float((10 ** log_sp.double()).sum()), 3), "sparsity.safetensors"
    return {
        "path": str(folder),
        "format": fmt,
        "architecture": c.architecture,
        "trained_architecture": meta.get("trained_architecture", c.architecture),
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "k": c.k if c.k is not None else meta.get("batchtopk_k"),
        "dtype": c.dtype,
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "site": c.site,
        "hook_name": c.hook_name,
        "model_name": c.model_name,
        "l0": l0,
        "l0_source": l0_source,
        "l0_label": meta.get("l0_label"),
        "n_params": n_params(sae),
        "metadata": meta,
    } | ({"kind": "transcoder", "d_out": c.d_out, "skip": c.skip, "site_out": c.site_out}
         if getattr(c, "d_out", None) is not None else {"kind": "sae"})


def format_info(info: dict[str, Any]) -> str:
    """Human-readable lines for `sae_info`'s result."""
    arch = info["architecture"]
    if info["trained_architecture"] != arch:
        arch += f" (trained as {info['trained_architecture']})"
    k = f", k={info['k']}" if info["k"] is not None else ""
    l0 = "not recorded"
    if info["l0"] is not None:
        l0 = f"{info['l0']} (from {info['l0_source']})"
    elif info["l0_label"]:
        l0 = f"{info['l0_label']} (Gemma Scope 2 label)"
    rows = [
        ("path", info["path"]),
        ("format", info["format"]),
        ("architecture", arch + k),
        (
            "widths",
            f"d_in={info['d_in']} -> d_sae={info['d_sae']} ({info['n_params']:,} parameters, {info['dtype']})",
        ),
        ("input", "x - b_dec" if info["apply_b_dec_to_input"] else "raw activations"),
        ("site", info["site"] or "unknown"),
        ("hook_name", info["hook_name"] or "unknown"),
        ("model", info["model_name"] or "unknown"),
        ("L0", l0),
    ]
    if info.get("kind") == "transcoder":  # reads `site`, predicts `site_out`
        rows[0:0] = [("kind", "skip transcoder" if info["skip"] else "transcoder")]
        rows[4] = ("widths", f"d_in={info['d_in']} -> d_sae={info['d_sae']} -> d_out="
                   f"{info['d_out']} ({info['n_params']:,} parameters, {info['dtype']})")
        rows.insert(7, ("writes", info["site_out"] or "unknown"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def convert_sae(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str, *, overwrite: bool = False
) -> dict[str, Any]:
    """Load `src` (any readable format), write it to folder `dst` in format `to`.

    Returns `sae_info` of what was written. Refuses to write over an existing SAE
    unless `overwrite`, and refuses conversions a format cannot express.
    """
    fmt = canonical_format(to)
    if fmt not in CONVERT_TARGETS:
        raise FormatError(f"cannot convert to {to!r}; targets are {', '.join(CONVERT_TARGETS)}")
    out = Path(dst)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FormatError(f"{out} exists and is not empty; pick a new folder or pass --overwrite")
    sae = load_sae(src)
    save_sae(sae, out, fmt)
    return sae_info(out)
