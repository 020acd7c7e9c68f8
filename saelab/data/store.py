"""The on-disk activation cache: shards plus a manifest with checksums.

Layout of a cache folder::

    manifest.json            what was harvested (model + hash, sites + widths, dtype,
                             context, corpus + hash) and the list of complete shards,
                             each with its token count and sha256
    shard_00000.safetensors  "ids" [n_ctx, context] int32 token ids,
                             "special" [n_ctx, context] bool (BOS/pad/chat markers),
                             one tensor per site "resid_post.12" [n_ctx, context, d]

A shard is written to a temporary name, fsynced and renamed; only then is the
manifest (also written atomically) told about it. So a crash, Ctrl-C or full
disk can leave at most a temporary (`.shard_00007.safetensors.tmp`,
`.manifest.json.tmp`) or the one shard renamed but not yet listed, which the
next run deletes, and every listed shard is complete. Nothing else is ever
deleted: a folder holding any other file, or shards without their manifest
(a cache whose manifest was lost), is refused. Shards are verified against
their sha256 before they are read, so a truncated or altered shard is named,
never used.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saelab.atomic import atomic_write_text, fault_point, file_sha256
from saelab.checks import integer
from saelab.data.outliers import norm_outliers
from saelab.errors import CorruptFileError, SaelabError, SiteError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHARD = re.compile(r"shard_(\d{5})\.safetensors")
# The only temporaries a writer leaves when killed: exactly these names, nothing broader.
TEMPORARY = re.compile(r"\.(shard_\d{5}\.safetensors|manifest\.json)\.tmp")

__all__ = ["ActivationStore", "Manifest", "ShardWriter", "atomic_write_text", "file_sha256"]


@dataclass
class Manifest:
    """What a cache holds. `identity` must match for a resume to continue it."""

    identity: dict  # model, model_hash, sites {name: width}, dtype, context, corpus, corpus_hash
    tokens_target: int
    shards: list[dict] = field(default_factory=list)  # {file, n_contexts, n_tokens, sha256}
    version: int = FORMAT_VERSION
    forward: dict | None = None  # how harvest forwarded: batch_contexts, batch_tokens, device

    @property
    def n_contexts(self) -> int:
        return sum(s["n_contexts"] for s in self.shards)

    @property
    def n_tokens(self) -> int:
        return sum(s["n_tokens"] for s in self.shards)

    @property
    def complete(self) -> bool:
        return self.n_tokens >= self.tokens_target

    @property
    def sites(self) -> dict[str, int]:
        return self.identity["sites"]

    def to_json(self) -> str:
        extra = {} if self.forward is None else {"forward": self.forward}
        return json.dumps({"version": self.version, "identity": self.identity,
                           "tokens_target": self.tokens_target, "n_tokens": self.n_tokens,
                           **extra, "shards": self.shards}, indent=1)

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise SaelabError(f"{folder} is not an activation cache: it has no {MANIFEST}. "
                              "Create one with `saelab harvest --out DIR`.")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptFileError(f"{path} is not valid JSON ({err}); it may be truncated. "
                                   "Delete the folder and harvest again.") from err
        return cls(**_check_manifest(raw, path))


def _check_manifest(raw, path: Path) -> dict:
    """The Manifest fields of a parsed manifest.json, every one type-checked (exit 3 naming
    the file and the field): valid JSON of the wrong shape must not reach the readers."""
    def bad(field: str, want: str, value) -> CorruptFileError:
        return CorruptFileError(f"{path}: {field} is {value!r:.60}, expected {want}. "
                                "Delete the folder and harvest again.")

    if not isinstance(raw, dict):
        raise bad("the top level", "a JSON object", raw)
    for key in ("identity", "tokens_target", "shards", "version"):
        if key not in raw:
            raise bad(key, "present", None)
    identity, shards = raw["identity"], raw["shards"]
    if not isinstance(identity, dict):
        raise bad("identity", "an object", identity)
    sites = identity.get("sites")
    if not isinstance(sites, dict) or not sites:
        raise bad("identity.sites", "an object of site: width", sites)
    for site, width in sites.items():
        integer(f"{path}: identity.sites.{site}", width, low=1, error=CorruptFileError)
    if "context" in identity:
        integer(f"{path}: identity.context", identity["context"], low=1, error=CorruptFileError)
    integer(f"{path}: tokens_target", raw["tokens_target"], low=0, error=CorruptFileError)
    integer(f"{path}: version", raw["version"], low=1, error=CorruptFileError)
    if not isinstance(shards, list):
        raise bad("shards", "a list", shards)
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise bad(f"shards[{i}]", "an object", shard)
        name = shard.get("file")
        # A plain shard name: a manifest must not point outside its folder.
        if not isinstance(name, str) or not re.fullmatch(r"shard_\d+\.safetensors", name):
            raise bad(f"shards[{i}].file", "a name like shard_00000.safetensors", name)
        for key in ("n_contexts", "n_tokens"):
            integer(f"{path}: shards[{i}].{key}", shard.get(key), low=0, error=CorruptFileError)
        if not isinstance(shard.get("sha256"), str):
            raise bad(f"shards[{i}].sha256", "a hex digest", shard.get("sha256"))
    forward = raw.get("forward")
    if forward is not None:
        if not isinstance(forward, dict):
            raise bad("forward", "an object", forward)
        if "batch_contexts" in forward:
            integer(f"{path}: forward.batch_contexts", forward["batch_contexts"], low=1,
                    error=CorruptFileError)
    return {"identity": identity, "tokens_target": raw["tokens_target"], "shards": shards,
            "version": raw["version"], "forward": forward}


def identity_diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: cached {old.get(k)!r}, asked {new.get(k)!r}" for k in keys
            if old.get(k) != new.get(k)]


def _refuse_foreign(folder: Path, manifest: Manifest | None) -> None:
    """A harvest writes only into an empty folder or a cache of its own; anything else is
    refused, never deleted (a user's files, or shards whose manifest was lost)."""
    ours = set() if manifest is None else {s["file"] for s in manifest.shards} | {
        MANIFEST, f"shard_{len(manifest.shards):05d}.safetensors"}
    names = sorted(p.name for p in folder.iterdir()
                   if p.name not in ours and not TEMPORARY.fullmatch(p.name))
    shards = [n for n in names if SHARD.fullmatch(n)]
    if manifest is None and shards and len(shards) == len(names):
        raise SaelabError(f"{folder} holds {len(shards)} activation shards but no {MANIFEST}: "
                          "the cache's manifest was lost, so its shards cannot be verified or "
                          "resumed, and they are left as they are. Pick an empty folder for "
                          "--out, or delete this one.")
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise SaelabError(f"{folder} holds files that are not part of "
                          + ("an activation cache" if manifest is None else "its cache's manifest")
                          + f" ({shown}); harvest writes only into an empty folder or its own "
                          "cache and deletes nothing else. Pick an empty folder for --out.")


class ShardWriter:
    """Appends complete shards to a cache folder, resuming what is there."""

    def __init__(self, folder: str | Path, identity: dict, tokens_target: int):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise SaelabError(f"{self.folder} is a file; give a folder for the cache (--out).")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest = None
        if (self.folder / MANIFEST).is_file():
            self.manifest = Manifest.read(self.folder)
            diff = identity_diff(self.manifest.identity, identity)
            if diff:
                raise SaelabError(
                    f"{self.folder} already holds a cache harvested differently:\n  "
                    + "\n  ".join(diff) + "\nUse another --out folder, or delete this one.")
        _refuse_foreign(self.folder, self.manifest)
        if self.manifest is None:
            self.manifest = Manifest(identity=identity, tokens_target=tokens_target)
        self.manifest.tokens_target = max(tokens_target, self.manifest.tokens_target)
        self._remove_leftovers()
        self._commit_manifest()

    def _remove_leftovers(self) -> None:
        """Delete what an interrupted write of ours left: temporaries, and the shard that was
        renamed into place just before a kill but never listed (it is written again)."""
        unlisted = f"shard_{len(self.manifest.shards):05d}.safetensors"
        for path in self.folder.iterdir():
            if TEMPORARY.fullmatch(path.name) or path.name == unlisted:
                path.unlink()

    def _commit_manifest(self) -> None:
        atomic_write_text(self.folder / MANIFEST, self.manifest.to_json())

    def record_forward(self, forward: dict) -> None:
        """Record how the harvest forwards (its batch), so a resumed run forwards the same."""
        if self.manifest.forward != forward:
            self.manifest.forward = forward
            self._commit_manifest()

    def append(self, ids: torch.Tensor, special: torch.Tensor, acts: dict[str, torch.Tensor]
               ) -> None:
        name = f"shard_{len(self.manifest.shards):05d}.safetensors"
        tensors = {"ids": ids.to(torch.int32).contiguous(), "special": special.contiguous()}
        tensors |= {site: a.contiguous() for site, a in acts.items()}
        tmp = self.folder / f".{name}.tmp"
        try:
            save_file(tensors, str(tmp))
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            digest = file_sha256(tmp)
            fault_point("shard-written")
            os.replace(tmp, self.folder / name)
        finally:
            tmp.unlink(missing_ok=True)  # a full disk leaves no half shard taking space
        fault_point("shard-renamed")
        n_tokens = int((~special).sum())
        self.manifest.shards.append({"file": name, "n_contexts": ids.shape[0],
                                     "n_tokens": n_tokens, "sha256": digest})
        self._commit_manifest()
        fault_point("manifest-written")


class ActivationStore:
    """Reads a cache: whole shards, or shuffled batches of one site's activations."""

    def __init__(self, folder: str | Path, verify: bool = True):
        self.folder = Path(folder)
        self.manifest = Manifest.read(self.folder)
        self.verify = verify
        self._verified: set[str] = set()
        self.outliers_dropped = 0

    @property
    def sites(self) -> dict[str, int]:
        return self.manifest.sites

    def _check_site(self, site: str) -> None:
        if site not in self.sites:
            raise SiteError(f"the cache {self.folder} holds sites {list(self.sites)}, not {site!r}.")

    def load_shard(self, i: int) -> dict[str, torch.Tensor]:
        entry = self.manifest.shards[i]
        path = self.folder / entry["file"]
        if not path.is_file():
            raise CorruptFileError(f"shard {path} listed in the manifest is missing. "
                                   "Run the same harvest command again to recreate the cache.")
        if self.verify and entry["file"] not in self._verified:
            if file_sha256(path) != entry["sha256"]:
                raise CorruptFileError(
                    f"shard {path} is corrupt or truncated (its sha256 does not match the "
                    "manifest); it was not read. Delete it and its manifest entry, or the "
                    "folder, and harvest again.")
            self._verified.add(entry["file"])
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises several types on bad headers
            raise CorruptFileError(f"shard {path} could not be read: {err}") from err

    def batches(self, site: str, batch_size: int, *, seed: int = 0, epochs: int = 1,
                drop_special: bool = True, outlier_factor: float = 0.0,
                dtype: torch.dtype = torch.float32,
                rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
        """Shuffled [batch_size, d] rows of `site`, special tokens left out.

        With `outlier_factor` > 0, attention-sink rows (norm above that many times
        the shard's median norm, see outliers.py) are left out too, and counted
        in `self.outliers_dropped`.

        Shards come in a seeded random order and the rows of two consecutive
        shards are mixed, so a batch holds tokens from different documents and
        positions. With `world_size` > 1 each rank reads a disjoint share of
        every batch-sized chunk, so ranks see different data of equal size.
        """
        self._check_site(site)
        gen = torch.Generator().manual_seed(seed)
        buffer = torch.empty(0, self.sites[site], dtype=dtype)
        step = batch_size * world_size
        for _ in range(epochs):
            for i in torch.randperm(len(self.manifest.shards), generator=gen).tolist():
                shard = self.load_shard(i)
                rows = shard[site].reshape(-1, self.sites[site]).to(dtype)
                if drop_special:
                    rows = rows[~shard["special"].reshape(-1)]
                if outlier_factor > 0:
                    sinks = norm_outliers(rows, factor=outlier_factor)
                    self.outliers_dropped += int(sinks.sum())
                    rows = rows[~sinks]
                buffer = torch.cat([buffer, rows])
                buffer = buffer[torch.randperm(len(buffer), generator=gen)]
                # keep up to one shard's rows back so the next shard mixes with them
                while len(buffer) >= step + len(rows):
                    chunk, buffer = buffer[:step], buffer[step:]
                    yield chunk[rank * batch_size:(rank + 1) * batch_size]
        while len(buffer) >= step:
            chunk, buffer = buffer[:step], buffer[step:]
            yield chunk[rank * batch_size:(rank + 1) * batch_size]

    def tokens(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(ids, special) of every shard in order, for dashboards."""
        for i in range(len(self.manifest.shards)):
            shard = self.load_shard(i)
            yield shard["ids"], shard["special"]
