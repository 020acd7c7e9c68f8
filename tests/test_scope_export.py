"""`saelab scope export --neuronpedia`: every field Neuronpedia's converter writes, with its
type, and numbers that read back equal to the scope's metrics, features and examples."""

import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_scope import make_tiny_scope
from typer.testing import CliRunner

from saelab.scope.export import ExportConfig, cantor, export_neuronpedia, source_id
from saelab.scope.layout import read_scope

S, N, F, B, L, D = str, int, float, bool, list, dict
OPT = type(None)
# Neuronpedia's records (utils/neuronpedia-utils db_models, Prisma schema): field -> types
RELEASE = {"name": S, "description": S, "creatorName": S, "creatorId": S, "visibility": S,
           "isNewUi": B, "featured": B, "descriptionShort": (S, OPT), "urls": L,
           "creatorEmail": (S, OPT), "creatorNameShort": (S, OPT),
           "defaultSourceSetName": (S, OPT), "defaultSourceId": (S, OPT),
           "defaultUmapSourceIds": L, "createdAt": S}
MODEL = {"id": S, "instruct": B, "creatorId": S, "displayNameShort": S, "displayName": S,
         "tlensId": (S, OPT), "dimension": (N, OPT), "visibility": S,
         "defaultSourceSetName": (S, OPT), "defaultSourceId": (S, OPT), "inferenceEnabled": B,
         "layers": N, "neuronsPerLayer": N, "createdAt": S, "owner": S, "updatedAt": S,
         "website": (S, OPT)}
SOURCE_SET = {"modelId": S, "name": S, "creatorId": S, "hasDashboards": B, "visibility": S,
              "description": S, "type": S, "creatorName": S, "urls": L, "creatorEmail": (S, OPT),
              "releaseName": (S, OPT), "defaultOfModelId": (S, OPT), "defaultRange": N,
              "defaultShowBreaks": B, "showDfa": B, "showCorrelated": B,
              "showHeadAttribution": B, "showUmap": B, "createdAt": S}
SOURCE = {"id": S, "modelId": S, "setName": S, "creatorId": S, "hasDashboards": B,
          "inferenceEnabled": B, "inferenceHosts": L, "saelensConfig": (D, OPT),
          "saelensRelease": (S, OPT), "saelensSaeId": (S, OPT), "hfRepoId": (S, OPT),
          "hfFolderId": (S, OPT), "visibility": S, "defaultOfModelId": (S, OPT), "hasUmap": B,
          "hasUmapLogSparsity": B, "hasUmapClusters": B, "num_prompts": (N, OPT),
          "num_tokens_in_prompt": (N, OPT), "dataset": (S, OPT), "notes": (S, OPT),
          "createdAt": S}
FEATURE = {"modelId": S, "layer": S, "index": S, "creatorId": (S, OPT), "createdAt": S,
           "maxActApprox": (F, N, OPT), "hasVector": B, "vector": L, "vectorLabel": (S, OPT),
           "vectorDefaultSteerStrength": (F, N, OPT), "hookName": (S, OPT),
           "topkCosSimIndices": L, "topkCosSimValues": L, "neuron_alignment_indices": L,
           "neuron_alignment_values": L, "neuron_alignment_l1": L,
           "correlated_neurons_indices": L, "correlated_neurons_pearson": L,
           "correlated_neurons_l1": L, "correlated_features_indices": L,
           "correlated_features_pearson": L, "correlated_features_l1": L, "neg_str": L,
           "neg_values": L, "pos_str": L, "pos_values": L, "frac_nonzero": (F, N),
           "freq_hist_data_bar_heights": L, "freq_hist_data_bar_values": L,
           "logits_hist_data_bar_heights": L, "logits_hist_data_bar_values": L,
           "decoder_weights_dist": L, "sourceSetName": (S, OPT)}
ACTIVATION = {"id": S, "tokens": L, "index": S, "layer": S, "modelId": S, "maxValue": (F, N),
              "maxValueTokenIndex": N, "minValue": (F, N), "values": L, "creatorId": S,
              "dataSource": (S, OPT), "dataIndex": (S, OPT), "dfaValues": L,
              "dfaTargetIndex": (N, OPT), "dfaMaxValue": (F, OPT), "createdAt": S,
              "lossValues": L, "logitContributions": (S, OPT), "binMin": (F, N, OPT),
              "binMax": (F, N, OPT), "binContains": (F, N, OPT),
              "qualifyingTokenIndex": (N, OPT), "zIndices": (L, OPT), "zValues": (L, OPT)}
EXPLANATION = {"id": S, "modelId": S, "layer": S, "index": S, "description": S, "authorId": S,
               "embedding": (L, OPT), "triggeredById": (S, OPT), "typeName": (S, OPT),
               "explanationModelName": (S, OPT), "notes": (S, OPT), "createdAt": S}
