"""The Parquet feature index, the static dashboard (escaping) and the browser's JSON API."""

import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest
from tiny_lm import tiny_lm
from tiny_models import tiny_sae

from saelab.data.corpus import Corpus, load_corpus
from saelab.errors import SaelabError
from saelab.features import build as build_mod
from saelab.features.build import IndexConfig, build_index
from saelab.features.collect import CollectConfig
from saelab.features.index import EXAMPLE_COLUMNS, FEATURE_COLUMNS, FeatureIndex
from saelab.report.dashboard import render_dashboard, token_spans

EVIL = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A feature index of a tiny model; every token's text is replaced by an XSS probe."""
    lm = tiny_lm("llama")
    sae = tiny_sae(lm.model, "resid_post.1", "topk", d_sae=24)
    docs = load_corpus("builtin:stdlib")
    corpus = Corpus.from_texts("head", [d for _, d in zip(range(30), docs)])
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


def test_dashboard_escapes_model_text(run):
    html = render_dashboard(run / "tiny", cards=5)
    assert EVIL not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert html.count("<script>") == 1  # only the fixed table sorter
    spans = token_spans([EVIL, "<script>alert(1)</script>"], [1.0, 0.5], 1.0, focus=0)
    assert "<img" not in spans and "<script>" not in spans
    assert (run / "tiny" / "dashboard.html").read_text().count('class="card"') == 5


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
