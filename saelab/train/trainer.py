"""The training loop: many SAEs from one activation stream, on one device, resumable.

A run folder holds `run.json` (config, data identity, device, dtype, kernel,
buffer, site groups, versions), `metrics.jsonl`, `ckpt/` while training, and
one SAE folder per trained SAE (native SAELens v6 layout).

Data comes from an activation cache (`data` a folder) or streams from a model
(`data` a `Stream`): see saelab/data/stream.py; both go through the same
shuffling buffer, so they give the same batches for the same tokens. The SAEs
are split into site groups that fit the memory budget; each group is one pass
over the same token stream. Objectives live on `device` and a step reads
nothing back; statistics are read every `cfg.log_every` steps.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from saelab.data.store import ActivationStore, atomic_write_text
from saelab.data.stream import BatchStream, CacheContexts, ModelContexts, source_sites
from saelab.errors import SaelabError, ShapeMismatchError
from saelab.precision import DTYPES, dtype_name, resolve_dtype
from saelab.train.checkpoint import (
    agreed_checkpoint,
    drop_previous,
    load_checkpoint,
    read_run_record,
    save_checkpoint,
)
from saelab.train.config import TrainConfig
from saelab.train.distributed import SINGLE, Dist
from saelab.train.kernels import choose_kernels
from saelab.train.objective import TOPK_FAMILY, SAEObjective


@dataclass(frozen=True)
class Stream:
    """Stream activations from a model instead of reading a cache."""

    lm: object  # saelab.models.load.LM
    corpus: str = "builtin"
    context: int = 128
    save_cache: Path | None = None
    """Also write the activations to this cache folder (harvest's layout)."""
    shard_tokens: int = 65_536
    """Tokens per shard of the saved cache (as harvest's)."""


@dataclass
class TrainResult:
    out: Path
    sae_dirs: dict[str, Path]  # label -> folder
    final: dict[str, dict]  # label -> last metrics
    tokens_per_second: float
    groups: list[list[str]] = field(default_factory=list)
    already_finished: bool = False


def versions() -> dict:
    import saelab

    return {"saelab": saelab.__version__, "torch": torch.__version__}


def resolve_device(device: str | torch.device) -> torch.device:
    """The training device; a clear error when CUDA is asked for and not usable."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available() or torch.cuda.device_count() <= (dev.index or 0):
            raise SaelabError(
                f"--device {device}: torch {torch.__version__} sees no usable CUDA GPU "
                f"(built for CUDA {torch.version.cuda or 'none'}, "
                f"{torch.cuda.device_count()} device(s) visible). Use --device cpu, or "
                "install a CUDA build of torch on a machine with a GPU.")
    elif dev.type not in ("cpu", "meta"):
        raise SaelabError(f"--device {device}: use cpu or cuda.")
    return dev


def default_memory_budget(device: torch.device) -> int:
    """Most (80%) of the device memory that is free now, or of the available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(0.8 * int(line.split()[1]) * 1024)
    except OSError:
        pass
    return 8 << 30


def plan_groups(cfg: TrainConfig, specs: list, widths: dict[str, int], budget: int,
                compute_dtype: torch.dtype, buffer_itemsize: int, local_batch: int
                ) -> list[list[int]]:
    """Split `specs` (indices kept) into groups whose bytes fit `budget`, in order.

    An objective costs SAEObjective.nbytes; a site's buffer costs twice its rows
    (the rows and their permuted copy), counted once per group that trains it.
    """
    groups: list[list[int]] = []
    used, sites = 0, set()
    for i, spec in enumerate(specs):
        cost = SAEObjective.nbytes(spec, widths[spec.site], local_batch, compute_dtype,
                                   d_out=widths[spec.target] if spec.target else None)
        row = sum(widths[s] for s in spec.sites)  # a transcoder's buffer rows join both sites
        buf = 2 * cfg.buffer_tokens * row * buffer_itemsize
        if cost + buf > budget:
            raise SaelabError(
                f"SAE {spec.label} needs {_gb(cost)} (weights, Adam state, scratch for a "
                f"batch of {local_batch}) plus {_gb(buf)} of buffer, more than the memory "
                f"budget of {_gb(budget)}. Raise --memory-budget, or lower --batch-size, "
                "--buffer-tokens or the width.")
        extra = cost + (0 if spec.key in sites else buf)
        if groups and used + extra <= budget:
            groups[-1].append(i)
            used += extra
            sites.add(spec.key)
        else:
            groups.append([i])
            used, sites = cost + buf, {spec.key}
    return groups


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def parse_bytes(text: str) -> int:
    """'2GB', '512MiB', '1.5G', '1000000' -> bytes (GB and GiB both 2**30: budgets are rough)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        if t and t[-1] in units:
            value = float(t[:-1]) * units[t[-1]]
        else:
            value = float(t)
    except ValueError:
        raise SaelabError(f"--memory-budget {text!r}: give bytes such as 2GB or 512MB.") from None
    if not value > 0 or not math.isfinite(value):
        raise SaelabError(f"--memory-budget {text!r}: must be positive.")
    return int(value)


def train(cfg: TrainConfig, data: str | Path | Stream, out: str | Path, *, resume: bool = False,
          on_progress: Callable[[int, int, dict], None] | None = None,
          dist: Dist = SINGLE, shard_sites: bool = False, cache_per_rank: bool = False,
          device: str | torch.device = "cpu", memory_budget: int | None = None
          ) -> TrainResult:
    """Train every SAE of `cfg` on `data` (a cache folder or a `Stream`), writing to `out`.

    Under torch.distributed (`dist`), data-parallel by default: ranks sharing a
    cache read disjoint shares of every global batch; streaming ranks (or
    `cache_per_rank`) read their own slice of the corpus. With `shard_sites`
    each rank trains its own subset of the SAEs on full batches. See
    distributed.py. Raises SaelabError for bad input (a missing site, a
    changed config on resume, an SAE larger than `memory_budget` bytes).
    """
    out = Path(out)
    dev = resolve_device(device)
    if cfg.deterministic:
        if dev.type == "cuda":  # cuBLAS needs this for deterministic matmuls
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    cdt = resolve_dtype(cfg.dtype, dev if dev.type != "meta" else "cpu")
    streaming = isinstance(data, Stream)
    corpus = None
    if streaming:  # loaded (and hashed) once for the run
        from saelab.data.corpus import load_corpus

        corpus = load_corpus(data.corpus)
    widths, identity, provenance, buffer_dtype = (
        _stream_identity(data, corpus, cfg) if streaming else _cache_identity(Path(data), cfg))
    for spec in cfg.saes:
        for site in spec.sites:
            if site not in widths:
                raise ShapeMismatchError(f"the data holds sites {list(widths)}; SAE {spec.label} "
                                         f"needs {site}. Harvest or stream that site.")
    sync = SINGLE if shard_sites else dist
    split = sync.active and not streaming and not cache_per_rank  # ranks share one cache
    local_batch = cfg.batch_size // sync.world_size
    mine = [s for i, s in enumerate(cfg.saes) if not shard_sites or i % dist.world_size == dist.rank]
    budget = memory_budget or default_memory_budget(dev)
    groups = plan_groups(cfg, mine, widths, budget, cdt, buffer_dtype.itemsize, local_batch)
    if resume:  # a resumed run keeps its groups, whatever memory is free now
        groups = _previous_groups(out, mine) or groups
    old_run = read_run_record(out / "run.json") if resume and (out / "run.json").is_file() else {}
    kernels = choose_kernels(cfg.kernel, mine, widths, dev, local_batch, old_run.get("kernel"))
    # through JSON once, so tuples become lists and compare equal to a re-read record
    run_record = {"config": json.loads(json.dumps(cfg.to_dict())),
                  "data": identity, "streaming": streaming,
                  "cache": None if streaming else str(data),
                  "save_cache": str(data.save_cache) if streaming and data.save_cache else None,
                  "device": str(dev), "compute_dtype": dtype_name(cdt),
                  "kernel": kernels,
                  "buffer": {"tokens_per_site": cfg.buffer_tokens,
                             "dtype": dtype_name(buffer_dtype), "device": str(dev),
                             "chunk_contexts": cfg.chunk_contexts},
                  "memory_budget": budget,
                  "site_groups": [[mine[i].label for i in g] for g in groups],
                  "versions": versions(), "world_size": dist.world_size,
                  "shard_sites": shard_sites}
    _check_resume(out, run_record, resume)
    dist.barrier()  # every rank checked run.json before rank 0 rewrites it
    writes = dist.is_main or shard_sites  # who saves SAEs and metrics
    # Ranks that read their own data (own SAEs, or their own slice of the corpus) each
    # checkpoint their own state; ranks sharing one cache hold identical state.
    own_ckpt = shard_sites or (dist.active and (streaming or cache_per_rank))
    saves_ckpt = writes or own_ckpt
    ckpt_dir = out / "ckpt" / (f"rank_{dist.rank}" if own_ckpt else "")
    # Data-parallel ranks with their own streams must resume at one step: a kill can land
    # between two ranks' saves, so each keeps its previous checkpoint until all saved.
    agree = own_ckpt and not shard_sites and dist.active
    ckpt = None
    if resume:
        ckpt = agreed_checkpoint(ckpt_dir, dist, cfg.steps, dev) if agree else load_checkpoint(ckpt_dir)
    info = ckpt[1] if ckpt else {}
    labels = [[mine[i].label for i in g] for g in groups]
    if info.get("finished"):
        return TrainResult(out, {lb: out / lb for g in labels for lb in g}, info.get("final", {}),
                           0.0, labels, already_finished=True)
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        atomic_write_text(out / "run.json", json.dumps(run_record, indent=1))
    first_group, start_step = info.get("group", 0), info.get("step", 0)
    final: dict[str, dict] = info.get("final", {})
    metrics_path = out / "metrics.jsonl"
    if writes:
        _truncate_metrics(metrics_path, first_group, start_step)

    steps, n_groups = cfg.steps, len(groups)
    total = n_groups * steps * cfg.batch_size
    sae_dirs: dict[str, Path] = {lb: out / lb for g in labels[:first_group] for lb in g}
    started, trained_steps = time.perf_counter(), 0
    g = first_group - 1
    while g + 1 < len(groups):  # a group split on out-of-memory adds one
        g += 1
        specs = [mine[i] for i in groups[g]]
        objectives = [SAEObjective(s, widths[s.site], cfg, cdt,
                                   _metadata(s, provenance, cfg), sync=sync, device=dev,
                                   d_out=widths[s.target] if s.target else None,
                                   kernel=kernels[s.label]["name"] if s.arch in TOPK_FAMILY
                                   else "torch")
                      for s in specs]
        sites = list(dict.fromkeys(s.key for s in specs))  # buffer keys (pairs for transcoders)
        stream = _open_stream(data, corpus, cfg, sites, dev, buffer_dtype, local_batch, split,
                              dist)
        begin = 0
        if ckpt is not None and g == first_group and start_step > 0:
            tensors = ckpt[0]
            for i, obj in enumerate(objectives):
                obj.load_state_tensors({k.split("/", 1)[1]: v for k, v in tensors.items()
                                        if k.startswith(f"{i}/")})
            stream.load(tensors, info["stream"])
            begin = start_step
        ckpt_every = max(1, cfg.checkpoint_every // cfg.batch_size) if cfg.checkpoint_every else 0
        last: dict[str, dict] = {}
        t0 = time.perf_counter()
        for step in range(begin, steps):
            batch = stream.next()  # on the device; a refill reads the model or the cache
            if stream.nonfinite_rows > cfg.nan_limit * cfg.batch_size:
                raise SaelabError(f"{stream.nonfinite_rows} activation rows with NaN/inf at "
                                  f"{sites}: the cache or the model is broken; check the "
                                  "harvest dtype.")
            for j, obj in enumerate(objectives):
                try:
                    obj.train_step(batch[obj.spec.key], steps)
                except torch.OutOfMemoryError:
                    # Split the group: the SAEs from this one on (or the second half, if
                    # it is the first) train again from scratch in a pass of their own,
                    # on the same batches, so the run ends with the same SAEs.
                    cut = j if j > 0 else len(objectives) // 2
                    if cut == 0:
                        raise SaelabError(
                            f"out of device memory training {obj.spec.label} alone (batch "
                            f"{local_batch}); lower --batch-size or --buffer-tokens, or free "
                            "device memory.") from None
                    moved = groups[g][cut:]
                    groups[g:g + 1] = [groups[g][:cut], moved]
                    labels = [[mine[i].label for i in grp] for grp in groups]
                    n_groups, total = len(groups), len(groups) * steps * cfg.batch_size
                    run_record["site_groups"] = labels
                    if dist.is_main:
                        atomic_write_text(out / "run.json", json.dumps(run_record, indent=1))
                    objectives = objectives[:cut]
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                    warnings.warn(f"out of device memory at step {step} of site group "
                                  f"{g + 1}: {', '.join(labels[g + 1])} will train in a "
                                  "pass of their own.", stacklevel=2)
                    for again in objectives[j:]:  # j == 0: the step is retried
                        again.train_step(batch[again.spec.key], steps)
                    break
            trained_steps += 1
            rate = (step + 1 - begin) * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
            if (step + 1) % cfg.log_every == 0 or step == steps - 1:
                last = {obj.spec.label: obj.read_stats() for obj in objectives}
                if writes:
                    with open(metrics_path, "a") as fh:
                        for label, stats in last.items():
                            fh.write(json.dumps({"step": step, "group": g,
                                                 "tokens": (step + 1) * cfg.batch_size,
                                                 "sae": label, "tokens_per_s": rate,
                                                 **stats}) + "\n")
            if on_progress:
                on_progress((g * steps + step + 1) * cfg.batch_size, total,
                            {"tokens/s": rate, "group": f"{g + 1}/{n_groups}", "saes": last})
            if saves_ckpt and ckpt_every and (step + 1) % ckpt_every == 0 and step + 1 < steps:
                _checkpoint(ckpt_dir, objectives, stream, g, step + 1, final, agree)
                if agree:
                    dist.barrier()  # every rank holds this step: the one before can go
                    drop_previous(ckpt_dir)
        if isinstance(stream.source, ModelContexts):
            stream.source.flush()
        final |= last
        if writes:
            from saelab.sae.formats import save_sae

            for obj in objectives:
                stats = last.get(obj.spec.label, {})
                # The corpus text the run read (the buffer reads ahead of what is trained):
                # evaluations start past it to stay on held-out text.
                sae = obj.export({"tokens_trained": steps * cfg.batch_size, "final": stats,
                                  "l0": stats.get("l0"),
                                  "corpus_contexts": stream.source.corpus_contexts()})
                sae_dirs[obj.spec.label] = save_sae(sae, out / obj.spec.label,
                                                    log_sparsity=obj.log_sparsity())
        if own_ckpt and not shard_sites:
            dist.barrier()  # rank 0 saved the SAEs before any rank marks the group done
        if saves_ckpt:  # the group is done: its SAEs are saved, the next pass starts at 0
            save_checkpoint(ckpt_dir, 0, {}, {"group": g + 1, "step": 0, "final": final,
                                              "finished": g + 1 == n_groups}, keep_previous=agree)
            if agree:
                dist.barrier()
                drop_previous(ckpt_dir)
        del objectives, stream
    dist.barrier()
    rate = trained_steps * cfg.batch_size / max(time.perf_counter() - started, 1e-9)
    return TrainResult(out, sae_dirs, final, rate, labels)


def _previous_groups(out: Path, mine: list) -> list[list[int]] | None:
    path = out / "run.json"
    if not path.is_file():
        return None
    old = read_run_record(path).get("site_groups")
    index = {s.label: i for i, s in enumerate(mine)}
    if not old or sorted(lb for g in old for lb in g) != sorted(index):
        return None
    return [[index[lb] for lb in g] for g in old]


def _cache_identity(folder: Path, cfg: TrainConfig):
    store = ActivationStore(folder, verify=False)
    ident = store.manifest.identity
    provenance = {k: ident.get(k) for k in ("model", "model_hash", "corpus", "corpus_hash",
                                            "context")}
    identity = {**provenance, "sites": ident.get("sites"), "store_dtype": ident.get("store_dtype"),
                "n_tokens": store.manifest.n_tokens, "n_contexts": store.manifest.n_contexts}
    stored = DTYPES.get(ident.get("store_dtype") or "float32", torch.float32)
    dtype = stored if cfg.buffer_dtype == "auto" else DTYPES[cfg.buffer_dtype]
    return dict(store.sites), identity, provenance, dtype


def _stream_identity(data: Stream, corpus, cfg: TrainConfig):
    from saelab.models.sites import Site, site_width

    lm = data.lm
    widths = {}
    for spec in cfg.saes:
        for site in spec.sites:
            widths[site] = site_width(lm.arch, Site.parse(site))
    prov = lm.provenance()
    provenance = {"model": prov["model"], "model_hash": prov["model_hash"], "corpus": corpus.name,
                  "corpus_hash": corpus.sha256, "context": data.context}
    identity = {**provenance, "sites": widths, "model_dtype": prov.get("dtype")}
    dtype = torch.bfloat16 if cfg.buffer_dtype == "auto" else DTYPES[cfg.buffer_dtype]
    return widths, identity, provenance, dtype


def _open_stream(data, corpus, cfg: TrainConfig, sites: list[str], dev: torch.device,
                 dtype: torch.dtype, local_batch: int, split: bool, dist: Dist) -> BatchStream:
    if isinstance(data, Stream):
        from saelab.models.sites import resolve_sites

        writer = None
        if data.save_cache is not None:
            from saelab.data.harvest import cache_identity
            from saelab.data.stream import open_cache_writer

            all_sites = resolve_sites(data.lm.arch,
                                      list(dict.fromkeys(x for s in cfg.saes for x in s.sites)))
            ident = cache_identity(data.lm, all_sites, corpus, data.context, dtype, dist.rank,
                                   dist.world_size)
            writer = open_cache_writer(data.save_cache, ident, cfg.tokens)
        source = ModelContexts(data.lm, source_sites(sites), corpus, data.context,
                               cfg.chunk_contexts, dtype, rank=dist.rank,
                               world_size=dist.world_size, writer=writer,
                               shard_contexts=max(1, data.shard_tokens // data.context))
        if writer is not None:  # the cache holds every site, so its chunks do too
            source.sites = [s.name for s in all_sites]
    else:
        source = CacheContexts(ActivationStore(data), source_sites(sites), cfg.chunk_contexts)
    batch = cfg.batch_size if split else local_batch
    return BatchStream(source, sites, batch=batch, capacity=max(cfg.buffer_tokens, 2 * batch),
                       seed=cfg.seed, device=dev, dtype=dtype, outlier_factor=cfg.outlier_factor,
                       take=(dist.rank, dist.world_size) if split else (0, 1))


def _metadata(spec, provenance: dict, cfg: TrainConfig) -> dict:
    from saelab.models.sites import Site

    out = {"site_out": spec.target, "hook_name_out": Site.parse(spec.target).tl_name
           } if spec.target else {}
    return out | {"model_name": provenance["model"], "model_hash": provenance["model_hash"],
            "site": spec.site, "hook_name": Site.parse(spec.site).tl_name,
            "corpus": provenance["corpus"], "corpus_hash": provenance["corpus_hash"],
            "context_size": provenance["context"], "seed": cfg.seed, "trained_by": "saelab",
            "train_config": {k: v for k, v in cfg.to_dict().items() if k != "saes"} | {
                "spec": spec.__dict__}, "versions": versions()}


def _checkpoint(folder: Path, objectives, stream: BatchStream, group: int, step: int,
                final: dict, keep_previous: bool = False) -> None:
    tensors = {f"{i}/{k}": v.detach().cpu() for i, obj in enumerate(objectives)
               for k, v in obj.state_tensors().items()}
    stream_tensors, stream_info = stream.state()
    save_checkpoint(folder, step, tensors | stream_tensors,
                    {"group": group, "stream": stream_info, "final": final},
                    keep_previous=keep_previous)



def _truncate_metrics(path: Path, group: int, step: int) -> None:
    """Drop rows logged after the checkpoint being resumed (they will be logged again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a row cut by the kill
        g = row.get("group", 0)
        if g < group or (g == group and row.get("step", 0) < step):
            keep.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))


