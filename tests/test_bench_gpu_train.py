"""bench/gpu_train.py runs (tiny shapes, CPU) so that it is never broken."""

import json

import pytest

pytest.importorskip("bench.gpu_train")


def test_gpu_train_bench_runs_on_the_cpu(tmp_path):
    from bench.gpu_train import SPARSIFY_PYTHON, main

    methods = "saelab,sparsify" if SPARSIFY_PYTHON.exists() else "saelab"
    out = main(["--device", "cpu", "--shapes", "tiny", "--steps", "3", "--warmup", "1",
                "--methods", methods, "--dtype", "float32", "--out", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["rows"]
    for row in out["rows"]:
        saelab = next(r for r in row["results"] if r["method"] == "saelab")
        assert saelab["tokens_per_s_median"] > 0 and saelab["steps_timed"] == 3
        assert 0 < saelab["heldout"]["fvu"] < 2
        if SPARSIFY_PYTHON.exists():
            sparsify = next(r for r in row["results"] if r["method"] == "sparsify")
            assert "heldout" in sparsify, sparsify


def test_gpu_train_streaming_option_runs(tmp_path):
    from tiny_lm import tiny_lm

    from bench.gpu_train import main

    lm = tiny_lm("llama")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    words = " ".join(f"w{i % 53}x{i % 7}" for i in range(6000))
    (tmp_path / "t.txt").write_text(words)
    out = main(["--stream", "--compare-harvest", "--device", "cpu", "--model", str(tmp_path / "model"),
                "--corpus", str(tmp_path / "t.txt"), "--sites", "resid_post.*", "--arch", "topk",
                "--width", "64", "--k-stream", "4", "--tokens", "2048", "--batch", "256",
                "--context", "32", "--dtype", "float32", "--buffer-tokens", "1024", "--out", str(tmp_path / "s.json")])
    stream = out["stream"]
    assert stream["saes"] == 3 and stream["stream"]["tokens_per_s_end_to_end"] > 0
    assert stream["stream"]["fvu"] == pytest.approx(stream["harvest_then_train"]["fvu"], abs=0.2)
