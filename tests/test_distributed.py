"""Real torch.distributed processes (gloo, CPU) launched with torchrun."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from synthetic import write_synthetic_cache

from saelab.sae.formats import load_sae
from saelab.train.config import SAESpec, TrainConfig
from saelab.train.trainer import train

TOKENS = 16_384


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, *args: str, cwd, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    # a 5 s monitor: a rank that dies leaves the others time to reach the next barrier
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
           "--monitor-interval", "5", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "saelab", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    write_synthetic_cache(folder, n_tokens=TOKENS)
    return folder


ARGS = ["--sites", "resid_post.0", "--arch", "topk", "--width", "64", "--k", "3",
        "--tokens", str(TOKENS), "--batch-size", "512", "--lr", "0.003", "--json",
        "--dtype", "float32"]  # bf16 matmuls of 256 and 512 rows round differently


def test_two_process_data_parallel_equals_one_process(cache, tmp_path):
    done = torchrun(2, "train", "--cache", str(cache), "--out", str(tmp_path / "ddp"), *ARGS,
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    spec = SAESpec("resid_post.0", "topk", 64, k=3)
    single = train(TrainConfig(saes=(spec,), tokens=TOKENS, batch_size=512, lr=0.003,
                               dtype="float32"),
                   cache, tmp_path / "one")
    a = load_sae(tmp_path / "ddp" / spec.label)
    b = load_sae(single.sae_dirs[spec.label])
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "ddp" / "run.json").read_text())["world_size"] == 2


def test_site_sharded_ranks_train_different_saes(cache, tmp_path):
    out = tmp_path / "sharded"
    done = torchrun(2, "train", "--cache", str(cache), "--out", str(out), *ARGS[:6],
                    "--width", "32,64", "--k", "3", "--tokens", "4096", "--batch-size", "512",
                    "--shard-sites", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "resid_post.0-topk-32-k3" / "cfg.json").is_file()
    assert (out / "resid_post.0-topk-64-k3" / "cfg.json").is_file()
    assert {p.name for p in (out / "ckpt").iterdir()} == {"rank_0", "rank_1"}


def stream_inputs(tmp_path):
    """A tiny llama saved to a folder and a 4000-word corpus file."""
    from tiny_lm import tiny_lm

    lm = tiny_lm("llama")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    words = [f"word{i % 97} thing{i % 13}" for i in range(4000)]
    (tmp_path / "text.txt").write_text("\n\n\n".join(" ".join(words[i:i + 40])
                                                     for i in range(0, 4000, 40)))


def test_two_process_streaming_each_rank_reads_its_own_slice(tmp_path):
    stream_inputs(tmp_path)
    out = tmp_path / "stream"
    done = torchrun(2, "train", "--model", str(tmp_path / "model"), "--corpus",
                    str(tmp_path / "text.txt"), "--context", "32", "--out", str(out),
                    "--sites", "resid_post.1", "--arch", "topk", "--width", "64", "--k", "3",
                    "--tokens", "4096", "--batch-size", "512", "--buffer-tokens", "1024",
                    "--save-cache", str(tmp_path / "saved"), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "resid_post.1-topk-64-k3" / "cfg.json").is_file()
    assert json.loads((out / "run.json").read_text())["streaming"]
    # each rank's stream is its own, so each rank checkpoints its own
    assert {p.name for p in (out / "ckpt").iterdir()} == {"rank_0", "rank_1"}
    # each rank streamed (and saved) its own slice of the corpus: contexts r, r + 2, ...
    from saelab.data.store import ActivationStore

    ids = [ActivationStore(tmp_path / "saved" / f"rank_{r}").load_shard(0)["ids"] for r in (0, 1)]
    assert ids[0].shape == ids[1].shape and not torch.equal(ids[0], ids[1])


def test_data_parallel_streaming_killed_between_the_ranks_saves_resumes_exactly(tmp_path):
    """Rank 1 dies as it starts its second checkpoint, after rank 0 saved its own: the
    resume must start both ranks at the first (each rank streams its own slice, so a
    rank resumed one checkpoint ahead would train on other batches, or hang)."""
    stream_inputs(tmp_path)
    args = ["train", "--model", str(tmp_path / "model"), "--corpus", str(tmp_path / "text.txt"),
            "--context", "32", "--sites", "resid_post.1", "--arch", "topk", "--width", "64",
            "--k", "3", "--tokens", "8192", "--batch-size", "512", "--buffer-tokens", "1024",
            "--checkpoint-every", "2048", "--dtype", "float32", "--deterministic", "--json"]
    whole = torchrun(2, *args, "--out", str(tmp_path / "whole"), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "parts"
    killed = torchrun(2, *args, "--out", str(out), cwd=tmp_path,
                      env={"SAELAB_FAULT": "checkpoint-save:2@1"})
    assert killed.returncode != 0
    steps = {r: json.loads((out / "ckpt" / f"rank_{r}" / "latest.json").read_text())["step"]
             for r in (0, 1)}
    assert steps == {0: 8, 1: 4}  # checkpoints every 4 steps; rank 1 never saved step 8
    assert (out / "ckpt" / "rank_0" / "previous.json").is_file()
    resumed = torchrun(2, *args, "--out", str(out), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    label = "resid_post.1-topk-64-k3"
    a, b = load_sae(tmp_path / "whole" / label), load_sae(out / label)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    assert not any((out / "ckpt" / f"rank_{r}" / "previous.json").exists() for r in (0, 1))
