"""The feature browser in a real browser: Playwright driving Debian's chromium, headless.

Set-up (Playwright's own browser download does not work offline):
    apt-get install -y chromium
    .venv/bin/pip install playwright
The run is made by `saelab features` on the embedded model with a small random SAE.
Screenshots are kept in test-artifacts/.
"""


import pytest
import typer
from browser_kit import CHROMIUM, EVIL, NO_BROWSER, chromium_page, screenshot, served
from typer.testing import CliRunner

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason=NO_BROWSER),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                               "(.venv/bin/pip install playwright)")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, embedded_lm):
    from saelab.features.commands import register
    from saelab.sae import save_sae
    from saelab.sae.testing import random_sae

    root = tmp_path_factory.mktemp("browser")
    sae = random_sae("topk", 576, 128, k=8, seed=3,
                     metadata={"site": "resid_post.3", "model_name": "smollm2-135m-instruct"})
    save_sae(sae, root / "saes" / "l3")
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps typer's subcommand dispatch
    result = CliRunner().invoke(app, ["features", str(root / "saes" / "l3"), "--tokens", "2048",
                                      "--context", "64", "--out", str(root / "run"),
                                      "--ablate", "4", "--cards", "8", "--top-k", "5",
                                      "--per-bin", "2"])
    assert result.exit_code == 0, result.output
    assert (root / "run" / "l3" / "dashboard.html").is_file()
    return root / "run"


@pytest.fixture(scope="module")
def base_url(run_dir):
    with served(run_dir) as url:
        yield url


@pytest.fixture(scope="module")
def page():
    with chromium_page() as pg:
        yield pg


def shot(page, name):
    screenshot(page, f"browser-{name}")


def test_sae_page_and_feature_page(page, base_url):
    page.goto(base_url + "/")
    page.click("text=l3")
    page.wait_for_selector("#features tr td a")
    assert "resid_post.3" in page.inner_text("#metrics")
    first = page.inner_text("#features tr:nth-child(2) td:first-child")
    shot(page, "sae")
    page.click("#features tr:nth-child(2) td a")
    page.wait_for_selector("#feature-title")
    assert page.inner_text("#feature-title") == f"Feature {first}"
    assert page.locator("#top-examples .ex").count() >= 1
    assert page.locator("#bin-examples .ex").count() >= 1
    assert page.locator("svg rect").count() >= 1  # histogram
    shot(page, "feature")


def test_prompt_search_links_to_features(page, base_url):
    page.goto(base_url + "/sae/l3/search")
    page.fill("#search-text", "The cat sat on the mat. " + EVIL)
    page.click("#search-go")
    page.wait_for_selector("#overall tr td a", timeout=120_000)
    tokens = page.inner_text("#search-tokens")
    assert "cat" in tokens and "onerror" in tokens  # model text shown as text
    assert page.locator("#search-results img").count() == 0
    page.click("#search-tokens .tok >> nth=2")
    page.wait_for_selector("#token-features a")
    shot(page, "search")
    page.click("#overall tr:nth-child(2) td a")
    page.wait_for_selector("#feature-title")
    assert page.inner_text("#feature-title").startswith("Feature ")
    assert page.dialogs == []


def test_steering_side_by_side(page, base_url):
    page.goto(base_url + "/sae/l3/steer?feature=5")
    assert page.input_value("#steer-feature") == "5"
    assert page.input_value("#steer-strength") == "0.25"  # the default, in site norms
    assert "site norms" in page.inner_text("#steer-unit")
    page.fill("#steer-tokens", "12")
    page.fill("#steer-strength", "2")
    page.click("#steer-go")
    page.wait_for_selector("#steer-steered", timeout=180_000)
    plain, steered = page.inner_text("#steer-plain"), page.inner_text("#steer-steered")
    assert plain.strip() and steered.strip()
    assert plain != steered  # a strong push along a feature changes the text
    assert "N = " in page.inner_text("#steer-results")  # the unit's size is shown
    shot(page, "steer")


