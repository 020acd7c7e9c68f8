"""The list study's "gene expression" maps: features x examples, clustered both ways.

    feats = [f for f, _, _ in top_features(attr, "resid_post.12", k_per_example=20)]
    m = feature_matrix(attr, "resid_post.12", feats)           # (F, E) max activation per list
    png = clustered_heatmap(m, [f"f{f}" for f in feats], names, templates, title="...")

Matrices are computed from the sparse `SiteAttribution` entries in one scatter
(no loop over entries); figures use the Agg `Figure` API as `saelab.report.plots`.
Position 0 is skipped by default: the first token (BOS) carries huge, topic-blind
activations that would swamp every row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy.cluster.hierarchy import dendrogram, leaves_list, linkage

from saelab.attribution.result import Attribution
from saelab.report.plots import new_figure, to_png

MAX_EXAMPLE_LABELS = 40  # above this, example tick labels overlap at any readable size
MAX_FEATURE_LABELS = 100


# ---------------------------------------------------------------- matrices


def _scatter(attr: Attribution, site: str, features: Sequence[int], skip_first: int,
             key: str, reduce: str) -> np.ndarray:
    s = attr.sites[site]
    feats = torch.as_tensor(list(features), dtype=torch.long)
    if feats.numel() != feats.unique().numel():
        raise ValueError(f"features must be distinct; got {list(features)}")
    if feats.numel() and (feats.min() < 0 or feats.max() >= s.d_sae):
        raise ValueError(f"features must be in [0, {s.d_sae}) for site {site}; got {list(features)}")
    row_of = torch.full((s.d_sae,), -1, dtype=torch.long)  # feature id -> matrix row
    row_of[feats] = torch.arange(feats.numel())
    rows = row_of[s.index[:, 2]]
    keep = (rows >= 0) & (s.index[:, 1] >= skip_first)
    flat = rows[keep] * attr.n_examples + s.index[keep, 0]  # (kept,) cell index in the (F, E) matrix
    out = torch.zeros(feats.numel() * attr.n_examples, dtype=torch.float64)
    # include_self=False: a cell no entry reaches stays 0 ("inactive"), even for negative values
    out.scatter_reduce_(0, flat, getattr(s, key)[keep].double(), reduce=reduce, include_self=False)
    return out.view(feats.numel(), attr.n_examples).numpy()


def feature_matrix(attr: Attribution, site: str, features: Sequence[int], *,
                   skip_first: int = 1) -> np.ndarray:
    """(F, E): per example, each feature's max activation over positions >= skip_first (0 if inactive)."""
    return _scatter(attr, site, features, skip_first, "act", "amax")


def attribution_matrix(attr: Attribution, site: str, features: Sequence[int], *,
                       skip_first: int = 1) -> np.ndarray:
    """(F, E): per example, each feature's attribution summed over positions >= skip_first."""
    return _scatter(attr, site, features, skip_first, "value", "sum")


def feature_density(attr: Attribution, site: str, skip_first: int = 1) -> np.ndarray:
    """(d_sae,) each feature's firing fraction over all examples' positions >= skip_first:
    active entries / positions (the attribution records every active feature)."""
    s = attr.sites[site]
    positions = sum(max(len(t) - skip_first, 0) for t in attr.tokens)
    keep = s.index[:, 1] >= skip_first
    counts = np.bincount(s.index[keep, 2].numpy(), minlength=s.d_sae)[:s.d_sae]
    return counts / max(positions, 1)


