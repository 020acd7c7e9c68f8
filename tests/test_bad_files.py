"""Bad files and shapes: exit 3 (or 2) and one line naming the file and the field (#13)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_lm import tiny_lm
from typer.testing import CliRunner

from saelab.cli import app
from saelab.data.harvest import HarvestConfig, harvest
from saelab.data.store import MANIFEST, ActivationStore, ShardWriter
from saelab.errors import BadValueError, CorruptFileError, ShapeMismatchError
from saelab.features.collect import collect_cache
from saelab.interventions.generate import generate
from saelab.sae import save_sae
from saelab.sae.testing import random_sae
from saelab.train.checkpoint import POINTER, load_checkpoint, read_run_record, save_checkpoint

SITE = "resid_post.0"


def one_line(args: list[str], code: int) -> str:
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


# ---------------------------------------------------------------- SAE cfg.json
CFG_CASES = {
    "d_sae zero": ({"d_sae": 0}, "d_sae=0"),
    "d_sae negative": ({"d_sae": -5}, "d_sae=-5"),
    "d_in bool": ({"d_in": True}, "d_in=True"),
    "k text": ({"k": "abc"}, "k='abc'"),
    "k past d_sae": ({"k": 65}, "k=65"),
    "top-k without k": ({"k": None}, "k is missing"),
    "metadata text": ({"metadata": "x"}, "metadata"),
    "apply_b_dec_to_input text": ({"apply_b_dec_to_input": "no"}, "apply_b_dec_to_input='no'"),
    "architecture number": ({"architecture": 3}, "architecture 3"),
    "not an object": ([1, 2], "JSON list"),
}


@pytest.mark.parametrize("case", list(CFG_CASES))
def test_bad_cfg_json(case: str, tmp_path: Path) -> None:
    change, expected = CFG_CASES[case]
    folder = tmp_path / "sae"
    save_sae(random_sae("topk", d_in=16, d_sae=64), folder, "saelens")
    cfg = json.loads((folder / "cfg.json").read_text())
    if isinstance(change, dict):
        for key, value in change.items():
            cfg.pop(key) if value is None else cfg.__setitem__(key, value)
    else:
        cfg = change
    (folder / "cfg.json").write_text(json.dumps(cfg))
    line = one_line(["sae", "info", str(folder)], 3 if case != "architecture number" else 2)
    assert "cfg.json" in line and expected in line


def test_apply_b_dec_false_is_read_as_false(tmp_path: Path) -> None:
    """The check refuses "no" but keeps real booleans (no truthiness either way)."""
    from saelab.sae import load_sae

    save_sae(random_sae("topk", apply_b_dec_to_input=False), tmp_path / "sae", "saelens")
    assert load_sae(tmp_path / "sae").cfg.apply_b_dec_to_input is False


# ---------------------------------------------------------------- the cache manifest
def tiny_cache(folder: Path, width: int = 8, contexts: int = 4, context: int = 16) -> Path:
    writer = ShardWriter(folder, {"sites": {SITE: width}, "context": context}, contexts * context)
    ids = torch.randint(0, 100, (contexts, context))
    writer.append(ids, torch.zeros(contexts, context, dtype=torch.bool),
                  {SITE: torch.randn(contexts, context, width)})
    return folder


MANIFEST_CASES = {
    "shards an object": (lambda m: m.__setitem__("shards", {"file": 3}), "shards"),
    "a list": (lambda m: [m], "top level"),
    "shard file a number": (lambda m: m["shards"][0].__setitem__("file", 3), "shards[0].file"),
    "shard file outside": (lambda m: m["shards"][0].__setitem__("file", "../x.safetensors"),
                           "shards[0].file"),
    "n_tokens text": (lambda m: m["shards"][0].__setitem__("n_tokens", "9"), "shards[0].n_tokens"),
    "width zero": (lambda m: m["identity"]["sites"].__setitem__(SITE, 0), f"sites.{SITE}"),
    "no identity": (lambda m: m.pop("identity"), "identity"),
    "tokens_target bool": (lambda m: m.__setitem__("tokens_target", True), "tokens_target"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_manifest_of_the_wrong_shape(case: str, tmp_path: Path) -> None:
    edit, field = MANIFEST_CASES[case]
    cache = tiny_cache(tmp_path / "cache")
    manifest = json.loads((cache / MANIFEST).read_text())
    manifest = edit(manifest) if case == "a list" else (edit(manifest), manifest)[1]
    (cache / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CorruptFileError, match="manifest.json") as err:
        ActivationStore(cache)
    assert field in str(err.value)
    line = one_line(["train", "--out", str(tmp_path / "run"), "--cache", str(cache),
                     "--sites", SITE, "--width", "16", "--k", "4", "--tokens", "64",
                     "--batch-size", "16"], 3)
    assert field in line


def test_truncated_manifest(tmp_path: Path) -> None:
    cache = tiny_cache(tmp_path / "cache")
    text = (cache / MANIFEST).read_text()
    (cache / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        ActivationStore(cache)


# ---------------------------------------------------------------- checkpoints and run.json
def test_truncated_or_wrong_latest_json(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, 3, {"w": torch.ones(2)}, {})
    assert load_checkpoint(folder)[1]["step"] == 3
    text = (folder / POINTER).read_text()
    for bad, match in [(text[: len(text) // 2], "not valid JSON"), ("[]", "JSON list"),
                       ('{"file": 3, "step": 3}', "file is 3"),
                       ('{"file": "../../x.safetensors", "step": 3}', "file is"),
                       ('{"file": "step_00000003.safetensors", "step": "3"}', "step='3'")]:
        (folder / POINTER).write_text(bad)
        with pytest.raises(CorruptFileError, match=match) as err:
            load_checkpoint(folder)
        assert POINTER in str(err.value)


def test_truncated_run_json(tmp_path: Path) -> None:
    from saelab.train.config import SAESpec, TrainConfig
    from saelab.train.trainer import train

    cache = tiny_cache(tmp_path / "cache")
    out = tmp_path / "run"
    out.mkdir()
    cfg = TrainConfig(saes=(SAESpec(SITE, arch="topk", width=16, k=4),), tokens=32,
                      batch_size=16)
    for bad, match in [('{"config": {"tok', "not valid JSON"), ('"x"', "JSON str"),
                       ('{"config": 3}', "config is 3")]:
        (out / "run.json").write_text(bad)
        with pytest.raises(CorruptFileError, match=match):
            read_run_record(out / "run.json")
        with pytest.raises(CorruptFileError, match="run.json"):
            train(cfg, cache, out, resume=True)
    line = one_line(["train", "--out", str(out), "--cache", str(cache), "--sites", SITE,
                     "--arch", "topk", "--width", "16", "--k", "4", "--tokens", "32",
                     "--batch-size", "16", "--resume"], 3)
    assert "run.json: config is 3" in line


# ---------------------------------------------------------------- shapes and limits
def test_sae_on_a_cache_of_another_width(tmp_path: Path) -> None:
    """The same site name at another width (another model) is refused by name, not by
    `shape '[-1, 16]' is invalid`."""
    store = ActivationStore(tiny_cache(tmp_path / "cache", width=8))
    sae = random_sae("topk", d_in=16, d_sae=64, metadata={"site": SITE})
    with pytest.raises(ShapeMismatchError, match="d_in=16 .* width 8"):
        collect_cache(store, {"s": sae})


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")  # max_position_embeddings 128, a character tokenizer


def test_generate_empty_and_too_long_prompt(lm) -> None:
    with pytest.raises(BadValueError, match="empty"):
        generate(lm, "", tokenizer=_no_bos())
    with pytest.raises(BadValueError, match="prompt 0 is 130 positions long, but tiny-llama has 128"):
        generate(lm, "a" * 129, max_new_tokens=20, past_positions="error")  # and <bos>
    with pytest.warns(UserWarning, match="runs past tiny-llama's 128 positions"):
        generate(lm, "a" * 129, max_new_tokens=1, temperature=0)  # the library warns
    with pytest.warns(UserWarning, match="runs past tiny-llama's 128 positions"):
        generate(lm, "a" * 120, max_new_tokens=20, temperature=0)
    assert len(generate(lm, "a" * 100, max_new_tokens=20, temperature=0).samples[0].tokens) > 0


def _no_bos():
    from tiny_lm import char_tokenizer

    return char_tokenizer(bos=False)  # as SmolLM2: an empty prompt is zero tokens


def test_harvest_context_past_the_models_positions(lm, tmp_path: Path) -> None:
    with pytest.raises(BadValueError, match="128"):
        harvest(lm, HarvestConfig(sites=SITE, tokens=100, context=200), tmp_path / "h")
    assert not (tmp_path / "h").exists()  # refused before anything was written
