"""Report pages: self-contained, escaped, rendered from JSON alone."""

from __future__ import annotations

import base64
import re
import subprocess
import sys

import pytest

from saelab.report import plots
from saelab.report.evals import render_compare, render_eval
from saelab.report.html import Markup, esc, fmt, page, section, table, write_page

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = '<script>alert("x")</script>'


def _eval_result(name: str = "resid_post.3") -> dict:
    return {
        "schema": "saelab.eval/1",
        "sae": {"architecture": "topk", "d_in": 32, "d_sae": 64, "site": name, "path": EVIL},
        "model": {"model": "tiny"},
        "data": {"corpus": EVIL, "tokens_evaluated": 1000, "n_contexts": 10},
        "settings": {"tokens": 1000},
        "metrics": {"fvu": {"value": 0.2, "ci95": [0.18, 0.22]},
                    "l0": {"value": 12.5, "ci95": None},
                    "ce_clean": {"value": 3.1, "ci95": [3.0, 3.2]},
                    "ce_sae": {"value": 3.3, "ci95": [3.2, 3.4]},
                    "ce_zero": {"value": 7.0, "ci95": [6.8, 7.2]},
                    "loss_recovered": {"value": None, "ci95": None}},
        "features": {"n_features": 64, "n_dead": 3, "dead_fraction": 3 / 64, "dense_fraction": 0.0,
                     "dense_threshold": 0.1,
                     "log10_density_histogram": {"edges": [-3, -2, -1, 0], "counts": [5, 30, 26]},
                     "l0_histogram": {"l0": [0, 1, 2], "counts": [1, 4, 2]},
                     "cosine_histogram": {"edges": [-1, 0, 1], "counts": [2, 98]}},
        "bootstrap": {"method_text": "resampled contexts"},
        "definitions": {"fvu": "Σ‖x − x̂‖² / Σ‖x − μ‖²"},
        "notes": [f"a note with {EVIL}"],
        "wall_time_s": 1.5,
    }


def test_escaping_of_script_strings():
    assert esc(EVIL) == "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"
    assert esc(Markup("<b>ok</b>")) == "<b>ok</b>"  # built HTML passes through
    html = page(EVIL, section(EVIL, table([[EVIL, 1.5]], header=[EVIL])), subtitle=EVIL)
    assert "<script" not in html and html.count("&lt;script&gt;") == 6  # <title>, h1, subtitle, h2, th, td


def test_eval_report_is_self_contained_and_escaped(tmp_path):
    html = render_eval(_eval_result())
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # no CDN, no remote anything
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 4  # density, L0, cosine, cross-entropy
    assert all(base64.b64decode(b).startswith(PNG_MAGIC) for b in images)
    assert "0.2" in html and "[0.18, 0.22]" in html and "Σ‖x − x̂‖²" in html
    path = write_page(tmp_path / "r" / "report.html", html)
    assert path.read_text(encoding="utf-8") == html


def test_compare_report():
    result = {"mcs": 0.8, "mcs_reverse": 0.7, "n_features_a": 4, "n_features_b": 8,
              "frac_above": {"0.5": 1.0, "0.9": 0.25}, "matching": {"mean_cos": 0.6, "n_pairs": 4,
                                                                  "frac_above": {"0.5": 0.5}},
              "max_cos_histogram": {"edges": [-1, 0, 1], "counts": [0, 4]},
              "a": {"path": EVIL}, "b": {"path": "b"}, "notes": [], "definitions": {}}
    html = render_compare(result)
    assert "<script" not in html and "data:image/png;base64," in html and "0.8" in html


def test_plots_return_png_bytes():
    png = plots.histogram([0, 1, 2], [3, 4], title="t", xlabel="x", log_y=True, marker=1.0,
                          marker_label="m", note="n")
    assert png.startswith(PNG_MAGIC)
    png = plots.point_chart(["a", "b"], [1.0, 2.0], title="t", ylabel="y",
                            intervals=[(0.9, 1.1), None])
    assert png.startswith(PNG_MAGIC)
    assert plots.data_uri(b"abc") == "data:image/png;base64,YWJj"
    with pytest.raises(ValueError, match="edges"):
        plots.histogram([0, 1], [1, 2], title="t", xlabel="x")


def test_fmt():
    assert fmt(None) == fmt(float("nan")) == "–"
    assert fmt(12345) == "12,345" and fmt(0.123456) == "0.1235" and fmt(True) == "yes"


def test_report_modules_do_not_import_torch():
    code = ("import sys, saelab.report.evals, saelab.report.plots, saelab.report.html; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
