"""The feature browser's JSON API: what each route answers, over the indexes of a run folder.

    app = App("runs/feats")                          # finds the indexes; SaelabError if none
    app.api("GET", ["saes", "NAME"], {}, lambda: {})  # -> the JSON payload, or HttpError

    GET  /api/saes                                   SAEs found under the run folder
    GET  /api/damaged                                damaged indexes found there, by file
    GET  /api/saes/NAME                              one SAE: meta, summary, eval metrics
    GET  /api/saes/NAME/features?sort=&order=&offset=&limit=&alive=   feature list
    GET  /api/saes/NAME/features/ID                  one feature: stats, examples, lens, ...
    POST /api/saes/NAME/features/ID/ablation         live ablated text of the top and uniform examples
    POST /api/saes/NAME/search   {"text"}            which features fire on which tokens
    POST /api/saes/NAME/steer    {"prompt", "feature", "mode", "strength", ...}
    GET  /api/scope, POST /api/scope/search, /api/scope/steer   on a scope folder (scope_routes)
    GET  /api/graphs, /api/graphs/NAME, POST /api/graphs/NAME/view   attribution graphs (graphs)

Only the SAEs discovered at start-up are served, by name: no URL segment or body
field is ever turned into a file path. Parquet is read with pyarrow; torch and
the model load on the first live request. Bad input raises HttpError (4xx, one
message); every field is type-checked in saelab.app.request. A damaged index is
named (file and rebuild command) with a 503, never skipped in silence. NaN/inf
become null. The HTTP side (host checks, static files, connections) is
saelab.app.server.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from saelab.app.indexes import open_indexes, read_failed
from saelab.app.request import (
    HttpError,
    bool_field,
    check_keys,
    check_query,
    choice_field,
    int_field,
    number_field,
    path_int,
    query_choice,
    query_int,
    text_field,
)
from saelab.app.scope_routes import ScopeRoutes
from saelab.errors import CorruptFileError, SaelabError
from saelab.features.index import ABLATION, EXAMPLES, FeatureIndex, lens_filter
from saelab.scope.layout import is_scope

log = logging.getLogger(__name__)
MAX_PROMPT_CHARS = 4000
MAX_TOKENS = 256
MAX_NEW_TOKENS = 128
SORTABLE = ("feature", "density", "max_act", "mean_act", "count", "label")
STEER_FIELDS = ("prompt", "feature", "mode", "strength", "max_new_tokens", "seed", "temperature",
                "chat")


class App:
    """What the server serves: the indexes found at start-up, and the live model (lazily)."""

    def __init__(self, run_dir: str | Path, device: str = "cpu"):
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise SaelabError(f"{run_dir} does not exist or is not a folder; give the --out folder "
                              "of `saelab features`.")
        self.saes, self.damaged = open_indexes(self.run_dir)
        self.device = device
        self.scope = ScopeRoutes(self.run_dir, self) if is_scope(self.run_dir) else None
        damaged = list(self.damaged.values())
        if not self.saes and damaged and self.scope is None:  # nothing to serve: name the first
            for d in damaged[1:]:
                log.warning("%s", d.message)
            more = f" ({len(damaged) - 1} more damaged index(es) logged above)" if len(damaged) > 1 else ""
            raise CorruptFileError(damaged[0].message + more)
        for d in damaged:  # served anyway: each is named in the log, on / and on its pages
            log.warning("%s", d.message)
        from saelab.app.graphs import find_graphs

        self.graphs = find_graphs(self.run_dir)  # attribution graphs (saelab graph --out)
        if not self.saes and self.scope is None and not self.graphs:
            raise SaelabError(f"no feature index under {run_dir} (looked for index.json up to 3 "
                              "folders deep). Create one with `saelab features SAE_DIR --out DIR`, "
                              "then serve DIR.")
        self._live = None
        self._live_lock = threading.Lock()
        self._order: dict[tuple[str, str, str], Any] = {}

    @property
    def live(self):
        with self._live_lock:
            if self._live is None:
                from saelab.app.live import Live  # torch is imported here, not at start-up

                self._live = Live(self.device)
            return self._live

    # ------------------------------------------------------------------ routes
    def api(self, method: str, parts: list[str], query: dict, body) -> Any:
        """Answer /api/<parts>: the JSON payload, or HttpError (4xx/5xx with its message).

        `query` is the parsed query string; `body` is a callable reading the JSON body (POST only).
        """
        if parts[:1] == ["scope"] and self.scope is not None:
            return self.scope.api(method, parts[1:], query, body)
        if parts[:1] == ["graphs"]:
            from saelab.app.graphs import graph_api

            if method == "GET":
                check_query(query, (), "GET /api/graphs")
            return graph_api(self.graphs, self.saes, method, parts[1:], body)
        if method == "GET":
            if len(parts) != 3:  # only the feature list takes query parameters
                check_query(query, (), f"GET /api/{'/'.join(parts)[:200]}")
            if parts == ["saes"]:
                return [self.sae_summary(n, i) for n, i in self.saes.items()]
            if parts == ["damaged"]:
                return self.damaged_list()
            if len(parts) == 2 and parts[0] == "saes":
                return self.sae_detail(parts[1])
            if len(parts) == 3 and parts[0] == "saes" and parts[2] == "features":
                return self.feature_list(parts[1], query)
            if len(parts) == 4 and parts[0] == "saes" and parts[2] == "features":
                return self.feature(parts[1], parts[3])
        elif method == "POST" and len(parts) >= 3 and parts[0] == "saes":
            if len(parts) == 3 and parts[2] == "search":
                return self.search(parts[1], body())
            if len(parts) == 3 and parts[2] == "steer":
                return self.steer(parts[1], body())
            if len(parts) == 5 and parts[2] == "features" and parts[4] == "ablation":
                return self.live_ablation(parts[1], parts[3], body())
        raise HttpError(404, f"no API endpoint {method} /api/{'/'.join(parts)[:200]}")

    # ------------------------------------------------------------------ lookups
    def index(self, name: str) -> FeatureIndex:
        if name in self.damaged:
            raise HttpError(503, self.damaged[name].message)
        if name not in self.saes:
            raise HttpError(404, f"no SAE named {name[:80]!r} here; known: {', '.join(self.saes)}")
        return self.saes[name]

    def feature_id(self, index: FeatureIndex, f: int | str) -> int:
        """A feature id of `index` from a URL segment (str) or a type-checked body field (int)."""
        if isinstance(f, str):
            f = path_int(f, "feature id")
        if not 0 <= f < index.d_sae:
            raise HttpError(404, f"feature {f} does not exist: this SAE has features 0..{index.d_sae - 1}")
        return f

    def examples(self, name: str, index: FeatureIndex, f: int) -> list[dict]:
        try:
            return index.examples(f)
        except (OSError, pa.ArrowException) as err:  # a page damaged inside: name the file
            raise HttpError(503, read_failed(name, index, EXAMPLES, err).message) from None

    def stored_ablation(self, name: str, index: FeatureIndex, f: int) -> list[dict]:
        try:
            return index.ablations(f)
        except (OSError, pa.ArrowException) as err:
            raise HttpError(503, read_failed(name, index, ABLATION, err).message) from None

    # ------------------------------------------------------------------ API
    def sae_summary(self, name: str, index: FeatureIndex) -> dict:
        meta = index.meta
        return {"name": name, "sae": meta["sae"], "model": meta["model"]["name"],
                "tokens": meta["tokens"], "summary": meta["summary"],
                "corpus": meta["collection"].get("corpus")}

    def sae_detail(self, name: str) -> dict:
        index = self.index(name)
        out = self.sae_summary(name, index)
        out["logit_lens"] = index.meta["logit_lens"] | {"filter": lens_filter(index.meta)}
        out["collection"] = index.meta["collection"]
        out["eval"] = _eval_metrics(index)
        return out

    def damaged_list(self) -> list[dict]:
        return [{"name": d.name, "file": str(d.file), "problem": d.problem, "message": d.message}
                for d in self.damaged.values()]

    def feature_list(self, name: str, query: dict[str, list[str]]) -> dict:
        index = self.index(name)
        check_query(query, ("sort", "order", "offset", "limit", "alive"), "the feature list")
        sort = query_choice(query, "sort", "feature", SORTABLE)
        order = query_choice(query, "order", "asc", ("asc", "desc"))
        alive = query_choice(query, "alive", "0", ("0", "1")) == "1"
        offset = query_int(query, "offset", 0, 0, 10**9)
        limit = query_int(query, "limit", 100, 1, 1000)
        key = (name, sort, order)
        if key not in self._order:
            direction = "ascending" if order == "asc" else "descending"
            # nulls (mean_act of dead features, labels) sort last by default
            self._order[key] = pc.sort_indices(index.features, sort_keys=[(sort, direction)])
        rows = index.features.take(self._order[key])
        if alive:
            rows = rows.filter(pc.greater(rows["count"], 0))
        page = rows.slice(offset, limit).select(
            ["feature", "density", "max_act", "mean_act", "count", "label", "lens_top_tokens"])
        items = page.to_pylist()
        for item in items:
            item["lens_top_tokens"] = (item["lens_top_tokens"] or [])[:5]
        return {"total": rows.num_rows, "offset": offset, "features": _clean(items)}

    def feature(self, name: str, fid: str) -> dict:
        index = self.index(name)
        f = self.feature_id(index, fid)
        row = index.feature(f)
        examples = self.examples(name, index, f)
        top = float(row["max_act"] or 0.0)
        n_bins = index.meta["collection"]["config"]["n_bins"]
        bins = [{"bin": b, "lo": b * top / n_bins, "hi": (b + 1) * top / n_bins,
                 "count": row["bin_counts"][b],
                 "examples": sorted((e for e in examples if e["kind"] == "bin" and e["bin"] == b),
                                    key=lambda e: -e["act"])}
                for b in range(n_bins - 1, -1, -1)]
        ablated = self.stored_ablation(name, index, f)
        uniform = sorted((r for r in ablated if r["kind"] == "bin"), key=lambda r: (-r["bin"], r["rank"]))
        return _clean({"sae": name, **row, "top": [e for e in examples if e["kind"] == "top"],
                       "bins": bins, "ablation": next((r for r in ablated if r["kind"] == "top"), None),
                       "ablation_uniform": uniform, "lens_filter": lens_filter(index.meta),
                       "n_tokens": index.meta["tokens"], "d_sae": index.d_sae})

    def live_ablation(self, name: str, fid: str, body: dict) -> dict:
        index = self.index(name)
        check_keys(body, (), "live ablation")
        f = self.feature_id(index, fid)
        examples = self.examples(name, index, f)
        top = [e for e in examples if e["kind"] == "top"][:1]
        if not top:
            raise HttpError(404, f"feature {f} never fired in the collected tokens: no example to ablate")
        per_bin = index.meta.get("ablation", {}).get("per_bin", 1)
        uniform = sorted((e for e in examples if e["kind"] == "bin" and e["rank"] < per_bin),
                         key=lambda e: (-e["bin"], e["rank"]))
        context = index.feature(f).get("top_context")
        rows = self._call(lambda: self.live.ablation(name, index, f, top + uniform, context))
        return _clean({"ablation": rows[0], "ablation_uniform": rows[1:], "live": True})

    def search(self, name: str, body: dict) -> dict:
        index = self.index(name)
        check_keys(body, ("text", "top"), "search")
        text = text_field(body, "text", MAX_PROMPT_CHARS)
        top = int_field(body, "top", 5, 1, 20)
        return self._call(lambda: self.live.search(name, index, text, top=top, max_tokens=MAX_TOKENS))

    def steer(self, name: str, body: dict) -> dict:
        index = self.index(name)
        check_keys(body, STEER_FIELDS, "steer")
        args = dict(prompt=text_field(body, "prompt", MAX_PROMPT_CHARS),
                    feature=self.feature_id(index, int_field(body, "feature", None, 0, 2**62)),
                    mode=choice_field(body, "mode", "add", ("add", "clamp")),
                    strength=number_field(body, "strength", 0.25, -1000.0, 1000.0),  # site norms
                    max_new_tokens=int_field(body, "max_new_tokens", 40, 1, MAX_NEW_TOKENS),
                    seed=int_field(body, "seed", 0, 0, 2**31 - 1),
                    temperature=number_field(body, "temperature", 0.7, 0.0, 2.0),
                    chat=bool_field(body, "chat", True))
        return self._call(lambda: self.live.steer(name, index, **args))

    def _call(self, fn):
        from saelab.app.live import LiveError

        try:
            return fn()
        except LiveError as err:
            raise HttpError(err.status, str(err)) from None
        except SaelabError as err:  # a damaged SAE file (503, logged) or another user error (409)
            if err.exit_code == CorruptFileError.exit_code:
                log.warning("live request: %s", err)
                raise HttpError(503, str(err)) from None
            raise HttpError(409, str(err)) from None
        except ValueError as err:
            raise HttpError(400, str(err)) from None


def _eval_metrics(index: FeatureIndex) -> dict | None:
    """`saelab eval`'s metrics when the SAE folder has an eval/eval.json next to it."""
    path = index.meta["sae"].get("path")
    if not path:
        return None
    candidate = Path(path) / "eval" / "eval.json"
    try:
        return json.loads(candidate.read_text()).get("metrics") if candidate.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _clean(obj: Any) -> Any:
    """NaN/inf (not JSON) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj
