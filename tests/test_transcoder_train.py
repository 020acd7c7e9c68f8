"""Transcoders trained by the streaming engine: every layer from one forward, paired rows."""

import random

import pytest
import torch
from tiny_lm import tiny_lm

from saelab.data.stream import key_sites, pair_key
from saelab.errors import SiteError
from saelab.models.hooks import capture
from saelab.models.sites import resolve_sites
from saelab.sae.formats import load_sae
from saelab.sae.transcoder import Transcoder, load_transcoders
from saelab.train.config import SAESpec, TrainConfig
from saelab.train.pairs import resolve_pairs
from saelab.train.trainer import Stream, train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(80)]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 80))) + "." for _ in range(60)]
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text("\n\n\n".join(docs))
    return str(path)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


def _config(specs, tokens=40 * 256):
    return TrainConfig(saes=tuple(specs), tokens=tokens, batch_size=256, lr=3e-3, warmup_steps=4,
                       dead_tokens=2000, checkpoint_every=0, deterministic=True,
                       dtype="float32", buffer_tokens=1024, buffer_dtype="float32",
                       chunk_contexts=4, log_every=5)


def test_pairs_resolve_mlps_and_explicit_pairs(lm):
    def resolve(t):
        return [s.name for s in resolve_sites(lm.arch, t)]

    n = lm.arch.n_layers
    assert resolve_pairs(["mlp.*"], resolve) == [(f"mlp_in.{i}", f"mlp_out.{i}") for i in range(n)]
    assert resolve_pairs(["mlp.1", "resid_mid.0>mlp_out.0"], resolve) == [
        ("mlp_in.1", "mlp_out.1"), ("resid_mid.0", "mlp_out.0")]
    with pytest.raises(SiteError, match="a single site"):
        resolve_pairs(["resid_post.1"], resolve)
    assert key_sites(pair_key("mlp_in.1", "mlp_out.1")) == ["mlp_in.1", "mlp_out.1"]


@pytest.mark.parametrize("arch,skip", [("topk", True), ("batchtopk", False), ("relu", False),
                                       ("jumprelu", True)])
def test_streaming_trains_every_layer_and_predicts_the_mlp(tmp_path, lm, corpus, arch, skip):
    n = lm.arch.n_layers
    specs = [SAESpec(f"mlp_in.{i}", arch, 64, k=8, target=f"mlp_out.{i}", skip=skip, l1=1e-3,
                     l0_coef=1e-4) for i in range(n)]
    res = train(_config(specs), Stream(lm, corpus=corpus, context=32), tmp_path / "run")
    for spec in specs:
        assert res.final[spec.label]["fvu"] < 1.0, res.final[spec.label]  # learned something
    tset = load_transcoders(tmp_path / "run")
    assert tset.layers == list(range(n)) and tset.model_name == lm.name
    tset.check_model(n_layers=n, d_model=lm.arch.d_model, model_name=lm.name)
    tc = tset[1]
    assert isinstance(tc, Transcoder) and (tc.site, tc.site_out) == ("mlp_in.1", "mlp_out.1")
    assert (tc.W_skip is not None) == skip
    # On raw activations of held-out text (scales folded in), the prediction beats the mean.
    ids = lm.tokenizer(["abc dea fgh bij cadd ef ghij abcd"], return_tensors="pt").input_ids
    with torch.no_grad(), capture(lm.model, ["mlp_in.1", "mlp_out.1"], arch=lm.arch) as cap:
        lm.model(ids)
    x, y = cap["mlp_in.1"][0, 1:], cap["mlp_out.1"][0, 1:]
    pred = tc(x).output
    fvu = ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert fvu < 1.0, float(fvu)