def top_features(attr: Attribution, site: str, k_per_example: int, *, skip_first: int = 1,
                 limit: int = 60, exclude: set[int] | None = None) -> list[tuple[int, int, float]]:
    """(feature, examples, summed attribution) over the examples' top-k positive pairs.

    Per example, the k (position, feature) pairs at positions >= skip_first with
    the largest positive attribution (those pushing the metric up, towards
    ending the list); a feature counts once per example however many of its
    positions are among them, and its sum runs over all of those pairs. Sorted
    by examples, then sum (then feature id, for a stable order); at most `limit`.
    Features in `exclude` (e.g. the dense ones) are left out before ranking.
    """
    s = attr.sites[site]
    index, value = s.index.numpy(), s.value.double().numpy()
    keep = (value > 0) & (index[:, 1] >= skip_first)
    if exclude:
        keep &= ~np.isin(index[:, 2], list(exclude))
    ex, feat, val = index[keep, 0], index[keep, 2], value[keep]
    order = np.lexsort((-val, ex))  # by example, then descending attribution
    ex, feat, val = ex[order], feat[order], val[order]
    starts = np.searchsorted(ex, ex, side="left")  # each entry's example run start
    top = (np.arange(ex.size) - starts) < k_per_example  # rank within its example
    ex, feat, val = ex[top], feat[top], val[top]
    if not feat.size:
        return []
    ids, inverse = np.unique(feat, return_inverse=True)
    sums = np.bincount(inverse, weights=val, minlength=ids.size)
    pairs = np.unique(np.stack([feat, ex]), axis=1)  # distinct (feature, example)
    counts = np.bincount(np.searchsorted(ids, pairs[0]), minlength=ids.size)
    best = np.lexsort((ids, -sums, -counts))[:limit]
    return [(int(ids[i]), int(counts[i]), float(sums[i])) for i in best]


def minmax_rows(m: np.ndarray) -> np.ndarray:
    """Scale each row to [0, 1]; a constant row becomes 0 (it carries no contrast)."""
    m = np.asarray(m, dtype=float)
    lo = m.min(axis=1, keepdims=True, initial=np.inf)  # initial: an empty row gives span -inf -> 0
    span = m.max(axis=1, keepdims=True, initial=-np.inf) - lo
    return np.divide(m - lo, span, out=np.zeros_like(m), where=span > 0)


# ---------------------------------------------------------------- clustering


