"""`build_scope`: train, evaluate, lay out, index and report a scope, resumably.

    DIR/run.json           settings, stages done, their wall and CPU times (the resume record)
    DIR/train/             the training run (saelab/train/trainer.py: checkpoints, one SAE each)
    DIR/eval.json          every SAE's eval.json dict, {label: ...} (one evaluation pass)
    DIR/native/<label>/    each SAE, SAELens layout
    DIR/<kind>/layer_L/width_W/average_l0_N/params.npz   Gemma Scope's file (not top-k)
    DIR/features/<label>/  dashboards (saelab/features, one collection pass for all SAEs)
    DIR/scope.json, scope.parquet, report.html

Stages run in order: train, eval, layout, features, report; each one's outputs are
written atomically before it is marked done in run.json, so a killed run resumes
at the stage it was in (training itself resumes from its last checkpoint). A resume
with other settings is refused, listing each difference.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saelab.atomic import atomic_write_text, fault_point
from saelab.errors import SaelabError
from saelab.scope.layout import Scope, ScopeEntry, read_scope, scope_id, write_scope
from saelab.scope.plan import PlannedSAE, ScopeConfig, plan_saes

STAGES = ("train", "eval", "layout", "features", "report")
RUN = "run.json"
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class ScopeResult:
    out: Path
    scope: Scope
    stages: dict[str, float]
    already_finished: bool = False


def _record(out: Path) -> dict | None:
    p = out / RUN
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError:
        raise SaelabError(f"{p} cannot be parsed: the scope's resume record is damaged; "
                          "start again in a new --out.") from None


def check_resume(out: Path, settings: dict, resume: bool) -> dict:
    """The run record to continue (empty for a new scope); refuses a changed resume."""
    old = _record(out)
    if old is None:
        if resume:
            raise SaelabError(f"nothing to resume in {out}: it has no {RUN}. Drop --resume.")
        if out.exists() and any(out.iterdir()):
            raise SaelabError(f"{out} is not empty and holds no scope; choose a new --out.")
        return {"settings": settings, "stages": {}, "done": []}
    if not resume:
        raise SaelabError(f"{out} already holds a scope. Continue it with --resume, or choose "
                          "another --out.")
    was = old.get("settings", {})
    diff = [f"{k}: was {was.get(k)!r}, now {settings.get(k)!r}"
            for k in sorted(set(was) | set(settings)) if was.get(k) != settings.get(k)]
    if diff:
        raise SaelabError("cannot resume with other settings:\n  " + "\n  ".join(diff)
                          + "\nResume with the original settings, or build into a new --out.")
    return old


def _save_record(out: Path, record: dict) -> None:
    atomic_write_text(out / RUN, json.dumps(record, indent=1) + "\n")


def matmul_gflops(device: torch.device, dtypes=(torch.float32, torch.bfloat16)) -> dict[str, float]:
    """This machine's measured dense matmul rate (GFLOP/s) per dtype, [4096, 576] x [576, 2304]."""
    out = {}
    m, k, n = 4096, 576, 2304
    for dtype in dtypes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        a @ b
        best = float("inf")
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t)
        out[str(dtype).removeprefix("torch.")] = round(2 * m * k * n / best / 1e9, 1)
    return out