def test_stored_ablated_text_of_top_and_uniform_examples(page, base_url, run_dir):
    from saelab.features.index import FeatureIndex

    index = FeatureIndex.open(run_dir / "l3")
    f = pq_rows(run_dir / "l3" / "ablation.parquet")[0]["feature"]
    rows = index.ablations(f)
    page.goto(f"{base_url}/sae/l3/feature/{f}")
    page.wait_for_selector("#ablation .ex")
    assert page.locator("#ablation .ablation-top").count() == 1
    n_bins = sum(r["kind"] == "bin" for r in rows)
    assert n_bins >= 1 and page.locator("#ablation .ablation-bin").count() == n_bins
    labels = page.locator("#ablation .ablation-bin .a").all_inner_texts()
    assert [t.split()[:2] for t in labels] == [["bin", str(r["bin"])] for r in
                                               sorted(rows[1:], key=lambda r: -r["bin"])]
    page.click("#lens-filter summary")  # the logit lens's filter: rule and tokens left out
    filt = page.inner_text("#lens-filter")
    assert "standard deviations" in filt and "high_norm (" in filt
    shot(page, "ablation-stored")


def test_live_token_ablation(page, base_url, run_dir):
    from saelab.features.index import FeatureIndex

    index = FeatureIndex.open(run_dir / "l3")
    stored = {r["feature"] for r in pq_rows(run_dir / "l3" / "ablation.parquet")}
    f = next(r["feature"] for r in index.features.to_pylist() if r["count"] and r["feature"] not in stored)
    page.goto(f"{base_url}/sae/l3/feature/{f}")
    page.click("#ablate")
    page.wait_for_selector("#ablation .ex", timeout=120_000)
    assert "activation" in page.inner_text("#ablation")
    n_bins = len({e["bin"] for e in index.examples(f) if e["kind"] == "bin"})
    assert page.locator("#ablation .ablation-bin").count() == n_bins  # uniform examples too
    assert "window alone" in page.inner_text("#ablation")
    shot(page, "ablation")


def test_ablated_text_is_shown_as_text(page, tmp_path):
    """Every token of a tiny model's index is markup: the ablated text shows it, never runs it."""
    from tiny_lm import tiny_lm
    from tiny_models import tiny_sae

    from saelab.data.corpus import Corpus, load_corpus
    from saelab.features import build as build_mod
    from saelab.features.build import IndexConfig, build_index
    from saelab.features.collect import CollectConfig

    lm = tiny_lm("llama")
    sae = tiny_sae(lm.model, "resid_post.1", "topk", d_sae=24)
    corpus = Corpus.from_texts("head", [d for _, d in zip(range(30), load_corpus("builtin:stdlib"))])
    real = build_mod.decode_vocab
    build_mod.decode_vocab = lambda tok, ids: {int(i): f"{EVIL}{int(i)}" for i in ids}
    try:
        build_index(lm, {"tiny": (sae, None)}, tmp_path, IndexConfig(
            tokens=600, corpus=corpus, context=24, batch_size=8, ablate=1, cards=1, dashboard=False,
            collect=CollectConfig(top_k=2, n_bins=3, per_bin=1, left=4, right=2)))
    finally:
        build_mod.decode_vocab = real
    f = pq_rows(tmp_path / "tiny" / "ablation.parquet")[0]["feature"]
    with served(tmp_path) as url:
        page.goto(f"{url}/sae/tiny/feature/{f}")
        page.wait_for_selector("#ablation .ablation-bin")
        assert EVIL in page.inner_text("#ablation")  # the markup, as text
        assert page.locator("#ablation img").count() == 0 and page.dialogs == []


def pq_rows(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def test_bad_feature_shows_error(page, base_url):
    page.goto(base_url + "/sae/l3/feature/99999")
    page.wait_for_selector("#error")
    assert "does not exist" in page.inner_text("#error")


def test_static_dashboard_renders(page, run_dir):
    page.goto((run_dir / "l3" / "dashboard.html").as_uri())
    assert page.locator(".card").count() >= 1
    page.click("th.sort >> nth=1")  # sort by density
    shot(page, "dashboard")
    assert page.dialogs == []
