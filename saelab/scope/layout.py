"""A scope folder's index: DIR/scope.json and DIR/scope.parquet.

    DIR/scope.json      {"format": "saelab.scope", "version": 1, model, model_hash, d_model,
                         n_layers, kind, settings, stages, machine, saes: [entry, ...]}
    DIR/scope.parquet   one row per SAE: the entry's fields, metrics flattened into
                        `metric_<name>` columns
    DIR/<site kind>/layer_<L>/width_<W>/average_l0_<N>/params.npz   Gemma Scope's file
    DIR/native/<label>/                                           the SAELens folder
    DIR/features/<label>/                                         the feature index

Every path in the index is relative to DIR. `status` is not stored: `read_scope`
computes it from the disk ("ok", "missing" when the native folder is absent,
"corrupt" when its files cannot be read), so a scope with an SAE deleted or
damaged still opens and shows which one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saelab.atomic import atomic_write_text, disk_full
from saelab.errors import CorruptFileError, SaelabError

FORMAT, VERSION = "saelab.scope", 1
INDEX_JSON, INDEX_PARQUET = "scope.json", "scope.parquet"
NATIVE_CFG, NATIVE_WEIGHTS = "cfg.json", "sae_weights.safetensors"
METRICS = ("l0", "fvu", "delta_ce", "loss_recovered", "kl", "dead_frac", "dense_frac")


class ScopeError(SaelabError):
    """A scope folder that cannot be read or written as asked."""


def width_label(width: int) -> str:
    """Gemma Scope's width name: 16384 -> "16k", 1<<20 -> "1m", 2304 -> "2304"."""
    if width >= 1 << 20 and width % (1 << 20) == 0:
        return f"{width >> 20}m"
    return f"{width // 1024}k" if width % 1024 == 0 else str(width)


def scope_id(site_kind: str, layer: int, width: int, average_l0: float) -> str:
    """The Gemma Scope folder of one SAE, relative to DIR:
    ``resid_post/layer_3/width_2304/average_l0_31`` (N is the measured mean L0, rounded)."""
    return f"{site_kind}/layer_{layer}/width_{width_label(width)}/average_l0_{round(average_l0)}"


@dataclass
class ScopeEntry:
    """One SAE of the scope. Paths are relative to the scope folder; `params` is None for
    a top-k SAE (Gemma Scope's file holds JumpReLU SAEs only), `features` None when no
    dashboards were collected. `status` is computed by `read_scope`, never stored."""

    id: str
    site: str
    site_kind: str
    layer: int
    width: int
    arch: str
    target_l0: float
    average_l0: float
    params: str | None
    native: str
    features: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "ok"

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("status")
        return d


@dataclass
class Scope:
    """A scope's header and its SAEs (see the module docstring for the fields)."""

    model: str
    model_hash: str
    d_model: int
    n_layers: int
    kind: str = "sae"
    settings: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    entries: list[ScopeEntry] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        head = {k: v for k, v in dataclasses.asdict(self).items() if k != "entries"}
        return {"format": FORMAT, "version": VERSION, **head,
                "saes": [e.to_json() for e in self.entries]}


