"""The builtin offline corpus: documentation that ships with Python and with saelab's
own dependencies, so it is present wherever saelab is installed.

    builtin          Python's documentation topics (pydoc_data) and the docstrings of
                     the standard library, then those of numpy, scipy, torch,
                     transformers, matplotlib, ... (`PACKAGES`). The big default.
    builtin:stdlib   the first two sources only: smaller, and the same for a given
                     Python version whatever else is installed.

Sizes on CPython 3.11.7 with numpy 2.4, scipy 1.17, torch 2.13, transformers 5.23,
matplotlib 3.11, networkx 3.6, sympy 1.14 (tokens of the SmolLM2 tokenizer)::

    builtin          6,321 documents   21.1 M characters   6.20 M tokens   build ~15 s
    builtin:stdlib     766 documents    1.6 M characters   0.42 M tokens   build ~2 s

Sources: the topics (0.46 M characters), the standard library (1.15 M), then by
size scipy (4.2 M), sympy (4.0 M), transformers (3.3 M), torch (2.5 M), networkx,
numpy, matplotlib, huggingface_hub and the small ones. No system folders such as
/usr/share/doc are read: they are not there on every machine.

Docstrings are read by parsing source files with `ast`, never by importing them:
nothing runs, a patched or mocked module in this process cannot change the text,
and C-only modules (sys, math, itertools) contribute nothing. Each module gives one
document (its docstring and its public functions'), each public class another (its
docstring and its methods'). Private names (_helper) are left out but private
modules are read: _pydecimal, numpy._core and scipy.linalg._basic are where public
functions are documented. Test folders, vendored code, conversion scripts and package
files that are mostly code are skipped. Sections made mostly of doctest sessions, and
sections already seen earlier, are dropped; documents under 200 characters are dropped; the
rest are shuffled with a fixed seed so that the sources are interleaved.

The corpus is deterministic for a given environment: Python version, package
versions and this file. It is built once (15 s of CPU for `builtin`), then cached
under $SAELAB_CACHE/corpus/, keyed by a fingerprint of exactly those, and loads in
about 0.2 s. The corpus's content hash (`Corpus.sha256`) records exactly
the documents used; `builtin_manifest` says where they came from.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import random
import re
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

from saelab.errors import SaelabError

log = logging.getLogger(__name__)

# Import names, read in this order after the standard library (earlier sources win
# when the same docstring appears twice). Missing ones are skipped.
PACKAGES = (
    "numpy", "scipy", "torch", "transformers", "matplotlib", "pyarrow", "rich", "typer",
    "click", "safetensors", "jaxtyping", "einops", "accelerate", "huggingface_hub", "gguf",
    "networkx", "sympy",  # required by torch
)
VARIANTS = {"builtin": PACKAGES, "builtin:stdlib": ()}

# Standard-library folders and modules left out: tests, GUI and side-effect modules,
# installers, codec tables, the topics (read separately), and the modules deprecated
# in 3.11 and removed in 3.13, so the corpus stays alike across Python versions.
_STDLIB_SKIP = frozenset("""
site-packages dist-packages test tests idlelib tkinter turtledemo lib2to3 ensurepip
distutils encodings pydoc_data __phello__ turtle antigravity this
aifc asynchat asyncore audioop cgi cgitb chunk crypt imghdr imp mailcap msilib nis
nntplib ossaudiodev pipes smtpd sndhdr spwd sunau telnetlib uu xdrlib
""".split())
# Folders left out of packages (tests, vendored copies of other projects).
_PACKAGE_SKIP = frozenset("test tests testing _vendor vendor vendored __pycache__".split())
# Conversion scripts and transformers' "modular" sources (copies of generated modules).
_SKIP_STEMS = ("test_", "conftest", "setup", "convert_", "modular_")
_MAX_FILE_BYTES = 1 << 20  # larger sources are generated tables, not prose
# Package files where triple-quoted text is under this share of the bytes (compiler
# and kernel internals, modeling code with generated docs) are skipped unparsed:
# parsing is nearly all of the build time, and this halves it for 17% of the text.
_MIN_DOC_SHARE = 0.25
_TRIPLE_QUOTED = re.compile(rb'"""(?:.*?)"""|\'\'\'(?:.*?)\'\'\'', re.S)

_MIN_CHARS = 200
_SHUFFLE_SEED = 20240601
_FORMAT = 1  # of the cache file
_KEEP_BUILDS = 3  # cache files kept per variant


def check_variant(variant: str) -> str:
    """`variant` if it is `builtin` or `builtin:stdlib`; otherwise SaelabError."""
    if variant not in VARIANTS:
        raise SaelabError(
            f"unknown builtin corpus {variant!r}; expected one of {', '.join(VARIANTS)}."
        )
    return variant


def builtin_documents(variant: str = "builtin") -> tuple[str, ...]:
    """The documents of `builtin` (big, the default) or `builtin:stdlib`, built once and
    cached; see the module docstring. `load_corpus("builtin")` wraps them in a Corpus."""
    return _load(check_variant(variant))[0]


def builtin_manifest(variant: str = "builtin") -> dict:
    """Where the documents came from: the environment fingerprint (Python and package
    versions) and, per source, its version, documents and characters."""
    return _load(check_variant(variant))[1]


# ---------------------------------------------------------------- cache


def cache_dir() -> Path:
    # As saelab.models.load.cache_root, which imports torch.
    root = Path(os.environ.get("SAELAB_CACHE", Path.home() / ".cache" / "saelab"))
    return root / "corpus"


def fingerprint(variant: str) -> dict:
    """What the corpus depends on: Python, the packages read, this file."""
    return {
        "variant": variant,
        "format": _FORMAT,
        "builder": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16],
        "python": f"{sys.implementation.name} {sys.version}",
        "packages": {name: _package_version(name) for name in VARIANTS[variant]},
    }


def _package_version(name: str) -> str | None:
    if not _package_roots(name):
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    # An import name that is not its distribution's (PIL: pillow); this scan takes ~0.3 s.
    for dist in importlib.metadata.packages_distributions().get(name, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"  # on sys.path without metadata


@cache
def _load(variant: str) -> tuple[tuple[str, ...], dict]:
    fp = fingerprint(variant)
    key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"{variant.replace(':', '-')}-{key}.txt"
    cached = _read_cache(path, fp)
    if cached is not None:
        return cached
    log.info("building the %s corpus once (up to half a minute); cached at %s", variant, path)
    start = time.perf_counter()
    docs, sources = build(VARIANTS[variant])
    manifest = {"fingerprint": fp, "sources": sources,
                "n_docs": len(docs), "n_chars": sum(map(len, docs)),
                "build_seconds": round(time.perf_counter() - start, 1)}
    _write_cache(path, manifest, docs)
    return tuple(docs), manifest


# The cache file: the manifest as one line of JSON, then the documents separated by
# NUL (which no source file can hold). Splitting is ~20x faster than a JSON list.
_SEP = "\0"


def _read_cache(path: Path, fp: dict) -> tuple[tuple[str, ...], dict] | None:
    try:
        head, _, body = path.read_bytes().partition(b"\n")
        manifest = json.loads(head)
        # Split, then decode: one emoji would make the whole text 4 bytes a character.
        docs = tuple(d.decode("utf-8") for d in body.split(_SEP.encode()))
        # Counts catch a truncated or edited file; a mismatch means build again.
        if (manifest["fingerprint"] == fp and manifest["n_docs"] == len(docs)
                and manifest["n_chars"] == sum(map(len, docs))):
            return docs, manifest
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable
    return None


def _write_cache(path: Path, manifest: dict, docs: list[str]) -> None:
    """Atomically: written to a temporary file next to it, then renamed."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(json.dumps(manifest) + "\n" + _SEP.join(docs))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        warnings.warn(f"could not cache the builtin corpus in {path.parent} "
                      f"({e.strerror or e}); it will be built again next time.", stacklevel=2)
        return
    # Keep the newest few builds of this variant (other environments may share the
    # folder); each upgrade of a package or of saelab leaves one behind otherwise.
    stem = path.name.rsplit("-", 1)[0]
    others = [p for p in path.parent.glob(f"{stem}-*.txt")
              if p.name.rsplit("-", 1)[0] == stem and p != path]
    for old in sorted(others, key=_mtime, reverse=True)[_KEEP_BUILDS - 1:]:
        try:
            old.unlink()
        except OSError:
            pass  # gone already, or not ours to delete


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# ---------------------------------------------------------------- build


