import json

import pytest
import torch

from saelab.data.store import ActivationStore, Manifest, ShardWriter
from saelab.errors import CorruptFileError, SaelabError, SiteError

IDENTITY = {"model": "tiny", "model_hash": "abc", "sites": {"resid_post.1": 8}, "dtype": "float32",
            "context": 4, "corpus": "builtin", "corpus_hash": "h"}


def write_cache(folder, n_shards=3, n_ctx=5):
    writer = ShardWriter(folder, IDENTITY, tokens_target=10_000)
    gen = torch.Generator().manual_seed(0)
    for s in range(n_shards):
        ids = torch.arange(n_ctx * 4).reshape(n_ctx, 4) + 100 * s
        special = torch.zeros(n_ctx, 4, dtype=torch.bool)
        special[:, 0] = True  # a BOS in every context
        acts = torch.randn(n_ctx, 4, 8, generator=gen)
        writer.append(ids, special, {"resid_post.1": acts})
    return writer


def test_batches_cover_every_non_special_row_once(tmp_path):
    write_cache(tmp_path)
    store = ActivationStore(tmp_path)
    rows = torch.cat(list(store.batches("resid_post.1", batch_size=5, seed=1)))
    expected = torch.cat([store.load_shard(i)["resid_post.1"][:, 1:].reshape(-1, 8)
                          for i in range(3)])
    assert rows.shape[0] == expected.shape[0] == 45
    # same multiset of rows, different order
    key = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
    assert torch.equal(key(rows), key(expected))
    assert not torch.equal(rows, expected)
    again = torch.cat(list(store.batches("resid_post.1", batch_size=5, seed=1)))
    assert torch.equal(rows, again)


def test_ranks_read_disjoint_rows(tmp_path):
    write_cache(tmp_path)
    store = ActivationStore(tmp_path)
    a = torch.cat(list(store.batches("resid_post.1", 5, seed=2, rank=0, world_size=2)))
    b = torch.cat(list(store.batches("resid_post.1", 5, seed=2, rank=1, world_size=2)))
    assert a.shape == b.shape
    assert not (a[:, None, :] == b[None, :, :]).all(-1).any()


def test_resume_removes_partial_files_and_keeps_shards(tmp_path):
    write_cache(tmp_path, n_shards=2)
    (tmp_path / ".shard_00002.safetensors.tmp").write_bytes(b"half a shard")
    writer = ShardWriter(tmp_path, IDENTITY, tokens_target=10_000)
    assert len(writer.manifest.shards) == 2
    assert not (tmp_path / ".shard_00002.safetensors.tmp").exists()


def test_resume_with_other_settings_is_refused(tmp_path):
    write_cache(tmp_path, n_shards=1)
    with pytest.raises(SaelabError, match="context: cached 4, asked 8"):
        ShardWriter(tmp_path, IDENTITY | {"context": 8}, tokens_target=10)


def test_truncated_shard_is_named_and_not_read(tmp_path):
    write_cache(tmp_path, n_shards=2)
    path = tmp_path / "shard_00001.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    store = ActivationStore(tmp_path)
    store.load_shard(0)
    with pytest.raises(CorruptFileError, match="shard_00001"):
        store.load_shard(1)


def test_unknown_site_and_bad_manifest(tmp_path):
    write_cache(tmp_path, n_shards=1)
    with pytest.raises(SiteError, match="resid_post.1"):
        next(ActivationStore(tmp_path).batches("attn_z.0", 2))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptFileError):
        Manifest.read(tmp_path)
    raw_dir = tmp_path / "empty"
    raw_dir.mkdir()
    with pytest.raises(SaelabError, match="no manifest.json"):
        ActivationStore(raw_dir)


def test_manifest_counts(tmp_path):
    write_cache(tmp_path, n_shards=2, n_ctx=5)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["n_tokens"] == 2 * 5 * 3
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
