"""An append-only JSON-lines file of keyed records: what lets a long study resume.

    log = RecordLog(out / "dataset.jsonl", key="index")
    todo = [p for p in prompts if p.index not in log]
    log.append([...])        # one flushed, fsynced write per batch

A run killed mid-write leaves at most one partial last line; opening the log
drops it (rewriting the file without it) so nothing complete is lost and the
next append starts on a clean line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any


class RecordLog:
    def __init__(self, path: str | os.PathLike, key: str | tuple[str, ...]):
        self.path = Path(path)
        self.key = key
        self.records: dict[Hashable, dict] = {}
        if self.path.is_file():
            self._load()

    def _key(self, record: dict) -> Hashable:
        return tuple(record[k] for k in self.key) if isinstance(self.key, tuple) else record[self.key]

    def _load(self) -> None:
        data = self.path.read_bytes()
        kept = []
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # the partial line of an interrupted write; everything before it is whole
            self.records[self._key(record)] = record
            kept.append(line)
        complete = b"".join(line + b"\n" for line in kept)
        if complete != data:
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_bytes(complete)
            os.replace(tmp, self.path)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: Hashable) -> dict | None:
        return self.records.get(key)

    def values(self) -> list[dict]:
        return list(self.records.values())

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        records = list(records)
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(b"".join(json.dumps(r).encode() + b"\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.records[self._key(r)] = r
