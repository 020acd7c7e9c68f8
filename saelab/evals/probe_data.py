"""Labelled text sets for sparse probing, read from the `sae-probes` package's data files.

    names = available()                          # ["agnews_0", ..., "world_latitude"]
    ds = load_probe_dataset("glue_sst2", n=600)  # 600 texts, balanced, labels 0/1

`sae-probes` (MIT, Kantamneni et al. 2025) ships about 155 labelled sets as
zstd-compressed CSV files with `prompt` and `target` columns. We read only those
files: the package is found with `importlib.util.find_spec` and never imported
(its `__init__` pulls transformer-lens, xgboost and more, which the set-up skips
with `--no-deps`), as the embedded model weights are found.

A set's name is its file name without the number in front and without `.csv.zst`
("92_glue_sst2.csv.zst" is "glue_sst2"); the numbered form is accepted too.
Probing here is binary: a set needs exactly two classes. Subsets are drawn
balanced (as many texts of each class), so chance is 50% unless a class runs out.
"""

from __future__ import annotations

import csv
import difflib
import functools
import importlib.util
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saelab.errors import BadValueError, SaelabError

PACKAGE = "sae_probes"
VERSION = "0.4.2"
INSTALL = f"pip install --no-deps sae-probes=={VERSION}"
_MAX_BYTES = 1 << 30  # a decompressed CSV larger than this is not one of the package's files


class ProbeDataMissingError(SaelabError):
    """The sae-probes package (the labelled sets) is not installed."""


@dataclass(frozen=True)
class ProbeDataset:
    """Texts with binary labels. texts: n strings; labels: (n,) int64 in {0, 1}."""

    name: str
    texts: list[str]
    labels: np.ndarray
    classes: tuple[str, str]  # the `target` values that labels 0 and 1 stand for
    n_available: int  # rows in the file

    @property
    def chance(self) -> float:
        """Accuracy of always answering the larger class."""
        return float(max(self.labels.mean(), 1 - self.labels.mean()))


def require(module: str, pip_name: str) -> None:
    """Raise SaelabError naming the pip package when `module` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise SaelabError(f"probing and absorption need the {pip_name} package, which is not "
                          f"installed; install it with `pip install {pip_name}`.")


def data_folder() -> Path:
    """The package's folder of labelled sets; raises ProbeDataMissingError if not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    folder = (Path(next(iter(spec.submodule_search_locations))) / "data" / "cleaned_data"
              if spec is not None and spec.submodule_search_locations else None)
    if folder is None or not folder.is_dir():
        raise ProbeDataMissingError(
            "sparse probing needs the labelled text sets of the sae-probes package, which is "
            f"not installed; install it with `{INSTALL}` (--no-deps: only its data files are "
            "read), and `pip install zstandard scikit-learn`.")
    return folder


@functools.cache
def _files() -> dict[str, Path]:
    files = {}
    for path in data_folder().glob("*.csv.zst"):
        stem = path.name[: -len(".csv.zst")]
        files[re.sub(r"^\d+_", "", stem)] = path
    return files


def available() -> list[str]:
    """Names of every labelled set in the installed package, sorted."""
    return sorted(_files())


def _resolve(name: str) -> tuple[str, Path]:
    files = _files()
    key = re.sub(r"^\d+_", "", name.strip()).removesuffix(".csv.zst").removesuffix(".csv")
    if key in files:
        return key, files[key]
    close = difflib.get_close_matches(key, list(files), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise BadValueError(f"unknown probing dataset {name!r}; {hint}available ({len(files)}): "
                        f"{', '.join(sorted(files))}")


def read_rows(name: str) -> list[tuple[str, str]]:
    """(prompt, target) of every row of set `name`, in file order."""
    require("zstandard", "zstandard")
    import zstandard

    _, path = _resolve(name)
    with open(path, "rb") as fh:
        raw = zstandard.ZstdDecompressor().stream_reader(fh).read(_MAX_BYTES)
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8")))
    if not reader.fieldnames or not {"prompt", "target"} <= set(reader.fieldnames):
        raise SaelabError(f"probing dataset {name!r} ({path}) has columns {reader.fieldnames}, "
                          "expected prompt and target; reinstall it with "
                          f"`{INSTALL} --force-reinstall`.")
    return [(row["prompt"], row["target"]) for row in reader]


def load_probe_dataset(name: str, *, n: int | None = None, seed: int = 0) -> ProbeDataset:
    """A balanced random subset of `n` texts (all rows when None) of the binary set `name`.

    Raises BadValueError for an unknown name (listing the available ones), a set with one
    class, or one with more than two (a regression target or a multi-class set: the
    one-vs-rest sets such as nyc_borough_Manhattan are binary).
    """
    key, _ = _resolve(name)
    rows = [(p, t) for p, t in read_rows(key) if p.strip()]
    classes = sorted({t for _, t in rows})
    if len(classes) < 2:
        raise BadValueError(f"probing dataset {key!r} has a single class ({classes[0]!r} in every "
                            "row): a probe has nothing to separate; pick another set.")
    if len(classes) > 2:
        shown = ", ".join(repr(c) for c in classes[:5]) + (", ..." if len(classes) > 5 else "")
        binary = [s for s in available() if s.startswith(key + "_")][:4]
        hint = f"; its one-vs-rest sets are binary: {', '.join(binary)}" if binary else ""
        raise BadValueError(f"probing dataset {key!r} has {len(classes)} classes ({shown}); sparse "
                            f"probing needs exactly two{hint}.")
    # "0"/"1", "False"/"True": the sorted order makes the second value the positive class.
    labels = np.array([classes.index(t) for _, t in rows], dtype=np.int64)
    rng = np.random.default_rng(seed)
    if n is not None:
        if n < 4:
            raise BadValueError(f"probing needs at least 4 texts per dataset, got n={n}")
        by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in (0, 1)]
        half = n // 2
        take0 = min(len(by_class[0]), max(half, n - len(by_class[1])))
        take1 = min(len(by_class[1]), n - take0)
        pick = rng.permutation(np.concatenate([by_class[0][:take0], by_class[1][:take1]]))
    else:
        pick = rng.permutation(len(rows))
    return ProbeDataset(name=key, texts=[rows[i][0] for i in pick], labels=labels[pick],
                        classes=(classes[0], classes[1]), n_available=len(rows))