EVAL = {"id": S, "typeName": S, "modelId": S, "sourceId": S, "output": D,
        "detailedMetrics": (D, OPT), "createdAt": S, "updatedAt": S}

MISSING = "attn_out/layer_1/width_64/average_l0_4"
LABELLED = "resid_post/layer_0/width_64/average_l0_4"


def check(record, fields, what):
    assert set(record) == set(fields), (what, set(record) ^ set(fields))
    for key, types in fields.items():
        types = types if isinstance(types, tuple) else (types,)
        value = record[key]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        assert ok, (what, key, value)


def lines(path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("scope_export")
    scope_dir = make_tiny_scope(root)
    scope = read_scope(scope_dir)
    entries = {e.id: e for e in scope.entries}
    shutil.rmtree(scope_dir / entries[MISSING].native)
    feats = scope_dir / entries[LABELLED].features / "features.parquet"  # one labelled feature
    table = pq.read_table(feats)
    labels = [None] * table.num_rows
    labels[3] = "the letter <e>"
    pq.write_table(table.set_column(table.column_names.index("label"), "label",
                                    pa.array(labels, pa.string())), feats)
    out = root / "np"
    res = export_neuronpedia(scope_dir, out, ExportConfig(model_id="tiny-llama", batch_size=20))
    return scope_dir, read_scope(scope_dir), out, res


def test_every_record_has_neuronpedia_fields_and_types(exported):
    scope_dir, scope, out, res = exported
    assert res.skipped == {MISSING: "its SAE folder native/attn_out__layer_1__width_64__k_4 is missing"}
    assert sorted(p.name for p in (out / "tiny-llama").iterdir()) == sorted(res.sources.values())
    assert len(res.sources) == 5
    check(lines(out / "config" / "eval_type.jsonl")[0],
          {"name": S, "displayName": S, "description": S, "longerDescription": S,
           "outputSchema": D, "featured": B, "url": (S, OPT)}, "eval type")
    for sid in res.sources.values():
        folder = out / "tiny-llama" / sid
        for name, fields in (("release", RELEASE), ("model", MODEL), ("sourceset", SOURCE_SET),
                             ("source", SOURCE), ("evals", EVAL)):
            (record,) = lines(folder / f"{name}.jsonl")
            check(record, fields, name)
        batches = sorted((folder / "features").glob("batch-*.jsonl.gz"))
        assert [p.name for p in batches] == [f"batch-{i}.jsonl.gz" for i in range(4)]  # 64 / 20
        for kind, fields in (("features", FEATURE), ("activations", ACTIVATION),
                             ("explanations", EXPLANATION)):
            for path in sorted((folder / kind).glob("*.jsonl.gz")):
                for record in lines(path):
                    check(record, fields, kind)
                    assert record["layer"] == sid and record["modelId"] == "tiny-llama"
        (source,) = lines(folder / "source.jsonl")
        assert source["id"] == sid and source["saelensConfig"]["d_sae"] == 64


def test_numbers_round_trip(exported):
    from saelab.features.index import FeatureIndex

    scope_dir, scope, out, res = exported
    n_features = n_acts = n_files = 0
    for e in scope.entries:
        if e.id == MISSING:
            continue
        folder = out / "tiny-llama" / source_id(e)
        (ev,) = lines(folder / "evals.jsonl")
        assert ev["output"] == e.metrics and ev["sourceId"] == source_id(e)
        assert ev["detailedMetrics"]["average_l0"] == e.average_l0
        index = FeatureIndex.open(scope_dir / e.features)
        rows = index.features.to_pylist()
        feats = [r for p in sorted((folder / "features").glob("*.gz"),
                                   key=lambda p: int(p.name.split("-")[1].split(".")[0]))
                 for r in lines(p)]
        assert [int(f["index"]) for f in feats] == [r["feature"] for r in rows]
        acts = [r for p in (folder / "activations").glob("*.gz") for r in lines(p)]
        examples = pq.read_table(index.folder / "examples.parquet").to_pylist()
        assert len(acts) == len(examples)
        by_id = {a["id"]: a for a in acts}
        assert len(by_id) == len(acts)  # ids are unique
        for f, r in zip(feats, rows, strict=True):
            assert f["maxActApprox"] == r["max_act"] and f["frac_nonzero"] == r["density"]
            assert f["freq_hist_data_bar_heights"] == [float(c) for c in r["hist"]]
            assert f["pos_str"] == r["lens_top_tokens"] and f["neg_values"] == r["lens_bottom_values"]
            assert f["topkCosSimIndices"] == r["neighbours"]
        for x in examples:
            kind_bin = f"{x['kind']}-{x['bin'] if x['kind'] == 'bin' else 0}"
            a = by_id[f"{source_id(e)}-{x['feature']}-{kind_bin}-{x['rank']}"]
            assert a["values"] == x["acts"] and a["tokens"] == x["tokens"]
            assert (a["dataIndex"], a["qualifyingTokenIndex"]) == (str(x["context"]),
                                                                  x["position"] - x["start"])
            assert a["maxValue"] == max(x["acts"])
            if x["kind"] == "top":
                assert a["binMin"] is None
            else:
                assert a["binMin"] <= x["act"] <= a["binMax"] + 1e-6
        for r in rows:
            ct = (out / "circuit-tracer" / "features" /
                  f"tiny-llama-{feats[0]['sourceSetName']}__target-l0-4" / f"{cantor(e.layer, r['feature'])}.json")
            assert ct.is_file() == (r["count"] > 0)
            if r["count"]:
                page = json.loads(ct.read_text())
                top = [x for x in examples if x["feature"] == r["feature"] and x["kind"] == "top"]
                shown = page["examples_quantiles"][0]["examples"]
                assert [s["tokens_acts_list"] for s in shown] == [x["acts"] for x in top]
                assert [s["train_token_ind"] for s in shown] == [x["position"] - x["start"] for x in top]
                assert page["act_max"] == r["max_act"] and page["top_logits"] == r["lens_top_tokens"]
                n_files += 1
        n_features += len(feats)
        n_acts += len(acts)
    assert (n_features, n_acts, n_files) == (res.features, res.activations, res.circuit_tracer_files)
    labelled = next(e for e in scope.entries if e.id == LABELLED)
    expl = [r for p in (out / "tiny-llama" / source_id(labelled) / "explanations").glob("*.gz")
            for r in lines(p)]
    assert [(x["index"], x["description"]) for x in expl] == [("3", "the letter <e>")]


def test_cli_export_and_refusals(exported, tmp_path):
    from saelab.cli import app

    scope_dir = exported[0]
    runner = CliRunner()
    out = tmp_path / "np"
    got = runner.invoke(app, ["scope", "export", "--neuronpedia", str(out), str(scope_dir), "--json"])
    assert got.exit_code == 0, got.output
    summary = json.loads(got.stdout)
    assert summary["model_id"] == "model" and len(summary["sources"]) == 5
    assert MISSING in summary["skipped"]
    again = runner.invoke(app, ["scope", "export", "--neuronpedia", str(out), str(scope_dir)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert runner.invoke(app, ["scope", "export", "--neuronpedia", str(out), str(scope_dir),
                               "--overwrite"]).exit_code == 0
    bad = runner.invoke(app, ["scope", "export", "--neuronpedia", str(tmp_path / "x"),
                              str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "not a scope folder" in bad.output
    bad = runner.invoke(app, ["scope", "export", "--neuronpedia", str(tmp_path / "y"),
                              str(scope_dir), "--model-id", "../up"])
    assert bad.exit_code == 2 and "--model-id" in bad.output
    assert not Path(tmp_path / "y").exists()


def test_names():
    from saelab.scope.export import scan_name, slug, source_set_name
    from saelab.scope.layout import ScopeEntry

    e = ScopeEntry(id="x", site="resid_post.3", site_kind="resid_post", layer=3, width=16384,
                   arch="jumprelu", target_l0=None, average_l0=30.6, params=None, native="n")
    assert source_set_name(e) == "saelab-res-16k"
    assert source_id(e) == "3-saelab-res-16k__l0-31"  # Neuronpedia's <layer>-<set>__l0-<N>
    assert scan_name("m", e) == "m-saelab-res-16k__target-l0-31"
    assert slug("runs/SmolLM2 135M/") == "smollm2-135m"
    assert [cantor(0, 5), cantor(2, 0), cantor(1, 1)] == [20, 3, 4]
    with pytest.raises(Exception, match="--model-id"):
        ExportConfig(model_id="../x")


def test_without_dashboards_and_same_mean_l0(tmp_path):
    import dataclasses

    from saelab.scope.layout import write_scope

    scope_dir = make_tiny_scope(tmp_path, features=False)
    scope = read_scope(scope_dir)
    first = scope.entries[0]
    twin = dataclasses.replace(first, id=first.id + "-b", target_l0=8)  # measured the same L0
    scope.entries.append(twin)
    write_scope(scope_dir, scope)
    res = export_neuronpedia(scope_dir, tmp_path / "np", ExportConfig(circuit_tracer=False))
    assert len(set(res.sources.values())) == 7
    assert res.sources[twin.id] == source_id(first) + "-target-8"
    assert (res.features, res.activations, res.circuit_tracer_files) == (0, 0, 0)
    folder = tmp_path / "np" / "model" / res.sources[twin.id]
    (source,) = lines(folder / "source.jsonl")
    assert source["hasDashboards"] is False and not (folder / "features").exists()
    (ev,) = lines(folder / "evals.jsonl")
    assert ev["output"] == twin.metrics
