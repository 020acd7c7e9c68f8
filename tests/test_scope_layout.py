"""The scope folder's index (saelab/scope/layout.py): round trip, status, refusals."""

import json

import pyarrow.parquet as pq
import pytest

from saelab.errors import CorruptFileError
from saelab.sae.formats import save_sae
from saelab.sae.testing import random_sae
from saelab.scope import Scope, ScopeEntry, ScopeError, is_scope, read_scope, scope_id, write_scope


def _scope(tmp_path, n=2):
    entries = []
    for layer in range(n):
        sid = scope_id("resid_post", layer, 64, 3.6 + layer)
        save_sae(random_sae("jumprelu", seed=layer), tmp_path / "native" / f"resid_post.{layer}")
        save_sae(random_sae("jumprelu", seed=layer), tmp_path / sid, format="gemma-scope")
        entries.append(ScopeEntry(
            id=sid, site=f"resid_post.{layer}", site_kind="resid_post", layer=layer, width=64,
            arch="jumprelu", target_l0=4, average_l0=3.6 + layer, params=f"{sid}/params.npz",
            native=f"native/resid_post.{layer}", features=None,
            metrics={"l0": 3.6 + layer, "fvu": 0.2, "fvu_lo": 0.1, "fvu_hi": 0.3}))
    return Scope(model="tiny", model_hash="ab" * 32, d_model=16, n_layers=n,
                 settings={"tokens": 100}, stages={"train": 1.5},
                 machine={"matmul_gflops": {"float32": 10.0}}, entries=entries)


def test_folder_names_follow_gemma_scope():
    assert scope_id("resid_post", 3, 2304, 31.4) == "resid_post/layer_3/width_2304/average_l0_31"
    assert scope_id("mlp_out", 12, 16384, 82) == "mlp_out/layer_12/width_16k/average_l0_82"
    assert scope_id("attn_out", 0, 1 << 20, 9.5) == "attn_out/layer_0/width_1m/average_l0_10"


def test_round_trip_json_and_parquet(tmp_path):
    scope = _scope(tmp_path)
    assert not is_scope(tmp_path)
    write_scope(tmp_path, scope)
    assert is_scope(tmp_path)
    back = read_scope(tmp_path)
    assert back == scope
    assert [e.status for e in back.entries] == ["ok", "ok"]
    raw = json.loads((tmp_path / "scope.json").read_text())
    assert raw["format"] == "saelab.scope" and raw["version"] == 1
    assert "status" not in raw["saes"][0] and raw["saes"][0]["id"].startswith("resid_post/layer_0/")
    table = pq.read_table(tmp_path / "scope.parquet").to_pydict()
    assert table["id"] == [e.id for e in scope.entries]
    assert table["metric_l0"] == [3.6, 4.6] and table["metric_fvu_hi"] == [0.3, 0.3]
    assert table["layer"] == [0, 1]
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporaries


def test_missing_and_corrupt_entries_are_marked(tmp_path):
    scope = _scope(tmp_path, n=3)
    write_scope(tmp_path, scope)
    import shutil

    shutil.rmtree(tmp_path / "native" / "resid_post.0")
    w = tmp_path / "native" / "resid_post.1" / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:-40])  # cut short
    assert [e.status for e in read_scope(tmp_path).entries] == ["missing", "corrupt", "ok"]


def test_refusals(tmp_path):
    with pytest.raises(ScopeError, match="scope.json does not exist"):
        read_scope(tmp_path)
    (tmp_path / "scope.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="cannot be parsed"):
        read_scope(tmp_path)
    assert not is_scope(tmp_path)
    (tmp_path / "scope.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CorruptFileError, match="not a saelab scope index"):
        read_scope(tmp_path)
