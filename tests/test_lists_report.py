"""The list study's maps and report: matrices by hand, clustering, PNGs, escaping."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
import torch

from saelab.attribution.result import Attribution, SiteAttribution
from saelab.studies.lists_maps import (
    attribution_matrix,
    cluster_order,
    clustered_heatmap,
    feature_density,
    feature_matrix,
    minmax_rows,
    top_features,
)
from saelab.studies.lists_report import render_report, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert(1)</script>"

# (example, position, feature, act, value), sorted by example then position as attribute() writes them
ENTRIES = [
    (0, 0, 1, 9.0, 5.0),  # position 0: skipped by default
    (0, 1, 1, 2.0, 1.0),
    (0, 1, 2, 1.0, -2.0),  # negative: never a "top" pair
    (0, 2, 1, 3.0, 0.5),
    (0, 2, 3, 4.0, 3.0),
    (1, 1, 2, 5.0, 2.0),
    (1, 3, 1, 1.0, 0.2),
    (2, 0, 3, 7.0, 4.0),  # example 2 has nothing after position 0
]


@pytest.fixture
def attr() -> Attribution:
    index = torch.tensor([e[:3] for e in ENTRIES], dtype=torch.long)
    act = torch.tensor([e[3] for e in ENTRIES])
    value = torch.tensor([e[4] for e in ENTRIES])
    site = SiteAttribution("resid_post.1", 8, index, act, value, torch.zeros(3, 4))
    return Attribution({"resid_post.1": site}, [[0] * 4] * 3, torch.zeros(3), "grad")


def test_feature_matrix_is_max_activation_after_skip(attr):
    m = feature_matrix(attr, "resid_post.1", [1, 2, 3])
    np.testing.assert_allclose(m, [[3, 1, 0],  # max(2, 3), not 9 (position 0) nor 5 (sum)
                                   [1, 5, 0],
                                   [4, 0, 0]])  # example 2's activation 7 is at position 0
    m0 = feature_matrix(attr, "resid_post.1", [3, 1], skip_first=0)
    np.testing.assert_allclose(m0, [[4, 0, 7], [9, 1, 0]])  # rows follow the order asked for
    assert feature_matrix(attr, "resid_post.1", []).shape == (0, 3)
    with pytest.raises(ValueError, match="distinct"):
        feature_matrix(attr, "resid_post.1", [1, 1])
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        feature_matrix(attr, "resid_post.1", [8])


def test_attribution_matrix_sums_values(attr):
    m = attribution_matrix(attr, "resid_post.1", [1, 2, 3])
    np.testing.assert_allclose(m, [[1.5, 0.2, 0], [-2, 2, 0], [3, 0, 0]])
    m0 = attribution_matrix(attr, "resid_post.1", [1, 3], skip_first=0)
    np.testing.assert_allclose(m0, [[6.5, 0.2, 0], [3, 0, 4]])


def test_top_features_counts_examples_then_sums(attr):
    site = "resid_post.1"
    # k=1: example 0's best pair after position 0 is f3 (3.0), example 1's is f2 (2.0)
    assert top_features(attr, site, 1) == [(3, 1, 3.0), (2, 1, 2.0)]
    # k=2 adds f1 in both examples: 2 examples beats a larger sum in 1
    out = top_features(attr, site, 2)
    assert [f for f, _, _ in out] == [1, 3, 2]
    assert out[0][1] == 2 and out[0][2] == pytest.approx(1.2)
    # k=3: f1 holds two of example 0's pairs; it counts once there but sums both
    f1 = top_features(attr, site, 3)[0]
    assert f1[:2] == (1, 2) and f1[2] == pytest.approx(1.7)
    # position 0 allowed: f1's 5.0 and f3's 4.0 become the best pairs
    assert top_features(attr, site, 1, skip_first=0) == [(1, 1, 5.0), (3, 1, 4.0), (2, 1, 2.0)]
    assert top_features(attr, site, 2, limit=1)[0][0] == 1
    assert top_features(attr, site, 1, skip_first=10) == []
    # dense features left out before ranking: without f1, k=2 keeps f3 (example 0) and f2 (example 1)
    assert top_features(attr, site, 2, exclude={1}) == [(3, 1, 3.0), (2, 1, 2.0)]


def test_feature_density_is_the_firing_fraction_after_skip(attr):
    # 3 examples x 4 tokens; positions >= 1: 9. f1 at (0,1) (0,2) (1,3); f2 at (0,1) (1,1);
    # f3 at (0,2) only (its (2,0) is position 0)
    np.testing.assert_allclose(feature_density(attr, "resid_post.1"),
                               [0, 3 / 9, 2 / 9, 1 / 9, 0, 0, 0, 0])
    np.testing.assert_allclose(feature_density(attr, "resid_post.1", skip_first=0)[[1, 3]],
                               [4 / 12, 2 / 12])


def test_minmax_rows():
    m = minmax_rows(np.array([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0], [-2.0, 0.0, 2.0]]))
    np.testing.assert_allclose(m, [[0, 1, 0.5], [0, 0, 0], [0, 0.5, 1]])
    assert minmax_rows(np.zeros((2, 0))).shape == (2, 0)


def _contiguous(order: np.ndarray, members: set[int]) -> bool:
    where = sorted(np.flatnonzero(np.isin(order, list(members))).tolist())
    return where == list(range(where[0], where[0] + len(members)))


def test_cluster_order_groups_separate_clusters():
    rng = np.random.default_rng(0)
    # rows 0, 2, 4 fire on columns 0, 2, 4, 6; rows 1, 3, 5 on columns 1, 3, 5, 7: interleaved on purpose
    m = np.zeros((6, 8))
    for r in range(6):
        m[r, r % 2::2] = 5 + rng.random(4)
    m += rng.random(m.shape) * 0.1
    rows, cols = cluster_order(m)
    assert sorted(rows.tolist()) == list(range(6)) and sorted(cols.tolist()) == list(range(8))
    assert _contiguous(rows, {0, 2, 4}) and _contiguous(rows, {1, 3, 5})
    assert _contiguous(cols, {0, 2, 4, 6}) and _contiguous(cols, {1, 3, 5, 7})
    # rows are min-max scaled before clustering: a per-feature scale and offset changes nothing
    noise = rng.random((6, 8))
    scale, shift = np.array([[1], [100], [0.01], [7], [3], [0.5]]), np.arange(6)[:, None]
    ra, ca = cluster_order(noise)
    rb, cb = cluster_order(noise * scale + shift)
    assert ra.tolist() == rb.tolist() and ca.tolist() == cb.tolist()
    r1, c1 = cluster_order(m[:1])
    assert r1.tolist() == [0] and sorted(c1.tolist()) == list(range(8))
    r2, c2 = cluster_order(m[:, :1])
    assert c2.tolist() == [0] and sorted(r2.tolist()) == list(range(6))


@pytest.mark.parametrize("shape", [(12, 20), (1, 20), (12, 1), (30, 60)])
def test_heatmaps_are_pngs(shape):
    rng = np.random.default_rng(1)
    m = rng.exponential(size=shape) * (rng.random(shape) < 0.5)
    feats = [f"f{i}" for i in range(shape[0])]
    examples = [f"{EVIL} #{i}" for i in range(shape[1])]
    groups = [("short", "long", "plain")[i % 3] for i in range(shape[1])]
    assert clustered_heatmap(m, feats, examples, groups, title=EVIL).startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="expected"):
        clustered_heatmap(m, feats[:-1] or ["x", "y"], examples, groups, title="t")


# ---------------------------------------------------------------- report


def _stat(mean, var=0.5, ci=(-0.1, 0.9), n=5) -> dict:
    return {"mean": mean, "var": var, "ci95": list(ci) if ci else None, "n": n}


def _results(out) -> dict:
    (out / "maps").mkdir(parents=True)
    m = np.random.default_rng(0).random((4, 6))
    (out / "maps" / "s_clustered.png").write_bytes(
        clustered_heatmap(m, list("abcd"), list("uvwxyz"), ["short", "long"] * 3, title="c"))
    cond = {"n_items": _stat(1.5), "distinct_items": _stat(0.75, ci=(0.25, 1.25)),
            "diversity": _stat(0.2, var=None, ci=None, n=1), "embed_diversity": None}
    return {
        "model": "smollm2-135m-instruct", "preset": "quick", "out": str(out),
        "config": {"topics": [EVIL], "samples": 2, "max_density": 0.1},
        "seconds": {"dataset": 1.5, "attribution": 3.0},
        "dataset": {"n": 6, "samples": 1,
                    "templates": {"short": _stat(3.0), "long": _stat(7.0), "plain": _stat(float("nan"))},
                    "distinct": {"short": _stat(2.5), "long": _stat(4.0)},
                    "caps": {"short": {"lists": 2, "cap_hits": 0, "token_limit": 100},
                             "long": {"lists": 2, "cap_hits": 2, "token_limit": 300}},
                    "contrast": {"name": "long - short", **_stat(4.0), "distinct": _stat(1.5),
                                 "censored_pairs": 2, "uncensored": _stat(None, ci=None, n=0)},
                    "endings": {"short": {"end_of_turn": 2, "length": 0}, "long": {"end_of_turn": 1}}},
        "metric": {"name": "end_of_turn", "reason": "no whitespace token before line breaks",
                   "tokens": {"whitespace": None, "line_break": "'\\n'", "end_of_turn": "'<|im_end|>'"},
                   "values": {"end_of_turn": {"mean": 1.2, "ci95": [1.0, 1.4], "n": 6}}},
        "saes": {"s": {
            "site": "resid_post.1", "path": "/tmp/sae", "dashboard": "features/s/dashboard.html",
            "lists_dashboard": "features_lists/s/dashboard.html",
            "density": {"max_density": 0.1, "excluded": 3, "positions": "..."},
            "error_share": {"mean": 0.3, "ci95": [0.2, 0.4]},
            "top_features": [{"feature": 123, "examples": 4, "attribution": 2.5, "density": 0.049,
                              "corpus_density": 0.25,
                              "dashboard": "features/s/dashboard.html#f123",
                              "lists_dashboard": "features_lists/s/dashboard.html#f123"},
                             {"feature": 9, "examples": 1, "attribution": 0.1,
                              "dashboard": "javascript:alert(1)"}],
            "maps": {"clustered": "maps/s_clustered.png"},
            "ablation": {"n_examples": 6, "top_n": 5, "every_step": False, "token_limit": 100,
                         "cap_hits": {"control": 1, "top": 4, "random": 2}, "top": cond, "random": cond},
            "per_topic": {EVIL: {"top": cond, "random": cond}},
            "verdict": {"effective": False, "rule": "mean Δdistinct >= 1", "mean_delta_items": 1.5,
                        "mean_delta_distinct": 0.75,
                        "ci_excludes_zero": False, "beats_random": True}}},
        "examples": [{"sae": "s", "example": 0, "topic": EVIL, "template": "short",
                      "control": ["Paris", EVIL], "top": ["Paris", "Rome", "Oslo"], "random": []}],
    }


HEADINGS = ("Summary", "Dataset", "Metric", "SAE s", "Example lists", "Per-topic effects",
            "Feature browser", "Run")  # in this order: the finding first, timings and settings last


def test_report_is_escaped_and_complete(tmp_path):
    out = tmp_path / "run"
    path = write_report(_results(out), out)
    assert path == out / "report.html"
    html = path.read_text(encoding="utf-8")
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert re.findall(r"<h2>(.*?)</h2>", html) == list(HEADINGS)
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 2  # items per template, clustered map (the flat topic map is gone)
    assert all(base64.b64decode(b).startswith(PNG_MAGIC) for b in images)
    assert 'href="features/s/dashboard.html#f123"' in html
    assert "javascript:" not in html  # a non-relative link is shown as text only
    assert "Paris<br>&lt;script&gt;" in html and "Paris<br>Rome<br>Oslo" in html
    assert "saelab serve" in html
    summary = html.split("<h2>Summary</h2>")[1].split("<h2>")[0]
    # the verdict on distinct items with its interval, the cap hits, density and censoring
    assert "s: not effective" in summary
    assert "distinct items by 0.75 [0.25, 1.25]" in summary and "item count by 1.5 [-0.1, 0.9]" in summary
    assert "1 control, 4 top-N, 2 random-N of 6" in summary
    assert "f123, fires on 4.9% of the lists&#x27; tokens and on 25.0% of the corpus tokens" in summary
    assert "more than 10.0% of the lists" in summary
    assert "2 of 5 pairs hold a list cut off" in summary
    assert 'href="features_lists/s/dashboard.html#f123"' in html
    assert "2 of 2 (limit 300)" in html  # the long template's lists cut off, beside its counts
    text = re.sub(r"data:image/png;base64,[^\"]+", "", html)
    assert not re.search(r"\bnan\b|\bNone\b", text, re.IGNORECASE)  # missing numbers are dashes


def test_report_survives_missing_keys_and_foreign_paths(tmp_path):
    html = render_report({"model": "m"}, tmp_path)
    for heading in ("Dataset", "Metric", "Per-topic effects", "Example lists", "Run"):
        assert f"<h2>{heading}</h2>" in html
    (tmp_path / "secret.png").write_bytes(PNG_MAGIC + b"secret")
    out = tmp_path / "run"
    results = _results(out)
    results["saes"]["s"]["maps"] = {"clustered": "../secret.png"}
    html = render_report(results, out)
    assert "outside the run folder" in html
    results["saes"]["s"]["maps"] = {"clustered": "maps/missing.png"}
    html2 = render_report(results, out)
    assert "not found" in html2
    assert len(re.findall(r'src="data:image/png', html)) == 1  # only the template chart