def test_sae_and_transcoder_share_one_stream(tmp_path, lm, corpus):
    specs = [SAESpec("mlp_out.1", "topk", 32, k=4),
             SAESpec("mlp_in.1", "topk", 32, k=4, target="mlp_out.1")]
    res = train(_config(specs, tokens=8 * 256), Stream(lm, corpus=corpus, context=32),
                tmp_path / "run")
    assert len(res.groups) == 1  # one pass, one forward for both
    sae = load_sae(res.sae_dirs[specs[0].label])
    tc = load_sae(res.sae_dirs[specs[1].label])
    assert not isinstance(sae, Transcoder) and isinstance(tc, Transcoder)
    assert specs[1].label == "mlp_in.1-tc-topk-32-k4"


def _cli(monkeypatch, lm, args):
    from typer.testing import CliRunner

    import saelab.models.limits as limits
    import saelab.models.load as load
    from saelab.cli import app

    monkeypatch.setattr(load, "load_model", lambda *a, **k: lm)
    monkeypatch.setattr(limits, "config_max_positions", lambda *a, **k: None)
    return CliRunner().invoke(app, ["train", *args])


def test_cli_trains_transcoders_of_every_mlp(tmp_path, lm, corpus, monkeypatch):
    r = _cli(monkeypatch, lm, ["--kind", "transcoder", "--sites", "mlp.*", "--skip",
                               "--arch", "topk", "--width", "32", "--k", "4", "--tokens", "1024",
                               "--batch-size", "256", "--buffer-tokens", "1024", "--context", "32",
                               "--corpus", corpus, "--out", str(tmp_path / "run"), "--json"])
    assert r.exit_code == 0, r.output
    tset = load_transcoders(tmp_path / "run")
    assert tset.layers == list(range(lm.arch.n_layers)) and tset[0].cfg.skip


@pytest.mark.parametrize("args,message", [
    (["--kind", "transcoder", "--sites", "resid_post.1"], "a single site"),
    (["--sites", "resid_post.1", "--skip"], "--skip is for transcoders"),
    (["--kind", "crosscoder"], "--kind"),
    (["--kind", "transcoder", "--sites", "mlp_in.1>mlp_in.1"], "another site than it reads"),
])
def test_cli_bad_transcoder_requests(tmp_path, lm, monkeypatch, args, message):
    r = _cli(monkeypatch, lm, [*args, "--tokens", "1024", "--batch-size", "256",
                               "--out", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


class _Stop(Exception):
    pass


def test_resumed_transcoder_run_equals_an_uninterrupted_one_and_a_cache_equals_streaming(
        tmp_path, lm, corpus):
    """Checkpoints hold W_skip, the target scale and the paired buffers; a cache of both
    sites gives the same transcoders as streaming."""
    from saelab.data.harvest import HarvestConfig, harvest

    specs = [SAESpec("mlp_in.1", "topk", 32, k=4, target="mlp_out.1", skip=True),
             SAESpec("mlp_in.0", "relu", 32, target="mlp_out.0", l1=1e-3)]
    cfg = TrainConfig(**{**_config(specs, tokens=16 * 256).__dict__, "checkpoint_every": 5 * 256})

    def stop(done, total, info):
        if done >= 8 * 256:
            raise _Stop

    train(cfg, Stream(lm, corpus, context=32), tmp_path / "whole")
    with pytest.raises(_Stop):
        train(cfg, Stream(lm, corpus, context=32), tmp_path / "parts", on_progress=stop)
    train(cfg, Stream(lm, corpus, context=32), tmp_path / "parts", resume=True)
    hc = HarvestConfig(sites="mlp_in.0,mlp_out.0,mlp_in.1,mlp_out.1", corpus=corpus, tokens=8000,
                       context=32, batch_size=4)
    harvest(lm, hc, tmp_path / "cache")
    train(cfg, tmp_path / "cache", tmp_path / "cached")
    for spec in specs:
        a = load_sae(tmp_path / "whole" / spec.label)
        for other in ("parts", "cached"):
            b = load_sae(tmp_path / other / spec.label)
            for name, t in a.tensors().items():
                torch.testing.assert_close(b.tensors()[name], t, rtol=0, atol=0,
                                           msg=f"{other} {spec.label} {name}")
