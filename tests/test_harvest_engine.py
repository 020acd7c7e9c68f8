"""The forward engine harvest and streaming training share (saelab/data/engine.py):
packing in a background thread, batches sized in tokens, early stop, the host copy."""

import hashlib
import json
import threading

import pytest
import torch
from tiny_lm import tiny_lm

from saelab.data.engine import (
    CPU_BATCH_CONTEXTS,
    MAX_AUTO_TOKENS,
    auto_batch_tokens,
    contexts_per_forward,
    forward_chunks,
    prefetch,
    token_batches,
)
from saelab.data.harvest import HarvestConfig, harvest
from saelab.data.store import ActivationStore
from saelab.errors import SaelabError
from saelab.models.hooks import capture

TEXT = "\n\n".join(f"document {i}: " + " ".join(f"w{j % 37}" for j in range(i, i + 90))
                   for i in range(60))


def shard_bytes(folder):
    return [hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("shard_*.safetensors"))]


def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------- prefetch thread


def test_prefetch_yields_in_order_from_another_thread():
    makers = []

    def produce():
        for i in range(7):
            makers.append(threading.get_ident())
            yield i

    assert list(prefetch(produce())) == list(range(7))
    assert set(makers) and threading.get_ident() not in makers


def test_prefetch_raises_the_producers_error_where_it_happened():
    def produce():
        yield 1
        yield 2
        raise ValueError("bad document")

    got = []
    with pytest.raises(ValueError, match="bad document"):
        for item in prefetch(produce()):
            got.append(item)
    assert got == [1, 2]


def test_closing_prefetch_early_stops_and_joins_the_thread():
    made = []

    def produce():
        for i in range(10_000):
            made.append(i)
            yield i

    before = set(threading.enumerate())
    it = prefetch(produce(), depth=2)
    assert next(it) == 0
    it.close()
    assert not set(threading.enumerate()) - before  # the producer thread was joined
    assert len(made) < 10  # it stopped a few items ahead, not at the end


# ---------------------------------------------------------------- batch sizing


def test_auto_batch_is_a_power_of_two_of_contexts_within_bounds():
    gib = 1 << 30
    for free in (0, 10**6, gib, 80 * gib):
        tokens = auto_batch_tokens(free, per_token=50_000, context=128)
        n = tokens // 128
        assert tokens % 128 == 0 and n >= 1 and n & (n - 1) == 0
        assert tokens <= max(128, MAX_AUTO_TOKENS)
    assert auto_batch_tokens(0, 50_000, 128) == 128  # never zero
    assert auto_batch_tokens(80 * gib, 50_000, 128) == MAX_AUTO_TOKENS
    small = auto_batch_tokens(gib, 50_000, 128)
    assert small * 50_000 <= gib // 4 < 2 * small * 50_000  # the largest that fits a quarter


def test_contexts_per_forward_from_tokens_contexts_or_the_cpu_default():
    lm = tiny_lm("llama")
    assert contexts_per_forward(lm, 32, 2) == CPU_BATCH_CONTEXTS
    assert contexts_per_forward(lm, 32, 2, batch_tokens=200) == 6
    assert contexts_per_forward(lm, 32, 2, batch_size=3) == 3
    with pytest.raises(SaelabError, match="not both"):
        contexts_per_forward(lm, 32, 2, batch_size=3, batch_tokens=200)
    with pytest.raises(SaelabError, match="less than one context"):
        contexts_per_forward(lm, 32, 2, batch_tokens=31)


# ---------------------------------------------------------------- forwards


def test_forward_chunks_are_the_models_activations_and_leave_nothing_behind():
    lm = tiny_lm("llama")
    batches = list(token_batches([TEXT], lm.tokenizer, 32, 5))
    seen = []
    for chunk in forward_chunks(lm, ["resid_post.1", "attn_z.0"], iter(batches), torch.float32,
                                to_host=True):
        # between forwards the consumer runs unhooked and outside inference mode
        seen.append((n_hooks(lm.model), torch.is_inference_mode_enabled()))
        with capture(lm.model, ["resid_post.1", "attn_z.0"], stop_early=False) as cap:
            cap.run(input_ids=chunk.ids)
        for site in ("resid_post.1", "attn_z.0"):
            torch.testing.assert_close(chunk.acts[site], cap[site], rtol=0, atol=0)
    assert len(seen) == len(batches) > 2 and set(seen) == {(0, False)}


def test_harvest_batches_in_tokens_store_the_same_contexts(tmp_path):
    lm = tiny_lm("llama")
    base = dict(sites="resid_post.1", tokens=1500, context=32, shard_tokens=256)
    harvest(lm, HarvestConfig(**base, batch_size=4), tmp_path / "contexts")
    manifest = harvest(lm, HarvestConfig(**base, batch_tokens=4 * 32 + 31), tmp_path / "tokens")
    assert manifest.forward == {"batch_contexts": 4, "batch_tokens": 128, "device": "cpu"}
    assert shard_bytes(tmp_path / "tokens") == shard_bytes(tmp_path / "contexts")
    other = harvest(lm, HarvestConfig(**base, batch_tokens=7 * 32), tmp_path / "seven")
    assert other.forward["batch_contexts"] == 7
    a, b = ActivationStore(tmp_path / "contexts"), ActivationStore(tmp_path / "seven")
    ids_a = torch.cat([ids for ids, _ in a.tokens()])
    ids_b = torch.cat([ids for ids, _ in b.tokens()])
    n = min(len(ids_a), len(ids_b))
    assert n > 30 and torch.equal(ids_a[:n], ids_b[:n])  # same contexts, cut differently
    acts_a = torch.cat([a.load_shard(i)["resid_post.1"] for i in range(len(a.manifest.shards))])
    acts_b = torch.cat([b.load_shard(i)["resid_post.1"] for i in range(len(b.manifest.shards))])
    torch.testing.assert_close(acts_a[:n], acts_b[:n], rtol=1e-5, atol=1e-5)


