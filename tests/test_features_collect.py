"""Feature collection against a brute-force computation, and exact merging of parts."""

import math

import numpy as np
import pytest
import torch
from tiny_lm import tiny_lm
from tiny_models import tiny_sae

from saelab.data.corpus import Corpus, load_corpus
from saelab.data.tokens import pack
from saelab.features.collect import (
    CollectConfig,
    Collector,
    collect,
    collect_cache,
    load_parts,
    save_part,
)
from saelab.features.summary import sample_keys, summarize
from saelab.models.hooks import capture

CFG = CollectConfig(top_k=4, n_bins=4, per_bin=3, hist_bins=8, left=3, right=2, seed=5)
CONTEXT, TOKENS = 24, 2400


@pytest.fixture(scope="module")
def corpus():
    """A small in-memory corpus: hashing and packing it costs nothing."""
    docs = load_corpus("builtin:stdlib")
    return Corpus.from_texts("stdlib-head", [d for _, d in zip(range(40), docs)])


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return tiny_lm("llama")


@pytest.fixture(scope="module")
def saes(lm):
    return {"topk": tiny_sae(lm.model, "resid_post.1", "topk", d_sae=32, seed=1),
            "relu": tiny_sae(lm.model, "resid_post.2", "relu", d_sae=24, seed=2)}


def _batches(lm, corpus, batch_size):
    return list(pack(corpus, lm.tokenizer, CONTEXT, batch_size=batch_size, n_tokens=TOKENS))


def _dense(lm, sae, batches):
    """Dense feature activations [C, P, F] (special tokens zeroed) from the same batches."""
    out, ids_all, special_all = [], [], []
    with torch.inference_mode():
        for ids, special in batches:
            with capture(lm.model, sae.cfg.site, arch=lm.arch) as cap:
                cap.run(input_ids=ids)
            x = cap[sae.cfg.site].reshape(-1, sae.cfg.d_in)
            keep = ~special.reshape(-1)
            f = torch.zeros(len(x), sae.cfg.d_sae)
            f[keep] = sae.encode(x[keep])
            out.append(f.reshape(*ids.shape, -1))
            ids_all.append(ids)
            special_all.append(special)
    return torch.cat(out), torch.cat(ids_all), torch.cat(special_all)


def _brute(feats, cfg):
    """Per-feature loops over every token: the definitions in summary.py, spelled out."""
    C, P, F = feats.shape
    expected = {}
    for f in range(F):
        acts = feats[:, :, f]
        cs, ps = (acts > 0).nonzero(as_tuple=True)
        keys = sample_keys(cs * P + ps, torch.full_like(cs, f), cfg.seed).tolist()
        fired = list(zip(acts[cs, ps].tolist(), cs.tolist(), ps.tolist(), strict=True))
        top = max((a for a, _, _ in fired), default=0.0)
        per_ctx = []
        for c, row in enumerate(acts.tolist()):
            m = max(row)
            if m > 0:
                per_ctx.append((-m, c, row.index(m)))
        hist = [0] * cfg.hist_bins
        bins = [[] for _ in range(cfg.n_bins)]
        for (a, c, p), key in zip(fired, keys, strict=True):
            # float32 arithmetic, as the collector does it
            ratio = np.float32(a) / np.float32(top)
            hist[min(math.floor(ratio * np.float32(cfg.hist_bins)), cfg.hist_bins - 1)] += 1
            b = min(math.floor(ratio * np.float32(cfg.n_bins)), cfg.n_bins - 1)
            bins[b].append((key, c, p, a))
        expected[f] = {
            "count": len(fired), "max": top, "hist": hist,
            "top": [(c, p, -m) for m, c, p in sorted(per_ctx)[:cfg.top_k]],
            "bin_counts": [len(b) for b in bins],
            "bins": [sorted(b)[:cfg.per_bin] for b in bins],
            "mean": (sum(a for a, _, _ in fired) / len(fired)) if fired else float("nan"),
        }
    return expected


@pytest.mark.parametrize("name", ["topk", "relu"])
def test_collection_equals_brute_force(lm, saes, corpus, name):
    sae = saes[name]
    coll = collect(lm, saes, corpus=corpus, tokens=TOKENS, context=CONTEXT,
                   batch_size=8, config=CFG)
    table = summarize(coll, name)
    feats, ids, special = _dense(lm, sae, _batches(lm, corpus, 8))
    expected = _brute(feats, CFG)
    assert table.n_tokens == int((~special).sum())
    ex = table.examples
    for f, e in expected.items():
        assert table.count[f] == e["count"]
        assert table.max_act[f] == pytest.approx(e["max"], abs=0)
        assert table.hist[f].tolist() == e["hist"]
        assert table.bin_counts[f].tolist() == e["bin_counts"]
        if e["count"]:
            assert table.mean_act[f] == pytest.approx(e["mean"], rel=1e-9)
        tops = (ex["feature"] == f) & (ex["kind"] == 0)
        got = list(zip(ex["context"][tops].tolist(), ex["position"][tops].tolist(),
                       ex["act"][tops].tolist(), strict=True))
        assert got == [(c, p, pytest.approx(a, abs=0)) for c, p, a in e["top"]]
        for b, sample in enumerate(e["bins"]):
            rows = (ex["feature"] == f) & (ex["kind"] == 1) & (ex["bin"] == b)
            got = list(zip(ex["context"][rows].tolist(), ex["position"][rows].tolist(), strict=True))
            assert got == [(c, p) for _, c, p, _ in sample]
    # windows: the tokens and this feature's activations around each example
    W = CFG.window
    for i in range(len(ex["feature"])):
        c, s, f = ex["context"][i], ex["start"][i], ex["feature"][i]
        assert s <= ex["position"][i] < s + W
        np.testing.assert_array_equal(ex["token_ids"][i], ids[c, s:s + W].numpy())
        np.testing.assert_array_equal(ex["acts"][i], feats[c, s:s + W, f].numpy())


