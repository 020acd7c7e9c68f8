"""`saelab graph` end to end on the embedded model with random transcoders (slow)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from saelab.cli import app
from saelab.sae.testing import random_transcoder
from saelab.sae.transcoder import save_transcoders


@pytest.fixture(scope="module")
def tc_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tc")
    tset = {layer: random_transcoder("topk", d_in=576, d_sae=128, k=4, skip=True, layer=layer,
                                     seed=layer, model_name="smollm2-135m-instruct")
            for layer in range(30)}
    return save_transcoders(tset, folder / "set", format="circuit-tracer")


@pytest.mark.slow
def test_graph_command_writes_files_and_verifies(tc_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "g"
    res = runner.invoke(app, ["graph", "--transcoders", str(tc_dir), "--prompt", "The river",
                              "--out", str(out), "--max-features", "40", "--verify",
                              "--verify-top", "3", "--json"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    stats = result["stats"]
    assert stats["selected_features"] == min(40, stats["active_features"]) > 0
    assert 0 <= result["stats"]["replacement_score"] <= 1
    doc = json.loads((out / "neuronpedia.json").read_text())
    assert {"metadata", "qParams", "nodes", "links"} <= set(doc)
    assert (out / "record.safetensors").is_file() and (out / "verify.json").is_file()
    v = result["verify"]
    assert len(v["checks"]) == 2 * v["top"] and v["top"] >= 1
    for row in v["checks"]:  # the replacement model agrees with the graph's linear prediction
        assert row["replacement"] == pytest.approx(row["predicted"], rel=0.2, abs=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "empty"),
    (["--prompt", "x", "--target", 'logit_diff:" Paris and London":" x"'], "tokens"),
])
def test_graph_command_bad_input(tc_dir, tmp_path, args, message):
    res = CliRunner().invoke(app, ["graph", "--transcoders", str(tc_dir), "--out",
                                   str(tmp_path / "g"), *args], env={"COLUMNS": "200"})
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_graph_command_refuses_foreign_transcoders(tmp_path):
    small = {layer: random_transcoder("relu", d_in=32, d_sae=16, layer=layer) for layer in range(30)}
    folder = save_transcoders(small, tmp_path / "other")
    res = CliRunner().invoke(app, ["graph", "--transcoders", str(folder), "--prompt", "x",
                                   "--out", str(tmp_path / "g")], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "d_model" in res.output, res.output
    missing = {layer: random_transcoder("relu", d_in=576, d_sae=16, layer=layer) for layer in range(29)}
    folder = save_transcoders(missing, tmp_path / "missing")
    res = CliRunner().invoke(app, ["graph", "--transcoders", str(folder), "--prompt", "x",
                                   "--out", str(tmp_path / "g")], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "layer" in res.output, res.output
