"""Streaming training (the model in the loop), site groups, and resume of either."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_lm import tiny_lm

from saelab.data.harvest import HarvestConfig, harvest
from saelab.errors import SaelabError
from saelab.sae.formats import load_sae
from saelab.train.config import SAESpec, TrainConfig
from saelab.train.objective import SAEObjective
from saelab.train.trainer import Stream, train

SITES = ("resid_post.1", "attn_z.0", "resid_post.0")
WEIGHTS = ("W_enc", "W_dec", "b_enc", "b_dec")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~40k characters (tokens of the character tokenizer) of random words, 120 documents."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
             for _ in range(300)]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 80))) + "."
            for _ in range(120)]
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text("\n\n\n".join(docs))
    return str(path)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


def config(sites=SITES[:2], **kw) -> TrainConfig:
    specs = tuple(SAESpec(s, "topk", 64, k=4) for s in sites)
    base = dict(saes=specs, tokens=24 * 256, batch_size=256, lr=3e-3, warmup_steps=4,
                dead_tokens=1000, checkpoint_every=0, deterministic=True, dtype="float32",
                buffer_tokens=1024, buffer_dtype="float32", chunk_contexts=4, log_every=4)
    return TrainConfig(**(base | kw))


def assert_same_saes(a, b, labels, exact=True):
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-6}
    for label in labels:
        sa, sb = load_sae(a / label), load_sae(b / label)
        for name in WEIGHTS:
            torch.testing.assert_close(getattr(sa, name), getattr(sb, name), **tol,
                                       msg=f"{label} {name}")


def test_streaming_equals_training_from_a_cache_of_the_same_tokens(lm, corpus, tmp_path):
    cfg = config()
    labels = [s.label for s in cfg.saes]
    streamed = train(cfg, Stream(lm, corpus, context=32, save_cache=tmp_path / "saved"),
                     tmp_path / "stream")
    assert not (tmp_path / "stream" / "cache").exists()
    record = json.loads((tmp_path / "stream" / "run.json").read_text())
    assert record["streaming"] and record["buffer"]["tokens_per_site"] == 1024
    assert record["device"] == "cpu" and record["compute_dtype"] == "float32"
    assert record["site_groups"] == [labels] and record["kernel"][labels[0]]["name"] == "torch"
    # a harvest of the same corpus, forwarding the same contexts per batch
    harvest(lm, HarvestConfig(sites=",".join(SITES[:2]), corpus=corpus, tokens=30_000,
                              context=32, batch_size=4, shard_tokens=1024), tmp_path / "cache")
    from_cache = train(cfg, tmp_path / "cache", tmp_path / "from_cache")
    assert_same_saes(tmp_path / "stream", tmp_path / "from_cache", labels)
    assert from_cache.final[labels[0]]["fvu"] == pytest.approx(streamed.final[labels[0]]["fvu"])
    # --save-cache wrote the harvest's layout: training from it is the same run again
    train(cfg, tmp_path / "saved", tmp_path / "from_saved")
    assert_same_saes(tmp_path / "stream", tmp_path / "from_saved", labels)


class Stop(Exception):
    pass


def stop_at(tokens):
    def hook(done, total, info):
        if done >= tokens:
            raise Stop
    return hook


def test_a_streaming_run_stopped_and_resumed_equals_an_uninterrupted_one(lm, corpus, tmp_path):
    cfg = config(checkpoint_every=5 * 256)
    labels = [s.label for s in cfg.saes]
    train(cfg, Stream(lm, corpus, context=32), tmp_path / "whole")
    with pytest.raises(Stop):
        train(cfg, Stream(lm, corpus, context=32), tmp_path / "parts", on_progress=stop_at(13 * 256))
    info = json.loads((tmp_path / "parts" / "ckpt" / "latest.json").read_text())
    assert info["step"] == 10 and info["stream"]["position"] > 0
    train(cfg, Stream(lm, corpus, context=32), tmp_path / "parts", resume=True)
    assert_same_saes(tmp_path / "whole", tmp_path / "parts", labels)
    rows = [json.loads(r) for r in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["group"], r["step"], r["sae"]) for r in rows]
    assert len(keys) == len(set(keys)) == 6 * len(labels)  # steps 3, 7, ... 23, no repeats


def test_three_site_groups_equal_one(lm, corpus, tmp_path):
    cfg = config(sites=SITES)
    labels = [s.label for s in cfg.saes]
    one = train(cfg, Stream(lm, corpus, context=32), tmp_path / "one")
    cost = SAEObjective.nbytes(cfg.saes[0], 32, 256, torch.float32) + 2 * 1024 * 32 * 4
    three = train(cfg, Stream(lm, corpus, context=32), tmp_path / "three", memory_budget=cost)
    assert one.groups == [labels] and three.groups == [[lb] for lb in labels]
    assert json.loads((tmp_path / "three" / "run.json").read_text())["site_groups"] == three.groups
    assert_same_saes(tmp_path / "one", tmp_path / "three", labels)
    rows = [json.loads(r) for r in (tmp_path / "three" / "metrics.jsonl").read_text().splitlines()]
    assert {r["group"] for r in rows} == {0, 1, 2}


def test_resuming_a_finished_run_changes_nothing(lm, corpus, tmp_path):
    cfg = config()
    first = train(cfg, Stream(lm, corpus, context=32), tmp_path)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    again = train(cfg, Stream(lm, corpus, context=32), tmp_path, resume=True)
    assert again.already_finished and again.final == first.final
    assert again.final[cfg.saes[0].label]["l0"] > 0
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files


@pytest.mark.parametrize(("change", "message"), [
    ("tokens", r"data n_tokens: was"),
    # Issue 13: another width was a `copy_` size mismatch; the cache's identity refuses it first.
    ("width", r"data sites: was \{'resid_post\.1': 32\}, now \{'resid_post\.1': 64\}"),
])
def test_resume_refuses_a_different_cache_at_the_same_path(lm, corpus, tmp_path, change, message):
    import shutil

    cfg = config(sites=SITES[:1], tokens=8 * 256)
    hc = HarvestConfig(sites="resid_post.1", corpus=corpus, tokens=6000, context=32, batch_size=4)
    harvest(lm, hc, tmp_path / "cache")
    with pytest.raises(Stop):
        train(cfg, tmp_path / "cache", tmp_path / "run", on_progress=stop_at(3 * 256))
    shutil.rmtree(tmp_path / "cache")
    if change == "tokens":
        harvest(lm, HarvestConfig(**{**hc.__dict__, "tokens": 7000}), tmp_path / "cache")
    else:
        harvest(tiny_lm("llama", hidden_size=2 * lm.arch.d_model), hc, tmp_path / "cache")
    with pytest.raises(SaelabError, match=message):
        train(cfg, tmp_path / "cache", tmp_path / "run", resume=True)


KILLED = textwrap.dedent("""
    import os, signal, sys
    from saelab.train.config import SAESpec, TrainConfig
    from saelab.train.trainer import train
    cfg = TrainConfig.from_dict(__import__("json").loads(sys.argv[3]))
    def hook(done, total, info):
        if done >= int(sys.argv[4]):
            os.kill(os.getpid(), signal.SIGKILL)
    train(cfg, sys.argv[1], sys.argv[2], on_progress=hook)
