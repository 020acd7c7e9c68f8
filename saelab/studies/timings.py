"""Per-stage seconds of a resumable study that survive its reruns.

    clock = StageClock(out / "timings.json")
    with clock.stage("dataset", out / "dataset.jsonl"):
        sample_dataset(...)
    run["seconds"] = clock.seconds

A stage's time is what computing its saved output took, summed over the runs
that computed some of it. A rerun that finds a stage's output complete (its
files unchanged by the stage) keeps the time recorded when it was computed, so
re-running a finished study reports the original run's times, not the seconds
the resume took. Stages with no files of their own (loading the model, the
results) keep their recorded time unless an earlier stage of this run did work.
The times are written after every stage, so an interrupted run's are kept too.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from saelab.data.store import atomic_write_text


def _signature(paths: tuple[Path, ...]) -> tuple:
    """(path, size, mtime) of every file at or under `paths`: changes when a stage writes."""
    entries = []
    for root in paths:
        if root.is_file():
            entries.append((str(root), root.stat().st_size, root.stat().st_mtime_ns))
        elif root.is_dir():
            for dirpath, _, files in os.walk(root):
                for name in files:
                    p = Path(dirpath) / name
                    st = p.stat()
                    entries.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


class StageClock:
    """Seconds per stage, kept across reruns in `path` (JSON {stage: seconds})."""

    def __init__(self, path: Path, previous: dict[str, float] | None = None):
        self.path = Path(path)
        saved = previous or {}
        if self.path.is_file():
            try:
                saved = {k: float(v) for k, v in json.loads(self.path.read_text()).items()}
            except (ValueError, TypeError, AttributeError):
                saved = previous or {}  # a damaged file costs only the old times
        self.saved: dict[str, float] = saved
        self.seconds: dict[str, float] = {}
        self.this_run: dict[str, float] = {}
        self.worked = False  # did any stage of this run compute something?

    @contextmanager
    def stage(self, name: str, *outputs: Path) -> Iterator[None]:
        """Time the block as stage `name`, whose saved output lives at `outputs` (none: the
        stage is redone each run and keeps its recorded time when no stage before it worked)."""
        before = _signature(outputs) if outputs else None
        start = time.perf_counter()
        yield
        took = time.perf_counter() - start
        self.this_run[name] = took
        if outputs:
            changed = _signature(outputs) != before
            self.worked |= changed
        else:
            changed = self.worked
        if name not in self.saved:
            self.seconds[name] = took
        elif changed and outputs:
            self.seconds[name] = self.saved[name] + took  # finished what an earlier run began
        elif changed:
            self.seconds[name] = took  # recomputed from new inputs
        else:
            self.seconds[name] = self.saved[name]
        atomic_write_text(self.path, json.dumps({**self.saved, **self.seconds}, indent=1) + "\n")
