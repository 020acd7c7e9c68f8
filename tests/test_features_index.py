"""The Parquet feature index, the static dashboard (escaping) and the browser's JSON API."""

import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from tiny_lm import tiny_lm
from tiny_models import tiny_sae

from saelab.data.corpus import Corpus, load_corpus
from saelab.errors import SaelabError
from saelab.features import build as build_mod
from saelab.features.build import IndexConfig, build_index
from saelab.features.collect import CollectConfig
from saelab.features.index import ABLATION_COLUMNS, EXAMPLE_COLUMNS, FEATURE_COLUMNS, FeatureIndex
from saelab.report.dashboard import render_dashboard, token_spans

EVIL = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def tiny():
    """(model, SAE, corpus) of the index below."""
    lm = tiny_lm("llama")
    sae = tiny_sae(lm.model, "resid_post.1", "topk", d_sae=24)
    docs = load_corpus("builtin:stdlib")
    return lm, sae, Corpus.from_texts("head", [d for _, d in zip(range(30), docs)])


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny):
    """A feature index of a tiny model; every token's text is replaced by an XSS probe."""
    lm, sae, corpus = tiny
    out = tmp_path_factory.mktemp("run")
    real = build_mod.decode_vocab
    build_mod.decode_vocab = lambda tok, ids: {int(i): f"{EVIL}{int(i)}" for i in ids}
    try:
        build_index(lm, {"tiny": (sae, None)}, out, IndexConfig(
            tokens=1500, corpus=corpus, context=24, batch_size=8, ablate=3, cards=5,
            collect=CollectConfig(top_k=4, n_bins=3, per_bin=2, left=4, right=2)))
    finally:
        build_mod.decode_vocab = real
    return out


def test_tables_have_the_documented_columns(run):
    features = pq.read_table(run / "tiny" / "features.parquet")
    examples = pq.read_table(run / "tiny" / "examples.parquet")
    assert tuple(features.column_names) == FEATURE_COLUMNS
    assert tuple(examples.column_names) == EXAMPLE_COLUMNS
    assert features.num_rows == 24
    meta = json.loads((run / "tiny" / "index.json").read_text())
    assert meta["schema"] == "saelab.features/1" and meta["sae"]["site"] == "resid_post.1"
    assert (run / "run.json").is_file() and (run / "tiny" / "ablation.parquet").is_file()
    ex = examples.to_pylist()
    assert {e["kind"] for e in ex} == {"top", "bin"}
    assert all(len(e["tokens"]) == len(e["acts"]) == 7 for e in ex)
    contexts = features.column("top_context").to_pylist()
    for e in ex:
        if e["kind"] == "top" and e["rank"] == 0:  # the whole context of the top example is kept
            assert contexts[e["feature"]][e["start"]:e["start"] + 7] == e["token_ids"]
    counts = features.column("count").to_pylist()
    assert all((c is None) == (n == 0) for c, n in zip(contexts, counts, strict=True))


