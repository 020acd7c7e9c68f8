"""Writes that a kill -9, Ctrl-C or a full disk cannot leave half done.

- `atomic_write_text`: one file, written to `.NAME.tmp`, fsynced, renamed.
- `write_folder`: a set of files that form one result (an SAE folder, a feature
  index) is written into a fresh sibling folder `.NAME.new-XXXX` and switched in
  with one rename, so a reader sees the old set or the new one, never a mixture.
  Files in the old folder that are not part of the set (a user's notes, a
  `features/` index inside an SAE folder) are moved into the new one, never
  deleted. Leftovers of a killed switch are recognised by that exact name
  pattern and finished or removed by the next write.
- `disk_full`: an OSError(ENOSPC) -- or safetensors' SafetensorError and
  pyarrow's OSError, which carry the message but not the errno -- becomes one
  line, "disk full at PATH", exit 2.
- `fault_point`: a test hook. `SAELAB_FAULT=NAME:N` makes the process die with
  os._exit(137) (as kill -9 would: no finally, no flush) the N-th time it
  reaches the write point NAME. The fault-injection tests use it.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from saelab.errors import SaelabError

FAULT_ENV = "SAELAB_FAULT"
_hits: collections.Counter[str] = collections.Counter()


def fault_point(name: str) -> None:
    """Die here like kill -9 when SAELAB_FAULT names this point (tests only).

    `point:N` dies at the Nth hit; `point:N@R` only in the torch.distributed rank R.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    spec, _, rank = spec.partition("@")
    point, _, nth = spec.partition(":")
    if point != name or (rank and os.environ.get("RANK", "0") != rank):
        return
    _hits[name] += 1
    if _hits[name] == int(nth or 1):
        os._exit(137)


# ---------------------------------------------------------------- disk full


class DiskFullError(SaelabError):
    """The disk filled up while writing; what was complete before is kept."""


_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # safetensors raises SafetensorError("... No space left on device (os error 28)") and
    # pyarrow an OSError without errno: the message is all they give us.
    return any(text in str(err) for text in _FULL_TEXT)


@contextlib.contextmanager
def disk_full(path: str | os.PathLike, kept: str = "nothing was changed") -> Iterator[None]:
    """Turn a full disk inside the block into DiskFullError naming `path`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if is_disk_full(err):
            raise DiskFullError(f"disk full at {path}: {kept}; free space and rerun the same "
                                "command.") from None
        raise


# ---------------------------------------------------------------- one file


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all (temporary `.NAME.tmp`, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- a set of files


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _temporaries(target: Path, kind: str) -> list[Path]:
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{kind}-[A-Za-z0-9_]{{8}}")
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir())


def _own_temporary(owned: set[str]) -> re.Pattern[str]:
    """Names of temporaries our writers make for the set's files: `.NAME.tmp`
    (atomic_write_text and the like) and `.NAME.XXXXXXXX.tmp` (tempfile.mkstemp)."""
    names = "|".join(re.escape(n) for n in sorted(owned)) or "(?!)"
    return re.compile(rf"\.(?:{names})(?:\.[a-z0-9_]{{8}})?\.tmp")


def _carry(src: Path, dst: Path, owned: set[str]) -> None:
    """Move entries of `src` that are not part of the set into `dst` (never overwriting);
    the set's own files and our temporaries of them stay behind, to be deleted."""
    ours = _own_temporary(owned)
    for entry in sorted(src.iterdir()):
        if entry.name in owned or ours.fullmatch(entry.name):
            continue
        if not (dst / entry.name).exists():
            os.rename(entry, dst / entry.name)


def recover_folder(target: str | os.PathLike, owned: Iterable[str]) -> None:
    """Finish or undo a `write_folder` that was killed: the result at `target` is then
    the old set or the new one, every foreign file is back in it, no temporary is left.
    """
    target, owned = Path(target), set(owned)
    olds = _temporaries(target, "old")
    if olds and not target.exists():  # killed between the two renames of the fallback switch
        os.rename(olds.pop(), target)
    for tmp in olds + _temporaries(target, "new"):
        if target.is_dir():
            _carry(tmp, target, owned)
        shutil.rmtree(tmp)


def write_folder(target: str | os.PathLike, owned: Iterable[str],
                 write: Callable[[Path], None]) -> Path:
    """Write a set of files as one result at folder `target`.

    `write(tmp)` fills a fresh folder beside `target` with the set; `owned`
    names every file the set may hold (the new set replaces all of them, so
    an old `sparsity.safetensors` does not outlive a new set without one).
    Then the new folder replaces `target` in one rename, and entries of the
    old folder outside `owned` are moved into it. Returns `target`.
    Raises whatever `write` raises; the old result is then untouched. One writer
    per `target` at a time (the next one finishes or removes a killed one's leftovers).
    """
    target, owned = Path(target), set(owned)
    if target.is_symlink():  # switch the folder the link points to; the link stays a link
        target = target.resolve()
    if target.exists() and not target.is_dir():
        raise SaelabError(f"{target} is a file; give a folder path for the output.")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(target, owned)
    new = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    try:
        write(new)
        stray = sorted(p.name for p in new.iterdir() if p.name not in owned)
        if stray:  # a writer bug: these would be lost beside the old folder's files of that name
            raise RuntimeError(f"write_folder({target}): {stray} written but not in owned")
        _fsync_tree(new)
        fault_point("folder-written")
        if not target.exists():
            os.rename(new, target)
        elif _exchange(new, target):  # `new` now holds the old set
            fault_point("folder-switched")
            _carry(new, target, owned)
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rmdir(old)
            os.rename(target, old)
            fault_point("folder-switched")
            os.rename(new, target)
            _carry(old, target, owned)
            shutil.rmtree(old)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(new, ignore_errors=True)
    return target


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