def test_merge_of_batches_equals_whole(lm, saes, corpus):
    """Same batches fed to one collector, or split over two and merged: identical tables."""
    batches = _batches(lm, corpus, 4)
    acts = []
    sites = sorted({s.cfg.site for s in saes.values()})
    with torch.inference_mode():
        for ids, _ in batches:
            with capture(lm.model, sites, arch=lm.arch) as cap:
                cap.run(input_ids=ids)
            acts.append(dict(cap.acts))
    whole, a, b = Collector(saes, CFG), Collector(saes, CFG), Collector(saes, CFG)
    start = 0
    for i, ((ids, special), act) in enumerate(zip(batches, acts, strict=True)):
        ctx = torch.arange(start, start + len(ids))
        start += len(ids)
        whole.add(ctx, ids, special, act)
        (a if i % 3 == 1 else b).add(ctx, ids, special, act)  # interleaved parts
    merged = b.collection.merge(a.collection)
    for name in saes:
        _assert_tables_equal(summarize(whole.collection, name), summarize(merged, name))


def test_two_ranks_saved_and_merged_equal_one_process(lm, saes, corpus, tmp_path):
    """rank/world_size split of the corpus (batch of 1 context: same activations either way)."""
    kw = dict(corpus=corpus, tokens=TOKENS // 2, context=CONTEXT, batch_size=1, config=CFG)
    whole = collect(lm, saes, **kw)
    paths = [save_part(collect(lm, saes, rank=r, world_size=2, **kw), tmp_path / f"rank_{r}.st")
             for r in range(2)]
    merged = load_parts(paths)
    assert merged.n_tokens == whole.n_tokens
    for name in saes:
        _assert_tables_equal(summarize(whole, name), summarize(merged, name))


def test_cache_source(lm, saes, tmp_path):
    from saelab.data.harvest import HarvestConfig, harvest
    from saelab.data.store import ActivationStore

    harvest(lm, HarvestConfig(sites=("resid_post.1", "resid_post.2"), corpus="builtin:stdlib",
                              tokens=600, context=CONTEXT, batch_size=4, shard_tokens=200), tmp_path)
    store = ActivationStore(tmp_path)
    coll = collect_cache(store, saes, config=CFG)
    table = summarize(coll, "topk")
    assert table.n_tokens == sum(int((~s).sum()) for _, s in store.tokens())
    assert (table.examples["kind"] == 0).any()
    parts = [collect_cache(store, saes, config=CFG, rank=r, world_size=2) for r in range(2)]
    _assert_tables_equal(table, summarize(parts[0].merge(parts[1]), "topk"))


def _assert_tables_equal(x, y):
    assert x.n_tokens == y.n_tokens
    for field in ("count", "density", "max_act", "hist", "bin_counts"):
        np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=field)
    np.testing.assert_array_equal(x.mean_act, y.mean_act)
    assert x.examples.keys() == y.examples.keys()
    for key in x.examples:
        np.testing.assert_array_equal(x.examples[key], y.examples[key], err_msg=key)


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from tiny_lm import tiny_lm
from tiny_models import tiny_sae
from saelab.data.corpus import Corpus, load_corpus
from saelab.features.build import IndexConfig, build_index
from saelab.features.collect import CollectConfig
from saelab.train.distributed import from_env, shutdown

torch.set_num_threads(1)
lm = tiny_lm("llama")
sae = tiny_sae(lm.model, "resid_post.1", "topk", d_sae=32, seed=1)
docs = load_corpus("builtin:stdlib")
corpus = Corpus.from_texts("stdlib-head", [d for _, d in zip(range(40), docs)])
config = IndexConfig(tokens={tokens}, corpus=corpus, context={context}, batch_size=1, ablate=2,
                     dashboard=False, collect=CollectConfig(**{cfg!r}))
dist = from_env() if len(sys.argv) < 3 else None
build_index(lm, {{"tiny": (sae, None)}}, sys.argv[1], config, dist=dist)
shutdown()
"""


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    """Real torch.distributed processes (gloo): each rank packs its share, rank 0 merges."""
    import dataclasses
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pyarrow.parquet as pq
    from test_distributed import free_port

    script = tmp_path / "build.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), tokens=TOKENS // 2,
                                    context=CONTEXT, cfg=dataclasses.asdict(CFG)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                           str(script), str(tmp_path / "ddp")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "single"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "ddp" / "parts").iterdir()) == [
        "rank_0.safetensors", "rank_1.safetensors"]
    for name in ("features.parquet", "examples.parquet", "ablation.parquet"):
        a = pq.read_table(tmp_path / "ddp" / "tiny" / name)
        b = pq.read_table(tmp_path / "one" / "tiny" / name)
        for col in a.column_names:  # column by column: NaN (not ablated) equals NaN here
            if col == "deltas":
                np.testing.assert_array_equal(np.array(a[col].to_pylist(), dtype=float),
                                              np.array(b[col].to_pylist(), dtype=float))
            else:
                assert a[col].equals(b[col]), f"{name}: {col}"