def is_scope(directory: str | os.PathLike) -> bool:
    """True when `directory` holds a scope.json that says it is a saelab scope."""
    p = Path(directory) / INDEX_JSON
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _safetensors_readable(path: Path) -> bool:
    """The header parses and the file is as long as the header says (not cut short)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size:
                return False
            header = json.loads(fh.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return size >= 8 + n + max(ends, default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError):
        return False


def entry_status(directory: Path, entry: ScopeEntry) -> str:
    """"missing" when the native folder is absent, "corrupt" when its config or weights
    cannot be read (or the Gemma Scope file is not an archive), else "ok"."""
    native = directory / entry.native
    if not native.is_dir():
        return "missing"
    try:
        json.loads((native / NATIVE_CFG).read_text())
    except (OSError, ValueError):
        return "corrupt"
    if not _safetensors_readable(native / NATIVE_WEIGHTS):
        return "corrupt"
    if entry.params is not None:
        import zipfile

        params = directory / entry.params
        if params.suffix == ".safetensors":  # a transcoder scope's Gemma Scope 2 file
            if params.exists() and not _safetensors_readable(params):
                return "corrupt"
        elif params.exists() and not zipfile.is_zipfile(params):
            return "corrupt"
    return "ok"


def _entry(raw: Any, where: Path) -> ScopeEntry:
    names = {f.name for f in dataclasses.fields(ScopeEntry)} - {"status"}
    if not isinstance(raw, dict) or not {"id", "site", "native"} <= raw.keys():
        raise CorruptFileError(f"{where}: an entry of 'saes' lacks id/site/native ({raw!r:.80}); "
                               "rerun `saelab scope` to rewrite the index.")
    return ScopeEntry(**{k: v for k, v in raw.items() if k in names})


def read_scope(directory: str | os.PathLike) -> Scope:
    """Read DIR/scope.json; each entry's `status` is computed from the disk.

    Raises ScopeError when scope.json is absent, CorruptFileError when it cannot be
    parsed or is not a saelab scope index.
    """
    directory = Path(directory)
    path = directory / INDEX_JSON
    if not path.is_file():
        raise ScopeError(f"{path} does not exist: {directory} is not a scope folder; make one "
                         "with `saelab scope --model M --out DIR`.")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"{path} cannot be parsed ({e}); rerun `saelab scope --resume` "
                               "on this folder to rewrite it.") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CorruptFileError(f"{path} is not a saelab scope index (format "
                               f"{raw.get('format') if isinstance(raw, dict) else None!r}, "
                               f"expected {FORMAT!r}).")
    if raw.get("version") != VERSION:
        raise CorruptFileError(f"{path} is scope index version {raw.get('version')!r}; this "
                               f"saelab reads version {VERSION}. Upgrade saelab.")
    entries = [_entry(e, path) for e in raw.get("saes") or []]
    for e in entries:
        e.status = entry_status(directory, e)
    head = {f.name: raw[f.name] for f in dataclasses.fields(Scope)
            if f.name != "entries" and f.name in raw}
    try:
        return Scope(**head, entries=entries)
    except TypeError as e:
        raise CorruptFileError(f"{path}: header fields missing ({e}).") from None


def _rows(scope: Scope) -> dict[str, list[Any]]:
    """Columns of scope.parquet: the entry fields and one `metric_<name>` per metric."""
    metric_names = sorted({m for e in scope.entries for m in e.metrics})
    cols: dict[str, list[Any]] = {
        k: [] for k in ("id", "site", "site_kind", "layer", "width", "arch", "target_l0",
                        "average_l0", "params", "native", "features")}
    for name in metric_names:
        cols[f"metric_{name}"] = []
    for e in scope.entries:
        d = e.to_json()
        for k in list(cols):
            if k.startswith("metric_"):
                v = e.metrics.get(k[len("metric_"):])
                cols[k].append(float(v) if v is not None else math.nan)
            else:
                cols[k].append(d[k])
    return cols


def write_scope(directory: str | os.PathLike, scope: Scope) -> None:
    """Write DIR/scope.json and DIR/scope.parquet, each atomically (temp + rename).

    The parquet file is written first, so a reader that finds scope.json finds the
    rows of an index at least as new. Raises DiskFullError when the disk fills up.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cols = _rows(scope)
    types = {"layer": pa.int64(), "width": pa.int64(), "target_l0": pa.float64(),
             "average_l0": pa.float64(), "params": pa.string(), "features": pa.string()}
    table = pa.table({k: pa.array(v, type=types.get(k, pa.float64() if k.startswith("metric_")
                                                    else pa.string())) for k, v in cols.items()})
    with disk_full(directory, "the previous index is kept"):
        tmp = directory / f".{INDEX_PARQUET}.tmp"
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, directory / INDEX_PARQUET)
        finally:
            tmp.unlink(missing_ok=True)
        atomic_write_text(directory / INDEX_JSON,
                          json.dumps(scope.to_json(), indent=1, allow_nan=False) + "\n")
