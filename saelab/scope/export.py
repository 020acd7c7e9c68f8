"""A scope in Neuronpedia's export layout, and the per-feature files of circuit-tracer's viewer.

    result = export_neuronpedia("runs/scope", "runs/np", ExportConfig(creator_name="me"))

Writes, under OUT (field names as Neuronpedia's converter, utils/neuronpedia-utils
db_models, and its Prisma schema spell them; one JSON record per line)::

    OUT/<modelId>/<sourceId>/release.jsonl       SourceRelease
                            model.jsonl         Model
                            sourceset.jsonl     SourceSet   (one per site kind and width)
                            source.jsonl        Source      (one per SAE; saelensConfig = cfg.json)
                            evals.jsonl         Eval        (the scope's metrics of this SAE)
                            features/batch-<i>.jsonl.gz      Feature     (`batch_size` per batch)
                            activations/batch-<i>.jsonl.gz   Activation  (those features' examples)
                            explanations/batch-<i>.jsonl.gz  Explanation (their labels, if any)
    OUT/config/eval_type.jsonl                  EvalType of the metrics record
    OUT/circuit-tracer/features/<scan>/<id>.json   one file per feature that fired, as the
                            graph viewer's feature panel reads it; <scan> is one site kind,
                            width and target L0 across layers, <id> = cantor(layer, feature)

The source id is Neuronpedia's "<layer>-<source set>__l0-<N>" (N the measured mean L0,
as in the Gemma Scope folder). An SAE without a feature index is exported without
dashboards (hasDashboards false, no batches); a missing or corrupt SAE is skipped and
listed in the result. The whole export is written into a sibling folder and renamed
into place, so OUT is never half-written.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from saelab.errors import SaelabError
from saelab.scope.layout import ScopeEntry, read_scope, width_label

KIND_SHORT = {"resid_post": "res", "resid_pre": "res-pre", "resid_mid": "res-mid",
              "attn_out": "att", "mlp_out": "mlp"}  # Gemma Scope's names on Neuronpedia
EVAL_TYPE = "saelab-scope-metrics"


@dataclass(frozen=True)
class ExportConfig:
    """Who and what the export names (Neuronpedia's release, model and creator fields)."""

    creator_name: str = "saelab"
    creator_id: str = "saelab"  # Neuronpedia's DEFAULT_CREATOR_ID of the importing instance
    model_id: str | None = None  # default: the scope's model, as a slug
    release_id: str | None = None  # default: "saelab-<modelId>"
    release_title: str | None = None
    url: str | None = None
    batch_size: int = 128  # features per batch file
    circuit_tracer: bool = True
    created_at: str | None = None  # ISO time of every record; default: now (UTC)

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SaelabError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        for name in ("model_id", "release_id"):
            v = getattr(self, name)
            if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
                raise SaelabError(f"--{name.replace('_', '-')} {v!r} must be letters, digits, "
                                  "dots, dashes and underscores (it names a folder and a URL)")


@dataclass
class ExportResult:
    """What was written: source ids by SAE id, counts, and the SAEs skipped (with why)."""

    out: Path
    model_id: str
    sources: dict[str, str] = field(default_factory=dict)
    features: int = 0
    activations: int = 0
    explanations: int = 0
    circuit_tracer_files: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def slug(text: str) -> str:
    """A folder- and URL-safe id from a model name or path: "runs/SmolLM2 135M" -> "smollm2-135m"."""
    name = Path(text.rstrip("/")).name or text
    return re.sub(r"[^a-z0-9._]+", "-", name.lower()).strip("-") or "model"


def source_set_name(e: ScopeEntry) -> str:
    return f"saelab-{KIND_SHORT.get(e.site_kind, e.site_kind.replace('_', '-'))}-{width_label(e.width)}"


def source_id(e: ScopeEntry) -> str:
    return f"{e.layer}-{source_set_name(e)}__l0-{round(e.average_l0)}"


def scan_name(model_id: str, e: ScopeEntry) -> str:
    """One site kind, width and target L0 across layers (the measured L0 when none was set)."""
    target = e.target_l0 if e.target_l0 is not None else round(e.average_l0)
    return f"{model_id}-{source_set_name(e)}__target-l0-{_num_label(target)}"


def cantor(layer: int, feature: int) -> int:
    """circuit-tracer's feature id: the Cantor pairing of (layer, feature index)."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def export_neuronpedia(scope_dir: str | os.PathLike, out: str | os.PathLike,
                       config: ExportConfig = ExportConfig(), *, overwrite: bool = False) -> ExportResult:
    """Export the scope at `scope_dir` into `out` (see the module docstring for the layout).

    Raises SaelabError when `out` exists and is not empty (unless `overwrite`), or when
    the scope cannot be read (CorruptFileError for a damaged scope.json).
    """
    scope_dir, out = Path(scope_dir), Path(out)
    scope = read_scope(scope_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SaelabError(f"{out} exists and is not empty; give a new folder, or --overwrite "
                          "to replace it")
    model_id = config.model_id or slug(scope.model)
    now = config.created_at or datetime.now(UTC).isoformat()
    result = ExportResult(out, model_id)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        writer = _Writer(scope_dir, staging, scope, model_id, config, now, result)
        for e in scope.entries:
            if e.status != "ok":
                result.skipped[e.id] = f"its SAE folder {e.native} is {e.status}"
                continue
            writer.source(e)
        _write_lines(staging / "config" / "eval_type.jsonl", [_eval_type()])
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


class _Writer:
    def __init__(self, scope_dir: Path, out: Path, scope: Any, model_id: str, config: ExportConfig,
                 now: str, result: ExportResult):
        self.dir, self.out, self.scope, self.model_id = scope_dir, out, scope, model_id
        self.config, self.now, self.result = config, now, result
        self.release = config.release_id or f"saelab-{model_id}"

    def source(self, e: ScopeEntry) -> None:
        from saelab.features.index import FeatureIndex, NotAnIndexError

        sid = source_id(e)
        if sid in self.result.sources.values():  # two target L0s that measured the same mean L0
            sid = f"{sid}-target-{_num_label(e.target_l0 if e.target_l0 is not None else 0)}"
        if sid in self.result.sources.values():
            sid = f"{sid}-{len(self.result.sources)}"
        folder = self.out / self.model_id / sid
        index = None
        if e.features is not None and (self.dir / e.features / "index.json").is_file():
            try:
                index = FeatureIndex.open(self.dir / e.features)
            except NotAnIndexError as err:
                self.result.skipped[e.id] = (f"its feature index {e.features} is damaged ({err}); "
                                             "exported without dashboards")
        meta = index.meta if index is not None else {}
        coll = meta.get("collection", {})
        context = coll.get("context")
        _write_lines(folder / "release.jsonl", [self._release()])
        _write_lines(folder / "model.jsonl", [self._model()])
        _write_lines(folder / "sourceset.jsonl", [self._source_set(e)])
        _write_lines(folder / "source.jsonl", [{
            "id": sid, "modelId": self.model_id, "setName": source_set_name(e),
            "creatorId": self.config.creator_id, "hasDashboards": index is not None,
            "inferenceEnabled": False, "inferenceHosts": [],
            "saelensConfig": _read_json(self.dir / e.native / "cfg.json"),
            "saelensRelease": None, "saelensSaeId": e.id, "hfRepoId": None, "hfFolderId": e.id,
            "visibility": "PUBLIC", "defaultOfModelId": None, "hasUmap": False,
            "hasUmapLogSparsity": False, "hasUmapClusters": False,
            "num_prompts": (meta["tokens"] // context) if index is not None and context else None,
            "num_tokens_in_prompt": context, "dataset": coll.get("corpus"),
            "notes": f"saelab scope SAE {e.id} ({e.arch}, site {e.site})", "createdAt": self.now}])
        _write_lines(folder / "evals.jsonl", [{
            "id": f"{self.model_id}-{sid}-{EVAL_TYPE}", "typeName": EVAL_TYPE,
            "modelId": self.model_id, "sourceId": sid, "output": _finite(e.metrics),
            "detailedMetrics": {"site": e.site, "arch": e.arch, "width": e.width,
                                "target_l0": e.target_l0, "average_l0": e.average_l0,
                                "saelab_id": e.id},
            "createdAt": self.now, "updatedAt": self.now}])
        self.result.sources[e.id] = sid
        if index is not None:
            self._dashboards(e, sid, folder, index)

    def _dashboards(self, e: ScopeEntry, sid: str, folder: Path, index: Any) -> None:
        import pyarrow.parquet as pq

        feats = index.features.to_pylist()
        examples: dict[int, list[dict]] = {}
        for ex in pq.read_table(index.folder / "examples.parquet").to_pylist():
            examples.setdefault(ex["feature"], []).append(ex)
        n_bins = index.meta["collection"]["config"]["n_bins"]
        dataset = index.meta["collection"].get("corpus")
        scan = scan_name(self.model_id, e)
        size = self.config.batch_size
        for b in range(0, len(feats), size):
            rows, acts, expl = [], [], []
            for row in feats[b:b + size]:
                f = row["feature"]
                rows.append(self._feature(e, sid, row))
                acts += [self._activation(sid, row, ex, n_bins, dataset) for ex in examples.get(f, [])]
                if row.get("label"):
                    expl.append({"id": f"{sid}-{f}-label", "modelId": self.model_id, "layer": sid,
                                 "index": str(f), "description": row["label"],
                                 "authorId": self.config.creator_id, "embedding": None,
                                 "triggeredById": None, "typeName": "saelab-label",
                                 "explanationModelName": None, "notes": None,
                                 "createdAt": self.now})
                if self.config.circuit_tracer and row["count"]:
                    self._circuit_tracer(scan, e, row, examples.get(f, []), n_bins)
            name = f"batch-{b // size}.jsonl.gz"
            _write_gz(folder / "features" / name, rows)
            _write_gz(folder / "activations" / name, acts)
            _write_gz(folder / "explanations" / name, expl)
            self.result.features += len(rows)
            self.result.activations += len(acts)
            self.result.explanations += len(expl)

    def _feature(self, e: ScopeEntry, sid: str, row: dict) -> dict:
        top = row["max_act"] or 0.0
        hist = list(row["hist"] or [])
        centres = [(h + 0.5) * top / len(hist) for h in range(len(hist))] if hist else []
        return _finite({
            "modelId": self.model_id, "layer": sid, "index": str(row["feature"]),
            "creatorId": self.config.creator_id, "createdAt": self.now,
            "maxActApprox": top, "hasVector": False, "vector": [], "vectorLabel": None,
            "vectorDefaultSteerStrength": top, "hookName": None,
            "topkCosSimIndices": list(row["neighbours"] or []),
            "topkCosSimValues": list(row["neighbour_cos"] or []),
            "neuron_alignment_indices": [], "neuron_alignment_values": [],
            "neuron_alignment_l1": [], "correlated_neurons_indices": [],
            "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
            "correlated_features_indices": [], "correlated_features_pearson": [],
            "correlated_features_l1": [],
            "neg_str": list(row["lens_bottom_tokens"] or []),
            "neg_values": list(row["lens_bottom_values"] or []),
            "pos_str": list(row["lens_top_tokens"] or []),
            "pos_values": list(row["lens_top_values"] or []),
            "frac_nonzero": row["density"],
            "freq_hist_data_bar_heights": [float(c) for c in hist],
            "freq_hist_data_bar_values": centres,
            "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
            "decoder_weights_dist": [], "sourceSetName": source_set_name(e)})

    def _activation(self, sid: str, row: dict, ex: dict, n_bins: int, dataset: str | None) -> dict:
        values = [float(v) for v in ex["acts"]]
        peak = max(range(len(values)), key=values.__getitem__) if values else 0
        top = row["max_act"] or 0.0
        is_bin = ex["kind"] == "bin"
        return _finite({
            "id": f"{sid}-{row['feature']}-{ex['kind']}-{ex['bin'] if is_bin else 0}-{ex['rank']}",
            "tokens": list(ex["tokens"]), "index": str(row["feature"]), "layer": sid,
            "modelId": self.model_id, "maxValue": values[peak] if values else 0.0,
            "maxValueTokenIndex": peak, "minValue": min(values) if values else 0.0,
            "values": values, "creatorId": self.config.creator_id, "dataSource": dataset,
            "dataIndex": str(ex["context"]), "dfaValues": [], "dfaTargetIndex": None,
            "dfaMaxValue": None, "createdAt": self.now, "lossValues": [],
            "logitContributions": None,
            "binMin": ex["bin"] * top / n_bins if is_bin else None,
            "binMax": (ex["bin"] + 1) * top / n_bins if is_bin else None,
            "binContains": (row["bin_counts"][ex["bin"]] / row["count"]) if is_bin and row["count"] else None,
            "qualifyingTokenIndex": ex["position"] - ex["start"],
            "zIndices": None, "zValues": None})

    def _circuit_tracer(self, scan: str, e: ScopeEntry, row: dict, examples: list[dict],
                        n_bins: int) -> None:
        top = row["max_act"] or 0.0

        def shown(ex: dict) -> dict:
            return {"tokens": list(ex["tokens"]), "tokens_acts_list": [float(v) for v in ex["acts"]],
                    "train_token_ind": ex["position"] - ex["start"], "is_repeated_datapoint": False}

        quantiles = [{"quantile_name": "Top activations",
                      "examples": [shown(x) for x in examples if x["kind"] == "top"]}]
        for b in range(n_bins - 1, -1, -1):
            xs = [shown(x) for x in examples if x["kind"] == "bin" and x["bin"] == b]
            if xs:
                quantiles.append({"quantile_name": f"Interval {b + 1}/{n_bins} "
                                  f"[{b * top / n_bins:.3g}, {(b + 1) * top / n_bins:.3g})",
                                  "examples": xs})
        fid = cantor(e.layer, row["feature"])
        record = _finite({"index": fid, "layer": e.layer, "feature": row["feature"],
                          "source": e.id, "act_min": 0.0, "act_max": top,
                          "density": row["density"],
                          "top_logits": list(row["lens_top_tokens"] or []),
                          "bottom_logits": list(row["lens_bottom_tokens"] or []),
                          "examples_quantiles": quantiles})
        path = self.out / "circuit-tracer" / "features" / scan / f"{fid}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, allow_nan=False))
        self.result.circuit_tracer_files += 1

    def _release(self) -> dict:
        title = self.config.release_title or f"saelab scope of {self.scope.model}"
        return {"name": self.release, "description": title, "descriptionShort": title,
                "creatorName": self.config.creator_name, "creatorNameShort": self.config.creator_name,
                "creatorId": self.config.creator_id, "creatorEmail": None, "visibility": "PUBLIC",
                "isNewUi": False, "featured": False,
                "urls": [self.config.url] if self.config.url else [],
                "defaultSourceSetName": None, "defaultSourceId": None, "defaultUmapSourceIds": [],
                "createdAt": self.now}

    def _model(self) -> dict:
        return {"id": self.model_id, "instruct": "instruct" in self.model_id or
                self.model_id.endswith("-it"), "creatorId": self.config.creator_id,
                "displayNameShort": self.model_id, "displayName": self.scope.model,
                "tlensId": None, "dimension": self.scope.d_model, "visibility": "PUBLIC",
                "defaultSourceSetName": None, "defaultSourceId": None, "inferenceEnabled": False,
                "layers": self.scope.n_layers, "neuronsPerLayer": 0, "owner": "",
                "website": None, "createdAt": self.now, "updatedAt": self.now}

    def _source_set(self, e: ScopeEntry) -> dict:
        kind = {"resid_post": "Residual Stream", "attn_out": "Attention Out",
                "mlp_out": "MLP Out"}.get(e.site_kind, e.site_kind)
        return {"modelId": self.model_id, "name": source_set_name(e),
                "creatorId": self.config.creator_id, "hasDashboards": True, "visibility": "PUBLIC",
                "description": f"{kind} - {width_label(e.width)}", "type": "sae",
                "creatorName": self.config.creator_name, "urls": [], "creatorEmail": None,
                "releaseName": self.release, "defaultOfModelId": None, "defaultRange": 1,
                "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False,
                "showHeadAttribution": False, "showUmap": False, "createdAt": self.now}


def _eval_type() -> dict:
    props = {m: {"type": "number"} for m in ("l0", "fvu", "delta_ce", "loss_recovered", "kl",
                                             "dead_frac", "dense_frac")}
    return {"name": EVAL_TYPE, "displayName": "saelab scope metrics",
            "description": "L0, FVU, delta CE, loss recovered, KL, dead and dense fractions "
                           "(with _lo/_hi intervals) from `saelab scope`.",
            "longerDescription": "", "outputSchema": {"type": "object", "properties": props},
            "featured": False, "url": None}


def _num_label(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _finite(obj: Any) -> Any:
    """NaN and inf (not JSON) become null, in nested dicts and lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_lines(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in records))


def _write_gz(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data, compresslevel=5, mtime=0))
