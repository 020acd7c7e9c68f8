"""Search across a scope: one forward gives each SAE what a separate capture of its own site
gives; the /api/scope routes check every field and name a missing SAE without breaking."""

import json
import shutil
import threading
import urllib.error
import urllib.request

import pytest
import torch
from tiny_lm import tiny_lm
from tiny_scope import make_tiny_scope, tiny_scope_saes

from saelab.models.hooks import capture
from saelab.scope.search import PromptTooLong, encode_all, prompt_ids, top_features


def test_one_forward_equals_separate_captures():
    lm = tiny_lm("llama")
    saes = tiny_scope_saes()
    ids = prompt_ids(lm, "The cat sat on the mat.")
    assert int(ids[0, 0]) == lm.tokenizer.bos_token_id
    acts = encode_all(lm, saes, ids)
    assert set(acts) == set(saes)
    for site, sae in saes.items():
        with capture(lm.model, site, arch=lm.arch) as cap:  # this site alone, its own forward
            cap.run(input_ids=ids)
        alone = sae.encode(cap[site][0].float())
        torch.testing.assert_close(acts[site], alone, rtol=0, atol=0)
    hits = top_features(acts, top=3)
    for site, per_token in hits.items():
        assert len(per_token) == ids.shape[1]
        for p, fs in enumerate(per_token):
            vals, idx = acts[site][p].topk(3)
            assert fs == [(int(i), float(v)) for v, i in zip(vals, idx, strict=True) if v > 0]
            assert len(fs) <= 3 and all(a > 0 for _, a in fs)
    with pytest.raises(PromptTooLong, match="at most 5"):
        prompt_ids(lm, "a longer prompt", max_tokens=5)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from saelab.app.server import make_server

    scope = make_tiny_scope(tmp_path_factory.mktemp("scope_api"))
    shutil.rmtree(scope / "native" / "mlp_out__layer_1__width_64__k_4")
    (scope / "features" / "attn_out__layer_1__width_64__k_4" / "index.json").write_text("{cut")
    server = make_server(scope, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", scope
    server.shutdown()
    server.server_close()


def call(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_scope_api_index_and_search_equal_the_library(served):
    base, scope = served
    status, index = call(base + "/api/scope")
    assert status == 200 and len(index["saes"]) == 6
    rows = {r["id"]: r for r in index["saes"]}
    missing = rows["mlp_out/layer_1/width_64/average_l0_4"]
    assert missing["status"] == "missing" and "missing" in missing["problem"]
    assert rows["resid_post/layer_0/width_64/average_l0_4"]["metrics"]["fvu"] == pytest.approx(0.1)
    damaged = rows["attn_out/layer_1/width_64/average_l0_4"]  # its SAE still searches and steers
    assert (damaged["status"], damaged["features"], damaged["features_status"]) == ("ok", None, "damaged")
    status, err = call(base + "/api/saes/features%2Fattn_out__layer_1__width_64__k_4/features/1")
    assert status == 503 and "index.json" in err["error"]
    status, res = call(base + "/api/scope/search", {"text": "The cat", "top": 2})
    assert status == 200
    assert [u["id"] for u in res["unavailable"]] == ["mlp_out/layer_1/width_64/average_l0_4"]
    assert len(res["saes"]) == 5 and [t["special"] for t in res["tokens"]][:2] == [True, False]
    lm, saes = tiny_lm("llama"), tiny_scope_saes()
    ids = prompt_ids(lm, "The cat")
    for row in res["saes"]:
        want = top_features(encode_all(lm, {row["site"]: saes[row["site"]]}, ids), 2)[row["site"]]
        got = [[(f["feature"], f["act"]) for f in fs] for fs in row["tokens"]]
        assert [[f for f, _ in fs] for fs in got] == [[f for f, _ in fs] for fs in want]
        assert [a for fs in got for _, a in fs] == pytest.approx([a for fs in want for _, a in fs],
                                                                   rel=1e-5)
        name = f"features/{row['site_kind']}__layer_{row['layer']}__width_64__k_4"
        assert row["features"] == (None if row["id"] == "attn_out/layer_1/width_64/average_l0_4" else name)


@pytest.mark.parametrize("path,body,status,needle", [
    ("search", {"text": 5}, 400, 'field "text" must be a string'),
    ("search", {"text": "hi", "top": True}, 400, 'field "top" must be an integer'),
    ("search", {"text": "hi", "sae": "x"}, 400, "unknown field"),
    ("search", {"text": "x" * 200}, 413, "at most 128"),
    ("steer", {"sae": "nope", "prompt": "hi", "feature": 1}, 404, "no SAE 'nope'"),
    ("steer", {"sae": 3, "prompt": "hi", "feature": 1}, 400, 'field "sae"'),
    ("steer", {"sae": "mlp_out/layer_1/width_64/average_l0_4", "prompt": "hi", "feature": 1}, 503,
     "is missing"),
    ("steer", {"sae": "resid_post/layer_0/width_64/average_l0_4", "prompt": "hi", "feature": 64},
     404, "features 0..63"),
    ("nothing", {}, 404, "no API endpoint"),
])
def test_scope_api_refusals(served, path, body, status, needle):
    base, _ = served
    got, res = call(f"{base}/api/scope/{path}", body)
    assert got == status and needle in res["error"], res
