"""The feature indexes a browser serves, and the damaged ones it names instead of skipping.

    saes, damaged = open_indexes("runs/feats")   # {name: FeatureIndex}, {name: Damaged}

An index is damaged when its index.json is not JSON or lacks a field the
browser reads, when features.parquet cannot be read, or when the footer of
examples.parquet / ablation.parquet is unreadable (a cut-short write). A file
damaged deeper inside (a bad page in examples.parquet) surfaces on the request
that reads it (`read_failed`). Either way the message
names the file and the command that rebuilds the index.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from saelab.features.index import (
    ABLATION,
    EXAMPLES,
    FEATURES,
    INDEX,
    FeatureIndex,
    NotAnIndexError,
    find_indexes,
)

log = logging.getLogger(__name__)
MAX_DEPTH = 3  # folders below the served one, as find_indexes
NEEDED_COLUMNS = ("feature", "count", "density", "mean_act", "max_act", "bin_counts",
                  "lens_top_tokens", "label")


@dataclass(frozen=True)
class Damaged:
    """A damaged index: its name in the browser, the bad file, what is wrong with it."""

    name: str
    file: Path
    problem: str
    sae_path: str | None = None

    @property
    def message(self) -> str:
        sae = self.sae_path or "SAE_DIR"
        return (f"the feature index {self.name!r} is damaged: {self.file} {self.problem}. "
                f"Rebuild it with `saelab features {sae} --out {self.file.parent.parent}`, "
                "then restart `saelab serve`.")


def open_indexes(run_dir: Path) -> tuple[dict[str, FeatureIndex], dict[str, Damaged]]:
    """Open every index at or below `run_dir` (3 folders deep), and name the damaged ones."""
    saes: dict[str, FeatureIndex] = {}
    damaged: dict[str, Damaged] = {}
    good = find_indexes(run_dir, max_depth=MAX_DEPTH)
    for folder in sorted(set(good) | set(_unreadable_index_folders(run_dir, good))):
        name = _name(run_dir, folder)
        try:
            saes[name] = FeatureIndex.open(folder)
        except NotAnIndexError as err:
            damaged[name] = _diagnose(name, folder, err)
            continue
        problem = _check(name, saes[name])
        if problem is not None:
            del saes[name]
            damaged[name] = problem
    return saes, damaged


def read_failed(name: str, index: FeatureIndex, file: str, err: Exception) -> Damaged:
    """The damage (logged) of a file of `index` that raised `err` while a request read it."""
    damaged = Damaged(name, index.folder / file, f"could not be read ({type(err).__name__}: {err})",
                      _sae_path(index.meta))
    log.warning("%s", damaged.message)
    return damaged


def _name(run_dir: Path, folder: Path) -> str:
    rel = folder.relative_to(run_dir).as_posix()
    return rel if rel != "." else folder.resolve().name


def _unreadable_index_folders(run_dir: Path, good: list[Path]) -> list[Path]:
    """Folders whose index.json is there but not a JSON object (a cut-short or garbled write).

    A JSON object of another schema is someone else's file and stays ignored.
    """
    out = []
    for depth in range(MAX_DEPTH + 1):
        for path in sorted(run_dir.glob("/".join(["*"] * depth + [INDEX]))):
            rel = path.parent.relative_to(run_dir).parts
            if path.parent in good or any(p.startswith(".") for p in rel) or not path.is_file():
                continue
            try:
                meta = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, ValueError):
                out.append(path.parent)
                continue
            if not isinstance(meta, dict):
                out.append(path.parent)
    return out


def _diagnose(name: str, folder: Path, err: NotAnIndexError) -> Damaged:
    meta = _read_meta(folder)
    if meta is None:
        return Damaged(name, folder / INDEX, "is not a readable JSON object")
    cause = err.__cause__ or err
    return Damaged(name, folder / FEATURES, f"could not be read ({type(cause).__name__}: {cause})",
                   _sae_path(meta))


def _check(name: str, index: FeatureIndex) -> Damaged | None:
    """What the browser would trip over later, found now: missing fields, columns, footers."""
    meta = index.meta
    sae_path = _sae_path(meta)
    problem = _meta_problem(meta)
    if problem is not None:
        return Damaged(name, index.folder / INDEX, problem, sae_path)
    missing = [c for c in NEEDED_COLUMNS if c not in index.features.column_names]
    if missing:
        return Damaged(name, index.folder / FEATURES, f"lacks the column(s) {', '.join(missing)}",
                       sae_path)
    for file, required in ((EXAMPLES, True), (ABLATION, False)):
        path = index.folder / file
        if not path.is_file():
            if required:
                return Damaged(name, path, "is missing", sae_path)
            continue
        try:
            pq.ParquetFile(path).close()  # reads the footer: a cut-short file fails here
        except (OSError, pa.ArrowException) as err:
            return Damaged(name, path, f"could not be read ({type(err).__name__}: {err})", sae_path)
    return None


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """The first field of index.json the browser reads that is missing or of the wrong type."""
    fields = (("sae", dict), ("model", dict), ("tokens", int), ("summary", dict),
              ("collection", dict), ("logit_lens", dict))
    for key, kind in fields:
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            return f'has no field "{key}" of type {kind.__name__}'
    if not isinstance(meta["model"].get("name"), str):
        return 'has no field "model.name" of type str'
    config = meta["collection"].get("config")
    n_bins = config.get("n_bins") if isinstance(config, dict) else None
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        return 'has no field "collection.config.n_bins" (a positive integer)'
    return None


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / INDEX).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _sae_path(meta: dict | None) -> str | None:
    sae = meta.get("sae") if isinstance(meta, dict) else None
    path = sae.get("path") if isinstance(sae, dict) else None
    return path if isinstance(path, str) else None