""")


def test_kill_9_then_resume_from_a_cache_ends_with_the_same_weights(tmp_path):
    from synthetic import write_synthetic_cache

    write_synthetic_cache(tmp_path / "cache", n_tokens=16_384)
    spec = SAESpec("resid_post.0", "batchtopk", 64, k=3)
    cfg = TrainConfig(saes=(spec,), tokens=2 * 16_384, batch_size=512, lr=3e-3,
                      checkpoint_every=4096, deterministic=True, buffer_tokens=4096)
    whole = train(cfg, tmp_path / "cache", tmp_path / "whole")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path / "cache"),
                           str(tmp_path / "killed"), json.dumps(cfg.to_dict()), str(45 * 512)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert json.loads((tmp_path / "killed" / "ckpt" / "latest.json").read_text())["step"] == 40
    resumed = train(cfg, tmp_path / "cache", tmp_path / "killed", resume=True)
    assert_same_saes(tmp_path / "whole", tmp_path / "killed", [spec.label])
    assert resumed.final == whole.final  # the reads fall at the same steps


def test_streaming_cli_checks_tokens_before_loading_a_model(tmp_path):
    import typer
    from typer.testing import CliRunner

    from saelab.train.commands import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # two commands: typer keeps the subcommand name
    res = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r"), "--tokens", "100",
                                   "--model", str(tmp_path / "no-such-model")])
    assert res.exit_code == 2 and "less than one batch" in res.output


def test_streaming_cli_trains_every_site_of_a_glob(lm, corpus, tmp_path):
    import typer
    from typer.testing import CliRunner

    from saelab.train.commands import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    model_dir = tmp_path / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    res = CliRunner().invoke(app, [
        "train", "--out", str(tmp_path / "r"), "--model", str(model_dir), "--corpus", corpus,
        "--sites", "resid_post.*", "--arch", "topk", "--width", "64", "--k", "4",
        "--tokens", "2048", "--batch-size", "256", "--context", "32", "--buffer-tokens", "1024",
        "--memory-budget", "1GB", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout[res.stdout.index("{"):])
    assert sorted(out["saes"]) == [f"resid_post.{i}-topk-64-k4" for i in range(3)]
    assert not (tmp_path / "r" / "cache").exists()
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    assert record["memory_budget"] == 2**30 and record["streaming"]


@pytest.mark.parametrize("stop", [11, 13])  # contexts in shards at the stop: fewer, more than at the checkpoint
def test_a_resumed_streaming_run_saves_the_whole_cache(lm, corpus, tmp_path, stop):
    """--save-cache across a stop: the contexts forwarded but not yet in a shard when the
    run stopped are forwarded again on resume, so the cache equals an uninterrupted one's."""
    import hashlib

    cfg = config(checkpoint_every=5 * 256)
    def stream(folder):
        return Stream(lm, corpus, context=32, save_cache=folder, shard_tokens=1024)
    train(cfg, stream(tmp_path / "c1"), tmp_path / "whole")
    with pytest.raises(Stop):
        train(cfg, stream(tmp_path / "c2"), tmp_path / "parts", on_progress=stop_at(stop * 256))
    train(cfg, stream(tmp_path / "c2"), tmp_path / "parts", resume=True)

    def shards(folder):
        return [hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.glob("shard_*.safetensors"))]
    assert len(shards(tmp_path / "c1")) > 2 and shards(tmp_path / "c1") == shards(tmp_path / "c2")


