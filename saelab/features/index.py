"""The feature index: Parquet tables in a run folder, readable with pyarrow alone.

A feature index folder (one per SAE) holds::

    index.json          schema "saelab.features/1", the SAE (path, site, widths), the model,
                        the corpus, the collection settings, token count, summary numbers,
                        the logit-lens token filter report, timings
    features.parquet    one row per feature (FEATURE_COLUMNS)
    examples.parquet    one row per example, sorted by feature (EXAMPLE_COLUMNS)
    ablation.parquet    ablated text of the top and uniform examples of some features
                        (ABLATION_COLUMNS; older indexes: top examples only, no kind/bin/rank)
    dashboard.html      the static dashboard (report/dashboard.py)

The set is written together by `write_index`: into a fresh folder beside the
old one, switched in with one rename, so a reader never sees a mixture of two
builds.

The README documents every column. This module never imports torch,
so readers (the browser, notebooks, other tools) start instantly; the writers
take numpy arrays.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA = "saelab.features/1"
INDEX, FEATURES, EXAMPLES, ABLATION = "index.json", "features.parquet", "examples.parquet", "ablation.parquet"
ROW_GROUP = 8192  # examples per row group: reading one feature touches one or two groups
KINDS = ("top", "bin")

FEATURE_COLUMNS = ("feature", "count", "density", "mean_act", "max_act", "hist", "bin_counts",
                   "lens_top_ids", "lens_top_tokens", "lens_top_values", "lens_bottom_ids",
                   "lens_bottom_tokens", "lens_bottom_values", "neighbours", "neighbour_cos",
                   "other_neighbours", "other_neighbour_cos", "top_context", "label")
EXAMPLE_COLUMNS = ("feature", "kind", "bin", "rank", "act", "context", "position", "start",
                   "token_ids", "tokens", "acts")
ABLATION_COLUMNS = ("feature", "kind", "bin", "rank", "context", "position", "start", "base",
                    "token_ids", "tokens", "deltas")
# Indexes written before uniform examples were ablated have no kind/bin/rank: one top row each.
ABLATION_OLD = {"kind": "top", "bin": -1, "rank": 0}


def lens_rule(z_max: float) -> str:
    """The logit lens's token filter, in words (index.json logit_lens.filter.rule)."""
    return (f"Token rows left out of the unembedding: rows whose norm is more than {z_max:g} standard "
            "deviations above the vocabulary's mean (high_norm: they would top every feature's lens; "
            "on BPE vocabularies mostly word pieces always merged further, which text never uses) "
            f"or more than {z_max:g} below it (low_norm: rows training barely moved, tokens never "
            "used), and padding rows with no token (padding).")


def lens_filter(meta: dict) -> dict:
    """index.json's logit_lens.filter with its `rule` (older indexes do not store it)."""
    filt = meta["logit_lens"]["filter"]
    return {"rule": lens_rule(filt.get("z_max", 5.0))} | filt


class NotAnIndexError(Exception):
    """A folder that is not a readable feature index (kept torch- and saelab.errors-free)."""


# ---------------------------------------------------------------- writing


def _list(values: np.ndarray, dtype: pa.DataType | None = None) -> pa.Array:
    """[n, w] numpy -> list<...> column with n rows of w items."""
    n, w = values.shape
    offsets = pa.array(np.arange(0, n * w + 1, w, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=dtype))


def _token_list(ids: np.ndarray, vocab: dict[int, str]) -> pa.Array:
    """[n, w] token ids -> list<dictionary<string>>: each distinct token's text is stored once."""
    uniq, inverse = np.unique(ids.reshape(-1), return_inverse=True)
    dictionary = pa.array([vocab.get(int(i), f"<{int(i)}>") for i in uniq], type=pa.string())
    tokens = pa.DictionaryArray.from_arrays(pa.array(inverse.astype(np.int32)), dictionary)
    n, w = ids.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * w + 1, w, dtype=np.int32)), tokens)


