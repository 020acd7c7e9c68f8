"""Atomic checkpoints: a kill -9 at any moment leaves the previous one usable.

`ckpt/step_000123.safetensors` holds every tensor (weights, Adam state, dead
counters); `ckpt/latest.json` names the newest complete file and is replaced
atomically only after that file is fully on disk. Older files are removed
after the pointer moves.

Data-parallel ranks that stream their own data each keep their own folder, and a
kill can land between two ranks' saves. So there a rank keeps the checkpoint
before its newest (`previous.json`) until every rank has saved the newest
(`drop_previous` after a barrier), and a resume takes the newest step that every
rank holds (`load_checkpoint(..., which="previous")` on the ranks that are ahead).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from saelab.atomic import fault_point
from saelab.checks import integer
from saelab.data.store import atomic_write_text
from saelab.errors import CorruptFileError

POINTER = "latest.json"
PREVIOUS = "previous.json"


def save_checkpoint(folder: Path, step: int, tensors: dict[str, Tensor], info: dict, *,
                    keep_previous: bool = False) -> Path:
    """Write `tensors` as the newest checkpoint of `folder`; `info` goes into its pointer.

    With `keep_previous`, the checkpoint it replaces stays loadable (previous.json)
    until `drop_previous`.
    """
    fault_point("checkpoint-save")
    folder.mkdir(parents=True, exist_ok=True)
    # The group is in the name: each group's closing checkpoint is at step 0.
    name = f"step_{int(info.get('group', 0)):03d}_{step:08d}.safetensors"
    tmp = folder / f".{name}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, folder / name)
    if keep_previous and (folder / POINTER).is_file():
        os.replace(folder / POINTER, folder / PREVIOUS)
    atomic_write_text(folder / POINTER, json.dumps({"file": name, "step": step, **info}))
    _remove_unnamed(folder)
    return folder / name


def drop_previous(folder: Path) -> None:
    """Forget the checkpoint kept by `save_checkpoint(keep_previous=True)`."""
    (folder / PREVIOUS).unlink(missing_ok=True)
    _remove_unnamed(folder)


def _remove_unnamed(folder: Path) -> None:
    """Delete step files no pointer names, and temporaries a killed save left."""
    named = set()
    for pointer in (POINTER, PREVIOUS):
        try:
            named.add(json.loads((folder / pointer).read_text()).get("file"))
        except (OSError, ValueError, AttributeError):
            pass
    for old in folder.glob("step_*.safetensors"):
        if old.name not in named:
            old.unlink()
    for tmp_left in folder.glob(".*.tmp"):
        tmp_left.unlink()


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON object from `path`, or CorruptFileError (exit 3) naming the file and `fix`.

    For run.json and latest.json: a truncated or hand-edited file must give one line.
    """
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is not valid JSON ({err}); it may be truncated: "
                               f"{fix}.") from None
    if not isinstance(raw, dict):
        raise CorruptFileError(f"{path} holds a JSON {type(raw).__name__}, expected an "
                               f"object: {fix}.")
    return raw


def read_run_record(path: Path) -> dict:
    """A training run's run.json, checked as far as a resume reads it (config: an object)."""
    fix = f"move {path.parent} aside and train into a new folder"
    raw = read_json_object(path, fix)
    if not isinstance(raw.get("config"), dict):
        raise CorruptFileError(f"{path}: config is {raw.get('config')!r:.60}, expected an "
                               f"object: {fix}.")
    return raw


def load_checkpoint(folder: Path, which: str = "latest") -> tuple[dict[str, Tensor], dict] | None:
    """The newest complete checkpoint (or, with which="previous", the one kept before it),
    or None if there is none."""
    pointer = folder / (POINTER if which == "latest" else PREVIOUS)
    if not pointer.is_file():
        return None
    info = read_json_object(pointer, f"delete {folder} to restart training from scratch")
    name, step = info.get("file"), info.get("step")
    # A plain step file name: the pointer must not lead outside its folder.
    if not isinstance(name, str) or not re.fullmatch(r"step_\d+(?:_\d+)?\.safetensors", name):
        raise CorruptFileError(f"{pointer}: file is {name!r}, expected a name like "
                               f"step_001_00000123.safetensors; delete {folder} to restart training.")
    integer(f"{pointer}: step", step, low=0, error=CorruptFileError)
    path = folder / name
    try:
        return load_file(str(path)), info
    except Exception as err:
        raise CorruptFileError(f"checkpoint {path} cannot be read ({err}); delete {folder} "
                               "to restart training from scratch.") from err


def agreed_checkpoint(folder: Path, dist, steps: int, device) -> tuple[dict[str, Tensor], dict] | None:
    """The newest checkpoint that every data-parallel rank holds (see the module doc).

    dist: a `saelab.train.distributed.Dist`; steps: optimizer steps per site group (a
    checkpoint's position is its group and step). Raises CorruptFileError when this rank
    no longer holds the step the ranks agree on.
    """
    def position(ckpt) -> int:  # runs through groups: group g's step s, then g + 1's 0
        return -1 if ckpt is None else int(ckpt[1].get("group", 0)) * (steps + 1) + int(ckpt[1]["step"])

    ckpt = load_checkpoint(folder)
    mine = position(ckpt)
    agreed = int(dist.min_(torch.tensor([mine], dtype=torch.int64, device=device)).item())
    if mine != agreed:
        ckpt = load_checkpoint(folder, "previous") if agreed >= 0 else None
        if position(ckpt) != agreed:
            raise CorruptFileError(
                f"the ranks' checkpoints under {folder.parent} disagree: this rank's newest is "
                f"at position {mine}, another rank's at {agreed}, which this rank no longer "
                f"holds; delete {folder.parent} to restart training from scratch.")
    return ckpt
