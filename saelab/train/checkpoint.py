"""Atomic checkpoints: a kill -9 at any moment leaves the previous one usable.

`ckpt/step_000123.safetensors` holds every tensor (weights, Adam state, dead
counters); `ckpt/latest.json` names the newest complete file and is replaced
atomically only after that file is fully on disk. Older files are removed
after the pointer moves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from saelab.data.store import atomic_write_text
from saelab.errors import CorruptFileError

POINTER = "latest.json"


def save_checkpoint(folder: Path, step: int, tensors: dict[str, Tensor], info: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}.safetensors"
    tmp = folder / f".{name}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, folder / name)
    atomic_write_text(folder / POINTER, json.dumps({"file": name, "step": step, **info}))
    for old in folder.glob("step_*.safetensors"):
        if old.name != name:
            old.unlink()
    for tmp_left in folder.glob(".*.tmp"):
        tmp_left.unlink()
    return folder / name


def load_checkpoint(folder: Path) -> tuple[dict[str, Tensor], dict] | None:
    """The newest complete checkpoint, or None if there is none."""
    pointer = folder / POINTER
    if not pointer.is_file():
        return None
    info = json.loads(pointer.read_text())
    path = folder / info["file"]
    try:
        return load_file(str(path)), info
    except Exception as err:
        raise CorruptFileError(f"checkpoint {path} cannot be read ({err}); delete {folder} "
                               "to restart training from scratch.") from err
