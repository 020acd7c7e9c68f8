"""Sets of per-layer transcoders on disk: folders of transcoder folders, and circuit-tracer sets.

saelab's layout: ``<dir>/layer_L/`` one transcoder folder per layer (any format
`load_sae` reads; a training run's ``saes/train`` of ``mlp_in.L-...`` folders works
too). Each transcoder's layer is its input site's (``mlp_in.L``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from saelab.sae.formats._common import FormatError
from saelab.sae.transcoder import (
    Transcoder,
    TranscoderSet,
    TranscoderSetError,
    require_transcoder,
)


def _is_circuit_tracer(folder: Path) -> bool:
    return (folder / "config.yaml").is_file()


def load_any(path: Path, *, dtype: str | None = None):
    """What `path` holds: an SAE, or {layer: Transcoder} for one transcoder or a set of them
    (layers may be missing: for evaluation, not for a replacement model)."""
    from saelab.sae.formats import _match, load_sae

    folder = path if path.is_dir() else path.parent
    if path.exists() and not _is_circuit_tracer(folder) and (_match(folder) or not path.is_dir()):
        obj = load_sae(path, dtype=dtype)
        if not isinstance(obj, Transcoder):
            return obj
        return {obj.layer if obj.layer is not None else 0: obj}
    if path.is_dir() and not _is_circuit_tracer(folder):
        members = sorted(d for d in folder.iterdir() if d.is_dir() and _match(d))
        if members and not isinstance(load_sae(members[0], dtype=dtype), Transcoder):
            return load_sae(path, dtype=dtype)  # a folder of SAEs: load_sae's own message
    return dict(load(path, dtype=dtype, complete=False))


def load(path: Path, *, dtype: str | None = None, model_name: str | None = None,
         complete: bool = True) -> TranscoderSet:
    from saelab.sae.formats import _match, load_sae

    if not path.exists():
        raise FormatError(f"{path} does not exist")
    folder = path if path.is_dir() else path.parent
    if _is_circuit_tracer(folder):
        from saelab.sae.formats import circuit_tracer

        return circuit_tracer.read_set(folder, dtype=dtype, model_name=model_name,
                                       complete=complete).eval()
    if _match(folder):
        members = [folder]
    else:
        members = sorted(d for d in folder.iterdir() if d.is_dir() and _match(d))
    if not members:
        raise FormatError(f"no transcoders found at {path}: expected a circuit-tracer config.yaml, "
                          "a transcoder folder, or a folder of transcoder folders (layer_0, ...)")
    by_layer: dict[int, Transcoder] = {}
    for d in members:
        tc = require_transcoder(load_sae(d, dtype=dtype), str(d))
        if tc.layer is None:
            raise TranscoderSetError(f"{d}: the transcoder names no layer (its input site is "
                                     f"{tc.site!r}); re-save it with metadata site mlp_in.L")
        if tc.layer in by_layer:
            raise TranscoderSetError(f"{folder}: two transcoders for layer {tc.layer} "
                                     f"({by_layer[tc.layer].site}, {d.name}); keep one per layer")
        by_layer[tc.layer] = tc
    return TranscoderSet(by_layer, model_name=model_name, source=str(folder),
                         complete=complete).eval()


def save(tset: Mapping[int, Transcoder], folder: Path, *, format: str = "saelens") -> Path:
    from saelab.sae.formats import save_sae

    if format == "circuit-tracer":
        from saelab.sae.formats import circuit_tracer

        return circuit_tracer.write_set(tset, folder)
    folder.mkdir(parents=True, exist_ok=True)
    for layer, tc in sorted(tset.items()):
        save_sae(require_transcoder(tc, f"layer {layer}"), folder / f"layer_{layer}", format=format)
    return folder