def _write(table: pa.Table, path: Path, row_group: int | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd", row_group_size=row_group)
    os.replace(tmp, path)


def write_features(folder: Path, cols: dict[str, Any], vocab: dict[int, str]) -> Path:
    """cols: feature-level numpy arrays as `build` produces them ([F] or [F, n])."""
    F = len(cols["count"])
    arrays = {
        "feature": pa.array(np.arange(F, dtype=np.int32)),
        "count": pa.array(cols["count"].astype(np.int64)),
        "density": pa.array(cols["density"].astype(np.float64)),
        "mean_act": pa.array(cols["mean_act"].astype(np.float64), from_pandas=True),  # NaN -> null
        "max_act": pa.array(cols["max_act"].astype(np.float32)),
        "hist": _list(cols["hist"].astype(np.int64)),
        "bin_counts": _list(cols["bin_counts"].astype(np.int64)),
    }
    for side in ("top", "bottom"):
        ids = cols[f"lens_{side}_ids"].astype(np.int32)
        arrays[f"lens_{side}_ids"] = _list(ids)
        arrays[f"lens_{side}_tokens"] = _token_list(ids, vocab)
        arrays[f"lens_{side}_values"] = _list(cols[f"lens_{side}_values"].astype(np.float32))
    for name in ("neighbours", "other_neighbours"):
        cos = name.replace("neighbours", "neighbour_cos")
        if cols.get(name) is not None:
            arrays[name] = _list(cols[name].astype(np.int32))
            arrays[cos] = _list(cols[cos].astype(np.float32))
        else:
            arrays[name] = pa.nulls(F, pa.list_(pa.int32()))
            arrays[cos] = pa.nulls(F, pa.list_(pa.float32()))
    arrays["top_context"] = pa.array(cols.get("top_context") or [None] * F, type=pa.list_(pa.int32()))
    labels = cols.get("label")
    arrays["label"] = pa.array(labels if labels is not None else [None] * F, type=pa.string())
    path = Path(folder) / FEATURES
    _write(pa.table(arrays), path)
    return path


def write_examples(folder: Path, ex: dict[str, np.ndarray], vocab: dict[int, str]) -> Path:
    kind = pa.DictionaryArray.from_arrays(pa.array(ex["kind"].astype(np.int32)), pa.array(KINDS))
    table = pa.table({
        "feature": pa.array(ex["feature"].astype(np.int32)), "kind": kind,
        "bin": pa.array(ex["bin"].astype(np.int16)), "rank": pa.array(ex["rank"].astype(np.int32)),
        "act": pa.array(ex["act"].astype(np.float32)),
        "context": pa.array(ex["context"].astype(np.int64)),
        "position": pa.array(ex["position"].astype(np.int32)),
        "start": pa.array(ex["start"].astype(np.int32)),
        "token_ids": _list(ex["token_ids"].astype(np.int32)),
        "tokens": _token_list(ex["token_ids"], vocab),
        "acts": _list(ex["acts"].astype(np.float32)),
    })
    path = Path(folder) / EXAMPLES
    _write(table, path, ROW_GROUP)
    return path


def write_ablation(folder: Path, rows: dict[str, np.ndarray], vocab: dict[int, str]) -> Path:
    """rows: feature, kind, bin, rank, context, position, start, base [A]; token_ids, deltas
    [A, W] (NaN = kept). Sorted by feature, then top before bins, as examples.parquet."""
    order = np.lexsort((rows["rank"], rows["bin"], rows["kind"], rows["feature"]))
    rows = {k: v[order] for k, v in rows.items()}
    table = pa.table({
        "feature": pa.array(rows["feature"].astype(np.int32)),
        "kind": pa.DictionaryArray.from_arrays(pa.array(rows["kind"].astype(np.int32)), pa.array(KINDS)),
        "bin": pa.array(rows["bin"].astype(np.int16)),
        "rank": pa.array(rows["rank"].astype(np.int32)),
        "context": pa.array(rows["context"].astype(np.int64)),
        "position": pa.array(rows["position"].astype(np.int32)),
        "start": pa.array(rows["start"].astype(np.int32)),
        "base": pa.array(rows["base"].astype(np.float32)),
        "token_ids": _list(rows["token_ids"].astype(np.int32)),
        "tokens": _token_list(rows["token_ids"], vocab),
        "deltas": _list(rows["deltas"].astype(np.float32)),
    })
    path = Path(folder) / ABLATION
    _write(table, path)
    return path


# Every file an index folder's set may hold: a rebuild replaces all of them together.
# explanations.* (features/explain.py) described the old build: a rebuild drops them.
INDEX_FILES = (INDEX, FEATURES, EXAMPLES, ABLATION, "dashboard.html", "explanations.parquet",
               "explanations.json")


def write_index(folder: Path, write: Callable[[Path], None]) -> Path:
    """Write one index as a set: `write(tmp)` fills a fresh folder beside `folder` with the
    write_* functions, then it replaces `folder` in one rename (saelab.atomic.write_folder).

    A rebuild killed at any moment leaves the old index or the new one, never new
    features.parquet with old examples; other files in `folder` are kept. Raises
    saelab.atomic.DiskFullError (one line naming `folder`) when the disk fills up.
    """
    from saelab.atomic import disk_full, write_folder

    with disk_full(folder, "the previous index there, if any, is unchanged"):
        return write_folder(folder, INDEX_FILES, write)


def write_meta(folder: Path, meta: dict) -> Path:
    path = Path(folder) / INDEX
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"schema": SCHEMA, **meta}, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- reading


