"""The browser's server under malformed and hostile requests (issue 13, "The browser's server").

A real server on 127.0.0.1 (a free port, a thread) over a tiny index; requests
go through http.client or a raw socket. Every socket has a client timeout, so a
server that hangs makes a test fail instead of blocking the suite.
"""

import http.client
import json
import logging
import shutil
import socket
import threading
import time

import pytest
from tiny_lm import tiny_lm
from tiny_models import tiny_sae

from saelab.app.indexes import open_indexes
from saelab.app.request import MAX_DEPTH, json_depth
from saelab.app.server import App, Server, make_server
from saelab.data.corpus import Corpus, load_corpus
from saelab.errors import CorruptFileError
from saelab.features.build import IndexConfig, build_index
from saelab.features.collect import CollectConfig

CLIENT_TIMEOUT = 20.0  # seconds: a guard against a hanging server, never a measurement


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A feature index 'tiny' of a tiny model, and that model and SAE for the live pages."""
    lm = tiny_lm("llama")
    sae = tiny_sae(lm.model, "resid_post.1", "topk", d_sae=24)
    docs = load_corpus("builtin:stdlib")
    corpus = Corpus.from_texts("head", [d for _, d in zip(range(30), docs)])
    out = tmp_path_factory.mktemp("run")
    build_index(lm, {"tiny": (sae, None)}, out, IndexConfig(
        tokens=1500, corpus=corpus, context=24, batch_size=8, ablate=3, cards=5,
        collect=CollectConfig(top_k=4, n_bins=3, per_bin=2, left=4, right=2)))
    return out, lm, sae


def start(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


def stop(server):
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def app(built):
    from saelab.app.live import Live

    run, lm, sae = built
    app = App(run)
    # The live pages with the tiny model (a character tokenizer) instead of a download.
    live = Live("cpu")
    live._lm[app.saes["tiny"].meta["model"]["name"]] = lm
    live._saes["tiny"] = sae.eval()
    app._live = live
    return app


@pytest.fixture(scope="module")
def port(app):
    server = start(Server(("127.0.0.1", 0), app, read_timeout=10.0))
    yield server.server_address[1]
    stop(server)


def request(port, method, path, body=None, headers=None):
    """(status, parsed JSON or text) of one request over a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        json_type = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers={**json_type, **(headers or {})})
        res = conn.getresponse()
        text = res.read().decode()
        is_json = res.getheader("Content-Type") == "application/json"
        return res.status, json.loads(text) if is_json else text
    finally:
        conn.close()


