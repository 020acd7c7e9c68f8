"""Self-contained HTML pages: inline CSS, images as data URIs, no scripts, no network.

Everything that comes from data (SAE names, metadata, corpus text, notes) goes
through `esc` (html.escape with quotes), so a feature label or a file name like
``<script>`` shows as text. Only `Markup` - HTML this module or a caller built
from escaped parts - passes through unescaped.

    body = section("Summary", table([["L0", 31.9]], header=["metric", "value"]))
    write_page(path, page("eval of my SAE", body))
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from saelab.report.plots import data_uri

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1100px;
color:#1d232b;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #dde}
.sub{color:#5a6270;margin-top:0}
table{border-collapse:collapse;margin:.6em 0}
th,td{padding:.25em .8em;border-bottom:1px solid #e6e8ee;text-align:left;vertical-align:top}
th{background:#f4f6fa;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.def{color:#5a6270;font-size:.9em}
.figs{display:flex;flex-wrap:wrap;gap:1em}.figs img{max-width:100%;border:1px solid #e6e8ee}
.note{background:#fff8e1;border-left:3px solid #e0a800;padding:.4em .8em;margin:.4em 0}
code{background:#f4f6fa;padding:0 .2em}
"""


class Markup(str):
    """HTML that is already safe: built by this module or from escaped parts."""


def esc(value: object) -> Markup:
    """Escape anything for HTML text or attribute values (Markup passes unchanged)."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def fmt(value: object, digits: int = 4) -> str:
    """Numbers to short text: 4 significant digits, ints with separators, None/NaN as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}g}"
    return str(value)


def table(rows: Iterable[Sequence[object]], header: Sequence[str] | None = None) -> Markup:
    """A table; numbers are right-aligned and formatted with `fmt`, text is escaped."""
    parts = ["<table>"]
    if header:
        parts.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for cell in row:
            numeric = isinstance(cell, int | float) and not isinstance(cell, bool)
            text = esc(fmt(cell)) if not isinstance(cell, Markup) else cell
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return Markup("".join(parts))


def key_values(mapping: Mapping[str, object]) -> Markup:
    """A two-column table of a flat mapping."""
    return table([[Markup(f"<code>{esc(k)}</code>"), v] for k, v in mapping.items()])


def image(png: bytes, alt: str) -> Markup:
    return Markup(f'<img src="{data_uri(png)}" alt="{esc(alt)}">')


def figures(*images: Markup) -> Markup:
    return Markup('<div class="figs">' + "".join(images) + "</div>")


def notes(texts: Iterable[str]) -> Markup:
    return Markup("".join(f'<p class="note">{esc(t)}</p>' for t in texts))


def paragraph(text: str, cls: str | None = None) -> Markup:
    attr = f' class="{esc(cls)}"' if cls else ""
    return Markup(f"<p{attr}>{esc(text)}</p>")


def section(title: str, *parts: Markup) -> Markup:
    return Markup(f"<h2>{esc(title)}</h2>" + "".join(parts))


def page(title: str, body: Markup, *, subtitle: str | None = None) -> str:
    """A complete HTML document with the CSS inline and nothing loaded from elsewhere."""
    sub = f'<p class="sub">{esc(subtitle)}</p>' if subtitle else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head>"
            f"<body><h1>{esc(title)}</h1>{sub}{body}</body></html>\n")


def write_page(path: str | os.PathLike, text: str) -> Path:
    """Write atomically (temp file + rename): a reader never sees half a page."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