def build(packages: Iterable[str] = ()) -> tuple[list[str], list[dict]]:
    """(documents, per-source stats) from the topics, the standard library and then
    `packages` (import names), uncached. Deterministic for given sources."""
    from pydoc_data.topics import topics

    seen: set[bytes] = set()
    units: list[str] = []
    sources = []

    def add(source: str, version: str | None, new: Iterable[list[tuple[str, str]]]) -> None:
        n_before, chars = len(units), 0
        for sections in new:
            doc = _join(sections, seen)
            if len(doc) >= _MIN_CHARS:
                units.append(doc)
                chars += len(doc)
        sources.append({"source": source, "version": version,
                        "n_docs": len(units) - n_before, "n_chars": chars})

    add("pydoc_data.topics", sys.version.split()[0],
        ([(None, topics[k])] for k in sorted(topics)))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    add("stdlib", sys.version.split()[0], _tree_units(stdlib, "", _STDLIB_SKIP, 0.0))
    for name in packages:
        roots = _package_roots(name)
        if roots:
            add(name, _package_version(name),
                (u for root in roots
                 for u in _tree_units(root, name, _PACKAGE_SKIP, _MIN_DOC_SHARE)))
    docs, seen_docs = [], set()
    for doc in units:  # two modules can still add up to the same text
        norm = _norm(doc)
        if norm not in seen_docs and _SEP not in doc:
            seen_docs.add(norm)
            docs.append(doc)
    random.Random(_SHUFFLE_SEED).shuffle(docs)
    return docs, sources


