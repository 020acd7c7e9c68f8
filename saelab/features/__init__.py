"""Feature dashboards: collect examples and statistics for every feature, analyse, index.

    collect.py / state.py   one streaming pass (model or activation cache), mergeable across ranks
    summary.py              per-feature stats, histograms, top and binned examples
    logit_lens.py           decoder directions through the final norm and the unembedding
    neighbours.py           nearest features by decoder cosine
    token_ablation.py       how each earlier token moves a feature (ablated text)
    ablated_text.py         which examples get ablated text (top and uniform), as index rows
    index.py                the Parquet feature index (pyarrow only, no torch)
    build.py                all of the above for `saelab features`

Nothing is imported here, so `saelab.features.index` loads without torch.
"""
