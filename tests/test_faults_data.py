"""Fault injection for the data writers: harvest, features, sae convert (issue 13).

A kill -9 is a child process ending itself with os._exit(137) at a named write
point (SAELAB_FAULT=point:N, see saelab/atomic.py): no finally block runs, no
buffer is flushed. After each kill the data must read as the old result or the
new one, never a mixture, and a rerun must equal an uninterrupted run (bit for
bit for harvest shards and manifests, table contents for feature indexes, file
bytes for SAEs). A full disk is a 2 MB tmpfs (mount needs root; skipped with
the reason otherwise) and, everywhere, a patched writer raising the errors a
full disk raises (OSError(ENOSPC); safetensors' SafetensorError).
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import random
import string
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors import SafetensorError
from tiny_lm import tiny_lm
from tiny_models import tiny_sae
from typer.testing import CliRunner

from saelab.atomic import FAULT_ENV, DiskFullError, recover_folder
from saelab.cli import app
from saelab.data.corpus import Corpus
from saelab.data.harvest import HarvestConfig, harvest
from saelab.data.store import ActivationStore
from saelab.errors import SaelabError
from saelab.features.build import IndexConfig, build_index
from saelab.features.collect import CollectConfig
from saelab.features.commands import check_cache
from saelab.features.index import FeatureIndex
from saelab.sae import load_sae, save_sae
from saelab.sae.info import convert_sae


def _text(n_words: int = 4000, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8)))
             for _ in range(n_words)]
    return "\n\n".join(" ".join(words[i:i + 60]) + "." for i in range(0, n_words, 60))


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(_text())
    return path


def killed(fault: str, fn, *args, **kwargs) -> None:
    """Run fn in a forked child that dies like kill -9 at the write point `fault`."""
    def child():
        # A forked child must not use the parent's OpenMP pool (libgomp is not fork-safe:
        # the harvest's background threads then wait forever on it).
        torch.set_num_threads(1)
        os.environ[FAULT_ENV] = fault
        fn(*args, **kwargs)
        os._exit(0)  # reaching the end means the point was never hit

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(300)
    assert proc.exitcode == 137, f"{fault}: the child ended with {proc.exitcode}, not at the fault"


def cli(*args: str):
    from saelab.console import console

    width = console.width
    console.width = 10_000  # rich wraps at the terminal width; a message is one logical line
    try:
        res = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        console.width = width
    return res.exit_code, res.output


def one_error_line(output: str) -> str:
    """The error message: one line, the last thing printed, no traceback."""
    assert "Traceback" not in output and "error:" in output, output
    tail = output[output.index("error:"):].strip()
    assert "\n" not in tail, output
    return tail


# ================================================================ harvest


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def cfg(text_file: Path, **kw) -> HarvestConfig:
    base = dict(sites="resid_post.1", corpus=str(text_file), tokens=2000, context=32,
                batch_size=8, shard_tokens=256)
    return HarvestConfig(**(base | kw))


@pytest.fixture(scope="module")
def whole_cache(lm, text_file, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("whole")
    harvest(lm, cfg(text_file), out)
    return files_of(out)


@pytest.mark.parametrize("fault", ["shard-written:3", "shard-renamed:3", "manifest-written:1",
                                   "manifest-written:4"])
def test_harvest_killed_at_a_write_point_resumes_bit_for_bit(lm, text_file, whole_cache,
                                                               tmp_path, fault):
    out = tmp_path / "cache"
    killed(fault, harvest, lm, cfg(text_file), out)
    left = {p.name for p in out.iterdir()}
    if fault.startswith("shard-written"):
        assert ".shard_00002.safetensors.tmp" in left  # the kill left our temporary
    if fault.startswith("shard-renamed"):
        assert "shard_00002.safetensors" in left  # renamed, never listed
        assert len(ActivationStore(out).manifest.shards) == 2
    store = ActivationStore(out)  # what a reader sees after the kill: only complete shards
    for i in range(len(store.manifest.shards)):
        store.load_shard(i)
    harvest(lm, cfg(text_file), out)
    assert files_of(out) == whole_cache


def test_harvest_refuses_a_folder_with_files_it_did_not_write(model_dir, text_file, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "c"))
    u = tmp_path / "u"
    u.mkdir()
    (u / "shard_notes.txt").write_text("n\n")
    (u / ".draft.tmp").write_text("b\n")
    code, output = cli("harvest", "--model", model_dir, "--sites", "resid_post.0", "--tokens",
                       "100", "--corpus", text_file, "--out", u)
    line = one_error_line(output)
    assert code == 2 and str(u) in line and ".draft.tmp, shard_notes.txt" in line, output
    assert "Pick an empty folder" in line
    assert sorted(p.name for p in u.iterdir()) == [".draft.tmp", "shard_notes.txt"]


def test_harvest_refuses_a_foreign_file_in_its_own_cache(lm, text_file, tmp_path):
    harvest(lm, cfg(text_file, tokens=300), tmp_path)
    (tmp_path / "notes.md").write_text("mine")
    with pytest.raises(SaelabError, match="notes.md"):
        harvest(lm, cfg(text_file, tokens=600), tmp_path)
    assert (tmp_path / "notes.md").read_text() == "mine"


def test_harvest_refuses_shards_whose_manifest_was_lost(lm, text_file, tmp_path):
    harvest(lm, cfg(text_file, tokens=600), tmp_path)
    (tmp_path / "manifest.json").unlink()
    before = files_of(tmp_path)
    with pytest.raises(SaelabError, match="no manifest.json.*left as they are"):
        harvest(lm, cfg(text_file, tokens=600), tmp_path)
    assert files_of(tmp_path) == before


@pytest.mark.parametrize("manifest", ['{"version": 1, "identity": {"sites": {}}, '
                                      '"tokens_target": 5, "shards": {"file": 3}}', "[]",
                                      '{"version": 1, "identity": {"sites": {}}, "tokens_target": 5,'
                                      ' "shards": [{"file": "../x", "n_contexts": 1, "n_tokens": 1,'
                                      ' "sha256": ""}]}'])
def test_a_manifest_of_the_wrong_shape_is_named(tmp_path, manifest):
    from saelab.errors import CorruptFileError

    (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(CorruptFileError, match=r"manifest\.json: .*expected"):
        ActivationStore(tmp_path)


# ---------------------------------------------------------------- model provenance


@pytest.fixture
def model_dir(lm, tmp_path) -> Path:
    folder = tmp_path / "model"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def test_weights_hash_sees_new_weights_of_the_same_size(model_dir, tmp_path, monkeypatch):
    from saelab.models.weights_hash import weights_hash

    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "c"))
    before = weights_hash(model_dir)
    assert weights_hash(model_dir) == before  # remembered, same answer
    weights = model_dir / "model.safetensors"
    size = weights.stat().st_size
    tiny_lm("llama", seed=1).model.save_pretrained(model_dir)  # other weights, same shapes
    assert weights.stat().st_size == size  # same names, shapes and size: only bytes differ
    assert weights_hash(model_dir) != before


def test_harvest_resumed_after_the_weights_changed_is_refused(model_dir, text_file, tmp_path,
                                                               monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "c"))
    out = tmp_path / "cache"
    args = ("harvest", "--model", model_dir, "--sites", "resid_post.1", "--context", "32",
            "--batch-size", "8", "--corpus", text_file, "--out", out, "--dtype", "float32")
    code, output = cli(*args, "--tokens", "200")
    assert code == 0, output
    tiny_lm("llama", seed=1).model.save_pretrained(model_dir)  # other weights, same shapes
    code, output = cli(*args, "--tokens", "400")
    assert code == 2 and "model_hash: cached" in output and "harvested differently" in output, output


# ================================================================ features


def _nan_as_text(obj):
    """NaN != NaN, so tables holding NaN (ablation deltas) compare with NaN spelled out."""
    if isinstance(obj, dict):
        return {k: _nan_as_text(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_as_text(v) for v in obj]
    return "nan" if isinstance(obj, float) and obj != obj else obj


def same(a, b) -> bool:
    """Equal tables, floats to 1e-5: an index built in the killed child process and one built
    here may differ in the last bits (the ablated text's batched forwards)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-5, abs=1e-7)
    return a == b


def tables(folder: Path) -> dict:
    """The contents of an index (tables and summary), and proof that it is one build."""
    idx = FeatureIndex.open(folder)
    out = {name: _nan_as_text(pq.read_table(folder / name).to_pydict())
           for name in ("features.parquet", "examples.parquet", "ablation.parquet")}
    out["summary"] = idx.meta["summary"]
    # one build: every alive feature's max activation is its top example's activation
    for f, (count, top) in enumerate(zip(out["features.parquet"]["count"],
                                         out["features.parquet"]["max_act"], strict=True)):
        if count:
            assert idx.examples(f)[0]["act"] == pytest.approx(top), f"feature {f}: a mixture"
    return out


@pytest.fixture(scope="module")
def feats(lm):
    sae = tiny_sae(lm.model, "resid_post.1", "topk", d_sae=24)
    corpus = Corpus.from_texts("faults", _text(3000, seed=1).split("\n\n"))
    small = IndexConfig(tokens=300, corpus=corpus, context=24, batch_size=8, ablate=2, cards=2,
                        collect=CollectConfig(top_k=3, n_bins=2, per_bin=1, left=3, right=2))
    return sae, small, replace(small, tokens=700)


def build(lm, sae, out: Path, config: IndexConfig) -> None:
    build_index(lm, {"tiny": (sae, None)}, out, config)


@pytest.fixture(scope="module")
def feats_refs(lm, feats, tmp_path_factory):
    sae, a, b = feats
    ra, rb = tmp_path_factory.mktemp("ref_a"), tmp_path_factory.mktemp("ref_b")
    build(lm, sae, ra, a)
    build(lm, sae, rb, b)
    return tables(ra / "tiny"), tables(rb / "tiny")


@pytest.mark.parametrize("fault", ["features-file:1", "features-file:2", "folder-written:1",
                                   "folder-switched:1"])
def test_features_rebuild_killed_shows_old_or_new_never_a_mixture(lm, feats, feats_refs,
                                                                   tmp_path, fault):
    sae, a, b = feats
    ref_a, ref_b = feats_refs
    build(lm, sae, tmp_path, a)
    (tmp_path / "tiny" / "notes.txt").write_text("mine")
    killed(fault, build, lm, sae, tmp_path, b)
    after_kill = tables(tmp_path / "tiny")
    assert same(after_kill, ref_b if fault.startswith("folder-switched") else ref_a)
    assert not same(ref_a, ref_b)
    assert any(p.name.startswith(".tiny.") for p in tmp_path.iterdir())  # the kill's leftover
    build(lm, sae, tmp_path, b)
    assert same(tables(tmp_path / "tiny"), ref_b)
    assert (tmp_path / "tiny" / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert (tmp_path / "tiny" / "dashboard.html").is_file()


def test_features_cache_of_another_model_or_width_is_refused(lm, tmp_path):
    sae = tiny_sae(lm.model, "resid_post.1", "topk", d_sae=24)
    sae.cfg = sae.cfg.with_metadata(model_name="tiny-llama", model_hash="aa" * 32)
    ident = {"model": "tiny-llama", "model_hash": "aa" * 32, "sites": {"resid_post.1": 32}}
    check_cache(tmp_path, ident, {"s": (sae, None)}, replace(lm, name="tiny-llama",
                                                             source_hash="aa" * 32))
    # same weights under another name (an embedded name vs its folder) are the same model
    check_cache(tmp_path, ident | {"model": "/models/tiny"}, {"s": (sae, None)},
                replace(lm, name="x", source_hash="aa" * 32))
    with pytest.raises(SaelabError, match=r"model 'gpt-x'.*SAE s is model 'tiny-llama'"):
        check_cache(tmp_path, ident | {"model": "gpt-x", "model_hash": "bb" * 32},
                    {"s": (sae, None)}, lm)
    with pytest.raises(SaelabError, match=r"holds resid_post.1 64 wide.*reads 32-wide"):
        check_cache(tmp_path, ident | {"sites": {"resid_post.1": 64}}, {"s": (sae, None)},
                    replace(lm, source_hash="aa" * 32))


def test_features_command_refuses_a_cache_of_another_model(lm, model_dir, text_file, tmp_path,
                                                           monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "c"))
    cache = tmp_path / "cache"
    harvest(lm, cfg(text_file, tokens=200), cache)  # recorded as model "tiny-llama"
    sae = tiny_sae(lm.model, "resid_post.1", "topk", d_sae=24)
    sae.cfg = sae.cfg.with_metadata(model_name=str(model_dir))
    save_sae(sae, tmp_path / "sae")
    code, output = cli("features", tmp_path / "sae", "--cache", cache, "--tokens", "100",
                       "--out", tmp_path / "f")
    line = one_error_line(output)
    assert code == 2 and "tiny-llama" in line and str(model_dir) in line, output


# ================================================================ SAE folders, sae convert


def sae_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "notes.txt"}