def _package_roots(name: str) -> list[Path]:
    """The folders (or single file) of a top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return sorted(Path(p) for p in spec.submodule_search_locations)
    origin = Path(spec.origin or "")
    return [origin] if origin.suffix == ".py" else []


def _tree_units(root: Path, package: str, skip: frozenset[str],
                min_doc_share: float) -> Iterator[list]:
    """Units of every readable .py file below `root`, walked in sorted order."""
    if root.is_file():
        yield from _file_units(root, package, min_doc_share)
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith(".")
                             and not d.startswith("config-"))
        rel = Path(dirpath).relative_to(root).parts
        for fname in sorted(filenames):
            stem = fname[:-3]
            if not fname.endswith(".py") or stem in skip or stem.startswith(_SKIP_STEMS):
                continue
            parts = [package, *rel] if package else list(rel)
            module = ".".join([*parts, stem] if stem != "__init__" else parts)
            yield from _file_units(Path(dirpath, fname), module or package, min_doc_share)


def _file_units(path: Path, module: str, min_doc_share: float) -> list[list[tuple[str, str]]]:
    """[module unit, class units...]: each a list of (title, docstring) sections. The
    module unit holds its docstring and its public functions'; a class unit, its
    docstring and its public methods' (and dunders such as __init__, __call__)."""
    try:
        source = path.read_bytes()
    except OSError:
        return []
    if len(source) > _MAX_FILE_BYTES or not source:
        return []
    if min_doc_share > 0:
        quoted = sum(len(m) for m in _TRIPLE_QUOTED.findall(source))
        if quoted < min_doc_share * len(source):
            return []
    try:
        tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []  # written for another Python version, or not Python at all
    mod_sections = [(module, ast.get_docstring(tree, clean=False))]
    units = [mod_sections]
    for node in tree.body:
        if not _documented(node):
            continue
        if isinstance(node, ast.ClassDef):
            sections = [(f"{module}.{node.name}", ast.get_docstring(node, clean=False))]
            sections += [(f"{node.name}.{m.name}", ast.get_docstring(m, clean=False))
                         for m in node.body if _documented(m, in_class=True)
                         and not isinstance(m, ast.ClassDef)]
            units.append(sections)
        else:
            mod_sections.append((node.name, ast.get_docstring(node, clean=False)))
    return units


def _documented(node: ast.AST, in_class: bool = False) -> bool:
    if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        return False
    name = node.name
    dunder = name.startswith("__") and name.endswith("__")
    return not name.startswith("_") or (in_class and dunder)


# ---------------------------------------------------------------- cleaning


def _join(sections: list[tuple[str | None, str | None]], seen: set[bytes]) -> str:
    """The sections worth keeping, as 'title\\n\\ndocstring' blocks (the docstring
    alone for an untitled section). A docstring
    already in `seen` (copied between modules, as transformers does) is dropped."""
    parts = []
    for title, doc in sections:
        if not doc or " at 0x" in doc:  # memory addresses in doctest output
            continue
        doc = _clean(doc)
        if not doc or _mostly_code(doc):
            continue
        norm = _norm(doc)
        if norm in seen:
            continue
        seen.add(norm)
        parts.append(doc if title is None else f"{title}\n\n{doc}")
    return "\n\n".join(parts)


def _norm(text: str) -> bytes:
    return hashlib.sha256(" ".join(text.split()).encode()).digest()


def _clean(text: str) -> str:
    text = inspect.cleandoc(text)
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _mostly_code(doc: str) -> bool:
    """Doctest sessions read as code, not prose; drop sections made mostly of them."""
    lines = [s.lstrip() for s in doc.splitlines() if s.strip()]
    return sum(s.startswith((">>>", "...")) for s in lines) > 0.5 * len(lines)
