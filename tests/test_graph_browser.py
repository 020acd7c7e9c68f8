"""The graph view of `saelab serve`: the API (fast) and the page in Chromium (slow).

The graph is built on a tiny random Llama with random transcoders; its prompt tokens
are replaced by markup to check that model text is shown, never run.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import pytest
import torch
from browser_kit import CHROMIUM, EVIL, NO_BROWSER, chromium_page, screenshot, served
from tiny_models import tiny_model

from saelab.app.graphs import graph_doc, save_view
from saelab.app.request import HttpError
from saelab.graphs.build import build_graph
from saelab.graphs.graph_json import neuronpedia_json
from saelab.sae.testing import random_transcoder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    model = tiny_model("llama")
    tcs = {layer: random_transcoder("relu", d_in=32, d_sae=24, skip=True, layer=layer, seed=layer)
           for layer in range(3)}
    ids = torch.randint(0, 60, (1, 6), generator=torch.Generator().manual_seed(0))
    graph = build_graph(model, None, ids, tcs, max_features=40)
    graph.prompt = "a prompt " + EVIL
    graph.token_texts = [EVIL if i == 2 else f"t{i}" for i in range(6)]
    root = tmp_path_factory.mktemp("graphs")
    out = root / "g1"
    graph.save(out)
    doc = neuronpedia_json(graph, graph.prune(0.9, 0.99), slug="g1", scan="tiny")
    (out / "neuronpedia.json").write_text(json.dumps(doc))
    return root


class _Index:
    """What graph_doc reads of a feature index: its site, width and feature rows."""

    def __init__(self, site: str):
        self.meta = {"sae": {"site": site}}
        self.d_sae = 24

    def feature(self, f: int) -> dict:
        return {"lens_top_tokens": ["a", EVIL, "c", "d", "e", "f"], "label": None}


def test_graph_api_links_features_and_saves_views(run_dir, tmp_path):
    shutil.copytree(run_dir / "g1", tmp_path / "g1")  # the served copy stays unpinned
    run_dir = tmp_path
    graphs = {"g1": run_dir / "g1"}
    doc = graph_doc(graphs, {"tc1": _Index("mlp_in.1")}, "g1")
    feats = [n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert feats
    for n in feats:
        layer = int(n["node_id"].split("_")[0])
        assert ("href" in n) == (layer == 1)
        if layer == 1:
            assert n["href"] == f"/sae/tc1/feature/{n['feature_index']}"
            assert n["top_tokens"] == ["a", EVIL, "c", "d", "e"]
    ids = [n["node_id"] for n in doc["nodes"]][:3]
    assert save_view(graphs, "g1", {"pinnedIds": ids, "supernodes": [["group", *ids[:2]]]})["saved"]
    saved = json.loads((run_dir / "g1" / "neuronpedia.json").read_text())["qParams"]
    assert saved["pinnedIds"] == ids and saved["supernodes"] == [["group", *ids[:2]]]
    for bad in ({"pinnedIds": ["nope"]}, {"supernodes": [["x"]]}, {"other": 1},
                {"supernodes": [["", ids[0]]]}):
        with pytest.raises(HttpError):
            save_view(graphs, "g1", bad)
    with pytest.raises(HttpError):
        graph_doc(graphs, {}, "missing")


@pytest.fixture(scope="module")
def base_url(run_dir):
    with served(run_dir) as url:
        yield url


def test_graph_routes_without_feature_index(base_url):
    with urllib.request.urlopen(base_url + "/api/graphs") as r:
        listed = json.loads(r.read())
    assert [g["name"] for g in listed] == ["g1"]
    with urllib.request.urlopen(base_url + "/graph/g1") as r:
        assert b"graph.js" in r.read()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base_url + "/api/graphs/nope")
    assert err.value.code == 404


browser = pytest.mark.skipif(CHROMIUM is None, reason=NO_BROWSER)


@pytest.mark.slow
@browser
def test_graph_page_in_chromium(base_url, run_dir):
    pytest.importorskip("playwright.sync_api")
    with chromium_page(1300, 900) as page:
        page.goto(base_url + "/graph")
        page.click("#graphs a")
        page.wait_for_selector("#full svg .node")
        doc = json.loads((run_dir / "g1" / "neuronpedia.json").read_text())
        assert page.locator("#full svg .node").count() == len(doc["nodes"])
        assert page.locator("#full svg line").count() == len(doc["links"])
        widths = {float(w) for w in page.eval_on_selector_all(
            "#full svg line", "ls => ls.map(l => l.getAttribute('stroke-width'))")}
        assert len(widths) > 1  # width follows the weight
        assert EVIL in page.inner_text("#prompt")  # model text is text
        assert page.locator("main img").count() == 0
        page.hover("#full svg .node.feature >> nth=0")
        assert page.is_visible("#hover") and "cross layer transcoder" in page.inner_text("#hover")
        page.select_option("#mode", "pin")
        page.click("#full svg .node.feature >> nth=0")
        page.click("#full svg .node.embedding >> nth=0")
        assert page.locator("#pinned li").count() == 2
        assert page.locator("#subgraph svg .node").count() == 2
        page.check("#pinned li input >> nth=0")
        page.check("#pinned li input >> nth=1")
        page.fill("#super-label", "my group")
        page.click("#group")
        assert "my group" in page.inner_text("#supernodes")
        page.click("#save")
        page.wait_for_selector("#status:has-text('saved')")
        screenshot(page, "browser-graph")
        saved = json.loads((run_dir / "g1" / "neuronpedia.json").read_text())["qParams"]
        assert len(saved["pinnedIds"]) == 2 and saved["supernodes"][0][0] == "my group"
        page.reload()
        page.wait_for_selector("#subgraph svg .node")
        assert page.locator("#pinned li").count() == 2  # the saved view comes back
        assert page.dialogs == []