def raw(port, data: bytes):
    """Send raw bytes, read until the server closes: (status, body text)."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as s:
        s.sendall(data)
        got = read_until_closed(s)
    head, _, body = got.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()


def read_until_closed(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):  # socket.timeout (a failure) if the server never closes
        chunks.append(chunk)
    return b"".join(chunks)


def post_head(path, extra=""):
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}"


# ---------------------------------------------------------------- JSON bodies


def test_deeply_nested_body_is_a_400_not_a_500(port):
    deep = b'{"text": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    status, body = request(port, "POST", "/api/saes/tiny/search", deep)
    assert status == 400 and "nested 30001 deep" in body["error"] and f"at most {MAX_DEPTH}" in body["error"]
    status, body = request(port, "POST", "/api/saes/tiny/steer", b"[" * 40_000)  # not even closed
    assert status == 400 and "nested" in body["error"]
    assert request(port, "GET", "/api/saes")[0] == 200  # the server goes on


def test_brackets_inside_strings_are_not_nesting(port):
    assert json_depth(b'{"a": "[[[[{{{{", "b": ["\\"[[["]}') == 2
    status, body = request(port, "POST", "/api/saes/tiny/search", {"text": "[" * 100 + "{" * 100})
    assert status == 200 and body["tokens"]


@pytest.mark.parametrize("path,payload,field,expected", [
    ("steer", {"prompt": "hi", "feature": True}, "feature", "an integer"),
    ("steer", {"prompt": "hi", "feature": False}, "feature", "an integer"),
    ("steer", {"prompt": "hi", "feature": 1.0}, "feature", "an integer"),
    ("steer", {"prompt": "hi", "feature": "1"}, "feature", "an integer"),
    ("steer", {"prompt": "hi", "feature": None}, "feature", "an integer"),
    ("steer", {"prompt": "hi"}, "feature", "missing"),
    ("steer", {"prompt": 5, "feature": 1}, "prompt", "a string"),
    ("steer", {"prompt": ["hi"], "feature": 1}, "prompt", "a string"),
    ("steer", {"prompt": "   ", "feature": 1}, "prompt", "blank"),
    ("steer", {"prompt": "hi", "feature": 1, "mode": 1}, "mode", "one of the strings"),
    ("steer", {"prompt": "hi", "feature": 1, "mode": "zap"}, "mode", "add, clamp"),
    ("steer", {"prompt": "hi", "feature": 1, "strength": True}, "strength", "a number"),
    ("steer", {"prompt": "hi", "feature": 1, "strength": "4"}, "strength", "a number"),
    ("steer", {"prompt": "hi", "feature": 1, "strength": 1e9}, "strength", "[-1000, 1000]"),
    ("steer", {"prompt": "hi", "feature": 1, "temperature": False}, "temperature", "a number"),
    ("steer", {"prompt": "hi", "feature": 1, "temperature": -0.1}, "temperature", "[0, 2]"),
    ("steer", {"prompt": "hi", "feature": 1, "max_new_tokens": True}, "max_new_tokens", "an integer"),
    ("steer", {"prompt": "hi", "feature": 1, "max_new_tokens": 0}, "max_new_tokens", "[1, 128]"),
    ("steer", {"prompt": "hi", "feature": 1, "seed": 1.5}, "seed", "an integer"),
    ("steer", {"prompt": "hi", "feature": 1, "seed": -1}, "seed", "[0, 2147483647]"),
    ("steer", {"prompt": "hi", "feature": 1, "chat": "no"}, "chat", "true or false"),
    ("steer", {"prompt": "hi", "feature": 1, "chat": 0}, "chat", "true or false"),
    ("steer", {"prompt": "hi", "feature": 1, "chat": None}, "chat", "true or false"),
    ("steer", {"prompt": "hi", "feature": 1, "strenght": 4}, "strenght", "unknown field"),
    ("search", {"text": True}, "text", "a string"),
    ("search", {"text": "hi", "top": True}, "top", "an integer"),
    ("search", {"text": "hi", "top": 21}, "top", "[1, 20]"),
    ("search", {"txt": "hi"}, "txt", "unknown field"),
    ("features/1/ablation", {"feature": 2}, "feature", "takes no fields"),
])
def test_every_body_field_is_type_checked(port, path, payload, field, expected):
    status, body = request(port, "POST", f"/api/saes/tiny/{path}", payload)
    assert status == 400, body
    assert field in body["error"] and expected in body["error"], body["error"]


@pytest.mark.parametrize("data,words", [
    (b'{"prompt": "hi", "feature": 1, "strength": NaN}', "NaN is not a JSON value"),
    (b'{"prompt": "hi", "feature": 1, "strength": Infinity}', "Infinity is not a JSON value"),
    (b'{"prompt": "hi", "feature": 1, "feature": 2}', "given twice"),
    (b'{"prompt": "hi", "feature": 1' + b"1" * 5000 + b"}", "not valid JSON"),
    (b'["prompt", "hi"]', "must be a JSON object"),
    (b'{"prompt": "\xff"}', "not UTF-8"),
])
def test_bodies_that_are_not_plain_json_objects(port, data, words):
    status, body = request(port, "POST", "/api/saes/tiny/steer", data)
    assert status == 400 and words in body["error"], body


@pytest.mark.parametrize("path,words", [
    ("/api/saes/tiny/features?alive=yes", "alive must be one of 0, 1"),
    ("/api/saes/tiny/features?limit=1_0", "limit must be an integer"),
    ("/api/saes/tiny/features?offset=+1", "offset must be an integer"),
    ("/api/saes/tiny/features?limit=%EF%BC%91", "limit must be an integer"),  # fullwidth 1
    ("/api/saes/tiny/features?sort=density&sort=label", "given 2 times"),
    ("/api/saes/tiny/features?sortt=density", "unknown"),
    ("/api/saes/tiny?limit=3", "takes no query parameters"),
    ("/api/saes/tiny/features/+1", "not an integer"),
    ("/api/saes/tiny/features/1_0", "not an integer"),
    ("/api/saes/tiny/features/%D9%A3", "not an integer"),  # Arabic-Indic 3
    ("/api/saes/tiny/features/%201", "not an integer"),
])
def test_every_url_field_is_checked(port, path, words):
    status, body = request(port, "GET", path)
    assert status == 400 and words in body["error"], body


def test_well_typed_requests_still_work(port):
    status, body = request(port, "GET", "/api/saes/tiny/features?sort=count&order=desc&alive=1&limit=5")
    assert status == 200 and body["features"]
    f = body["features"][0]["feature"]
    assert request(port, "GET", f"/api/saes/tiny/features/{f}")[0] == 200
    status, body = request(port, "POST", "/api/saes/tiny/steer", {
        "prompt": "hi", "feature": f, "mode": "clamp", "strength": 3, "max_new_tokens": 2,
        "seed": 1, "temperature": 0.0, "chat": False})
    assert status == 200 and set(body) == {"unsteered", "steered", "stop", "seed", "site_norm", "activation"}


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", None])
def test_only_json_bodies_are_read(port, ctype):
    # what a page on another site may POST without a CORS preflight is refused
    head = post_head("/api/saes/tiny/search", "Content-Length: 13\r\n")
    head = head.replace("Content-Type: application/json\r\n", f"Content-Type: {ctype}\r\n" if ctype else "")
    status, body = raw(port, (head + "\r\n").encode() + b'{"text":"hi"}')
    assert status == 415 and "application/json" in json.loads(body)["error"]
    status, _ = request(port, "POST", "/api/saes/tiny/search", {"text": "hi"},
                        headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 200


# ---------------------------------------------------------------- limits


def test_prompt_over_the_token_limit_is_413(port):
    # 702 characters are 703 tokens of the character tokenizer: under the 4000-character limit,
    # over the 256-token one, which the model's tokenizer decides.
    status, body = request(port, "POST", "/api/saes/tiny/search", {"text": "a" * 702})
    assert status == 413 and "703 tokens; at most 256" in body["error"]
    status, body = request(port, "POST", "/api/saes/tiny/search", {"text": "a" * 4001})
    assert status == 413 and "4001 characters; at most 4000" in body["error"]
    status, body = request(port, "POST", "/api/saes/tiny/steer", {"prompt": "a" * 4001, "feature": 1})
    assert status == 413 and "prompt" in body["error"]


@pytest.mark.parametrize("header,status,words", [
    ("Content-Length: -1\r\n", 400, "non-negative integer"),
    ("Content-Length: abc\r\n", 400, "non-negative integer"),
    ("Content-Length: 1_0\r\n", 400, "non-negative integer"),
    ("Content-Length: 2\r\nContent-Length: 3\r\n", 400, "one non-negative integer"),
    ("", 411, "needs a Content-Length"),
    ("Transfer-Encoding: chunked\r\n", 411, "chunked"),
    ("Content-Length: 99999999999\r\n", 413, "at most 65536"),
])
def test_bad_content_length_is_answered_at_once(port, header, status, words):
    # The body is never sent: a server that waits for it fails on the client's timeout.
    got, body = raw(port, (post_head("/api/saes/tiny/search", header) + "\r\n").encode())
    assert got == status and words in json.loads(body)["error"], body


@pytest.fixture(scope="module")
def short(app):
    """A server whose connections time out after half a second of silence."""
    server = start(Server(("127.0.0.1", 0), app, read_timeout=0.5))
    yield server.server_address[1]
    stop(server)


def test_idle_connection_is_closed_after_the_read_timeout(short):
    with socket.create_connection(("127.0.0.1", short), timeout=CLIENT_TIMEOUT) as s:
        assert s.recv(1) == b""  # closed by the server, long before the client's timeout
    # the same after a keep-alive request has been answered
    with socket.create_connection(("127.0.0.1", short), timeout=CLIENT_TIMEOUT) as s:
        s.sendall(b"GET /api/saes HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        got = read_until_closed(s)
    assert got.startswith(b"HTTP/1.1 200") and b'"tiny"' in got


def test_stalled_body_gets_408(short):
    head = post_head("/api/saes/tiny/search", "Content-Length: 100\r\n") + "\r\n"
    status, body = raw(short, head.encode() + b'{"te')
    assert status == 408 and "stopped arriving" in json.loads(body)["error"]


def test_connections_past_the_bound_get_503(app):
    server = start(Server(("127.0.0.1", 0), app, read_timeout=30.0, max_connections=2))
    port = server.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) for _ in range(2)]
    try:
        status, body = raw(port, b"")  # a third connection, while two hold both slots
        assert status == 503 and "2 connections are open" in json.loads(body)["error"]
        idle.pop().close()  # frees a slot once the server sees the close
        for _ in range(200):  # bounded: the handler thread notices the close and releases
            status, _ = request(port, "GET", "/api/saes")
            if status == 200:
                break
            time.sleep(0.05)
        assert status == 200
    finally:
        for s in idle:
            s.close()
        stop(server)


def test_server_settings_are_checked(app):
    from saelab.errors import SaelabError

    with pytest.raises(SaelabError, match="read_timeout"):
        Server(("127.0.0.1", 0), app, read_timeout=0)
    with pytest.raises(SaelabError, match="max_connections"):
        Server(("127.0.0.1", 0), app, max_connections=0)


# ---------------------------------------------------------------- damaged indexes

BAD = "bad<b>&"  # a folder name that must reach the page escaped


@pytest.fixture
def served(built, tmp_path):
    """A folder with a good index copy and one whose features.parquet is cut short."""
    run = built[0]
    root = tmp_path / "served"
    shutil.copytree(run / "tiny", root / "good")
    shutil.copytree(run / "tiny", root / BAD)
    data = (root / BAD / "features.parquet").read_bytes()
    (root / BAD / "features.parquet").write_bytes(data[: len(data) // 2])
    return root


def test_damaged_index_is_named_in_the_log_the_api_and_the_page(served, caplog):
    with caplog.at_level(logging.WARNING, logger="saelab.app"):
        server = start(make_server(served, port=0))
    port = server.server_address[1]
    try:
        bad_file = str(served / BAD / "features.parquet")
        assert any(bad_file in r.getMessage() and "saelab features" in r.getMessage()
                   for r in caplog.records)
        status, saes = request(port, "GET", "/api/saes")
        assert status == 200 and [s["name"] for s in saes] == ["good"]
        status, damaged = request(port, "GET", "/api/damaged")
        assert status == 200 and [(d["name"], d["file"]) for d in damaged] == [(BAD, bad_file)]
        status, body = request(port, "GET", "/api/saes/bad%3Cb%3E%26/features/1")
        assert status == 503 and bad_file in body["error"] and "saelab features" in body["error"]
        status, page = request(port, "GET", "/sae/bad%3Cb%3E%26/feature/1")
        assert status == 503 and "features.parquet" in page and "saelab features" in page
        assert "bad&lt;b&gt;&amp;" in page and BAD not in page  # the name is escaped
        assert request(port, "GET", "/api/saes/good/features/1")[0] == 200
    finally:
        stop(server)


def test_examples_damaged_while_served_give_503_naming_it(served, caplog):
    server = start(make_server(served, port=0))
    port = server.server_address[1]
    try:
        path = served / "good" / "examples.parquet"
        path.write_bytes(path.read_bytes()[:100])  # an index rewritten under the server
        with caplog.at_level(logging.WARNING, logger="saelab.app"):
            status, body = request(port, "GET", "/api/saes/good/features/1")
        assert status == 503 and str(path) in body["error"] and "Rebuild it with" in body["error"]
        assert any(str(path) in r.getMessage() for r in caplog.records)
        assert request(port, "GET", "/api/saes")[0] == 200
    finally:
        stop(server)


def test_all_indexes_damaged_is_one_error_naming_the_file(served):
    (served / "good" / "index.json").write_text('{"schema": "saelab.features/1", "sae": ')
    with pytest.raises(CorruptFileError) as err:  # nothing left to serve: exit 3, the file named
        make_server(served, port=0)
    assert str(served / BAD / "features.parquet") in str(err.value)
    assert "1 more damaged index(es)" in str(err.value)
    damaged = open_indexes(served)[1]
    assert str(damaged["good"].file) == str(served / "good" / "index.json")


def test_index_without_examples_is_damaged(built, tmp_path):
    shutil.copytree(built[0] / "tiny", tmp_path / "a")
    shutil.copytree(built[0] / "tiny", tmp_path / "b")
    (tmp_path / "b" / "examples.parquet").unlink()
    app = App(tmp_path)
    assert list(app.saes) == ["a"]
    assert "examples.parquet is missing" in app.damaged["b"].message


def test_damaged_sae_weights_give_503_naming_the_file(built, tmp_path):
    shutil.copytree(built[0] / "tiny", tmp_path / "served" / "x")
    meta_path = tmp_path / "served" / "x" / "index.json"
    meta = json.loads(meta_path.read_text())
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "cfg.json").write_text('{"d_in": ')  # cut short
    (tmp_path / "sae" / "sae_weights.safetensors").write_bytes(b"\0" * 16)
    meta["sae"]["path"] = str(tmp_path / "sae")
    meta_path.write_text(json.dumps(meta))
    server = start(make_server(tmp_path / "served", port=0))
    try:
        status, body = request(server.server_address[1], "POST", "/api/saes/x/search", {"text": "hi"})
        assert status == 503 and str(tmp_path / "sae" / "cfg.json") in body["error"], body
    finally:
        stop(server)


# ---------------------------------------------------------------- --host


def test_non_loopback_host_warns(built, caplog):
    with caplog.at_level(logging.WARNING, logger="saelab.app"):
        server = make_server(built[0], host="0.0.0.0", port=0)  # bound, never served
    server.server_close()
    assert any("reachable from the network" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="saelab.app"):
        make_server(built[0], host="127.0.0.1", port=0).server_close()
    assert not any("reachable" in r.getMessage() for r in caplog.records)


def test_home_page_lists_damaged_index_as_text(served):
    """In a real browser (chromium, when installed): / names the damaged file, escaped."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    server = start(make_server(served, port=0))
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium,
                                        args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
            page.wait_for_selector("#damaged p.error", timeout=30_000)
            text = page.inner_text("#damaged")
            assert str(served / BAD / "features.parquet") in text and "saelab features" in text
            assert page.locator("#damaged b").count() == 0  # the name is text, not markup
            assert page.locator("table a").all_inner_texts() == ["good"]
            browser.close()
    finally:
        stop(server)