def _check_resume(out: Path, record: dict, resume: bool) -> None:
    path = out / "run.json"
    if not path.is_file():
        if resume:
            raise SaelabError(f"nothing to resume in {out}: it has no run.json.")
        return
    old = read_run_record(path)
    if not resume:
        raise SaelabError(f"{out} already holds a training run. Resume it with --resume, "
                          "or choose another --out.")
    # a setting added since the old run was made had its default then
    was = {f.name: f.default for f in fields(TrainConfig)} | old["config"]
    diff = [f"{k}: was {was.get(k)!r}, now {record['config'].get(k)!r}"
            for k in record["config"] if was.get(k) != record["config"].get(k)]
    old_data, new_data = old.get("data") or {}, record["data"]
    diff += [f"data {k}: was {old_data.get(k)!r}, now {new_data.get(k)!r}"
             for k in sorted(set(old_data) | set(new_data)) if old_data.get(k) != new_data.get(k)]
    for key in ("streaming", "shard_sites", "world_size"):
        if old.get(key) != record.get(key):
            diff.append(f"{key}: was {old.get(key)!r}, now {record.get(key)!r}")
    if diff:
        raise SaelabError("cannot resume with a changed config or data:\n  " + "\n  ".join(diff)
                          + "\nResume with the original settings and data, or train into a "
                          "new folder.")


def fmt_stats(stats: dict) -> str:
    parts = []
    for k, v in stats.items():
        if isinstance(v, float) and math.isfinite(v):
            parts.append(f"{k} {v:,.0f}" if abs(v) >= 100 else f"{k} {v:.3g}")
    return "  ".join(parts)


def fmt_progress(info: dict) -> str:
    """The progress bar's line: tokens/s, the site group, L0/FVU/dead of each SAE."""
    head = f"{info.get('tokens/s', 0):,.0f} tok/s  group {info.get('group', '1/1')}"
    saes = [f"{label}: L0 {s.get('l0', 0):.1f} FVU {s.get('fvu', 0):.3f} "
            f"dead {s.get('dead', 0):.1%}" for label, s in info.get("saes", {}).items()]
    return "  ".join([head, *saes])