def _linkages(m: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(min-max scaled m, row linkage, column linkage): average linkage on Euclidean
    distances; None for an axis with fewer than 2 entries (nothing to cluster)."""
    scaled = minmax_rows(m)
    z = [linkage(x, "average", metric="euclidean") if x.shape[0] >= 2 else None
         for x in (scaled, scaled.T)]
    return scaled, z[0], z[1]


def _leaves(z: np.ndarray | None, n: int) -> np.ndarray:
    return leaves_list(z) if z is not None else np.arange(n)


def cluster_order(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row order, column order) of the clustered map of `m` (min-max scaled per row first)."""
    m = np.asarray(m, dtype=float)
    _, z_rows, z_cols = _linkages(m)
    return _leaves(z_rows, m.shape[0]), _leaves(z_cols, m.shape[1])


def _check(matrix: np.ndarray, rows: int, cols: int, what: str) -> np.ndarray:
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape != (rows, cols) or not m.size:
        raise ValueError(f"{what}: matrix of shape {m.shape} for {rows} feature labels and "
                         f"{cols} examples; expected a non-empty ({rows}, {cols}) matrix")
    return m


def _dendrogram(ax, z: np.ndarray | None, *, top: bool) -> None:
    """Draw a dendrogram whose leaves sit at 0..n-1, aligned with the heat map's cells."""
    ax.set_axis_off()
    if z is None:
        return
    d = dendrogram(z, no_plot=True)
    # scipy puts leaf i at 10 i + 5; heights are the linkage distances
    segments = []
    for xs, ys in zip(d["icoord"], d["dcoord"], strict=True):
        leaf = (np.asarray(xs) - 5) / 10
        segments.append(np.column_stack([leaf, ys] if top else [ys, leaf]))
    ax.add_collection(LineCollection(segments, colors="#444", linewidths=0.6))
    n, height = len(d["leaves"]), max(float(z[:, 2].max()), 1e-12)
    if top:
        ax.set(xlim=(-0.5, n - 0.5), ylim=(0, height * 1.05))
    else:  # root on the left, leaves next to the map; row 0 at the top like the map
        ax.set(xlim=(height * 1.05, 0), ylim=(n - 0.5, -0.5))


def _size(rows: int, cols: int, extra_w: float, extra_h: float) -> tuple[float, float]:
    return (min(max(extra_w + 0.06 * cols, 6.0), 14.0), min(max(extra_h + 0.13 * rows, 3.5), 14.0))


def _label_rows(ax, labels: Sequence[str], order: np.ndarray, *, right: bool) -> None:
    if len(labels) > MAX_FEATURE_LABELS:
        ax.set_yticks([])
        return
    ax.set_yticks(np.arange(len(order)), [labels[i] for i in order], fontsize=6)
    if right:
        ax.yaxis.tick_right()
    ax.tick_params(axis="y", length=0, pad=1)


def clustered_heatmap(matrix: np.ndarray, feature_labels: Sequence[str],
                      example_labels: Sequence[str], example_groups: Sequence[str], *,
                      title: str) -> bytes:
    """PNG of the min-max scaled (F, E) matrix, rows and columns clustered, with dendrograms.

    A strip under the top dendrogram colours each example by its group (the
    template), so clusters of lists that share a template show at a glance.
    """
    m = _check(matrix, len(feature_labels), len(example_labels), "clustered_heatmap")
    if len(example_groups) != m.shape[1]:
        raise ValueError(f"clustered_heatmap: {len(example_groups)} example groups for "
                         f"{m.shape[1]} examples")
    scaled, z_rows, z_cols = _linkages(m)
    rows, cols = _leaves(z_rows, m.shape[0]), _leaves(z_cols, m.shape[1])

    fig: Figure = new_figure(_size(m.shape[0], m.shape[1], 4.0, 2.5))
    fig.get_layout_engine().set(w_pad=0.01, h_pad=0.01, wspace=0.005, hspace=0.005)
    grid = fig.add_gridspec(3, 3, width_ratios=[1.2, 8, 0.25], height_ratios=[1.2, 0.18, 8])
    heat = fig.add_subplot(grid[2, 1])
    im = heat.imshow(scaled[np.ix_(rows, cols)], aspect="auto", interpolation="nearest",
                     cmap="viridis", vmin=0, vmax=1)
    _label_rows(heat, feature_labels, rows, right=True)
    if len(cols) <= MAX_EXAMPLE_LABELS:
        heat.set_xticks(np.arange(len(cols)), [example_labels[i] for i in cols], rotation=90,
                        fontsize=6)
        heat.tick_params(axis="x", length=0, pad=1)
    else:
        heat.set_xticks([])
        heat.set_xlabel(f"{len(cols)} examples (clustered)", fontsize=8)
    _dendrogram(fig.add_subplot(grid[0, 1]), z_cols, top=True)
    _dendrogram(fig.add_subplot(grid[2, 0]), z_rows, top=False)

    groups = list(dict.fromkeys(example_groups))  # first-appearance order (short, long, plain)
    palette = colormaps["tab10"]
    colour = {g: palette(i % 10)[:3] for i, g in enumerate(groups)}
    strip = fig.add_subplot(grid[1, 1])
    strip.imshow(np.array([[colour[example_groups[i]] for i in cols]]), aspect="auto",
                 interpolation="nearest")
    strip.set_axis_off()
    legend = fig.add_subplot(grid[0, 0])
    legend.set_axis_off()
    legend.legend(handles=[Patch(color=colour[g], label=str(g)) for g in groups], loc="center",
                  fontsize=7, frameon=False, title="template", title_fontsize=7)
    bar = fig.colorbar(im, cax=fig.add_subplot(grid[2, 2]))
    bar.set_label("scaled per feature", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    return to_png(fig)
