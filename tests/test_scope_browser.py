"""The browser on a scope folder, in Chromium (Playwright, as test_features_browser.py):
the index page with its pickers, metrics table and metric-vs-depth plot, a missing SAE
and a corrupt one shown as such, search across the whole scope, steering with a scope SAE.

The scope is the tiny one of tiny_scope.py (tiny llama, 6 random SAEs): seconds, no
embedded model.
"""

import json
import shutil

import pytest
from browser_kit import CHROMIUM, EVIL, NO_BROWSER, chromium_page, screenshot, served
from tiny_scope import make_tiny_scope

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=NO_BROWSER)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                               "(.venv/bin/pip install playwright)")

MISSING = "mlp_out/layer_1/width_64/average_l0_4"
CORRUPT = "attn_out/layer_0/width_64/average_l0_4"


@pytest.fixture(scope="module")
def scope_dir(tmp_path_factory):
    scope = make_tiny_scope(tmp_path_factory.mktemp("scope_browser"))
    entries = {e["id"]: e for e in json.loads((scope / "scope.json").read_text())["saes"]}
    shutil.rmtree(scope / entries[MISSING]["native"])  # deleted: "missing"
    weights = scope / entries[CORRUPT]["native"] / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short: "corrupt"
    return scope


@pytest.fixture(scope="module")
def base_url(scope_dir):
    with served(scope_dir) as url:
        yield url


@pytest.fixture(scope="module")
def page():
    with chromium_page() as pg:
        yield pg


def shot(page, name):
    screenshot(page, f"scope-{name}")


def test_index_pickers_plot_and_missing(page, base_url):
    page.goto(base_url + "/")
    page.wait_for_selector("#scope-table tr td")
    rows = page.locator("#scope-table tr")
    assert rows.count() == 1 + 6
    missing_row = page.locator(f'#scope-table tr[data-id="{MISSING}"]')
    assert "missing" in missing_row.inner_text() and "missing" in missing_row.get_attribute("class")
    assert "corrupt" in page.locator(f'#scope-table tr[data-id="{CORRUPT}"]').inner_text()
    assert MISSING in page.inner_text("#scope-missing") and CORRUPT in page.inner_text("#scope-missing")
    # one line per site kind, a point per layer
    assert page.locator("#depth-plot polyline.series").count() == 3
    assert page.locator("#depth-plot circle").count() == 6
    page.select_option("#pick-kind", "resid_post")
    assert page.locator("#scope-table tr").count() == 1 + 2
    assert page.locator("#depth-plot polyline.series").count() == 1
    page.select_option("#pick-layer", "1")
    assert page.locator("#scope-table tr").count() == 1 + 1
    page.select_option("#pick-l0", "4")  # the target L0
    assert page.locator("#scope-table tr").count() == 1 + 1
    assert "null" not in page.inner_text("#main")
    page.select_option("#plot-metric", "kl")
    assert "kl" in page.locator("#depth-plot circle title").first.text_content()
    shot(page, "index")
    # the feature pages of a scope SAE are the ordinary ones
    page.click('#scope-table tr[data-id="resid_post/layer_1/width_64/average_l0_4"] td a')
    page.wait_for_selector("#features tr td a")
    assert "resid_post.1" in page.inner_text("#metrics")
    page.click("#features tr:nth-child(2) td a")
    page.wait_for_selector("#feature-title")
    assert page.dialogs == []


def test_search_across_the_scope(page, base_url):
    page.goto(base_url + "/scope/search")
    page.fill("#scope-search-text", "The cat sat. " + EVIL)
    page.click("#scope-search-go")
    page.wait_for_selector("#scope-hits tr td", timeout=120_000)
    tokens = page.inner_text("#scope-tokens")
    assert "c" in tokens and "<" in tokens  # model text shown as text, never run
    assert page.locator("#scope-search-results img").count() == 0
    # four SAEs searched (one missing, one corrupt, both named), one row each
    assert page.locator("#scope-hits tr").count() == 1 + 4
    unavailable = page.inner_text("#scope-unavailable")
    assert MISSING in unavailable and CORRUPT in unavailable
    page.click("#scope-tokens .tok >> nth=2")
    row = page.locator('#scope-hits tr[data-id="resid_post/layer_0/width_64/average_l0_4"]')
    assert row.locator("a").count() >= 1  # top-k SAE: k features fire on every token
    shot(page, "search")
    row.locator("a").first.click()
    page.wait_for_selector("#feature-title")
    assert page.inner_text("#feature-title").startswith("Feature ")
    assert page.dialogs == []


def test_steer_with_a_scope_sae(page, base_url):
    sae = "mlp_out/layer_0/width_64/average_l0_4"
    page.goto(f"{base_url}/scope/steer?sae={sae}&feature=5")
    page.wait_for_selector("#scope-steer-sae")
    assert page.input_value("#scope-steer-sae") == sae
    assert page.input_value("#steer-feature") == "5"
    page.uncheck("#steer-chat")  # the tiny tokenizer has no chat template
    page.fill("#steer-tokens", "8")
    page.fill("#steer-strength", "20")
    page.click("#steer-go")
    page.wait_for_selector("#steer-steered", timeout=120_000)
    assert page.inner_text("#steer-plain") != page.inner_text("#steer-steered")
    shot(page, "steer")