def build_scope(cfg: ScopeConfig, out: str | Path, *, device: str = "cpu",
                memory_budget: int | None = None, resume: bool = False,
                on_progress: Progress | None = None, lm: Any = None,
                fast_lm: Any = None) -> ScopeResult:
    """Build (or resume) the scope of `cfg` in `out`; see the module docstring.

    lm: the model in float32 (evaluation); fast_lm: the same model in cfg.model_dtype
    (training and dashboards), default `lm`. Both are loaded from cfg.model when lm is None.
    Raises SaelabError for bad input (a layer out of range, a site kind the family
    lacks, widths over the memory budget, a resume with other settings).
    """
    from saelab.models.limits import check_positions, lm_max_positions
    from saelab.train.trainer import plan_groups, resolve_device

    out = Path(out)
    dev = resolve_device(device)
    settings = cfg.to_json()
    record = check_resume(out, settings, resume)
    if lm is None:
        from saelab.models.load import load_model

        lm = load_model(cfg.model, dtype="float32", device=str(dev))
        fast_lm = load_fast_model(cfg, lm, str(dev))
    fast_lm = fast_lm if fast_lm is not None else lm
    check_positions("--context", cfg.context, lm_max_positions(lm), cfg.model)
    planned = plan_saes(cfg, lm.arch)
    tcfg = _train_config(cfg, planned)
    budget = memory_budget
    if budget is not None:  # before anything is written: say what the widths need
        from saelab.models.sites import site_width
        from saelab.precision import resolve_dtype

        widths = {s: site_width(lm.arch, s) for p in planned for s in p.spec.sites}
        plan_groups(tcfg, list(tcfg.saes), widths, budget, resolve_dtype(tcfg.dtype, dev),
                    2, tcfg.batch_size)
    if record["done"] == list(STAGES):
        return ScopeResult(out, read_scope(out), record["stages"], already_finished=True)
    out.mkdir(parents=True, exist_ok=True)
    if "machine" not in record:
        dtypes = (torch.float32, torch.bfloat16)
        record["machine"] = {"device": str(dev), "threads": torch.get_num_threads(),
                             "matmul_gflops": matmul_gflops(dev, dtypes)}
    _save_record(out, record)
    progress = on_progress or (lambda *_: None)
    if cfg.kind == "transcoder":
        from saelab.scope.transcoders import TranscoderContext as context_class
    else:
        context_class = _Context
    ctx = context_class(cfg, out, lm, fast_lm, planned, record, dev, budget, progress)
    for stage in STAGES:
        if stage in record["done"]:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        getattr(ctx, stage)()
        record["stages"][stage] = round(record["stages"].get(stage, 0.0)
                                        + time.perf_counter() - t0, 3)
        # CPU seconds of this process beside the wall time: on a shared machine the wall
        # time measures the other jobs too
        cpu = record.setdefault("cpu_seconds", {})
        cpu[stage] = round(cpu.get(stage, 0.0) + time.process_time() - c0, 3)
        record["done"].append(stage)
        _save_record(out, record)
        ctx.write_index()  # the index always tells the stages' times so far
        fault_point(f"scope-{stage}")
    return ScopeResult(out, read_scope(out), record["stages"])


def load_fast_model(cfg: ScopeConfig, lm: Any, device: str) -> Any:
    """The model in cfg.model_dtype for training and dashboards; `lm` when that is float32."""
    from saelab.models.load import load_model
    from saelab.precision import resolve_dtype

    if resolve_dtype(cfg.model_dtype, device) == torch.float32:
        return lm
    return load_model(cfg.model, dtype=cfg.model_dtype, device=device)


