import hashlib

import pytest
import torch
from tiny_lm import tiny_lm

from saelab.data.harvest import HarvestConfig, harvest
from saelab.data.store import ActivationStore
from saelab.errors import SaelabError
from saelab.models.hooks import capture


def shard_hashes(folder):
    return [hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("shard_*.safetensors"))]


CFG = HarvestConfig(sites="resid_post.1,attn_z.0", tokens=3000, context=32, batch_size=8,
                    shard_tokens=512)


def test_stored_activations_are_the_models(tmp_path):
    lm = tiny_lm("llama")
    manifest = harvest(lm, CFG, tmp_path)
    assert manifest.n_tokens >= 3000 and len(manifest.shards) > 3
    assert manifest.sites == {"attn_z.0": 32, "resid_post.1": 32}
    store = ActivationStore(tmp_path)
    shard = store.load_shard(1)
    with capture(lm.model, ["resid_post.1", "attn_z.0"], stop_early=False) as cap:
        cap.run(input_ids=shard["ids"].long())
    torch.testing.assert_close(shard["resid_post.1"], cap["resid_post.1"], rtol=0, atol=0)
    torch.testing.assert_close(shard["attn_z.0"], cap["attn_z.0"], rtol=0, atol=0)
    assert shard["special"][:, 0].all()  # the BOS opens every context


def test_interrupted_harvest_resumes_to_identical_shards(tmp_path):
    lm = tiny_lm("llama")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    harvest(lm, CFG, whole)
    calls = 0

    def interrupt(done, total):
        nonlocal calls
        calls += 1
        if calls == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harvest(lm, CFG, parts, on_progress=interrupt)
    kept = len(ActivationStore(parts).manifest.shards)
    assert 0 < kept < len(ActivationStore(whole).manifest.shards)
    harvest(lm, CFG, parts)
    assert shard_hashes(parts) == shard_hashes(whole)


def test_harvest_refuses_a_different_setup_in_the_same_folder(tmp_path):
    lm = tiny_lm("llama")
    harvest(lm, CFG, tmp_path)
    with pytest.raises(SaelabError, match="context: cached 32, asked 16"):
        harvest(lm, HarvestConfig(sites=CFG.sites, tokens=100, context=16), tmp_path)


def test_harvest_stops_the_forward_after_the_deepest_site(tmp_path):
    lm = tiny_lm("llama")
    ran = []
    handle = lm.model.model.layers[2].register_forward_hook(lambda *a: ran.append(1))
    try:
        harvest(lm, HarvestConfig(sites="resid_post.0", tokens=100, context=32), tmp_path)
    finally:
        handle.remove()
    assert ran == []


@pytest.mark.slow
def test_embedded_model_harvest_and_shuffled_read(embedded_lm, tmp_path):
    cfg = HarvestConfig(sites="resid_post.6,attn_z.2", tokens=4000, context=64, batch_size=8,
                        shard_tokens=1024)
    harvest(embedded_lm, cfg, tmp_path)
    store = ActivationStore(tmp_path)
    batches = list(store.batches("resid_post.6", 512, seed=0))
    assert len(batches) >= 6 and batches[0].shape == (512, 576)
    assert all(torch.isfinite(b).all() for b in batches)