def test_index_reads_without_torch(run):
    code = ("import sys; from saelab.features.index import FeatureIndex; "
            f"i = FeatureIndex.open({str(run / 'tiny')!r}); f = next(r['feature'] for r in "
            "i.features.to_pylist() if r['count']); assert i.examples(f); "
            "import saelab.app.server; assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_examples_of_one_feature(run):
    index = FeatureIndex.open(run / "tiny")
    alive = [r["feature"] for r in index.features.to_pylist() if r["count"] > 0]
    for f in alive[:5]:
        rows = index.examples(f)
        assert rows and all(r["feature"] == f for r in rows)
        tops = [r["act"] for r in rows if r["kind"] == "top"]
        assert tops == sorted(tops, reverse=True) and tops[0] == pytest.approx(index.feature(f)["max_act"])


def test_examples_of_a_feature_split_across_row_groups(run, tmp_path):
    """A feature whose examples span two row groups reads whole (pyarrow cannot read two
    groups of a nested dictionary column into one table; seen on a real 66k-row index)."""
    import shutil

    import pyarrow.parquet as pq

    folder = tmp_path / "tiny"
    shutil.copytree(run / "tiny", folder)
    table = pq.read_table(folder / "examples.parquet")
    pq.write_table(table, folder / "examples.parquet", row_group_size=7)
    assert pq.ParquetFile(folder / "examples.parquet").num_row_groups > 2
    index = FeatureIndex.open(folder)
    feats = table["feature"].to_pylist()
    for f in sorted(set(feats)):
        assert [r["position"] for r in index.examples(f)] == [
            p for g, p in zip(feats, table["position"].to_pylist()) if g == f]


def test_dashboard_escapes_model_text(run):
    html = render_dashboard(run / "tiny", cards=5)
    assert EVIL not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert html.count("<script>") == 1  # only the fixed table sorter
    spans = token_spans([EVIL, "<script>alert(1)</script>"], [1.0, 0.5], 1.0, focus=0)
    assert "<img" not in spans and "<script>" not in spans
    assert (run / "tiny" / "dashboard.html").read_text().count('class="card"') == 5


def test_top_and_uniform_examples_carry_ablated_text(run, tiny):
    """One row for the top example and one per non-empty bin of each of the first 3 alive
    features; every delta equals a fresh forward of the context with that token deleted."""
    from saelab.data.tokens import pack
    from saelab.models.hooks import capture

    lm, sae, corpus = tiny
    index = FeatureIndex.open(run / "tiny")
    table = pq.read_table(run / "tiny" / "ablation.parquet")
    assert tuple(table.column_names) == ABLATION_COLUMNS
    assert index.meta["ablation"] == {"features": 3, "max_back": 16, "per_bin": 1}
    alive = [r["feature"] for r in index.features.to_pylist() if r["count"]][:3]
    assert sorted(set(table.column("feature").to_pylist())) == alive
    batches = list(pack(corpus, lm.tokenizer, 24, batch_size=8, n_tokens=1500))
    ids = torch.cat([b[0] for b in batches]).tolist()  # row = context index (one process)
    special = torch.cat([b[1] for b in batches]).tolist()

    def act(seq, pos, f):
        with torch.no_grad(), capture(lm.model, "resid_post.1") as cap:
            cap.run(input_ids=torch.tensor([seq]))
            return float(sae.encode(cap["resid_post.1"][0, pos])[f])

    n_uniform = 0
    for f in alive:
        rows = index.ablations(f)
        examples = {(e["kind"], e["bin"], e["rank"]): e for e in index.examples(f)}
        want = {k for k in examples if k[2] == 0}  # the top example and each bin's first
        assert [(r["kind"], r["bin"], r["rank"]) for r in rows][0] == ("top", -1, 0)
        assert {(r["kind"], r["bin"], r["rank"]) for r in rows} == want and len(rows) == len(want)
        assert repr(index.ablation(f)) == repr(rows[0])  # repr: NaN deltas compare equal
        for r in rows:
            e = examples[(r["kind"], r["bin"], r["rank"])]
            assert [r[k] for k in ("context", "position", "start", "token_ids", "tokens")] == \
                   [e[k] for k in ("context", "position", "start", "token_ids", "tokens")]
            assert len(r["deltas"]) == len(r["tokens"]) == 7
            ctx, pos = ids[r["context"]], r["position"]
            assert r["base"] == pytest.approx(act(ctx[:pos + 1], pos, f), abs=1e-4)
            assert r["base"] == pytest.approx(e["act"], abs=1e-4)  # the collected activation
            for i, d in enumerate(r["deltas"]):
                j = r["start"] + i
                if j >= pos or special[r["context"]][j]:
                    assert d != d  # NaN: not deleted
                else:
                    want_d = act(ctx[:j] + ctx[j + 1:pos + 1], pos - 1, f) - r["base"]
                    assert d == pytest.approx(want_d, abs=1e-4), (f, r["kind"], r["bin"], j)
            n_uniform += r["kind"] == "bin"
    assert n_uniform >= 3


def test_dashboard_shows_uniform_ablated_text_and_the_lens_filter(run):
    from saelab.report.dashboard import lens_filter_html

    html = render_dashboard(run / "tiny", cards=5)
    index = FeatureIndex.open(run / "tiny")
    f = next(r["feature"] for r in index.features.to_pylist() if r["count"])
    card = html.split(f'id="f{f}"')[1].split('class="card"')[0]
    ablated = card.split("Ablated text: top and uniform examples")[1]
    assert ablated.count('class="ex"') == len(index.ablations(f)) > 1
    assert ">top " in ablated and ">bin " in ablated
    assert 'id="lens-filter"' in html and "standard deviations above" in html
    assert "padding (26)" in html  # the char tokenizer's 26 padding rows are listed
    filt = {"rule": "r", "n_excluded": 1, "reasons": {"high_norm": {"count": 3, "examples": [EVIL]}}}
    shown = lens_filter_html(filt)
    assert EVIL not in shown and "&lt;img" in shown and "and 2 more" in shown


def test_old_ablation_files_still_load(run, tmp_path):
    """An index written before uniform examples were ablated: top rows only, no kind/bin/rank."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(run / "tiny", old)
    table = pq.read_table(old / "ablation.parquet")
    top = table.filter(pc.equal(table["kind"], "top")).drop_columns(["kind", "bin", "rank"])
    pq.write_table(top, old / "ablation.parquet")
    index = FeatureIndex.open(old)
    f = top.column("feature")[0].as_py()
    rows = index.ablations(f)
    assert len(rows) == 1 and rows[0]["kind"] == "top" and rows[0]["bin"] == -1
    assert repr(index.ablation(f)) == repr(rows[0])
    assert "Ablated text" in render_dashboard(old, cards=5)
    meta = json.loads((old / "index.json").read_text())
    meta["logit_lens"]["filter"].pop("rule")  # older index.json: no rule stored
    (old / "index.json").write_text(json.dumps(meta))
    from saelab.app.server import make_server

    srv = make_server(old, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        status, feat = call(srv, f"/api/saes/old/features/{f}")
        assert status == 200 and feat["ablation"]["kind"] == "top" and feat["ablation_uniform"] == []
        assert "standard deviations" in feat["lens_filter"]["rule"]
    finally:
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------- the JSON API


@pytest.fixture(scope="module")
def server(run):
    from saelab.app.server import make_server

    srv = make_server(run, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def call(server, path, body=None, raw=None, headers=None):
    url = f"http://127.0.0.1:{server.server_address[1]}{path}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {**({"Content-Type": "application/json"} if data is not None else {}), **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_api_answers(server):
    status, saes = call(server, "/api/saes")
    assert status == 200 and [s["name"] for s in saes] == ["tiny"]
    status, detail = call(server, "/api/saes/tiny")
    assert detail["sae"]["d_sae"] == 24 and "filter" in detail["logit_lens"]
    status, page = call(server, "/api/saes/tiny/features?sort=density&order=desc&limit=10")
    dens = [f["density"] for f in page["features"]]
    assert status == 200 and page["total"] == 24 and dens == sorted(dens, reverse=True)
    f = page["features"][0]["feature"]
    status, feat = call(server, f"/api/saes/tiny/features/{f}")
    assert status == 200 and feat["feature"] == f and feat["top"] and len(feat["bins"]) == 3
    assert feat["top"][0]["tokens"][0].startswith(EVIL)  # the API returns text; pages insert it as text
    ablated = next(a for a in page["features"] if call(server, f"/api/saes/tiny/features/{a['feature']}")[1]["ablation"])
    status, feat = call(server, f"/api/saes/tiny/features/{ablated['feature']}")
    assert feat["ablation"]["kind"] == "top" and feat["ablation_uniform"]
    bins = [r["bin"] for r in feat["ablation_uniform"]]
    assert bins == sorted(bins, reverse=True) and all(r["kind"] == "bin" for r in feat["ablation_uniform"])
    assert "rule" in feat["lens_filter"] and "rule" in detail["logit_lens"]["filter"]


@pytest.mark.parametrize("path,status,words", [
    ("/api/saes/tiny/features/999", 404, "does not exist"),
    ("/api/saes/tiny/features/abc", 400, "not an integer"),
    ("/api/saes/nope", 404, "no SAE named"),
    ("/api/saes/tiny/features?sort=evil", 400, "sort must be"),
    ("/api/whatever", 404, "no API endpoint"),
    ("/static/..%2F..%2Fserver.py", 404, "no static file"),
    ("/../../etc/passwd", 404, "no page"),
])
def test_api_bad_requests(server, path, status, words):
    got, body = call(server, path)
    assert got == status and words in body["error"]


def test_api_bad_bodies_and_live_errors(server):
    assert call(server, "/api/saes/tiny/search", raw=b"{not json")[0] == 400
    assert call(server, "/api/saes/tiny/search", {"text": "x" * 5000})[0] == 413
    assert call(server, "/api/saes/tiny/search", raw=b"x" * 70_000)[0] == 413
    assert call(server, "/api/saes/tiny/steer", {"prompt": "hi", "feature": 1, "mode": "zap"})[0] == 400
    assert call(server, "/api/saes/tiny/steer", {"prompt": "hi", "feature": 99})[0] == 404
    # the tiny model has no loadable name and its SAE no folder: a clear 409, and the server goes on
    status, body = call(server, "/api/saes/tiny/search", {"text": "hello"})
    assert status == 409 and "live pages need them" in body["error"]
    assert call(server, "/api/saes")[0] == 200


def test_foreign_host_header_refused(server):
    status, body = call(server, "/api/saes", headers={"Host": "evil.example"})
    assert status == 403 and "localhost only" in body["error"]


def test_pages_and_static_files(server):
    url = f"http://127.0.0.1:{server.server_address[1]}"
    for path in ("/", "/sae/tiny", "/sae/tiny/feature/3", "/static/app.js"):
        with urllib.request.urlopen(url + path) as res:
            assert res.status == 200
            assert "default-src 'self'" in res.headers["Content-Security-Policy"]


def test_server_start_errors(run, tmp_path):
    from saelab.app.server import make_server

    with pytest.raises(SaelabError, match="does not exist"):
        make_server(tmp_path / "missing", port=0)
    with pytest.raises(SaelabError, match="no feature index"):
        make_server(tmp_path, port=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(SaelabError, match="in use"):
            make_server(run, port=s.getsockname()[1])