def _train_config(cfg: ScopeConfig, planned: list[PlannedSAE]):
    from saelab.train.config import TrainConfig

    return TrainConfig(saes=tuple(p.spec for p in planned), tokens=cfg.tokens,
                       batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, dtype=cfg.dtype,
                       checkpoint_every=cfg.checkpoint_every,
                       # a run shorter than the buffer shuffles all of its tokens at once
                       buffer_tokens=min(cfg.buffer_tokens, cfg.tokens),
                       log_every=max(1, min(50, cfg.tokens // cfg.batch_size // 4)))


class _Context:
    """The stages of one build, sharing the model, the plan and the run record.

    Transcoder scopes override eval, layout and the index hooks (saelab/scope/transcoders.py).
    """

    kind = "sae"

    def __init__(self, cfg: ScopeConfig, out: Path, lm: Any, fast_lm: Any,
                 planned: list[PlannedSAE], record: dict, device: torch.device,
                 budget: int | None, progress: Progress):
        self.cfg, self.out, self.lm, self.fast_lm, self.planned = cfg, out, lm, fast_lm, planned
        self.record, self.device, self.budget, self.progress = record, device, budget, progress

    # ------------------------------------------------------------------ stages
    def train(self) -> None:
        from saelab.train.trainer import Stream, train

        tcfg = _train_config(self.cfg, self.planned)
        folder = self.out / "train"
        result = train(tcfg, Stream(self.fast_lm, corpus=self.cfg.corpus, context=self.cfg.context),
                       folder, resume=(folder / "run.json").is_file(), device=self.device,
                       memory_budget=self.budget,
                       on_progress=lambda done, total, _info: self.progress("train", done, total))
        self.record["train"] = {"tokens_per_s": round(result.tokens_per_second, 1),
                                "site_groups": len(result.groups)}

    def _saes(self, where: str) -> dict[str, Any]:
        from saelab.sae import load_sae

        return {p.label: load_sae(self.out / where / p.label, dtype="float32").to(self.lm.device)
                for p in self.planned}

    def eval(self) -> None:
        from saelab.evals.run import EvalConfig
        from saelab.scope.eval import evaluate_scope

        ecfg = EvalConfig(tokens=self.cfg.eval_tokens, corpus=self.cfg.corpus,
                          context=self.cfg.context, bootstrap=self.cfg.bootstrap,
                          seed=self.cfg.seed)
        results = evaluate_scope(self.lm, self._saes("train"), ecfg,
                                 on_progress=lambda d, t: self.progress("eval", d, t))
        atomic_write_text(self.out / "eval.json", json.dumps(results, indent=1) + "\n")

    def layout(self) -> None:
        from saelab.sae.formats import save_sae

        ids = self._ids()
        for p in self.planned:
            sae = self._load(self.out / "train" / p.label)
            save_sae(sae, self.out / "native" / p.label)
            if sae.cfg.architecture != "topk":  # Gemma Scope's file holds JumpReLU SAEs only
                save_sae(sae, self.out / ids[p.label], format="gemma-scope")
            self.progress("layout", self.planned.index(p) + 1, len(self.planned))

    def features(self) -> None:
        from saelab.features.build import IndexConfig, build_index

        if not self.cfg.feature_tokens:
            return
        saes = {p.label: (self._load(self.out / "native" / p.label).to(self.fast_lm.device),
                          self.out / "native" / p.label) for p in self.planned}
        icfg = IndexConfig(tokens=self.cfg.feature_tokens, corpus=self.cfg.corpus,
                           context=self.cfg.context, ablate=self.cfg.ablate,
                           cards=min(128, max(16, self.cfg.ablate)))
        folder = self.out / "features"
        if folder.exists() and not (folder / "run.json").is_file():
            shutil.rmtree(folder)  # a killed pass: its collection is redone whole
        build_index(self.fast_lm, saes, folder, icfg,
                    on_stage=lambda name, d, t: self.progress("features", d, t))

    def report(self) -> None:
        from saelab.scope.report import write_report

        self.write_index()
        write_report(self.out, read_scope(self.out))

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _load(folder: Path):
        from saelab.sae import load_sae

        return load_sae(folder, dtype="float32")

    def _evals(self) -> dict[str, dict]:
        return json.loads((self.out / "eval.json").read_text())

    def _ids(self) -> dict[str, str]:
        """label -> Gemma Scope folder, by measured L0; two SAEs of one site and width whose
        L0s round alike get their target appended (`average_l0_32_target_64`)."""
        results, ids, seen = self._evals(), {}, set()
        for p in self.planned:
            sid = self._scope_id(p, results[p.label]["metrics"]["l0"]["value"])
            if sid in seen:
                sid = f"{sid}_target_{p.target_l0}"
            seen.add(sid)
            ids[p.label] = sid
        return ids

    @staticmethod
    def _scope_id(p: PlannedSAE, l0: float) -> str:
        return scope_id(p.site_kind, p.layer, p.width, l0)

    @staticmethod
    def _params(sid: str) -> str:
        """The Gemma Scope file of the SAE in folder `sid`, relative to DIR."""
        return f"{sid}/params.npz"

    @staticmethod
    def _index_metrics(result: dict) -> dict[str, float]:
        return index_metrics(result)

    def write_index(self) -> None:
        """scope.json + scope.parquet from what exists so far (entries once laid out)."""
        done = self.record["done"]
        entries = []
        if "layout" in done:
            results, ids = self._evals(), self._ids()
            for p in self.planned:
                r = results[p.label]
                l0 = r["metrics"]["l0"]["value"]
                sid = ids[p.label]
                params = self._params(sid)
                feats = f"features/{p.label}"
                entries.append(ScopeEntry(
                    id=sid, site=p.site, site_kind=p.site_kind, layer=p.layer, width=p.width,
                    arch=self.cfg.arch, target_l0=p.target_l0, average_l0=l0,
                    params=params if params and (self.out / params).is_file() else None,
                    native=f"native/{p.label}",
                    features=feats if (self.out / feats / "index.json").is_file() else None,
                    metrics=self._index_metrics(r)))
        arch = self.lm.arch
        scope = Scope(model=self.cfg.model, model_hash=self.lm.source_hash, d_model=arch.d_model,
                      n_layers=arch.n_layers, kind=self.kind, settings=self.record["settings"],
                      stages=dict(self.record["stages"]), machine=self.record["machine"],
                      entries=entries)
        write_scope(self.out, scope)


# the index's metric names and the eval.json names they come from
_INDEX_METRICS = {"l0": "l0", "fvu": "fvu", "delta_ce": "delta_ce",
                  "loss_recovered": "loss_recovered", "kl": "kl_sae"}


def index_metrics(result: dict) -> dict[str, float]:
    """An eval.json dict's numbers as the index holds them: value, `_lo` and `_hi` (95%)."""
    m = result["metrics"]
    out: dict[str, float] = {}
    for name, src in _INDEX_METRICS.items():
        item = m.get(src) or {}
        if item.get("value") is None:
            continue
        out[name] = float(item["value"])
        if item.get("ci95"):
            out[f"{name}_lo"], out[f"{name}_hi"] = (float(v) for v in item["ci95"])
    feats = result["features"]
    out["dead_frac"] = float(feats["dead_fraction"])
    out["dense_frac"] = float(feats["dense_fraction"])
    return out
