"""Peak memory of a long attribution graph at the default 7,500 feature rows, without days of CPU.

A 1,000-token graph with 7,500 feature rows needs about a thousand batched backward
passes (7 rows each at this length): days on a CPU. Memory does not depend on how
many passes ran, only on what is alive at once, so this bench builds every object of
the real size with the library's own code and replaces only the rows' *values*:

measured for real (the library's code on the embedded model, fp32, 30 random TopK skip
transcoders 576 -> 4608 k=32 as `bench.graph` makes them):
  - the clean pass (`record_clean`, active features, error nodes, targets);
  - the `EdgeEngine`: the frozen forward whose autograd graph every pass reuses;
  - the targets' rows: real batched backward passes;
  - one feature batch: one real backward pass (`engine.feature_rows` on `engine.batch`
    features), run last, with the row store full and the engine alive, as the last pass
    of `build_graph`'s loop;
  - `RowStore.feature_influence` on the full store, `assemble` (the adjacency),
    `Graph.scores`, `Graph.prune`, `Graph.save` (record) and the Neuronpedia JSON.
synthetic: the rows of the other `max_features - batch` features. They are random, of
  the real width (every active feature, the L*T error nodes, the T tokens) and go through
  the real `RowStore.add` (top-k truncation at its 1 GB budget). Each respects causality
  (a feature at (layer l, position p) gets edges only from sources of layers < l at
  positions <= p, so influence converges as on a real graph), and its values are drawn
  from the real target rows' nonzero values (their heavy tail, hence realistic pruning).
  The features given rows are the most influential through the targets' rows.

The peak resident memory (VmHWM of /proc/self/status, reset between stages by writing 5
to /proc/self/clear_refs) is printed per stage; each stage's peak is of the whole
process, i.e. with everything `build_graph` and `run_graph` hold alive at that point.
Nothing is traced (no tracemalloc), so the figures are the process's own.

    nice -n 19 .venv/bin/python -m bench.graph_memory [--tokens 1000] [--max-features 7500]
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import tempfile
import time
from pathlib import Path

import torch

from bench.common import write
from bench.graph import prompt_of
from saelab.atomic import atomic_write_text
from saelab.data.tokens import tokenize
from saelab.graphs.build import assemble
from saelab.graphs.edges import EdgeEngine
from saelab.graphs.features import active_features, error_nodes
from saelab.graphs.frozen import record_clean
from saelab.graphs.graph_json import edges_kept, neuronpedia_json
from saelab.graphs.rows import ROW_BUDGET, RowStore
from saelab.graphs.targets import logit_targets
from saelab.models.load import load_model
from saelab.sae.testing import random_transcoder

GB = 1e9


def _status(key: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024 / GB


class Stages:
    """Peak and current resident memory per stage (GB), the peak reset at each stage's start."""

    def __init__(self):
        self.rows: list[dict] = []
        self.can_reset = True

    def run(self, name: str, fn, note=""):
        """Run fn(); note: a string, or a callable giving one after fn ran."""
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.can_reset = False  # the peaks are then cumulative: still a true upper bound
        before, t0 = _status("VmRSS"), time.perf_counter()
        out = fn()
        note = note() if callable(note) else note
        row = {"stage": name, "rss_before_gb": before, "peak_gb": _status("VmHWM"),
               "rss_after_gb": _status("VmRSS"), "seconds": time.perf_counter() - t0, "note": note}
        self.rows.append(row)
        print(f"{name:<14} peak {row['peak_gb']:6.2f} GB  (rss {before:5.2f} -> "
              f"{row['rss_after_gb']:5.2f} GB, {row['seconds']:7.1f} s)  {note}", flush=True)
        return out


