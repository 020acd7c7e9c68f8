"""Figures for reports, as PNG bytes (or data URIs for self-contained HTML).

Drawn with matplotlib's object API on the Agg canvas, never pyplot: pyplot keeps
global figure state (leaks in a long-running server) and may pick a GUI backend,
while a bare `Figure` needs no display and is freed when it goes out of scope.
Inputs are plain numbers and arrays (no torch), so reports render from run
folders on machines without the model.

    png = histogram(edges, counts, title="log10 feature density", xlabel="log10 density")
    '<img src="%s">' % data_uri(png)
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SIZE = (6.0, 3.2)  # inches; at DPI 100 a figure is ~20-40 kB
DPI = 100
COLOR = "#3b6ea5"
ACCENT = "#c0504d"


def new_figure(size: tuple[float, float] = SIZE) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def histogram(edges: Sequence[float], counts: Sequence[float], *, title: str, xlabel: str,
              ylabel: str = "count", log_y: bool = False, note: str | None = None,
              marker: float | None = None, marker_label: str | None = None) -> bytes:
    """A pre-binned histogram (len(edges) == len(counts) + 1), with an optional vertical marker."""
    edges, counts = np.asarray(edges, dtype=float), np.asarray(counts, dtype=float)
    if len(edges) != len(counts) + 1:
        raise ValueError(f"histogram: {len(edges)} edges for {len(counts)} counts; "
                         "expected one more edge than counts")
    fig = new_figure()
    ax = fig.add_subplot()
    ax.stairs(counts, edges, fill=True, color=COLOR, alpha=0.85)
    if marker is not None:
        ax.axvline(marker, color=ACCENT, linestyle="--", linewidth=1, label=marker_label)
        if marker_label:
            ax.legend(frameon=False, fontsize=8)
    if log_y and counts.max(initial=0) > 0:
        ax.set_yscale("symlog", linthresh=1)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if note:
        ax.text(0.99, 0.97, note, transform=ax.transAxes, ha="right", va="top", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return to_png(fig)


def point_chart(labels: Sequence[str], values: Sequence[float], *, title: str, ylabel: str,
                intervals: Sequence[tuple[float, float] | None] | None = None) -> bytes:
    """Points with optional (low, high) whiskers (None = none for that point).

    Points rather than bars: the values differ by small amounts on a large base
    (CE 3.10 vs 3.12 nats), which a zoomed axis shows and a bar from 0 hides, and a
    bar that does not start at 0 would mislead.
    """
    values = np.asarray(values, dtype=float)
    fig = new_figure()
    ax = fig.add_subplot()
    x = np.arange(len(values))
    if intervals is not None:
        lo = [v - iv[0] if iv else 0.0 for v, iv in zip(values, intervals, strict=True)]
        hi = [iv[1] - v if iv else 0.0 for v, iv in zip(values, intervals, strict=True)]
        ax.errorbar(x, values, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], fmt="none",
                    ecolor="black", capsize=4, linewidth=1)
    ax.plot(x, values, "o", color=COLOR, markersize=7)
    for xi, v in zip(x, values, strict=True):
        ax.annotate(f"{v:.4g}", (xi, v), ha="left", va="bottom", fontsize=8,
                    xytext=(6, 2), textcoords="offset points")
    ax.set_xticks(x, list(labels))
    ax.set_xlim(-0.5, len(values) - 0.5)
    ax.set(title=title, ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    return to_png(fig)
