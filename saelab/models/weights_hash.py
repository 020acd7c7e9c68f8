"""The provenance hash of a model folder: sha256 of its config and of every weight byte.

A harvest records this hash and a resumed harvest compares it, so activations of
two different models never end up in one cache. Which bytes to hash, measured on
the embedded model's cached safetensors (517 MB, 1 file, in the page cache):

    full sha256 of the file            0.46-0.55 s
    safetensors header + file size     0.0001 s

The header and size are not enough: a fine-tuned checkpoint saved over the old
one has the same tensor names, shapes, dtypes and file size, which is exactly
the change this hash exists to catch. So every byte is hashed, and each file's
digest is remembered in $SAELAB_CACHE/weight_hashes.json under its path, size,
mtime, ctime and inode: loading the same model again costs a stat. The ctime
changes on any write and cannot be set back by a user-level tool, so a file
rewritten in place (even with its mtime restored) is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from saelab.atomic import file_sha256

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MEMO = "weight_hashes.json"


def _memo_path() -> Path:
    from saelab.models.load import cache_root

    return cache_root() / MEMO


def _read_memo(path: Path) -> dict:
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def weights_hash(folder: str | os.PathLike) -> str:
    """sha256 over config.json and every weight file (*.safetensors, *.bin, ...) in `folder`.

    Returns "" for a folder with neither. Symlinks are followed (a Hugging Face
    snapshot links its files to blobs). Files are read whole the first time
    (about 1 s per GB); later calls reuse the remembered digest of an unchanged file.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and
                   (p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES)))
    if not files:
        return ""
    memo_path = _memo_path()
    memo = _read_memo(memo_path)
    changed = False
    total = hashlib.sha256()
    for path in files:
        st = path.stat()
        key = str(path.resolve())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = memo.get(key)
        if not (isinstance(entry, dict) and entry.get("stat") == stamp):
            entry = {"stat": stamp, "sha256": file_sha256(path)}
            memo[key], changed = entry, True
        total.update(f"{path.name}\0{entry['sha256']}\n".encode())
    if changed:
        try:
            from saelab.atomic import atomic_write_text

            memo = {k: v for k, v in memo.items() if os.path.exists(k)}  # forget deleted files
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(memo_path, json.dumps(memo))
        except OSError:  # a read-only cache only costs the next load a re-hash
            pass
    return total.hexdigest()


def hub_weights_hash(repo_id: str) -> str:
    """weights_hash of the local snapshot transformers loaded `repo_id` from, or "" if none."""
    try:
        from transformers.utils import cached_file

        config = cached_file(repo_id, "config.json", local_files_only=True)
    except Exception:  # noqa: BLE001 -- no snapshot on disk: nothing to hash
        return ""
    return weights_hash(Path(config).parent) if config else ""
