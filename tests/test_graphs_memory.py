"""Graph stages that run over every stored row allocate no temporary of the store's or R's size.

Measured as the process's peak resident memory (Linux: VmHWM, reset through
/proc/self/clear_refs) above what it held before the call; skipped where that
cannot be reset. The sizes (tens of MB) dwarf the interpreter's own noise.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from saelab.graphs import rows as rows_module
from saelab.graphs.influence import Layout, prune
from saelab.graphs.rows import RowStore


def _kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _peak_growth(fn) -> int:
    """Bytes of resident memory `fn()` needed above what the process held before it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident memory")
    base = _kb("VmRSS")
    fn()
    return (_kb("VmHWM") - base) * 1024


def test_row_store_passes_over_all_rows_are_chunked(monkeypatch):
    monkeypatch.setattr(rows_module, "_CHUNK_ELEMS", 1 << 18)
    n_rows, n_feat, k = 1000, 40_000, 16_384
    store = RowStore(n_rows, n_feat, 8, budget=n_rows * k * 8)
    assert not store.exact and store.k == k
    g = torch.Generator().manual_seed(0)
    for _ in range(n_rows // 100):
        store.add(torch.randn(100, n_feat, generator=g), torch.randn(100, 8, generator=g))
    part = store.val.numel() * 4  # 64 MB, as much again in store.idx
    first = torch.rand(n_rows, generator=g)
    no_feature = torch.full((n_rows,), -1)
    # The old code held a long copy of every index (2 x part) and two float copies of the values.
    grown = _peak_growth(lambda: store.feature_influence(first, no_feature))
    assert grown < part / 4, grown
    selected = torch.arange(0, n_feat, 8)
    out_bytes = n_rows * len(selected) * 4
    grown = _peak_growth(lambda: store.feature_columns(torch.arange(n_rows), selected))
    assert grown < out_bytes + part / 4, grown
    # Chunking changes nothing in the results.
    dense = torch.zeros(n_rows, n_feat)
    dense.scatter_(1, store.idx.long(), store.val)
    w = first / store.abs_sum.float()
    torch.testing.assert_close(store.feature_influence(first, no_feature), w @ dense.abs(),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(store.feature_columns(torch.arange(n_rows), selected),
                               dense[:, selected])


def test_prune_holds_one_copy_of_the_adjacency():
    # Features read only errors and tokens; the target reads ten features strongly, so node
    # pruning drops almost every row and the edge threshold works on a nearly empty matrix.
    n_f, n_e, n_tok = 3000, 12_000, 1000
    lay = Layout(n_f, n_e, n_tok, 1)
    g = torch.Generator().manual_seed(0)
    R = torch.zeros(n_f + 1, lay.n_cols)
    R[:n_f, n_f:] = torch.rand(n_f, n_e + n_tok, generator=g)
    R[n_f, :n_f] = 1e-6
    R[n_f, :10] = 1.0
    size = R.numel() * 4  # 192 MB
    # The old code multiplied a float copy of R by two masks: two copies at once.
    grown = _peak_growth(lambda: prune(R, lay, torch.ones(1)))
    assert grown < 1.75 * size, grown
    kept = prune(R, lay, torch.ones(1))
    assert kept.node_mask[:10].all() and not kept.node_mask[10:n_f].any()