def is_index(folder: str | os.PathLike) -> bool:
    path = Path(folder) / INDEX
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("schema", "").startswith("saelab.features/")
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


def find_indexes(root: str | os.PathLike, max_depth: int = 3) -> list[Path]:
    """Feature index folders at or below `root` (not following symlinks out of it), sorted."""
    root = Path(root)
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and depth < max_depth)
        if is_index(dirpath):
            found.append(Path(dirpath))
    return found


@dataclass
class FeatureIndex:
    """A feature index folder opened for reading (features loaded eagerly, examples on demand)."""

    folder: Path
    meta: dict
    features: pa.Table
    _groups: list[tuple[int, int]] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> FeatureIndex:
        folder = Path(folder)
        if not is_index(folder):
            raise NotAnIndexError(f"{folder} is not a feature index (no {INDEX} with schema {SCHEMA}); "
                              "create one with `saelab features SAE_DIR --out DIR`.")
        meta = json.loads((folder / INDEX).read_text())
        try:
            features = pq.read_table(folder / FEATURES)
        except (OSError, pa.ArrowInvalid) as err:
            raise NotAnIndexError(f"{folder / FEATURES} could not be read ({err}); rebuild the index.") from err
        return cls(folder, meta, features)

    @property
    def d_sae(self) -> int:
        return self.features.num_rows

    def feature(self, f: int) -> dict:
        """One feature's row as plain Python values."""
        if not 0 <= f < self.d_sae:
            raise KeyError(f)
        return {k: v[0] for k, v in self.features.slice(f, 1).to_pydict().items()}

    def examples(self, f: int) -> list[dict]:
        """The examples of feature f (top first, then bins), as dicts."""
        return _rows_for(self.folder / EXAMPLES, f, self)

    def ablations(self, f: int) -> list[dict]:
        """The ablated text of feature f's examples: the top one first, then the bins in
        ascending order (kind, bin, rank as in examples.parquet); [] if none was stored."""
        path = self.folder / ABLATION
        if not path.is_file():
            return []
        rows = pq.read_table(path, filters=[("feature", "=", f)]).to_pylist()
        return [ABLATION_OLD | r for r in rows]

    def ablation(self, f: int) -> dict | None:
        """The ablated text of feature f's top example, or None."""
        return next((r for r in self.ablations(f) if r["kind"] == "top"), None)


def _rows_for(path: Path, f: int, idx: FeatureIndex) -> list[dict]:
    """Read only the row groups whose feature range holds f (examples are sorted by feature)."""
    pf = pq.ParquetFile(path)
    if idx._groups is None:
        col = pf.schema_arrow.get_field_index("feature")
        idx._groups = [(pf.metadata.row_group(g).column(col).statistics.min,
                        pf.metadata.row_group(g).column(col).statistics.max)
                       for g in range(pf.num_row_groups)]
    groups = [g for g, (lo, hi) in enumerate(idx._groups) if lo <= f <= hi]
    if not groups:
        return []
    # One row group at a time: each holds its own dictionary for the nested `tokens`
    # column, and pyarrow cannot read two of those into one table ("Nested data
    # conversions not implemented for chunked array outputs").
    rows: list[dict] = []
    for g in groups:
        table = pf.read_row_group(g)
        rows += table.filter(pc.equal(table["feature"], f)).to_pylist()
    return rows
