"""A tiny scope folder for the browser and export tests: the tiny llama, saved so that the
server loads it by path, 2 layers x 3 site kinds of random SAEs saved natively, feature
indexes from `saelab.features`, and scope.json written with `write_scope`.

    scope_dir = make_tiny_scope(tmp_path)     # tmp_path/scope, model at tmp_path/model
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_lm import tiny_lm

SITE_KINDS = ("resid_post", "attn_out", "mlp_out")
LAYERS = (0, 1)
WIDTH = 64
K = 4


def saelab_app():
    from saelab.cli import app  # every stage's commands, registered on import

    return app


def scope_cli(model: Path, out: Path, *args: str):
    """`saelab scope --model MODEL --out OUT ARGS...` through typer's test runner."""
    from typer.testing import CliRunner

    return CliRunner().invoke(saelab_app(), ["scope", "--model", str(model), "--out", str(out),
                                             *args], env={"COLUMNS": "200"})


def save_tiny_llama(folder: Path, **config) -> Path:
    """The tiny llama (tiny_lm.py, `config` overriding its sizes) saved where a path loads it."""
    lm = tiny_lm("llama", **config)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def tiny_scope_saes(d_in: int = 32) -> dict[str, object]:
    """{site: random top-k SAE} for every site of the tiny scope (fixed seeds)."""
    from saelab.sae import SAEConfig, build_sae

    out = {}
    for i, (kind, layer) in enumerate((k, layer) for k in SITE_KINDS for layer in LAYERS):
        site = f"{kind}.{layer}"
        sae = build_sae(SAEConfig("topk", d_in, WIDTH, k=K, metadata={"site": site}))
        with torch.no_grad():
            g = torch.Generator().manual_seed(10 + i)
            sae.reset_parameters_(g)
            sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
            sae.b_enc.copy_(0.05 * torch.randn(WIDTH, generator=g))
        out[site] = sae.eval()
    return out


def make_tiny_scope(root: Path, *, features: bool = True) -> Path:
    """Build the scope under root/scope (the model under root/model); returns the scope folder."""
    from saelab.features.build import IndexConfig, build_index
    from saelab.sae import save_sae
    from saelab.scope.layout import Scope, ScopeEntry, scope_id, write_scope

    lm = tiny_lm("llama")
    model_dir, scope_dir = save_tiny_llama(root / "model"), root / "scope"
    entries, saes = [], {}
    for i, (site, sae) in enumerate(tiny_scope_saes().items()):
        kind, layer = site.split(".")
        label = f"{kind}__layer_{layer}__width_{WIDTH}__k_{K}"
        save_sae(sae, scope_dir / "native" / label)
        saes[label] = (sae, scope_dir / "native" / label)
        metrics = {"l0": float(K), "fvu": 0.1 + 0.05 * i, "delta_ce": 0.01 * (i + 1),
                   "loss_recovered": 0.9 - 0.01 * i, "kl": 0.02 * (i + 1),
                   "dead_frac": 0.0625 * (i % 3), "dense_frac": 0.0,
                   "fvu_lo": 0.05 + 0.05 * i, "fvu_hi": 0.15 + 0.05 * i}
        entries.append(ScopeEntry(
            id=scope_id(kind, int(layer), WIDTH, K), site=site, site_kind=kind, layer=int(layer),
            width=WIDTH, arch="topk", target_l0=K, average_l0=K, params=None,
            native=f"native/{label}", features=f"features/{label}" if features else None,
            metrics=metrics))
    if features:
        build_index(lm, saes, scope_dir / "features",
                    IndexConfig(tokens=512, context=32, batch_size=8, ablate=0, cards=0,
                                dashboard=False))
    write_scope(scope_dir, Scope(model=str(model_dir), model_hash="tiny-llama-0", d_model=32,
                                 n_layers=3, settings={"preset": "test"},
                                 stages={"train": 1.0, "eval": 0.5}, entries=entries))
    return scope_dir