@pytest.fixture(scope="module")
def two_saes(lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("saes")
    for seed in (0, 1):
        save_sae(tiny_sae(lm.model, "resid_post.1", "topk", d_sae=24, seed=seed), root / f"s{seed}")
    return root / "s0", root / "s1"


@pytest.mark.parametrize("to", ["saelens", "sparsify"])
@pytest.mark.parametrize("fault", ["folder-written:1", "folder-switched:1"])
def test_convert_killed_shows_old_or_new_sae(two_saes, tmp_path, to, fault):
    a, b = two_saes
    ref_a, ref_b = tmp_path / "ref_a", tmp_path / "ref_b"
    convert_sae(a, ref_a, to)
    convert_sae(b, ref_b, to)
    dst = tmp_path / "dst"
    convert_sae(a, dst, to)
    (dst / "notes.txt").write_text("mine")
    killed(fault, convert_sae, b, dst, to, overwrite=True)
    expect = ref_b if fault.startswith("folder-switched") else ref_a
    assert sae_files(dst) == sae_files(expect)
    load_sae(dst)
    convert_sae(b, dst, to, overwrite=True)
    assert sae_files(dst) == sae_files(ref_b)
    assert (dst / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_switch_without_rename_exchange_is_undone_by_the_next_write(two_saes, tmp_path,
                                                                    monkeypatch):
    """Where renameat2 is missing the switch is two renames; a kill between them is undone."""
    import saelab.atomic

    a, b = two_saes
    dst = tmp_path / "dst"
    convert_sae(a, dst, "saelens")
    before = sae_files(dst)
    monkeypatch.setattr(saelab.atomic, "_exchange", lambda *_: False)
    killed("folder-switched:1", convert_sae, b, dst, "saelens", overwrite=True)
    assert not dst.exists()  # between the renames: no SAE, rather than half of two
    recover_folder(dst, ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"])
    assert sae_files(dst) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sae_write_cleans_our_old_temporaries_and_keeps_other_files(two_saes, tmp_path):
    a, _ = two_saes
    dst = tmp_path / "dst"
    convert_sae(a, dst, "saelens")
    (dst / ".sae_weights.safetensors.k3j_9x2a.tmp").write_bytes(b"half")  # a killed old write
    (dst / ".draft.tmp").write_text("not ours")
    save_sae(load_sae(a), dst)
    assert sorted(p.name for p in dst.iterdir()) == [".draft.tmp", "cfg.json",
                                                     "sae_weights.safetensors"]


# ================================================================ a full disk


def test_a_writer_failing_as_a_full_disk_does_is_one_line(lm, text_file, two_saes, tmp_path,
                                                          monkeypatch):
    """safetensors raises SafetensorError (no errno), Python an OSError(ENOSPC)."""
    import saelab.data.store
    import saelab.sae.formats.native as native

    def full_safetensors(tensors, path, *a, **k):
        Path(path).write_bytes(b"half a shard")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                              "StorageFull, message: \"No space left on device\" })")

    relu = tmp_path / "relu"
    save_sae(tiny_sae(lm.model, "resid_post.1", "relu", d_sae=24), relu)
    out = tmp_path / "cache"
    harvest(lm, cfg(text_file, tokens=600), out)
    kept = files_of(out)
    monkeypatch.setattr(saelab.data.store, "save_file", full_safetensors)
    with pytest.raises(DiskFullError, match=f"^disk full at {out}: every complete shard"):
        harvest(lm, cfg(text_file, tokens=1200), out)
    after = files_of(out)
    assert {n: after[n] for n in kept if n != "manifest.json"} == {
        n: kept[n] for n in kept if n != "manifest.json"}
    assert json.loads(after["manifest.json"])["shards"] == json.loads(kept["manifest.json"])["shards"]
    assert not [n for n in after if n.endswith(".tmp")]

    def full_numpy(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(native, "write_safetensors", lambda path, t: full_safetensors(t, path))
    a, _ = two_saes
    dst = tmp_path / "dst"
    code, output = cli("sae", "convert", a, dst, "--to", "saelens")
    assert code == 2 and one_error_line(output).startswith(f"error: disk full at {dst}"), output
    assert not tmp_path.joinpath("dst").exists() and not list(tmp_path.glob(".dst.*"))
    monkeypatch.setattr(Path, "write_bytes", full_numpy)  # the gemma-scope writer's params.npz
    with pytest.raises(DiskFullError, match=f"disk full at {dst}"):
        convert_sae(relu, dst, "gemma-scope")
    assert not dst.exists() and not list(tmp_path.glob(".dst.*"))


# ---------------------------------------------------------------- a real full disk: tmpfs


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"a 2 MB tmpfs could not be mounted (needs root): {res.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Take all but `leave` bytes of the disk with a filler file."""
    st = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def test_harvest_on_a_full_disk_keeps_its_shards_and_resumes_bit_for_bit(
        lm, text_file, whole_cache, small_disk):
    out = small_disk / "cache"
    out.mkdir()
    filler = fill(small_disk, 100_000)
    with pytest.raises(DiskFullError, match=f"^disk full at {out}"):
        harvest(lm, cfg(text_file), out)
    store = ActivationStore(out)
    assert 0 < len(store.manifest.shards) < len(whole_cache) - 1
    for i in range(len(store.manifest.shards)):
        store.load_shard(i)  # every listed shard is complete and verified
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    filler.unlink()
    harvest(lm, cfg(text_file), out)
    assert files_of(out) == whole_cache


def test_cli_on_a_full_disk_says_so_in_one_line(lm, model_dir, text_file, two_saes, small_disk,
                                                tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "c"))
    # harvest: nothing fits; the cache stays a valid, empty cache
    filler = fill(small_disk, 20_000)
    out = small_disk / "cache"
    code, output = cli("harvest", "--model", model_dir, "--sites", "resid_post.1,resid_post.2",
                       "--context", "32", "--corpus", text_file, "--tokens", "2000", "--out", out)
    assert code == 2 and one_error_line(output).startswith(f"error: disk full at {out}"), output
    assert ActivationStore(out).manifest.shards == []
    filler.unlink()

    # features: a rebuild that does not fit leaves the previous index whole
    sae = tiny_sae(lm.model, "resid_post.1", "topk", d_sae=24)
    sae.cfg = sae.cfg.with_metadata(model_name=str(model_dir))
    save_sae(sae, tmp_path / "sae")
    feats = small_disk / "feats"
    args = ("features", tmp_path / "sae", "--context", "24", "--batch-size", "8", "--ablate", "2",
            "--cards", "2", "--top-k", "3", "--bins", "2", "--per-bin", "1", "--corpus", text_file,
            "--out", feats)
    code, output = cli(*args, "--tokens", "200")
    assert code == 0, output
    before = tables(feats / "sae")
    filler = fill(small_disk, 8_000)
    code, output = cli(*args, "--tokens", "400")
    assert code == 2 and one_error_line(output).startswith("error: disk full at "), output
    assert tables(feats / "sae") == before
    assert not [p for p in feats.iterdir() if p.name.startswith(".")]
    filler.unlink()

    # sae convert: SafetensorError from safetensors itself
    a, _ = two_saes
    filler = fill(small_disk, 8_000)
    dst = small_disk / "converted"
    code, output = cli("sae", "convert", a, dst, "--to", "sparsify")
    assert code == 2 and one_error_line(output).startswith(f"error: disk full at {dst}"), output
    assert not dst.exists() and not list(small_disk.glob(".converted.*"))
    filler.unlink()


def test_shard_hashes_are_what_the_manifest_says(whole_cache):
    manifest = json.loads(whole_cache["manifest.json"])
    for shard in manifest["shards"]:
        assert hashlib.sha256(whole_cache[shard["file"]]).hexdigest() == shard["sha256"]


def test_an_sae_folder_behind_a_symlink_stays_behind_it(two_saes, tmp_path):
    a, b = two_saes
    real, link = tmp_path / "real", tmp_path / "link"
    convert_sae(a, real, "saelens")
    link.symlink_to(real)
    convert_sae(b, link, "saelens", overwrite=True)
    assert link.is_symlink() and sae_files(real) == sae_files(b)


def test_a_hub_snapshot_is_hashed_by_its_weights(tmp_path):
    """A Hugging Face id's model_hash was empty; now it is the snapshot's weights hash."""
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc")
    (snap / "config.json").write_text('{"a": 1}')
    (snap / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    code = ("from saelab.models.weights_hash import hub_weights_hash as h, weights_hash as w; "
            f"print(h('org/tiny') == w({str(snap)!r}) != '', h('org/absent') == '')")
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
                        "SAELAB_CACHE": str(tmp_path / "c")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.stdout.split() == ["True", "True"], res.stderr
