"""A scope of transcoders (`saelab scope --kind transcoder`): one per layer, mlp_in.L -> mlp_out.L.

The stages are the SAE scope's (run.py); what differs:

    eval    `evaluate_transcoders` (evals/transcoders.py), once per set of one width and
            target L0: one clean forward per batch captures every layer's mlp_in and
            mlp_out; then ΔCE with each MLP replaced alone, and with all replaced at once.
    layout  DIR/native/<label>/                       SAELens Transcoder / SkipTranscoder
            DIR/transcoder/layer_L_width_W_l0_N/      Gemma Scope 2's params.safetensors +
                                                      config.json (not top-k: it holds
                                                      JumpReLU transcoders only)
            DIR/circuit_tracer/                       circuit-tracer's set (config.yaml +
                                                      layer_L.safetensors), read by
                                                      `load_transcoders` and `saelab graph`;
                                                      with several widths or L0s, one set
                                                      each under circuit_tracer/<set>/
    index   rows with site mlp_in.L, metrics l0, fvu, delta_ce, kl, dead_frac, dense_frac
            (ΔCE and KL with that MLP replaced), and delta_ce_all / kl_all: every MLP of
            the row's set replaced at once. No loss_recovered: the transcoder evaluation
            has no zero-ablation baseline.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from saelab.atomic import atomic_write_text
from saelab.scope.layout import width_label
from saelab.scope.plan import PlannedSAE
from saelab.scope.run import _Context

CIRCUIT_TRACER = "circuit_tracer"
# the index's per-layer metric names and the names evaluate_transcoders gives them
_LAYER_METRICS = {"l0": "l0", "fvu": "fvu", "delta_ce": "delta_ce", "kl": "kl"}


def set_name(width: int, target_l0: float) -> str:
    """The name of the set of transcoders of one width and target L0: ``width_2304_l0_32``."""
    return f"width_{width}_l0_{target_l0:g}"


def _with_ci(out: dict[str, float], name: str, item: dict | None) -> None:
    if not item or item.get("value") is None:
        return
    out[name] = float(item["value"])
    if item.get("ci95"):
        out[f"{name}_lo"], out[f"{name}_hi"] = (float(v) for v in item["ci95"])


def index_metrics(result: dict, layer: int) -> dict[str, float]:
    """The index's numbers for `layer` of an `evaluate_transcoders` result (value, `_lo`, `_hi`)."""
    r = result["layers"][str(layer)]
    out: dict[str, float] = {}
    for name, src in _LAYER_METRICS.items():
        _with_ci(out, name, r["metrics"].get(src))
    out["dead_frac"] = float(r["dead_fraction"])
    out["dense_frac"] = float(r["dense_fraction"])
    every = (result.get("all_layers") or {}).get("metrics") or {}
    for name in ("delta_ce", "kl"):
        _with_ci(out, f"{name}_all", every.get(name))
    return out


class TranscoderContext(_Context):
    """The stages of a transcoder scope (see the module docstring)."""

    kind = "transcoder"

    def _sets(self) -> dict[str, list[PlannedSAE]]:
        """{set name: its transcoders by layer}: one set per (width, target L0)."""
        out: dict[str, list[PlannedSAE]] = defaultdict(list)
        for p in self.planned:
            out[set_name(p.width, p.target_l0)].append(p)
        return dict(out)

    def circuit_tracer_folder(self, name: str) -> Path:
        sets = self._sets()
        return self.out / CIRCUIT_TRACER if len(sets) == 1 else self.out / CIRCUIT_TRACER / name

    def eval(self) -> None:
        from saelab.evals.run import EvalConfig
        from saelab.evals.transcoders import evaluate_transcoders
        from saelab.sae import load_sae

        ecfg = EvalConfig(tokens=self.cfg.eval_tokens, corpus=self.cfg.corpus,
                          context=self.cfg.context, bootstrap=self.cfg.bootstrap,
                          seed=self.cfg.seed)
        sets, results = self._sets(), {}
        for i, (name, planned) in enumerate(sets.items()):
            tcs = {p.layer: load_sae(self.out / "train" / p.label, dtype="float32",
                                     expect="transcoder").to(self.lm.device) for p in planned}
            results[name] = evaluate_transcoders(
                self.lm, tcs, ecfg,
                on_progress=lambda d, t, i=i: self.progress("eval", i * t + d, len(sets) * t))
        atomic_write_text(self.out / "eval.json", json.dumps({"sets": results}, indent=1) + "\n")

    def layout(self) -> None:
        from saelab.sae.formats import save_sae
        from saelab.sae.transcoder import save_transcoders

        ids = self._ids()
        for n, p in enumerate(self.planned):
            tc = self._load(self.out / "train" / p.label)
            save_sae(tc, self.out / "native" / p.label)
            if tc.cfg.architecture != "topk":  # Gemma Scope 2 holds JumpReLU transcoders only
                save_sae(tc, self.out / ids[p.label], format="gemma-scope-2")
            self.progress("layout", n + 1, len(self.planned))
        for name, planned in self._sets().items():
            tcs = {p.layer: self._load(self.out / "native" / p.label) for p in planned}
            save_transcoders(tcs, self.circuit_tracer_folder(name), format="circuit-tracer")
        self.record["circuit_tracer"] = {
            name: str(self.circuit_tracer_folder(name).relative_to(self.out))
            for name in self._sets()}

    # ------------------------------------------------------------------ index hooks
    def _evals(self) -> dict[str, dict]:
        """{label: {"metrics": its layer's metrics, "result": its set's result, "layer": L}}."""
        sets = json.loads((self.out / "eval.json").read_text())["sets"]
        out = {}
        for name, planned in self._sets().items():
            for p in planned:
                r = sets[name]
                out[p.label] = {"metrics": r["layers"][str(p.layer)]["metrics"], "result": r,
                                "layer": p.layer}
        return out

    @staticmethod
    def _scope_id(p: PlannedSAE, l0: float) -> str:
        # Gemma Scope 2's folder naming: the layer is read back from the folder's name
        return f"transcoder/layer_{p.layer}_width_{width_label(p.width)}_l0_{round(l0)}"

    @staticmethod
    def _params(sid: str) -> str:
        return f"{sid}/params.safetensors"

    @staticmethod
    def _index_metrics(result: dict[str, Any]) -> dict[str, float]:
        return index_metrics(result["result"], result["layer"])