def synthetic_rows(feats, chosen: torch.Tensor, T: int, L: int, pool_f: torch.Tensor,
                   pool_d: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (n, N) and (n, L*T + T) of features `chosen`: causal support, values from the pools."""
    n, N = len(chosen), len(feats)
    layer, pos = feats.layer[chosen], feats.pos[chosen]
    mask = (feats.layer[None] < layer[:, None]) & (feats.pos[None] <= pos[:, None])
    feat = pool_f[torch.randint(len(pool_f), (n, N), generator=gen)] * mask
    err_layer = torch.arange(L).repeat_interleave(T)
    err_pos = torch.arange(T).repeat(L)
    dense_mask = torch.cat([(err_layer[None] < layer[:, None]) & (err_pos[None] <= pos[:, None]),
                            torch.arange(T)[None] <= pos[:, None]], 1)
    dense = pool_d[torch.randint(len(pool_d), dense_mask.shape, generator=gen)] * dense_mask
    return feat, dense


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--max-features", type=int, default=7500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    st = Stages()
    gen = torch.Generator().manual_seed(0)

    def load():
        lm = load_model("smollm2-135m-instruct", dtype="float32")
        tcs = {layer: random_transcoder("topk", d_in=576, d_sae=args.d_sae, k=args.k, skip=True,
                                        layer=layer, seed=layer).eval()
               for layer in range(lm.arch.n_layers)}
        return lm, tcs
    lm, tcs = st.run("load", load, "model + 30 transcoders")
    ids = tokenize(lm, prompt_of(lm, args.tokens)).input_ids
    T, L = ids.shape[1], lm.arch.n_layers

    def clean():
        with torch.no_grad():
            state = record_clean(lm.model, lm.arch, ids)
            feats = active_features(tcs, state)
            errors = error_nodes(tcs, feats, state)
        targets = logit_targets(lm.model, lm.tokenizer, state.logits, T)
        return state, feats, errors, targets
    state, feats, errors, targets = st.run("clean pass", clean, "real")
    N, n_t = len(feats), len(targets)

    engine = st.run("engine", lambda: EdgeEngine(lm.model, lm.arch, state, tcs, feats, errors),
                    "real frozen forward, autograd graph kept")
    cap = min(args.max_features, N)
    store = RowStore(cap + n_t, N, engine.n_dense, ROW_BUDGET, engine.row_dtype)
    t_rows = st.run("target rows", lambda: engine.target_rows(targets),
                    lambda: f"real: {n_t} rows, {engine.passes} backward passes")
    store.add(*t_rows)
    pool_f = t_rows[0][t_rows[0] != 0].float()
    pool_d = t_rows[1][t_rows[1] != 0].float()
    del t_rows

    # The features given rows: the most influential through the targets' rows.
    weights = torch.tensor([t.weight for t in targets])
    first = torch.zeros(n_t)
    first[:] = weights
    infl = store.feature_influence(first, torch.full((n_t,), -1))
    ranked = torch.argsort(infl, descending=True)[:cap]
    synth, last = ranked[:cap - engine.batch], ranked[cap - engine.batch:]
    row_feature = [-1] * n_t
    visited = torch.zeros(N, dtype=torch.bool)

    def fill():
        for a in range(0, len(synth), engine.batch):
            chunk = synth[a:a + engine.batch]
            store.add(*synthetic_rows(feats, chunk, T, L, pool_f, pool_d, gen))
            row_feature.extend(chunk.tolist())
            visited[chunk] = True
    st.run("fill rows", fill, f"SYNTHETIC: {len(synth)} rows of width {N:,} + {engine.n_dense:,}, "
           f"{'exact' if store.exact else f'top {store.k:,} kept'}")

    def rank():
        first = torch.zeros(store.n)
        first[:n_t] = weights
        return store.feature_influence(first, torch.tensor(row_feature))
    st.run("influence", rank, f"real code on {store.n:,} rows")

    def one_pass():
        store.add(*engine.feature_rows(last))
        row_feature.extend(last.tolist())
        visited[last] = True
    st.run("one pass", one_pass, f"real: {len(last)} feature rows, 1 backward pass, store full")
    stats = {"active_features": N, "rows_per_pass": engine.batch, "rows_exact": store.exact,
             "row_mass_dropped": store.dropped}

    def assembly():
        nonlocal engine, store
        engine = None  # as build_graph: the tape goes before the assembly
        graph = assemble(store, row_feature, visited, feats, targets, state, tcs, lm.tokenizer,
                         ids, L)
        store = None
        return graph
    graph = st.run("assemble", assembly, "real")
    graph.settings = {"max_features": args.max_features, "max_logits": 10, "desired_prob": 0.95}
    scores = st.run("scores", graph.scores, f"real, adjacency {tuple(graph.adjacency.shape)}")
    pruned = st.run("prune", graph.prune, "real, nodes 0.8 edges 0.98")
    with tempfile.TemporaryDirectory() as out:
        st.run("record", lambda: graph.save(out), "real record.json + record.safetensors")

        def neuronpedia():
            doc = neuronpedia_json(graph, pruned, slug="memory", scan="smollm2-135m-instruct")
            atomic_write_text(Path(out) / "neuronpedia.json", json.dumps(doc))
            return len(doc["nodes"]), len(doc["links"])
        nodes, links = st.run("neuronpedia", neuronpedia, "real")
        sizes = {p.name: p.stat().st_size for p in Path(out).iterdir()}
    overall = max(r["peak_gb"] for r in st.rows)
    payload = {"tokens": T, "max_features": args.max_features, "threads": args.threads,
               "transcoders": f"random topk 576->{args.d_sae} k={args.k} skip", **stats,
               "rows": cap + n_t, "real_backward_passes": engine_passes(st), "scores": scores,
               "pruned": {"nodes": nodes, "links": links, "edges_kept": edges_kept(pruned)},
               "file_bytes": sizes, "peaks_reset_per_stage": st.can_reset, "stages": st.rows,
               "peak_gb": overall,
               "ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB}
    path = write(f"graph_memory_{T}", payload)
    print(f"{T} tokens, {N:,} active features, {cap + n_t:,} rows ({cap - len(last):,} synthetic): "
          f"peak {overall:.2f} GB (stage '{max(st.rows, key=lambda r: r['peak_gb'])['stage']}'); "
          f"pruned graph {nodes:,} nodes, {links:,} links  ({path})")


def engine_passes(st: Stages) -> str:
    return "; ".join(f"{r['stage']}: {r['note']}" for r in st.rows if r["note"].startswith("real:"))


if __name__ == "__main__":
    main()