def test_resume_forwards_the_recorded_batch(tmp_path):
    lm = tiny_lm("llama")
    cfg = dict(sites="resid_post.1", tokens=2000, context=32, shard_tokens=256)
    harvest(lm, HarvestConfig(**cfg, batch_size=5), tmp_path / "whole")
    calls = 0

    def interrupt(done, total):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harvest(lm, HarvestConfig(**cfg, batch_size=5), tmp_path / "parts", on_progress=interrupt)
    recorded = json.loads((tmp_path / "parts" / "manifest.json").read_text())["forward"]
    assert recorded["batch_contexts"] == 5
    harvest(lm, HarvestConfig(**cfg), tmp_path / "parts")  # no batch given: the recorded one
    assert shard_bytes(tmp_path / "parts") == shard_bytes(tmp_path / "whole")


def test_a_manifest_with_a_bad_forward_record_is_named(tmp_path):
    from saelab.errors import CorruptFileError

    lm = tiny_lm("llama")
    harvest(lm, HarvestConfig(sites="resid_post.0", tokens=100, context=32), tmp_path)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    raw["forward"] = {"batch_contexts": 0}
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(CorruptFileError, match="forward.batch_contexts"):
        ActivationStore(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_overlapped_host_copy_equals_the_plain_copy():
    lm = tiny_lm("llama")
    lm.model.to("cuda")
    batches = list(token_batches([TEXT], lm.tokenizer, 32, 6))
    sites = ["resid_post.1", "attn_z.0"]
    overlapped = list(forward_chunks(lm, sites, iter(batches), torch.bfloat16, to_host=True))
    on_device = list(forward_chunks(lm, sites, iter(batches), torch.bfloat16))
    assert len(overlapped) == len(on_device) == len(batches)
    for a, b, (ids, _) in zip(overlapped, on_device, batches, strict=True):
        assert torch.equal(a.ids, ids)
        for s in sites:
            assert a.acts[s].device.type == "cpu" and a.acts[s].is_pinned()
            assert torch.equal(a.acts[s], b.acts[s].cpu())
    assert contexts_per_forward(lm, 128, 2) >= 1  # the free-memory default on a real device


# ---------------------------------------------------------------- the bench


def test_harvest_bench_runs_on_the_cpu(tmp_path):
    from bench.harvest import main

    lm = tiny_lm("llama")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "t.txt").write_text(TEXT)
    out = main(["--model", str(tmp_path / "model"), "--corpus", str(tmp_path / "t.txt"),
                "--sites", "resid_post.0,resid_post.1", "--tokens", "600", "--context", "32",
                "--batch-tokens", "128", "--dtype", "float32", "--threads", "1",
                "--out", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["ratio"] == out["ratio"] > 0
    assert out["depth_blocks"] == 2 and out["batch_contexts"] == 4
    assert out["saelab"]["tokens_stored"] >= 600 and out["plain_tokens_per_s"] > 0


# ---------------------------------------------------------------- the command


def test_cli_batch_tokens_is_used_and_reported(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from saelab.cli import app

    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "c"))
    lm = tiny_lm("llama")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "t.txt").write_text(TEXT)
    args = ["harvest", "--model", str(tmp_path / "model"), "--corpus", str(tmp_path / "t.txt"),
            "--sites", "resid_post.1", "--tokens", "300", "--context", "32"]
    res = CliRunner().invoke(app, [*args, "--batch-tokens", "96", "--out", str(tmp_path / "a"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout[res.stdout.index("{"):])["forward"]["batch_contexts"] == 3
    res = CliRunner().invoke(app, [*args, "--batch-tokens", "96", "--batch-size", "2",
                                   "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "not both" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "b").exists()  # refused before anything was loaded or written


def test_shards_are_written_off_the_forward_thread_and_a_failed_write_is_raised(tmp_path,
                                                                                monkeypatch):
    from saelab.data.store import ShardWriter

    lm = tiny_lm("llama")
    cfg = HarvestConfig(sites="resid_post.1", tokens=2000, context=32, shard_tokens=256,
                        batch_size=4)
    harvest(lm, cfg, tmp_path / "whole")
    append, writers = ShardWriter.append, []

    def failing(self, *args):
        writers.append(threading.get_ident())
        if len(writers) == 3:
            raise RuntimeError("write failed")
        append(self, *args)

    monkeypatch.setattr(ShardWriter, "append", failing)
    with pytest.raises(RuntimeError, match="write failed"):
        harvest(lm, cfg, tmp_path / "parts")
    assert threading.get_ident() not in writers
    assert len(ActivationStore(tmp_path / "parts").manifest.shards) == 2  # the prefix is kept
    monkeypatch.setattr(ShardWriter, "append", append)
    harvest(lm, cfg, tmp_path / "parts")
    assert shard_bytes(tmp_path / "parts") == shard_bytes(tmp_path / "whole")
