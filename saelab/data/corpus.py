"""Text sources: the builtin offline corpus, local files, Hugging Face datasets.

A `Corpus` is a re-iterable stream of documents (str) in a fixed order, with a
`name` and a `sha256` that goes into provenance. `load_corpus(spec)` accepts:

    builtin                      Python's and saelab's dependencies' documentation,
                                 offline, ~6 M tokens (see saelab.data.builtin)
    builtin:stdlib               the Python part only (~0.4 M tokens)
    notes.txt                    documents separated by a form feed or by two or
                                 more blank lines (one paragraph break keeps a
                                 document together)
    data.jsonl                   one JSON object per line, text in `text_field`
    data.parquet                 text in column `text_field`, streamed by row group
    some/dir                     every .txt/.jsonl/.parquet file below it, sorted
    hf:org/name[:config]         a Hugging Face dataset, streamed (needs `datasets`
    org/name                     and the network; never used unless named)

Example::

    corpus = load_corpus("builtin")
    corpus.sha256, corpus.stats().n_chars     # provenance, size
    for doc in corpus: ...
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from saelab.data.builtin import builtin_documents, check_variant
from saelab.errors import CorruptFileError, OfflineError, SaelabError

FILE_KINDS = (".txt", ".jsonl", ".parquet")
ACCEPTED = (
    "'builtin' or 'builtin:stdlib'; a .txt, .jsonl or .parquet file; a directory of such files; "
    "or a Hugging Face dataset as 'hf:org/name[:config]' (needs `datasets` and the network)"
)


@dataclass(frozen=True)
class CorpusStats:
    n_docs: int
    n_chars: int


@dataclass(frozen=True, eq=False)
class Corpus:
    """A named, re-iterable stream of documents in a stable order.

    `sha256` hashes the documents themselves (length-prefixed UTF-8), so the same
    documents give the same hash whatever file format held them. A streamed hub
    dataset cannot be hashed cheaply: there `identity` (dataset, config, split,
    field) is hashed instead and `hash_kind` says so.
    """

    name: str
    kind: str
    """builtin | txt | jsonl | parquet | dir | hf | memory"""
    reader: Callable[[], Iterable[str]] = field(repr=False)
    """Returns a fresh iterable of the documents; called once per iteration."""
    identity: str | None = None

    @classmethod
    def from_texts(cls, name: str, texts: Iterable[str]) -> Corpus:
        docs = tuple(t for t in texts if t.strip())
        return cls(name, "memory", lambda: docs)

    def __iter__(self) -> Iterator[str]:
        return iter(self.reader())

    @property
    def hash_kind(self) -> str:
        return "content" if self.identity is None else "identity"

    @cached_property
    def _summary(self) -> tuple[str, CorpusStats]:
        h, n_docs, n_chars = hashlib.sha256(), 0, 0
        for doc in self:
            b = doc.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
            n_docs += 1
            n_chars += len(doc)
        return h.hexdigest(), CorpusStats(n_docs, n_chars)

    @cached_property
    def sha256(self) -> str:
        if self.identity is not None:
            return hashlib.sha256(self.identity.encode()).hexdigest()
        return self._summary[0]

    def stats(self) -> CorpusStats:
        """Counts over one full pass (cached). For a hub dataset this reads all of it."""
        return self._summary[1]


def load_corpus(
    spec: str | os.PathLike, *, text_field: str = "text", split: str = "train"
) -> Corpus:
    """Open a corpus by spec (see the module docstring). `split` is for hub datasets."""
    s = os.fspath(spec).strip()
    if s == "builtin" or s.startswith("builtin:"):
        variant = check_variant(s)
        # Nothing is read (or built) until the corpus is first iterated.
        return Corpus(variant, "builtin", lambda: builtin_documents(variant))
    if s.startswith("hf:"):
        name, _, config = s[3:].partition(":")
        return _hf_corpus(name, config or None, split, text_field)
    path = Path(s).expanduser()
    if path.is_dir():
        corpus = _dir_corpus(path, s, text_field)
    elif path.is_file():
        if path.suffix not in FILE_KINDS:
            raise SaelabError(
                f"corpus file {s} has suffix {path.suffix!r}; expected one of "
                f"{', '.join(FILE_KINDS)}. Rename it or convert it."
            )
        corpus = Corpus(s, path.suffix[1:], lambda: _read_file(path, text_field))
    elif path.suffix in FILE_KINDS or s.startswith((".", "/", "~")):
        raise SaelabError(f"corpus file {s} does not exist; check the path.")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", s):
        return _hf_corpus(s, None, split, text_field, guessed=True)
    else:
        raise SaelabError(f"unknown corpus {s!r}; expected {ACCEPTED}.")
    # Fail at load time, not mid-run: read the first document now.
    if next(iter(corpus), None) is None:
        raise SaelabError(f"corpus {s} holds no non-empty documents.")
    return corpus


# ---------------------------------------------------------------- local files


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    reader = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[path.suffix]
    return reader(path, text_field)


def _dir_corpus(root: Path, name: str, text_field: str) -> Corpus:
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix in FILE_KINDS
         and not any(part.startswith(".") for part in p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise SaelabError(
            f"directory {name} holds no {', '.join(FILE_KINDS)} files; expected at least one."
        )
    return Corpus(name, "dir", lambda: (d for f in files for d in _read_file(f, text_field)))


# A form feed, or two or more blank lines (three newlines with only spaces between).
_TXT_SEP = re.compile(r"\f|\n(?:[^\S\n\f]*\n){2,}")
_TXT_CHUNK = 1 << 20  # characters per read: bounded memory for multi-GB files


def _read_txt(path: Path, text_field: str = "") -> Iterator[str]:
    buf, n_read = "", 0
    with open(path, encoding="utf-8") as f:
        while True:
            try:
                chunk = f.read(_TXT_CHUNK)
            except UnicodeDecodeError as e:
                raise CorruptFileError(
                    f"{path} is not UTF-8 text ({e.reason} after about {n_read} characters); "
                    "expected UTF-8. Re-encode it, e.g. `iconv -f latin1 -t utf-8`."
                ) from None
            if not chunk:
                break
            n_read += len(chunk)
            parts = _TXT_SEP.split(buf + chunk)
            # The last part may continue (or its separator may) in the next chunk.
            buf = parts.pop()
            yield from (p.strip() for p in parts if p.strip())
    if buf.strip():
        yield buf.strip()


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    lineno = 0
    with open(path, encoding="utf-8") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield from _jsonl_row(line, f"{path}, line {lineno}", text_field)
        except UnicodeDecodeError as e:
            raise CorruptFileError(
                f"{path} is not UTF-8 text ({e.reason}, after line {lineno}); expected UTF-8 "
                "JSON lines. Re-encode it, e.g. `iconv -f latin1 -t utf-8`."
            ) from None


def _jsonl_row(line: str, where: str, text_field: str) -> Iterator[str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorruptFileError(
            f"{where}: not valid JSON ({e.msg}, column {e.colno}); "
            "expected one JSON object per line."
        ) from None
    if not isinstance(row, dict):
        raise CorruptFileError(
            f"{where}: a JSON {type(row).__name__}; expected an object "
            f'like {{"{text_field}": "..."}}.'
        )
    yield from _text_value(row, text_field, where)


def _text_value(row: dict, text_field: str, where: str) -> Iterator[str]:
    if text_field not in row:
        raise SaelabError(
            f"{where}: no field {text_field!r} (fields: {', '.join(map(str, row)) or 'none'}); "
            "pass text_field (--text-field) naming the field that holds the text."
        )
    value = row[text_field]
    if value is None:
        return
    if not isinstance(value, str):
        raise SaelabError(
            f"{where}: field {text_field!r} holds a {type(value).__name__}; expected a string."
        )
    if value.strip():
        yield value


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise CorruptFileError(f"{path} is not a readable parquet file ({e}).") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise SaelabError(
            f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}); "
            "pass text_field (--text-field) naming the column that holds the text."
        )
    kind = schema.field(text_field).type
    value_kind = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(value_kind) or pa.types.is_large_string(value_kind)):
        raise SaelabError(f"{path}: column {text_field!r} has type {kind}; expected strings.")
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        yield from (t for t in batch.column(0).to_pylist() if t and t.strip())


# ---------------------------------------------------------------- Hugging Face


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hf_corpus(
    name: str, config: str | None, split: str, text_field: str, guessed: bool = False
) -> Corpus:
    spec = f"hf:{name}" + (f":{config}" if config else "")
    instead = "Use 'builtin' or a local .txt/.jsonl/.parquet file instead."
    if guessed:  # 'org/name' that is not an existing path
        instead += f" (No file or directory {name} exists, so it was taken for a dataset.)"
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if _env_true(v)]
    if offline:
        raise OfflineError(
            f"corpus {spec} is a Hugging Face dataset, but {offline[0]} is set, so the "
            f"network may not be used. Unset it to stream the dataset, or: {instead}"
        )
    try:
        import datasets
    except ImportError:
        raise OfflineError(
            f"corpus {spec} is a Hugging Face dataset, which needs the `datasets` package "
            f"(not installed; `pip install datasets`) and the network. {instead}"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except (OSError, ConnectionError, TimeoutError) as e:
        raise OfflineError(f"could not reach Hugging Face dataset {spec} ({e}). {instead}") from e
    except Exception as e:  # datasets raises many types for a bad name, config or split
        raise SaelabError(
            f"could not open Hugging Face dataset {spec} (split {split!r}): {e}"
        ) from e

    def docs() -> Iterator[str]:
        for i, row in enumerate(ds):
            yield from _text_value(row, text_field, f"{spec} row {i}")

    return Corpus(spec, "hf", docs, identity=f"{spec}|split={split}|field={text_field}")