@pytest.mark.parametrize("failing", [0, 1])  # the first SAE: retried after the split
def test_out_of_memory_in_a_step_splits_the_group_and_ends_with_the_same_saes(
        lm, corpus, tmp_path, monkeypatch, failing):
    cfg = config(sites=SITES)
    labels = [s.label for s in cfg.saes]
    train(cfg, Stream(lm, corpus, context=32), tmp_path / "one")
    step = SAEObjective.train_step
    raised = []

    def oom_once(self, x, steps):
        if self.spec.label == labels[failing] and self.step_i == 5 and not raised:
            raised.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return step(self, x, steps)

    monkeypatch.setattr(SAEObjective, "train_step", oom_once)
    with pytest.warns(UserWarning, match="out of device memory at step 5 of site group 1"):
        split = train(cfg, Stream(lm, corpus, context=32), tmp_path / "split")
    assert raised and split.groups == [labels[:1], labels[1:]]
    assert json.loads((tmp_path / "split" / "run.json").read_text())["site_groups"] == split.groups
    assert_same_saes(tmp_path / "one", tmp_path / "split", labels)


def test_out_of_memory_with_one_sae_is_an_error(lm, corpus, tmp_path, monkeypatch):
    def oom(self, x, steps):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(SAEObjective, "train_step", oom)
    with pytest.raises(SaelabError, match="out of device memory training resid_post.1-topk-64-k4 alone"):
        train(config(sites=SITES[:1]), Stream(lm, corpus, context=32), tmp_path)


def test_saes_record_the_corpus_contexts_their_run_read(lm, corpus, tmp_path):
    """The buffer reads ahead of what is trained: the SAE records every context read, so an
    evaluation can start past them (saelab/evals/run.py held_out_skip)."""
    cfg = config(sites=SITES[:1], tokens=8 * 256)
    train(cfg, Stream(lm, corpus=corpus, context=32), tmp_path / "run")
    read = load_sae(tmp_path / "run" / cfg.saes[0].label).cfg.metadata["corpus_contexts"]
    # trained rows plus the buffer, refilled half at a time, so at least half full
    assert read * 31 >= cfg.tokens + cfg.buffer_tokens // 2
    assert read % cfg.chunk_contexts == 0
